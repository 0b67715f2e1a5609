"""The harness's one training loop and its one "how to run a schedule" abstraction.

* :class:`Schedule`: the optimizer of one run and the hooks the loop calls around each step
  (``before_step(loss)`` for AutoLR-like controllers, ``after_step()`` / ``after_epoch()`` for
  ``torch.optim.lr_scheduler``, ``eval_mode()`` / ``train_mode()`` around evaluations).
* :class:`Method`: a named recipe, ``build(spec) -> Schedule``, for a run described by a
  :class:`RunSpec` (model, task, rate, length, validation data). The comparison registers its
  methods in :mod:`autolr_experiments.baselines`; the demo and meta-training build their own.
* :func:`train_step` (one step), :func:`run_steps` (a list of batches; with :func:`save_state`
  and :func:`load_state` it branches from a checkpoint) and :func:`train` (epochs of a task with
  evaluation, the per-step rates and the per-epoch curves).

The step order is the canonical one: ``zero_grad; loss = loss_fn(model(x), y); loss.backward();
before_step(loss); optimizer.step(); after_step()``. Rates and losses stay tensors until the
end of a :func:`run_steps` call (one host read per call, not per step).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from autolr_fast import AutoLR
from autolr_fast.rate_scale import DEFAULT_DECAY_FRACTION, envelope, resolve_decay, resolve_warmup

from .tasks import OptimSpec, Task

#: Shared optimizer settings of every SGD-based schedule (the MLR-SNet paper's setting).
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
#: Validation batches of a run without a held-out split come from the training set, shuffled
#: with this offset added to the run's seed.
VAL_BATCH_SEED_OFFSET = 1_000_003


def _noop(*args: Any) -> None:
    return None


@dataclass
class Schedule:
    """One run's optimizer and the hooks the loop calls.

    ``rate()`` returns the rate used by the step just taken (called after ``optimizer.step()``):
    a float, or a 0-dim tensor the loop clones (default: the first param group's ``lr``).
    ``autolr`` is the :class:`~autolr_fast.AutoLR` driving the optimizer, if any.
    """

    optimizer: torch.optim.Optimizer
    rate: Callable[[], float | Tensor] | None = None
    before_step: Callable[[Tensor], None] = _noop
    after_step: Callable[[], None] = _noop
    after_epoch: Callable[[], None] = _noop
    eval_mode: Callable[[], None] = _noop
    train_mode: Callable[[], None] = _noop
    autolr: AutoLR | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rate is None:
            self.rate = lambda: self.optimizer.param_groups[0]["lr"]


@dataclass
class RunSpec:
    """What a method's ``build`` gets: the run's model, task, shape and the rate to use."""

    task: Task
    model: nn.Module
    lr: float | None  # None: the method's own rate (untuned and learned methods)
    epochs: int
    steps_per_epoch: int
    seed: int
    batch_size: int
    val_data: Iterable | None = None  # validation batches, for methods that meta-learn

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


class MethodUnavailable(RuntimeError):
    """A method cannot run here (its package or checkpoint is missing); the message says why."""


@dataclass
class Method:
    """A named way to train: ``build(spec) -> Schedule``.

    ``family`` (``"hand"``, ``"untuned"``, ``"learned"``) and ``default_lr`` decide how the
    comparison tunes it; ``available()`` returns None or why the method cannot run here.
    ``task_lr``: the method trains with each task's own default optimizer, and its grid is
    centred on that optimizer's default rate instead of ``default_lr``.
    """

    name: str
    build: Callable[[RunSpec], Schedule]
    family: str = "hand"
    default_lr: float | None = None
    description: str = ""
    available: Callable[[], str | None] = lambda: None
    task_lr: bool = False
    #: raised when the method's build changes what a run measures: recorded runs of an older
    #: revision are not reused (compare --resume)
    revision: int = 1


# ------------------------------------------------------------------------------------------------
# Schedule helpers
# ------------------------------------------------------------------------------------------------
def sgd(model: nn.Module, lr: float, **kwargs: Any) -> torch.optim.SGD:
    """SGD with momentum 0.9 and weight decay 5e-4."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY, **kwargs)


def make_optimizer(model: nn.Module, optim: OptimSpec, lr: float | None = None,
                   cls: type[torch.optim.Optimizer] | None = None) -> torch.optim.Optimizer:
    """The task's default optimizer (``optim``) on ``model``, at ``lr`` (default: ``optim.lr``).
    ``cls`` replaces the torch class with a compatible one (e.g. a wrapped optimizer)."""
    lr = optim.lr if lr is None else lr
    if optim.kind == "sgd":
        return (cls or torch.optim.SGD)(model.parameters(), lr=lr, momentum=SGD_MOMENTUM,
                                        weight_decay=optim.weight_decay)
    default = torch.optim.AdamW if optim.kind == "adamw" else torch.optim.Adam
    return (cls or default)(model.parameters(), lr=lr, weight_decay=optim.weight_decay)


def torch_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, per: str = "step") -> Schedule:
    """A ``torch.optim.lr_scheduler`` stepped after every optimizer step (``per="step"``) or epoch."""
    if per not in ("step", "epoch"):
        raise ValueError(f"per must be 'step' or 'epoch', got {per!r}")
    if per == "step":
        return Schedule(optimizer, after_step=scheduler.step)
    return Schedule(optimizer, after_epoch=scheduler.step)


