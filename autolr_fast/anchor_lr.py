"""Choose the rate ``AutoLR`` anchors on, by short trials scored on held-out data.

``AutoLR``'s default scale takes the optimizer's ``lr`` as the peak rate the user means. When
that ``lr`` is a guess (a library default such as Adam's ``1e-3``), :func:`find_anchor_lr` tries
it and the rates around it (``lr * 10**(-1, -0.5, 0, 0.5, 1)`` by default), each for a fraction of
the run from the same weights, scores each trial by the loss on held-out batches, and sets the
best as the optimizer's ``lr`` (the param groups keep their ratios). Everything else (weights,
buffers, optimizer state, RNG) is restored bit for bit, so training then starts from the
weights it would have started from.

A trial's rate is constant: it answers "which peak rate trains best over the first part of the
run", the question a user answers by hand with a grid. Short trials favour large rates (they
learn fastest early and their cost shows later), so the trials are long (15 % of the run by
default: five of them cost 75 % of one run) and scored on data they did not train on (a rate
that overfits the training batches scores worse there). ``docs/anchor_lr.md`` has the measured
effect on the comparison's tasks.

    lr = find_anchor_lr(model, opt, loss_fn, train_loader, val_loader, total_steps=T).lr
    sched = AutoLR(opt, total_steps=T)      # anchored on the chosen lr
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import optim_support
from .batches import to_device
from .distributed import is_distributed
from .lr_finder import (
    TrainingSnapshot,
    Unpack,
    _model_device,
    _set_rate,
    _Trial,
    autolrs_driving,
    default_unpack,
)

#: the trial's length as a fraction of the run (``total_steps``)
DEFAULT_FRACTION = 0.15
#: the rates tried: ``lr * 10**e`` for ``e`` in ``linspace(-DECADES, DECADES, NUM_RATES)``
DEFAULT_DECADES = 1.0
DEFAULT_NUM_RATES = 5
#: evaluation batches taken from ``val_batches`` at most
DEFAULT_MAX_EVAL_BATCHES = 16


@dataclass
class AnchorResult:
    """What :func:`find_anchor_lr` tried and chose (rates of the first param group with a
    positive ``lr``)."""

    lr: float  # the rate chosen (the given one when no trial was usable)
    given_lr: float
    rates: list[float]
    losses: list[float]  # held-out loss after each trial; NaN where it diverged or was not tried
    start_loss: float  # held-out loss before any trial
    trial_steps: int
    seconds: float  # wall time of all trials
    trials_run: int  # the first trials_run rates were tried (after a divergence the larger are not)

    @property
    def cost_steps(self) -> int:
        """Training steps the trials took (what the choice cost, in steps of the run)."""
        return self.trial_steps * self.trials_run

    @property
    def factor(self) -> float:
        return self.lr / self.given_lr

    def to_dict(self) -> dict:
        return {"lr": self.lr, "given_lr": self.given_lr, "factor": self.factor, "rates": self.rates,
                "losses": self.losses, "start_loss": self.start_loss, "trial_steps": self.trial_steps,
                "trials_run": self.trials_run, "cost_steps": self.cost_steps, "seconds": self.seconds}

    def table(self) -> str:
        """Markdown: one row per rate tried, the chosen one marked."""
        lines = [f"| rate | x given | held-out loss after {self.trial_steps} steps | chosen |",
                 "|---:|---:|---:|:---:|"]
        for i, (rate, loss) in enumerate(zip(self.rates, self.losses, strict=True)):
            shown = f"{loss:.4g}" if math.isfinite(loss) else "diverged" if i < self.trials_run else "not tried"
            lines.append(f"| {rate:.3g} | {rate / self.given_lr:.3g} | {shown} | {'yes' if rate == self.lr else ''} |")
        return "\n".join(lines)


def _cycled(batches: Iterable):
    """The batches again and again (a re-iterable: list, DataLoader)."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("find_anchor_lr: train_batches is empty")


