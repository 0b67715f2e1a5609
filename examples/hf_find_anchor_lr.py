"""find_anchor_lr before the Hugging Face Trainer: short trials on the Trainer's own optimizer and
training batches, scored on held-out batches, set the lr that AutoLR then anchors on.

Run: python examples/hf_find_anchor_lr.py [output_dir]   (CPU, a few seconds)
"""

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from autolr_fast import AutoLR, find_anchor_lr
from autolr_fast.integrations.huggingface import AutoLRTrainer

EPOCHS, BATCH = 3, 4


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(config)


def token_dataset(n, length=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, length), generator=g)
    ids[:, 1::2] = (ids[:, 0::2] + 1) % 64  # something to learn: every odd token follows its neighbour
    return [{"input_ids": row, "labels": row} for row in ids]


def make_trainer(out_dir, train_data, total_steps):
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
                             learning_rate=1e-3,  # a guess: find_anchor_lr tries 0.1x to 10x of it
                             save_strategy="no", logging_steps=1, report_to="none", use_cpu=True, seed=0,
                             disable_tqdm=True)
    return AutoLRTrainer(model=tiny_llama(), args=args, train_dataset=train_data,
                         autolr=lambda opt: AutoLR(opt, total_steps=total_steps))


def find_anchor(trainer, held_out, total_steps):
    optimizer = trainer.create_optimizer()  # the optimizer train() will use
    trainer.model.train()  # train() trains in train mode (dropout); from_pretrained returns eval mode
    val = [trainer.data_collator(held_out[i:i + BATCH]) for i in range(0, len(held_out), BATCH)]
    return find_anchor_lr(
        trainer.model, optimizer,
        loss_fn=lambda outputs, _: outputs.loss,  # the model computes its loss from the batch's labels
        train_batches=trainer.get_train_dataloader(), val_batches=val,
        unpack=lambda batch: (batch, None),  # a dict batch goes to the model as keyword arguments
        total_steps=total_steps, progress=False)


def main(out_dir="hf_find_anchor_run"):
    data = token_dataset(96)
    train_data, held_out = data[:64], data[64:]  # the trials are scored on samples they do not train on
    total_steps = EPOCHS * len(train_data) // BATCH
    trainer = make_trainer(out_dir, train_data, total_steps)
    found = find_anchor(trainer, held_out, total_steps)  # sets the optimizer's lr; restores the rest
    print(found.table())
    trainer.train()  # AutoLR anchors on found.lr
    print(f"lr {trainer.args.learning_rate:g} -> {found.lr:g} ({found.cost_steps} trial steps); "
          f"{trainer.autolr.step_count} controller steps")
    return trainer, found


if __name__ == "__main__":
    main(*sys.argv[1:])
