"""find_lr next to torch-lr-finder (``torch_lr_finder.LRFinder``) on one task, side by side.

The two answer different questions: torch-lr-finder runs ONE training run whose rate grows every
step (each point continues from the previous one; its suggestion is the steepest descent of the
curve); ``find_lr`` restores the same weights for every rate and trains ``h`` steps (its
suggestion is the minimum of the loss after ``h`` steps; ``steepest`` is the torch-lr-finder
rule on the same curve). The comparison test checks both run on the same model, data and rate
range and that their suggestions are in the same ballpark (within 1.5 decades); the benchmarks
time both. ``AUTOLR_BENCH_PLOT=path.png`` also writes both curves in one figure.

Run: ``python -m pytest bench/test_bench_lr_finder.py -q -s`` (prints a Markdown table).
"""

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from autolr_experiments.report import markdown_table, plt, save_figure
from autolr_experiments.tasks import get_task
from autolr_fast import find_lr

torch_lr_finder = pytest.importorskip("torch_lr_finder", reason="the torch-lr-finder package is not installed")

START, END, NUM, BATCH = 1e-5, 10.0, 60, 64


def _setup(seed=0):
    task = get_task("digits-mlp", seed=seed)
    torch.manual_seed(seed)
    model = task.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=START, momentum=0.9)
    batches = list(task.batches(BATCH, seed=seed, epochs=4))
    return task, model, opt, batches


def _run_theirs(task, model, opt, batches):
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])),
        batch_size=BATCH, shuffle=False)
    finder = torch_lr_finder.LRFinder(model, opt, nn.CrossEntropyLoss(), device="cpu")
    finder.range_test(loader, start_lr=START, end_lr=END, num_iter=NUM, step_mode="exp", diverge_th=5)
    rates, losses = finder.history["lr"], finder.history["loss"]
    finder.reset()
    # torch-lr-finder's plot() rule: steepest gradient after skipping 10 points at the start and 5 at the end
    r, loss = rates[10:-5], losses[10:-5]
    return rates, losses, float(r[int(np.gradient(np.array(loss)).argmin())])


def _run_ours(task, model, opt, batches, horizons=(1, 8)):
    return find_lr(model, opt, task.loss_fn, batches, start_lr=START, end_lr=END, num=NUM,
                   horizons=horizons, progress=False)


def test_side_by_side_same_ballpark():
    task, model, opt, batches = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    theirs_rates, theirs_losses, theirs = _run_theirs(task, model, opt, batches)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # their reset() restored
    ours = _run_ours(task, model, opt, batches)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    rows = [("torch-lr-finder (one growing-rate run, steepest)", theirs),
            ("find_lr h=1: minimum", ours.suggestions[1]), ("find_lr h=1: steepest", ours.steepest[1]),
            ("find_lr h=8: minimum", ours.suggestions[8]), ("find_lr h=8: steepest", ours.steepest[8])]
    table = [[name, f"{r:.3g}", f"{math.log10(r / theirs):+.2f}"] for name, r in rows]
    print("\n" + markdown_table(["finder", "suggested rate", "decades from torch-lr-finder"], table))
    for _, r in rows[1:]:
        assert math.isfinite(r) and abs(math.log10(r / theirs)) <= 1.5, rows
    path = os.environ.get("AUTOLR_BENCH_PLOT")
    if path:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        axes[0].plot(theirs_rates, theirs_losses)
        axes[0].axvline(theirs, color="r", ls="--")
        axes[0].set_title("torch-lr-finder: training loss during one sweep")
        for h in ours.horizons:
            axes[1].plot(ours.rates[h], ours.smoothed[h], label=f"after {h} steps")
            axes[1].axvline(ours.suggestions[h], ls="--", lw=0.8)
        axes[1].set_title("find_lr: eval loss after h steps, same weights")
        axes[1].legend()
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
        save_figure(fig, path)


def test_bench_find_lr_one_step(benchmark):
    task, model, opt, batches = _setup()
    benchmark.pedantic(_run_ours, args=(task, model, opt, batches, (1,)), rounds=2, iterations=1)


def test_bench_torch_lr_finder(benchmark):
    task, model, opt, batches = _setup()
    benchmark.pedantic(_run_theirs, args=(task, model, opt, batches), rounds=2, iterations=1)
