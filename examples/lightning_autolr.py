"""AutoLR in PyTorch Lightning: gradient accumulation, bf16 autocast, checkpoint and resume.

Run: python examples/lightning_autolr.py [output_dir]   (CPU, a few seconds)
"""

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autolr_fast import AutoLR
from autolr_fast.integrations.lightning import AutoLRCallback


class TinyClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        # only the optimizer: AutoLR is the scheduler
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(n=96, batch_size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :3].argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)  # 12 micro-batches, 6 optimizer steps


def fit(out_dir, max_epochs, ckpt_path=None, callbacks=(), module=TinyClassifier):
    """Train (or resume from ``ckpt_path``) up to ``max_epochs``; returns the AutoLR callback."""
    autolr = AutoLRCallback(lambda opt: AutoLR(opt))  # the shipped controller, scaled to the optimizer's lr
    every_epoch = ModelCheckpoint(dirpath=out_dir, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        accelerator="cpu",
        devices=1,
        callbacks=[autolr, *callbacks, every_epoch],
        default_root_dir=out_dir,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module(), loader(), ckpt_path=ckpt_path)
    return autolr


def main(out_dir="lightning_autolr_run"):
    torch.manual_seed(0)
    first = fit(out_dir, max_epochs=4)
    print(f"4 epochs: {first.scheduler.step_count} optimizer steps, rate {float(first.scheduler.last_rate):.4f}")
    # a new Trainer resumes from the checkpoint written after epoch 2 and trains epochs 3 and 4 again
    resumed = fit(out_dir, max_epochs=4, ckpt_path=f"{out_dir}/epoch=1.ckpt")
    print(f"resumed: {resumed.scheduler.step_count} optimizer steps, rate {float(resumed.scheduler.last_rate):.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
