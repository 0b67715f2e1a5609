"""``python -m autolr_fast demo``: a small CNN on MNIST-1D with AutoLR and with cosine annealing.

The AutoLR run uses the controller shipped with the package (meta-trained on MNIST-1D by
``python -m autolr_fast meta-train --ship``), frozen and with its own gamma; cosine annealing
starts from 0.1. Same model, data order, optimizer (SGD, momentum 0.9, weight decay 5e-4).
Prints a table and writes ``demo.png`` and ``demo.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from tqdm import tqdm

from .pretrained import available_pretrained, load_pretrained
from .run_report import markdown_table, plot_runs, summarize
from .scheduler import AutoLR
from .tasks import get_task
from .training import Schedule, train


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autolr_fast demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="3 epochs")
    ap.add_argument("--out", default="results/demo")
    args = ap.parse_args(argv)
    epochs = 3 if args.quick else args.epochs
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if "mnist1d-cnn" not in available_pretrained():
        raise SystemExit("the package has no shipped controller 'mnist1d-cnn'; run `python -m autolr_fast meta-train --ship`")

    def autolr(model, task, steps, val):
        opt = _sgd(model)
        return opt, AutoLR(opt, load_pretrained("mnist1d-cnn"))

    def cosine(model, task, steps, val):
        opt = _sgd(model)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    task = get_task("mnist1d-cnn")
    os.makedirs(args.out, exist_ok=True)
    records = []
    with tqdm(total=2 * epochs, desc="demo", unit="epoch") as bar:
        for s in (Schedule("AutoLR (shipped controller)", autolr), Schedule("cosine from 0.1", cosine)):
            result, _, _ = train(task, s, epochs=epochs, seed=args.seed, progress=bar.update)
            records.append(result.to_json())
    table = markdown_table(summarize(records), f"MNIST-1D CNN, {epochs} epochs, seed {args.seed}")
    print(table)
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(records, f)
    plot_runs(records, os.path.join(args.out, "demo.png"), "MNIST-1D CNN: AutoLR vs cosine annealing")
    print(f"wrote {os.path.join(args.out, 'demo.png')} and demo.json")
    return 0
