"""Learning-rate schedules and optimizers the comparison harness runs, one small factory each.

A *method* is a plug-in: a function decorated with ``@register_method(...)`` that, given the
model, the task and the run's length, returns a :class:`MethodSetup` (the optimizer and the
hooks the training loop calls). :mod:`autolr_fast.compare` runs every registered method under
the same epochs, batches and seeds.

Families (they decide how a method is tuned, see ``docs/compare.md``):

* ``"hand"``: hand-designed schedules and optimizers with a learning rate people tune
  (constant, step, multistep, exponential, cosine, SGDR, Adam, SGD-HD, schedule-free SGD and
  AdamW). The harness runs them on a log-spaced grid around their ``default_lr`` and reports
  both the best grid value and the default.
* ``"untuned"``: methods designed to need no learning rate (Prodigy): run once, as shipped.
* ``"learned"``: learned controllers (published MLR-SNet checkpoints, this project's shipped
  controller, online meta-training, the action controller): run once, no tuning.

Also here: :class:`SGDHD`, SGD with hypergradient descent on the learning rate
(Baydin et al., 2018, "Online Learning Rate Adaptation with Hypergradient Descent").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

# Shared optimizer settings of every SGD-based method (the MLR-SNet paper's setting).
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
#: The common default learning rate of the SGD-based methods (also the fixed ``gamma`` of the
#: learned controllers on regression tasks, where ``gamma='auto'`` does not apply).
SGD_DEFAULT_LR = 0.1
ADAM_DEFAULT_LR = 1e-3
#: Hypergradient learning rate ``beta`` of SGD-HD (the paper's value for SGD-HD).
HD_BETA = 1e-3
#: Which published MLR-SNet checkpoints the harness runs plug-and-play.
OFFICIAL_CHECKPOINTS = ("mlr_snet_1.pth", "mlr_snet_100.pth", "mlr_snet_200.pth")


# ------------------------------------------------------------------------------------------------
# SGD with hypergradient descent
# ------------------------------------------------------------------------------------------------
class SGDHD(torch.optim.Optimizer):
    """SGD whose learning rate follows its own hypergradient (Baydin et al., 2018).

    With ``d_t`` the update direction of step ``t`` (the gradient plus weight decay, or the
    momentum buffer when ``momentum > 0``), the update is ``w_{t+1} = w_t - lr_t * d_t`` and

        lr_t = lr_{t-1} + hypergrad_lr * <g_t, d_{t-1}>

    where ``g_t`` is this step's gradient (plus weight decay): ``-<g_t, d_{t-1}>`` is the
    derivative of the loss at ``w_t`` with respect to the previous step's rate. Without
    momentum this is the paper's SGD-HD, ``lr_t = lr_{t-1} + beta * g_t . g_{t-1}``. The dot
    product runs over all parameters of the group.

    The rate lives in ``param_group["lr"]`` as a 0-dim tensor, updated on the device (no host
    sync per step); :attr:`rates` lists them per group.

    Args:
        params: parameters or param groups.
        lr: initial learning rate.
        hypergrad_lr: ``beta``, the learning rate of the learning rate (paper: 1e-3 for SGD-HD).
        momentum, weight_decay, nesterov: as in ``torch.optim.SGD``.
    """

    def __init__(self, params, lr: float = 1e-3, hypergrad_lr: float = HD_BETA, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if not (isinstance(lr, (float, int)) and lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"SGDHD: lr must be a finite float >= 0, got {lr!r}")
        if hypergrad_lr < 0:
            raise ValueError(f"SGDHD: hypergrad_lr must be >= 0, got {hypergrad_lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGDHD: momentum must be in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"SGDHD: weight_decay must be >= 0, got {weight_decay!r}")
        if nesterov and momentum <= 0:
            raise ValueError("SGDHD: nesterov=True needs momentum > 0")
        defaults = dict(lr=lr, hypergrad_lr=hypergrad_lr, momentum=momentum, weight_decay=weight_decay,
                        nesterov=nesterov)
        super().__init__(params, defaults)
        for group in self.param_groups:
            device = group["params"][0].device
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)

    @property
    def rates(self) -> list[Tensor]:
        """The current rate of every param group (0-dim tensors, no sync)."""
        return [g["lr"] for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            wd, mom = group["weight_decay"], group["momentum"]
            grads = [p.grad.add(p, alpha=wd) if wd else p.grad for p in params]
            prev = [self.state[p].get("prev_direction") for p in params]
            lr = group["lr"]
            if all(d is not None for d in prev):
                h = torch.stack([torch.sum(g * d) for g, d in zip(grads, prev)]).sum()
                lr.add_(group["hypergrad_lr"] * h.to(lr.dtype))
            for p, g in zip(params, grads):
                state = self.state[p]
                if mom:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.clone()
                    else:
                        buf.mul_(mom).add_(g)
                    d = g.add(buf, alpha=mom) if group["nesterov"] else buf
                else:
                    d = g
                state["prev_direction"] = d.clone()
                p.sub_(d * lr.to(p.dtype))
        return loss


# ------------------------------------------------------------------------------------------------
# The method registry
# ------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """What a method factory gets: the run's shape and the learning rate to use."""

    task: Any  # autolr_fast.tasks.Task
    model: nn.Module
    lr: float | None  # None for untuned / learned methods
    epochs: int
    steps_per_epoch: int
    seed: int
    batch_size: int
    val_batches: Callable[[], Any] | None = None  # factory of an iterator of (x, y) batches

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class MethodSetup:
    """The optimizer of one run and the hooks the training loop calls each step.

    Loop order: ``zero_grad; loss = ...; loss.backward(); before_step(loss); optimizer.step();
    rate() is recorded; after_step()``. ``after_epoch()`` runs at each epoch end;
    ``eval_mode()`` / ``train_mode()`` around every evaluation (schedule-free swaps weights).
    ``rate()`` returns the rate used by the step just taken: a float, or a 0-dim tensor that
    the loop clones and stacks at the epoch end (no host sync per step).
    """

    optimizer: torch.optim.Optimizer
    rate: Callable[[], float | Tensor]
    before_step: Callable[[Tensor], None] = lambda loss: None
    after_step: Callable[[], None] = lambda: None
    after_epoch: Callable[[], None] = lambda: None
    eval_mode: Callable[[], None] = lambda: None
    train_mode: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)


