"""A small, reproducible training loop shared by the demo and the meta-training experiment.

``train(task, schedule, ...)`` trains one model on one task with one learning-rate schedule
and returns per-epoch metrics and the per-step rates. A schedule is a :class:`Schedule`: it
builds the optimizer and its scheduler for a model, and says how to step it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .tasks import Task


@dataclass
class Schedule:
    """How to build and step one learning-rate schedule.

    ``build(model, task, steps_total, val_batches) -> (optimizer, scheduler)``; the scheduler
    is an ``AutoLR`` (stepped with the loss before ``optimizer.step()``) or a
    ``torch.optim.lr_scheduler`` (stepped after it), or None.
    """

    name: str
    build: Callable[..., tuple[torch.optim.Optimizer, object]]
    needs_validation: bool = False


@dataclass
class RunResult:
    name: str
    seed: int
    epochs: list[dict] = field(default_factory=list)  # {"epoch", "train_loss", "test_loss", "test_acc", "time_s"}
    rates: list[float] = field(default_factory=list)  # every step's rate of the first param group
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "seed": self.seed, "epochs": self.epochs, "rates": self.rates, "extra": self.extra}


def _current_rate(optimizer: torch.optim.Optimizer) -> Tensor:
    lr = optimizer.param_groups[0]["lr"]
    return lr.detach().clone() if isinstance(lr, Tensor) else torch.tensor(float(lr))


def train(
    task: Task,
    schedule: Schedule,
    *,
    epochs: int,
    batch_size: int = 100,
    seed: int = 0,
    val_size: int = 0,
    progress: Callable[[], None] | None = None,
) -> tuple[RunResult, nn.Module, object]:
    """Train ``task``'s model with ``schedule``; the same data order for every schedule.

    With ``val_size > 0`` that many training samples are held out (for every schedule alike)
    and handed to schedules that meta-learn, as cycled batches of ``batch_size``.
    """
    from .scheduler import AutoLR

    torch.manual_seed(seed)
    if val_size:
        task, xv, yv = task.split_validation(val_size, seed=seed)
        val_batches = [(xv[i : i + batch_size], yv[i : i + batch_size]) for i in range(0, len(xv), batch_size)]
    else:
        val_batches = []
    model = task.make_model()
    steps_per_epoch = task.steps_per_epoch(batch_size)
    optimizer, sched = schedule.build(model, task, epochs * steps_per_epoch, val_batches)
    result = RunResult(schedule.name, seed)
    batches = task.batches(batch_size, seed=seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        losses, rates = [], []
        model.train()
        for _ in range(steps_per_epoch):
            x, y = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss_fn(model(x), y)
            loss.backward()
            if isinstance(sched, AutoLR):
                sched.step(loss)
            rates.append(_current_rate(optimizer))
            optimizer.step()
            if sched is not None and not isinstance(sched, AutoLR):
                sched.step()
            losses.append(loss.detach())
        train_loss = float(torch.stack(losses).mean())
        result.rates.extend(torch.stack(rates).tolist())
        ev = task.evaluate(model)
        result.epochs.append({"epoch": epoch, "train_loss": train_loss, "test_loss": ev["loss"], "test_acc": ev["acc"],
                              "time_s": time.perf_counter() - start})
        if progress is not None:
            progress()
    return result, model, sched