def envelope_schedule(optimizer: torch.optim.Optimizer, total_steps: int, shape: str = "cosine",
                      decay_fraction: float | None = None) -> Schedule:
    """One of AutoLR's envelopes alone over ``total_steps`` (a 5 % linear warm-up, then ``"cosine"``
    to 0, or ``"wsd"``: the peak held, then linear to 0 over the last 20 %, or ``decay_fraction``
    of the steps; AutoLR's default), stepped after every optimizer step."""
    warmup = resolve_warmup(None, total_steps)
    decay = resolve_decay(None, total_steps, warmup, shape,
                          DEFAULT_DECAY_FRACTION if decay_fraction is None else decay_fraction)
    return torch_schedule(optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: envelope(t, total_steps, warmup, shape, decay)))


def autolr_schedule(optimizer: torch.optim.Optimizer, controller: nn.Module, **autolr_kwargs: Any) -> Schedule:
    """``AutoLR(optimizer, controller, **autolr_kwargs)``, stepped with the loss before each step."""
    sched = AutoLR(optimizer, controller, **autolr_kwargs)
    return Schedule(optimizer, rate=lambda: sched.rate, before_step=sched.step, autolr=sched)


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------
def train_step(model: nn.Module, schedule: Schedule, loss_fn: Callable, batch: tuple,
               rates: list | None = None) -> Tensor:
    """One training step on ``batch = (x, y)``; appends the step's rate to ``rates`` if given."""
    x, y = batch
    optimizer = schedule.optimizer
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    schedule.before_step(loss)
    optimizer.step()
    if rates is not None:
        r = schedule.rate()
        rates.append(r.detach().clone() if isinstance(r, Tensor) else r)
    schedule.after_step()
    return loss


def _floats(values: list) -> list[float]:
    """Rates (floats or 0-dim tensors) as floats, with one host read for tensors."""
    if values and isinstance(values[0], Tensor):
        return torch.stack(values).tolist()
    return [float(v) for v in values]


def run_steps(model: nn.Module, schedule: Schedule, loss_fn: Callable, batches: Iterable) -> tuple[Tensor, list[float]]:
    """One step per batch; returns the losses (a 1-D tensor) and the rate of every step."""
    losses: list[Tensor] = []
    rates: list = []
    for batch in batches:
        losses.append(train_step(model, schedule, loss_fn, batch, rates).detach())
    return (torch.stack(losses) if losses else torch.empty(0)), _floats(rates)