class MethodUnavailable(RuntimeError):
    """A method cannot run here (its module or checkpoint is missing); the message says why."""


@dataclass
class Method:
    name: str
    family: str  # "hand" | "untuned" | "learned"
    build: Callable[[RunSpec], MethodSetup]
    default_lr: float | None = None
    description: str = ""
    available: Callable[[], str | None] = lambda: None  # None, or why it cannot run


_METHODS: dict[str, Method] = {}


def register_method(name: str, family: str, default_lr: float | None = None, description: str = "",
                    available: Callable[[], str | None] | None = None) -> Callable:
    if family not in ("hand", "untuned", "learned"):
        raise ValueError(f"family must be 'hand', 'untuned' or 'learned', got {family!r}")
    if (family == "hand") != (default_lr is not None):
        raise ValueError("hand-designed methods (and only those) need a default_lr to centre their grid on")

    def wrap(fn: Callable[[RunSpec], MethodSetup]) -> Callable[[RunSpec], MethodSetup]:
        _METHODS[name] = Method(name, family, fn, default_lr, description, available or (lambda: None))
        return fn

    return wrap


def available_methods() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(_METHODS)}")
    return _METHODS[name]


def lr_grid(default_lr: float, n: int) -> list[float]:
    """``n`` log-spaced rates from ``default_lr / 10`` to ``default_lr * 10`` (``n = 1``: the default).

    Odd ``n`` always contains the default itself (``n = 5``: x0.1, x0.316, x1, x3.16, x10).
    """
    if n < 1:
        raise ValueError(f"the grid needs at least one value, got {n}")
    if n == 1:
        return [float(default_lr)]
    return [float(default_lr * 10 ** (-1 + 2 * i / (n - 1))) for i in range(n)]


