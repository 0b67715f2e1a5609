"""AutoLR with the Hugging Face Trainer: a tiny Llama built from a config (no download), gradient
accumulation, a checkpoint every 6 optimizer steps, and resume_from_checkpoint mid-epoch.

Run: python examples/hf_trainer_autolr.py [output_dir]   (CPU, a few seconds)
"""

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from autolr_fast import AutoLR
from autolr_fast.integrations.huggingface import AutoLRTrainer


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(config)


def token_dataset(n=64, length=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=g)
    ids[:, 1::2] = (ids[:, 0::2] + 1) % 64  # something to learn: every odd token follows its neighbour
    return [{"input_ids": row, "labels": row} for row in ids]


def make_trainer(out_dir, model=None, trainer_class=AutoLRTrainer):
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,  # 16 micro-batches per epoch, 8 optimizer steps
        num_train_epochs=3,
        learning_rate=1e-3,  # AdamW's lr: AutoLR starts there and the controller moves the rate from it
        save_steps=6,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return trainer_class(
        model=model if model is not None else tiny_llama(),
        args=args,
        train_dataset=token_dataset(),
        autolr=lambda opt: AutoLR(opt),  # the shipped controller, scaled to the optimizer's lr
    )


def main(out_dir="hf_autolr_run"):
    trainer = make_trainer(out_dir)
    trainer.train()
    print(f"{trainer.state.global_step} optimizer steps, {trainer.autolr.step_count} controller steps, "
          f"rate {trainer.autolr.get_last_lr()[0]:.2e}")
    # a new Trainer resumes from the checkpoint of step 12 (mid-epoch) and reaches the same rates
    resumed = make_trainer(out_dir)
    resumed.train(resume_from_checkpoint=f"{out_dir}/checkpoint-12")
    print(f"resumed: rate {resumed.autolr.get_last_lr()[0]:.2e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