def save_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A deep copy of the model's and the optimizer's state (a checkpoint to branch from)."""
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(optimizer.state_dict())}


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Put a :func:`save_state` checkpoint back (it stays usable for further branches)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(copy.deepcopy(state["opt"]))


# ------------------------------------------------------------------------------------------------
# Epochs
# ------------------------------------------------------------------------------------------------
CURVES = ("train_loss", "test_loss", "test_acc", "train_time_s", "time_s", "cpu_time_s", "steps")


@dataclass
class Run:
    """The result of :func:`train`: per-epoch curves, every step's rate, the trained model."""

    name: str
    seed: int
    classification: bool
    curves: dict[str, list] = field(default_factory=lambda: {k: [] for k in CURVES})
    rates: list[float] = field(default_factory=list)
    status: str = "ok"  # or "diverged": a non-finite training or test loss ended the run
    message: str = ""
    wall_time_s: float = 0.0
    model: nn.Module | None = None
    schedule: Schedule | None = None
    extra: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.curves["steps"][-1] if self.curves["steps"] else 0

    @property
    def train_time_s(self) -> float:
        return self.curves["train_time_s"][-1] if self.curves["train_time_s"] else 0.0

    @property
    def cpu_time_s(self) -> float:
        """CPU seconds of this process for the whole run (training, evaluations, the method's setup)."""
        return self.curves["cpu_time_s"][-1] if self.curves["cpu_time_s"] else 0.0

    def metrics(self) -> dict:
        """Final and best test metric (accuracy, or loss for regression) and the rate statistics."""
        c, cls = self.curves, self.classification
        diverged = self.status == "diverged"
        out: dict[str, Any] = {}
        out["final_test_loss"] = c["test_loss"][-1] if c["test_loss"] and not diverged else math.inf
        out["best_test_loss"] = min(_finite(c["test_loss"]), default=math.inf)
        if cls:
            out["final_test_acc"] = c["test_acc"][-1] if c["test_acc"] and not diverged else 0.0
            out["best_test_acc"] = max(_finite(c["test_acc"]), default=0.0)
        out["final_metric"] = out["final_test_acc"] if cls else out["final_test_loss"]
        out["best_metric"] = out["best_test_acc"] if cls else out["best_test_loss"]
        steps_per_epoch = self.steps // len(c["steps"]) if c["steps"] else 0
        out["rate_stats"] = rate_stats(_finite(self.rates), max(steps_per_epoch, 1))
        return out

    def record(self) -> dict:
        """Status, times, the curves (``rate``: every step's rate) and :meth:`metrics`, flat."""
        curves = {k: self.curves[k] for k in ("train_loss", "test_loss", "test_acc", "train_time_s", "steps")}
        return {"status": self.status, "message": self.message, "classification": self.classification,
                "wall_time_s": self.wall_time_s, "train_time_s": self.train_time_s,
                "cpu_time_s": self.cpu_time_s, "steps": self.steps,
                "curves": {**curves, "rate": self.rates}, **self.metrics()}

    def to_json(self) -> dict:
        """``{"name", "seed", "epochs": [{"epoch", "train_loss", "test_loss", "test_acc", "time_s"}],
        "rates", "extra"}`` (the record of the demo and meta-training)."""
        c = self.curves
        epochs = [{"epoch": i + 1, "train_loss": c["train_loss"][i], "test_loss": c["test_loss"][i],
                   "test_acc": c["test_acc"][i], "time_s": c["time_s"][i]} for i in range(len(c["steps"]))]
        return {"name": self.name, "seed": self.seed, "epochs": epochs, "rates": self.rates, "extra": self.extra}


def _finite(xs: Iterable) -> list[float]:
    return [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)]