def _trial_steps(total_steps: int | None, trial_steps: int | None, fraction: float) -> int:
    if trial_steps is not None:
        if isinstance(trial_steps, bool) or not isinstance(trial_steps, int) or trial_steps < 1:
            raise ValueError(f"trial_steps must be a positive whole number, got {trial_steps!r}")
        return trial_steps
    if total_steps is None:
        raise ValueError("find_anchor_lr needs total_steps (the run's optimizer steps; each trial is "
                         f"fraction={fraction:g} of them) or trial_steps")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive whole number, got {total_steps!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return max(1, round(fraction * total_steps))


def find_anchor_lr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any, Any], Tensor],
    train_batches: Iterable,
    val_batches: Iterable,
    *,
    total_steps: int | None = None,
    trial_steps: int | None = None,
    fraction: float = DEFAULT_FRACTION,
    decades: float = DEFAULT_DECADES,
    num: int = DEFAULT_NUM_RATES,
    max_eval_batches: int = DEFAULT_MAX_EVAL_BATCHES,
    apply: bool = True,
    unpack: Unpack | None = None,
    progress: bool = True,
    distributed: bool | str = "auto",
) -> AnchorResult:
    """Train from the current state at ``num`` rates around the optimizer's ``lr`` (from
    ``lr / 10**decades`` to ``lr * 10**decades``, log-spaced), ``trial_steps`` each (default:
    ``fraction`` of ``total_steps``), score each by the mean loss on ``val_batches``, and (with
    ``apply``) set the best as the optimizer's ``lr``, every param group keeping its ratio to it.

    Args:
        model, optimizer, loss_fn: as in your training loop; ``loss_fn(model(inputs), targets)``.
            Build ``AutoLR`` after this call (it reads the ``lr`` at its first step).
        train_batches: a re-iterable (a list or a DataLoader), cycled; every trial starts from the
            RNG at call time, so a shuffling DataLoader gives every trial the same batches.
        val_batches: held-out batches (not in ``train_batches``): a trial is scored on them, so a
            rate that only fits the training batches faster does not win. At most
            ``max_eval_batches`` are used.
        unpack: ``fn(batch) -> (inputs, targets)``; default as :func:`find_lr`'s.
        distributed: under an initialised process group the held-out loss is averaged across ranks,
            so every rank chooses the same rate.

    A trial whose held-out loss is not finite, or above the loss at call time by more than half its
    size, counts as diverged; the larger rates are then not tried. When no trial is usable, the
    ``lr`` is left as it was (with a warning). Returns an :class:`AnchorResult` (``cost_steps``: what it cost).
    """
    steps = _trial_steps(total_steps, trial_steps, fraction)
    if not (math.isfinite(decades) and decades > 0) or num < 2:
        raise ValueError(f"need decades > 0 and num >= 2, got decades={decades!r}, num={num!r}")
    if isinstance(train_batches, Iterator):  # asked without iterating: a DataLoader would draw from the RNG
        raise ValueError("find_anchor_lr: train_batches must be re-iterable (a list or a DataLoader): every trial "
                         "trains on the same batches")
    _refuse_autolr(optimizer)
    given, scales = optim_support.group_lr_scales([float(g["lr"]) for g in optimizer.param_groups])
    if not given > 0:
        raise ValueError("find_anchor_lr: every param group has lr 0; set the lr you would use")
    unpack = unpack or default_unpack
    device = _model_device(model)
    exponents = torch.linspace(-decades, decades, num, dtype=torch.float64).tolist()
    rates = [given * 10.0**e for e in exponents]
    start = time.perf_counter()
    snap = TrainingSnapshot(model, optimizer)  # before a shuffling DataLoader draws from the RNG
    losses: list[float] = []
    try:
        eval_batches = [to_device(unpack(b), device) for b in islice(val_batches, max_eval_batches)]
        if not eval_batches:
            raise ValueError("find_anchor_lr: val_batches is empty")
        snap.restore_rng()
        trial = _Trial(model, optimizer, loss_fn, "steps", train_batches, None, eval_batches, unpack, device,
                       is_distributed(distributed))
        start_loss = trial.eval_loss()
        if not math.isfinite(start_loss):
            raise ValueError(f"the held-out loss at call time is {start_loss}; find_anchor_lr needs a finite one")
        limit = start_loss + 0.5 * abs(start_loss)
        with tqdm(total=steps * num, desc="find_anchor_lr", leave=False, disable=not progress) as bar:
            for rate in rates:
                if losses and not math.isfinite(losses[-1]):
                    break  # a smaller rate diverged: the larger ones are not tried
                _set_rate(optimizer, rate, scales)
                batches = _cycled(train_batches)
                for _ in range(steps):
                    trial._train_step(to_device(unpack(next(batches)), device))
                    bar.update(1)
                value = trial.eval_loss()
                losses.append(value if math.isfinite(value) and value <= limit else float("nan"))
                snap.restore()
    finally:
        snap.restore()
    trials_run = len(losses)
    losses += [float("nan")] * (num - trials_run)
    usable = [(loss, rate) for loss, rate in zip(losses, rates, strict=True) if math.isfinite(loss)]
    chosen = min(usable)[1] if usable else given
    if not usable:
        warnings.warn(f"find_anchor_lr: every trial from lr={rates[0]:.3g} diverged; the lr is left at {given:.3g}",
                      stacklevel=2)
    if apply and chosen != given:  # else the groups keep their lrs exactly
        _set_rate(optimizer, chosen, scales)
    return AnchorResult(chosen, given, rates, losses, start_loss, steps, time.perf_counter() - start, trials_run)


def _refuse_autolr(optimizer: torch.optim.Optimizer) -> None:
    """An ``AutoLR`` on the optimizer fixed its scale at its first step (and a fresh one would
    refuse the trials' steps): the rate chosen here would not be the one it uses."""
    if autolrs_driving(optimizer):
        raise RuntimeError("find_anchor_lr: an AutoLR already drives this optimizer. Call find_anchor_lr "
                           "first, then build AutoLR: it anchors on the optimizer's lr at its first step")