# -- helpers -------------------------------------------------------------------------------------
def _sgd(spec: RunSpec, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(spec.model.parameters(), lr=lr, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)


def _group_lr(opt: torch.optim.Optimizer) -> Callable[[], float]:
    return lambda: float(opt.param_groups[0]["lr"])


def _torch_schedule(opt: torch.optim.Optimizer, sched, per: str) -> MethodSetup:
    if per == "step":
        return MethodSetup(opt, _group_lr(opt), after_step=sched.step)
    return MethodSetup(opt, _group_lr(opt), after_epoch=sched.step)


# -- hand-designed schedules (SGD with momentum 0.9, weight decay 5e-4) --------------------------
@register_method("constant", "hand", SGD_DEFAULT_LR, "SGD, constant rate")
def constant(spec: RunSpec) -> MethodSetup:
    opt = _sgd(spec, spec.lr)
    return MethodSetup(opt, _group_lr(opt))


@register_method("step", "hand", SGD_DEFAULT_LR, "SGD, StepLR: x0.5 every 1/8 of the epochs")
def step(spec: RunSpec) -> MethodSetup:
    opt = _sgd(spec, spec.lr)
    return _torch_schedule(opt, torch.optim.lr_scheduler.StepLR(opt, max(1, spec.epochs // 8), 0.5), "epoch")


@register_method("multistep", "hand", SGD_DEFAULT_LR, "SGD, MultiStepLR: x0.1 at 50% and 75% of the epochs")
def multistep(spec: RunSpec) -> MethodSetup:
    opt = _sgd(spec, spec.lr)
    milestones = sorted({max(1, spec.epochs // 2), max(1, (3 * spec.epochs) // 4)})
    return _torch_schedule(opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1), "epoch")


@register_method("exponential", "hand", SGD_DEFAULT_LR, "SGD, ExponentialLR per epoch down to 1% at the end")
def exponential(spec: RunSpec) -> MethodSetup:
    opt = _sgd(spec, spec.lr)
    return _torch_schedule(opt, torch.optim.lr_scheduler.ExponentialLR(opt, 0.01 ** (1 / max(spec.epochs, 1))), "epoch")


@register_method("cosine", "hand", SGD_DEFAULT_LR, "SGD, CosineAnnealingLR to 0 over all steps")
def cosine(spec: RunSpec) -> MethodSetup:
    opt = _sgd(spec, spec.lr)
    return _torch_schedule(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.total_steps), "step")


@register_method("sgdr", "hand", SGD_DEFAULT_LR, "SGD, cosine with warm restarts (T_0 = 1/7 of the steps, T_mult = 2)")
def sgdr(spec: RunSpec) -> MethodSetup:
    opt = _sgd(spec, spec.lr)
    t0 = max(1, spec.total_steps // 7)
    return _torch_schedule(opt, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, t0, 2), "step")


@register_method("adam", "hand", ADAM_DEFAULT_LR, "Adam, constant rate")
def adam(spec: RunSpec) -> MethodSetup:
    opt = torch.optim.Adam(spec.model.parameters(), lr=spec.lr)
    return MethodSetup(opt, _group_lr(opt))


@register_method("sgd-hd", "hand", SGD_DEFAULT_LR,
                 f"SGD-HD (Baydin et al. 2018), momentum 0.9, beta={HD_BETA:g}; grid over the initial rate")
def sgd_hd(spec: RunSpec) -> MethodSetup:
    opt = SGDHD(spec.model.parameters(), lr=spec.lr, hypergrad_lr=HD_BETA, momentum=SGD_MOMENTUM,
                weight_decay=WEIGHT_DECAY)
    return MethodSetup(opt, lambda: opt.param_groups[0]["lr"])


def _needs(module: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            __import__(module)
        except ImportError as exc:
            return f"package {module!r} is not installed ({exc}); pip install {module}"
        return None

    return check


def _schedulefree_setup(opt) -> MethodSetup:
    opt.train()
    return MethodSetup(opt, lambda: float(opt.param_groups[0]["scheduled_lr"]), eval_mode=opt.eval,
                       train_mode=opt.train)


@register_method("sf-sgd", "hand", SGD_DEFAULT_LR, "schedule-free SGD (momentum 0.9, 5% warmup)",
                 available=_needs("schedulefree"))
def sf_sgd(spec: RunSpec) -> MethodSetup:
    import schedulefree

    opt = schedulefree.SGDScheduleFree(spec.model.parameters(), lr=spec.lr, momentum=SGD_MOMENTUM,
                                       weight_decay=WEIGHT_DECAY, warmup_steps=spec.total_steps // 20)
    return _schedulefree_setup(opt)


@register_method("sf-adamw", "hand", 2.5e-3, "schedule-free AdamW (5% warmup)", available=_needs("schedulefree"))
def sf_adamw(spec: RunSpec) -> MethodSetup:
    import schedulefree

    opt = schedulefree.AdamWScheduleFree(spec.model.parameters(), lr=spec.lr, warmup_steps=spec.total_steps // 20)
    return _schedulefree_setup(opt)


# -- untuned ------------------------------------------------------------------------------------
@register_method("prodigy", "untuned", None, "Prodigy, lr=1 with cosine annealing (its recommended setup)",
                 available=_needs("prodigyopt"))
def prodigy(spec: RunSpec) -> MethodSetup:
    from prodigyopt import Prodigy

    opt = Prodigy(spec.model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.total_steps)
    return MethodSetup(opt, lambda: float(opt.param_groups[0]["d"] * opt.param_groups[0]["lr"]), after_step=sched.step)


# -- learned controllers -------------------------------------------------------------------------
def official_checkpoint_dir() -> Path | None:
    """The published MLR-SNet checkpoints: ``$AUTOLR_FAST_OFFICIAL_DIR`` (or
    ``$AUTOLR_FAST_FIXTURES``, as the tests use) if set, else the first
    ``shared/fixtures/mlrsnet_official`` found beside the project root or any of its parents
    (``../shared`` of a checkout), then beside the current directory or its parents."""
    candidates = [Path(os.environ[k]) for k in ("AUTOLR_FAST_OFFICIAL_DIR", "AUTOLR_FAST_FIXTURES") if os.environ.get(k)]
    project_root = Path(__file__).resolve().parent.parent
    for base in (project_root, Path.cwd().resolve()):
        for folder in (base, *base.parents):
            candidates.append(folder / "shared" / "fixtures" / "mlrsnet_official")
    for c in candidates:
        if (c / OFFICIAL_CHECKPOINTS[0]).is_file():
            return c
    return None


def _autolr_setup(spec: RunSpec, controller: nn.Module, meta: Any = None, gamma: Any = "default") -> MethodSetup:
    """SGD (momentum 0.9, weight decay 5e-4) driven by AutoLR with ``controller``.

    Classification: ``gamma='auto'`` with the task's class count (unless the controller carries
    a ``default_gamma``). Regression: the fixed ``SGD_DEFAULT_LR`` (documented in docs/compare.md).
    """
    from .scheduler import AutoLR

    opt = torch.optim.SGD(spec.model.parameters(), lr=SGD_DEFAULT_LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    if gamma == "default":
        gamma = getattr(controller, "default_gamma", None)
        if gamma is None:
            gamma = "auto" if spec.task.is_classification else SGD_DEFAULT_LR
    kwargs = {"num_classes": spec.task.num_classes} if gamma == "auto" else {}
    sched = AutoLR(opt, controller, gamma=gamma, meta=meta, **kwargs)
    return MethodSetup(opt, lambda: sched.rate, before_step=sched.step, info={"gamma": str(gamma)})


def _official(filename: str, gamma: Any = "default") -> Callable[[RunSpec], MethodSetup]:
    def build(spec: RunSpec) -> MethodSetup:
        from .controller import MLRSNet

        folder = official_checkpoint_dir()
        if folder is None:
            raise MethodUnavailable(_official_missing())
        return _autolr_setup(spec, MLRSNet.from_official(folder / filename), gamma=gamma)

    return build


def _official_missing() -> str | None:
    if official_checkpoint_dir() is None:
        return ("the published MLR-SNet checkpoints were not found (looked for shared/fixtures/"
                "mlrsnet_official beside the project and its parents; set AUTOLR_FAST_OFFICIAL_DIR to their folder)")
    return None


for _file in OFFICIAL_CHECKPOINTS:
    _epoch = _file[len("mlr_snet_"):-len(".pth")]
    register_method(f"mlrsnet-official-{_epoch}", "learned", None,
                    f"published MLR-SNet checkpoint {_file} plug-and-play (gamma='auto'; regression: fixed gamma)",
                    available=_official_missing)(_official(_file))

register_method("mlrsnet-official-200-fixed", "learned", None,
                f"published checkpoint mlr_snet_200.pth with the fixed gamma {SGD_DEFAULT_LR} on every task "
                "(the common default SGD rate, not tuned): separates the controller from the gamma='auto' rule",
                available=_official_missing)(_official("mlr_snet_200.pth", gamma=SGD_DEFAULT_LR))


def _module_attr(module: str, attr: str) -> str | None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not importable yet ({exc})"
    if not hasattr(mod, attr):
        return f"{module}.{attr} does not exist yet (not merged into this branch)"
    return None


#: The task whose shipped controller the harness uses (``load_pretrained`` name).
SHIPPED_CONTROLLER = "mnist1d-cnn"


def _shipped_missing() -> str | None:
    reason = _module_attr("autolr_fast.pretrained", "load_pretrained")
    if reason:
        return reason
    from .pretrained import available_pretrained

    if SHIPPED_CONTROLLER not in available_pretrained():
        return (f"no shipped controller {SHIPPED_CONTROLLER!r} in autolr_fast/weights yet "
                f"(available: {', '.join(available_pretrained()) or 'none'})")
    return None


@register_method("shipped", "learned", None,
                 f"this project's shipped controller load_pretrained({SHIPPED_CONTROLLER!r}) with its own gamma",
                 available=_shipped_missing)
def shipped(spec: RunSpec) -> MethodSetup:
    from .pretrained import load_pretrained

    return _autolr_setup(spec, load_pretrained(SHIPPED_CONTROLLER))


#: Meta-steps of the online meta-training method: one every ``META_INTERVAL`` steps.
META_INTERVAL = 20


@register_method("meta-online", "learned", None,
                 f"online meta-training from a fresh MLR-SNet (AutoLR meta=MetaConfig, interval {META_INTERVAL}; "
                 "validation batches drawn from the training set)",
                 available=lambda: _module_attr("autolr_fast.meta", "MetaTrainer"))
def meta_online(spec: RunSpec) -> MethodSetup:
    from .controller import MLRSNet
    from .meta import MetaConfig

    torch.manual_seed(spec.seed + 10_000)
    controller = MLRSNet()
    cfg = MetaConfig(model=spec.model, val_data=_Cycle(spec.val_batches), loss_fn=spec.task.loss_fn,
                     interval=META_INTERVAL)
    return _autolr_setup(spec, controller, meta=cfg)


class _Cycle:
    """An iterable that restarts a batch-iterator factory whenever it is iterated."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.factory = factory

    def __iter__(self):
        return iter(self.factory())


@register_method("action", "learned", None, "this project's action controller (autolr_fast.action)",
                 available=lambda: _module_attr("autolr_fast.action", "ActionController"))
def action(spec: RunSpec) -> MethodSetup:
    from .action import ActionController

    trained_on = _action_training_tasks()
    if spec.task.name in trained_on:
        raise MethodUnavailable(
            f"the shipped action controller was trained on data from {spec.task.name} "
            f"(its tasks: {', '.join(trained_on)}); it is evaluated only on other tasks"
        )
    return _autolr_setup(spec, ActionController.pretrained())


def _action_training_tasks() -> list[str]:
    """The tasks whose collected data trained the shipped action controller (its JSON card)."""
    import json

    from .pretrained import PRETRAINED_DIR

    card = PRETRAINED_DIR / "action-mlp.json"
    return list(json.loads(card.read_text()).get("tasks", [])) if card.is_file() else []