def rate_stats(rates: list[float], steps_per_epoch: int) -> dict:
    """Schedule statistics: mean/min/max rate, the coefficient of variation of the per-epoch
    mean rate (``epoch_cv``: how much the schedule moves over training) and ``jitter``, the
    median of ``|log(r[t+1] / r[t])|`` over steps (how noisy it is step to step; the median
    ignores the few jumps of a step schedule or a warm restart)."""
    if not rates:
        return {"mean": None, "min": None, "max": None, "epoch_cv": None, "jitter": None}
    epochs = [rates[i : i + steps_per_epoch] for i in range(0, len(rates), steps_per_epoch)]
    means = [sum(e) / len(e) for e in epochs if e]
    m = sum(means) / len(means)
    cv = statistics.pstdev(means) / m if m > 0 and len(means) > 1 else 0.0
    jumps = [abs(math.log(b / a)) for a, b in zip(rates[:-1], rates[1:], strict=True) if a > 0 and b > 0]
    return {"mean": sum(rates) / len(rates), "min": min(rates), "max": max(rates), "epoch_cv": cv,
            "jitter": statistics.median(jumps) if jumps else 0.0}


def train(task: Task, method: Method, *, epochs: int, batch_size: int = 100, seed: int = 0, lr: float | None = None,
          val_size: int = 0, name: str | None = None, progress: Callable[[], None] | None = None) -> Run:
    """Train ``task``'s model with ``method`` for ``epochs``; the same data order for every method.

    ``torch.manual_seed(seed)`` comes first, so every method starts from the same weights, trains
    on the same mini-batches (``task.batches(batch_size, seed)``) and draws the same dropout masks
    (whatever its ``build`` draws from the global RNG is forgotten). Validation data for
    methods that meta-learn: with ``val_size > 0`` that many training samples are held out (for
    every method alike) and cycled in batches of ``batch_size``; otherwise batches drawn from the
    training set with another shuffle seed. A non-finite training or test loss ends the run
    (``status="diverged"``). ``progress()`` is called after every epoch.
    """
    cpu_start = time.process_time()
    torch.manual_seed(seed)
    if val_size:
        task, xv, yv = task.split_validation(val_size, seed=seed)
        val_data: Iterable = [(xv[i : i + batch_size], yv[i : i + batch_size]) for i in range(0, len(xv), batch_size)]
    else:
        val_data = task.batches(batch_size, seed + VAL_BATCH_SEED_OFFSET)
    model = task.make_model()
    steps_per_epoch = task.steps_per_epoch(batch_size)
    spec = RunSpec(task, model, lr, epochs, steps_per_epoch, seed, batch_size, val_data)
    # A build may draw from the global RNG (a fresh controller's init); the training loop's draws
    # (dropout) must not depend on the method, so they continue from the state after make_model.
    with torch.random.fork_rng(devices=[]):
        schedule = method.build(spec)
    run = Run(name or method.name, seed, task.is_classification, model=model, schedule=schedule)
    batches = task.batches(batch_size, seed, epochs=epochs)
    start, train_time, steps = time.perf_counter(), 0.0, 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        losses, rates = run_steps(model, schedule, task.loss_fn, islice(batches, steps_per_epoch))
        schedule.after_epoch()
        train_loss = float(losses.mean())
        train_time += time.perf_counter() - t0
        steps += len(rates)
        run.rates.extend(rates)
        schedule.eval_mode()
        ev = task.evaluate(model)
        schedule.train_mode()
        for key, value in (("train_loss", train_loss), ("test_loss", ev["loss"]), ("test_acc", ev["acc"]),
                           ("train_time_s", train_time), ("time_s", time.perf_counter() - start),
                           ("cpu_time_s", time.process_time() - cpu_start), ("steps", steps)):
            run.curves[key].append(value)
        if progress is not None:
            progress()
        if not (math.isfinite(train_loss) and math.isfinite(ev["loss"])):
            run.status, run.message = "diverged", f"non-finite loss at epoch {epoch}"
            break
    run.wall_time_s = time.perf_counter() - start
    return run
