"""find_anchor_lr before PyTorch Lightning: short trials on the optimizer configure_optimizers
builds, scored on held-out batches, choose the lr; configure_optimizers then builds fit()'s
optimizer at that lr and AutoLR anchors on it.

Run: python examples/lightning_find_anchor_lr.py [output_dir]   (CPU, a few seconds)
"""

import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autolr_fast import AutoLR, find_anchor_lr
from autolr_fast.integrations.lightning import AutoLRCallback

EPOCHS = 4


class TinyClassifier(pl.LightningModule):
    def __init__(self, lr=0.003):  # a guess: find_anchor_lr tries 0.1x to 10x of it
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        # only the optimizer: AutoLR is the scheduler
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(n=144, batch_size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :3].argmax(dim=1)
    train = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=batch_size, shuffle=True)
    held_out = DataLoader(TensorDataset(x[96:], y[96:]), batch_size=batch_size)  # the trials do not train on it
    return train, held_out


def find_anchor(module, train, held_out, total_steps):
    """Sets ``module.lr`` to the rate the trials choose; the weights and the RNG stay as they were."""
    found = find_anchor_lr(module, module.configure_optimizers(), nn.functional.cross_entropy, train, held_out,
                           total_steps=total_steps, progress=False)
    module.lr = found.lr  # what configure_optimizers builds fit()'s optimizer with
    return found


def main(out_dir="lightning_find_anchor_run"):
    torch.manual_seed(0)
    module = TinyClassifier()
    train, held_out = data()
    total_steps = EPOCHS * len(train)
    found = find_anchor(module, train, held_out, total_steps)
    print(found.table())
    autolr = AutoLRCallback(lambda opt: AutoLR(opt, total_steps=total_steps))
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, callbacks=[autolr], default_root_dir=out_dir,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, train)
    print(f"lr 0.003 -> {found.lr:g} ({found.cost_steps} trial steps); {autolr.scheduler.step_count} controller steps")
    return trainer, autolr, found


if __name__ == "__main__":
    main(*sys.argv[1:])
