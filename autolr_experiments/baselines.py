"""The methods the comparison runs, one small factory each, and SGD with hypergradient descent.

A method is a plug-in: a function decorated with ``@register_method(...)`` that, given a
:class:`~autolr_experiments.training.RunSpec`, returns the run's
:class:`~autolr_experiments.training.Schedule` (its optimizer and the hooks the training loop
calls). :mod:`autolr_experiments.compare` runs every registered method under the same epochs,
batches and seeds.

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

import hashlib
import importlib
import json
import math
import os
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autolr_fast import ActionController, MetaConfig, MLRSNet, find_anchor_lr, load_controller, load_pretrained
from autolr_fast.anchor_lr import DEFAULT_FRACTION as ANCHOR_FRACTION
from autolr_fast.anchor_lr import AnchorResult
from autolr_fast.controllers.pretrained import PRETRAINED_DIR, available_pretrained
from autolr_fast.rate_scale import envelope, resolve_warmup

from .tasks import dataset_of, shares_data
from .training import (
    SGD_MOMENTUM,
    WEIGHT_DECAY,
    Method,
    MethodUnavailable,
    RunSpec,
    Schedule,
    autolr_schedule,
    envelope_schedule,
    make_optimizer,
    sgd,
    torch_schedule,
)

#: The common default learning rate of the SGD-based methods (also the fixed ``gamma`` of the
#: learned controllers on regression tasks, where ``gamma='auto'`` does not apply).
SGD_DEFAULT_LR = 0.1
ADAM_DEFAULT_LR = 1e-3
#: Hypergradient learning rate ``beta`` of SGD-HD (the paper's value for SGD-HD).
HD_BETA = 1e-3
#: Which published MLR-SNet checkpoints the harness runs plug-and-play.
OFFICIAL_CHECKPOINTS = ("mlr_snet_1.pth", "mlr_snet_100.pth", "mlr_snet_200.pth")
#: The shipped controllers the harness uses (``load_pretrained`` names).
SHIPPED_CONTROLLER = "mnist1d-cnn"
SHIPPED_ACTION_CONTROLLER = "action-mlp"
#: the other methods that run a shipped controller file, by name: compare keys their records on the
#: file's digest, so that records of an earlier file are not reused
SHIPPED_FILES = {"shipped": SHIPPED_CONTROLLER, "action": SHIPPED_ACTION_CONTROLLER,
                 "action-always-raise": SHIPPED_ACTION_CONTROLLER}
#: Meta-steps of the online meta-training method: one every ``META_INTERVAL`` steps.
META_INTERVAL = 20


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
                h = torch.stack([torch.sum(g * d) for g, d in zip(grads, prev, strict=True)]).sum()
                lr.add_(group["hypergrad_lr"] * h.to(lr.dtype))
            for p, g in zip(params, grads, strict=True):
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
_METHODS: dict[str, Method] = {}


def register_method(name: str, family: str, default_lr: float | None = None, description: str = "",
                    available: Callable[[], str | None] | None = None, task_lr: bool = False,
                    revision: int = 1) -> Callable:
    """Register ``fn(spec) -> Schedule`` as a method. ``task_lr``: a hand-designed method that trains
    with the task's default optimizer and is tuned on a grid around that optimizer's default rate.
    ``revision``: raised when a change to ``fn`` changes what its runs record (older records are
    then run again by ``compare --resume``)."""
    if family not in ("hand", "untuned", "learned"):
        raise ValueError(f"family must be 'hand', 'untuned' or 'learned', got {family!r}")
    if task_lr and family != "hand":
        raise ValueError("only hand-designed methods are tuned, so only they take task_lr")
    if (family == "hand") != (default_lr is not None or task_lr):
        raise ValueError("hand-designed methods (and only those) need a default_lr (or task_lr) to centre their "
                         "grid on")

    def wrap(fn: Callable[[RunSpec], Schedule]) -> Callable[[RunSpec], Schedule]:
        _METHODS[name] = Method(name, fn, family, default_lr, description, available or (lambda: None), task_lr,
                                revision)
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


# -- hand-designed schedules (SGD with momentum 0.9, weight decay 5e-4) --------------------------
@register_method("constant", "hand", None, "the task's default optimizer, constant rate; grid around the task's "
                 "default rate", task_lr=True, revision=2)  # 2: the task's optimizer (was SGD on every task)
def constant(spec: RunSpec) -> Schedule:
    return Schedule(make_optimizer(spec.model, spec.task.optim, spec.lr))


@register_method("step", "hand", SGD_DEFAULT_LR, "SGD, StepLR: x0.5 every 1/8 of the epochs")
def step(spec: RunSpec) -> Schedule:
    opt = sgd(spec.model, spec.lr)
    return torch_schedule(opt, torch.optim.lr_scheduler.StepLR(opt, max(1, spec.epochs // 8), 0.5), "epoch")


@register_method("multistep", "hand", SGD_DEFAULT_LR, "SGD, MultiStepLR: x0.1 at 50% and 75% of the epochs")
def multistep(spec: RunSpec) -> Schedule:
    opt = sgd(spec.model, spec.lr)
    milestones = sorted({max(1, spec.epochs // 2), max(1, (3 * spec.epochs) // 4)})
    return torch_schedule(opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1), "epoch")


@register_method("exponential", "hand", SGD_DEFAULT_LR, "SGD, ExponentialLR per epoch down to 1% at the end")
def exponential(spec: RunSpec) -> Schedule:
    opt = sgd(spec.model, spec.lr)
    gamma = 0.01 ** (1 / max(spec.epochs, 1))
    return torch_schedule(opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma), "epoch")


@register_method("cosine", "hand", None, "the task's default optimizer, CosineAnnealingLR to 0 over all steps; "
                 "grid around the task's default rate", task_lr=True)
def cosine(spec: RunSpec) -> Schedule:
    opt = make_optimizer(spec.model, spec.task.optim, spec.lr)
    return torch_schedule(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.total_steps), "step")


@register_method("cosine-warmup", "hand", None, "the task's default optimizer, 5% linear warm-up, then cosine to 0 "
                 "(AutoLR's envelope='cosine' with total_steps, alone)", task_lr=True)
def cosine_warmup(spec: RunSpec) -> Schedule:
    return envelope_schedule(make_optimizer(spec.model, spec.task.optim, spec.lr), spec.total_steps)


@register_method("wsd", "hand", None, "the task's default optimizer, 5% linear warm-up, constant, then linear "
                 "decay to 0 over the last 20% of the steps (warmup-stable-decay: AutoLR's default envelope, alone)",
                 task_lr=True, revision=2)  # 2: every step of the decay falls below the peak
def wsd(spec: RunSpec) -> Schedule:
    return envelope_schedule(make_optimizer(spec.model, spec.task.optim, spec.lr), spec.total_steps, "wsd")


@register_method("wsd-decay10", "hand", None, "ablation of `wsd`: the decay over the last 10% of the steps",
                 task_lr=True)
def wsd_decay10(spec: RunSpec) -> Schedule:
    return envelope_schedule(make_optimizer(spec.model, spec.task.optim, spec.lr), spec.total_steps, "wsd", 0.1)


@register_method("wsd-decay40", "hand", None, "ablation of `wsd`: the decay over the last 40% of the steps",
                 task_lr=True)
def wsd_decay40(spec: RunSpec) -> Schedule:
    return envelope_schedule(make_optimizer(spec.model, spec.task.optim, spec.lr), spec.total_steps, "wsd", 0.4)


class SpikeGuard:
    """Halves a factor on the rate when the training loss says the rate is too high.

    The mean of every block of ``block`` losses is compared with a reference: ``"lowest"``, the
    lowest block mean so far (above ``ratio`` x it the factor halves and that block becomes the
    reference, so the next halving needs another doubling); ``"initial"``, the run's first block
    mean (every later block above ``ratio`` x it halves the factor: training has made the loss
    worse than where it started). A non-finite loss halves it too."""

    def __init__(self, reference: str = "initial", block: int = 5, ratio: float = 1.0) -> None:
        if reference not in ("lowest", "initial"):
            raise ValueError(f"reference must be 'lowest' or 'initial', got {reference!r}")
        self.reference, self.block, self.ratio = reference, block, ratio
        self.factor, self.ref, self.losses, self.halvings = 1.0, math.inf, [], 0

    def observe(self, loss: float) -> float:
        if not math.isfinite(loss):
            self._halve()
            return self.factor
        self.losses.append(loss)
        if len(self.losses) == self.block:
            mean = sum(self.losses) / self.block
            self.losses.clear()
            if mean > self.ratio * self.ref:
                self._halve()
                if self.reference == "lowest":
                    self.ref = mean
            elif self.reference == "lowest" or self.ref == math.inf:
                self.ref = min(self.ref, mean)
        return self.factor

    def _halve(self) -> None:
        self.factor *= 0.5
        self.halvings += 1


def _guarded_cosine_warmup(spec: RunSpec, guard: SpikeGuard) -> Schedule:
    opt = make_optimizer(spec.model, spec.task.optim, spec.lr)
    total, warmup = spec.total_steps, resolve_warmup(None, spec.total_steps)
    step = [0]
    base = [g["lr"] for g in opt.param_groups]

    def before_step(loss: Tensor) -> None:
        factor = guard.observe(float(loss.detach())) * envelope(step[0], total, warmup)
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * factor
        step[0] += 1
        schedule.info["halvings"] = guard.halvings

    schedule = Schedule(opt, before_step=before_step, info={"halvings": 0})
    return schedule


@register_method("cosine-warmup-guard", "hand", None, "cosine-warmup whose rate halves each time the training "
                 "loss doubles (block means of 5 losses against their lowest; SpikeGuard('lowest', ratio=2))",
                 task_lr=True)
def cosine_warmup_guard(spec: RunSpec) -> Schedule:
    return _guarded_cosine_warmup(spec, SpikeGuard("lowest", ratio=2.0))


@register_method("cosine-warmup-guard-initial", "hand", None, "cosine-warmup whose rate halves on every block of "
                 "5 losses whose mean is above the run's first (SpikeGuard('initial'))", task_lr=True)
def cosine_warmup_guard_initial(spec: RunSpec) -> Schedule:
    return _guarded_cosine_warmup(spec, SpikeGuard("initial"))


@register_method("cosine-warmup-guard-initial2", "hand", None, "cosine-warmup whose rate halves on every block of "
                 "5 losses whose mean is above twice the run's first (SpikeGuard('initial', ratio=2))", task_lr=True)
def cosine_warmup_guard_initial2(spec: RunSpec) -> Schedule:
    return _guarded_cosine_warmup(spec, SpikeGuard("initial", ratio=2.0))


@register_method("sgdr", "hand", SGD_DEFAULT_LR, "SGD, cosine with warm restarts (T_0 = 1/7 of the steps, T_mult = 2)")
def sgdr(spec: RunSpec) -> Schedule:
    opt = sgd(spec.model, spec.lr)
    t0 = max(1, spec.total_steps // 7)
    return torch_schedule(opt, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, t0, 2), "step")


@register_method("adam", "hand", ADAM_DEFAULT_LR, "Adam, constant rate")
def adam(spec: RunSpec) -> Schedule:
    return Schedule(torch.optim.Adam(spec.model.parameters(), lr=spec.lr))


@register_method("sgd-hd", "hand", SGD_DEFAULT_LR,
                 f"SGD-HD (Baydin et al. 2018), momentum 0.9, beta={HD_BETA:g}; grid over the initial rate")
def sgd_hd(spec: RunSpec) -> Schedule:
    return Schedule(SGDHD(spec.model.parameters(), lr=spec.lr, hypergrad_lr=HD_BETA, momentum=SGD_MOMENTUM,
                          weight_decay=WEIGHT_DECAY))


def _needs(module: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"package {module!r} is not installed ({exc}); pip install {module}"
        return None

    return check


def _schedulefree(opt) -> Schedule:
    opt.train()
    return Schedule(opt, rate=lambda: float(opt.param_groups[0]["scheduled_lr"]), eval_mode=opt.eval,
                    train_mode=opt.train)


#: SGDScheduleFree's own default rate (its authors advise rates well above a scheduled SGD's)
SF_SGD_DEFAULT_LR = 1.0


@register_method("sf-sgd", "hand", SF_SGD_DEFAULT_LR, "schedule-free SGD (momentum 0.9, 5% warmup)",
                 available=_needs("schedulefree"))
def sf_sgd(spec: RunSpec) -> Schedule:
    import schedulefree  # optional: the compare extra

    return _schedulefree(schedulefree.SGDScheduleFree(spec.model.parameters(), lr=spec.lr, momentum=SGD_MOMENTUM,
                                                      weight_decay=WEIGHT_DECAY, warmup_steps=spec.total_steps // 20))


@register_method("sf-adamw", "hand", 2.5e-3, "schedule-free AdamW (5% warmup)", available=_needs("schedulefree"))
def sf_adamw(spec: RunSpec) -> Schedule:
    import schedulefree  # optional: the compare extra

    return _schedulefree(schedulefree.AdamWScheduleFree(spec.model.parameters(), lr=spec.lr,
                                                        warmup_steps=spec.total_steps // 20))


# -- untuned ------------------------------------------------------------------------------------
@register_method("prodigy", "untuned", None, "Prodigy, lr=1 with cosine annealing (its recommended setup)",
                 available=_needs("prodigyopt"))
def prodigy(spec: RunSpec) -> Schedule:
    from prodigyopt import Prodigy  # optional: the compare extra

    opt = Prodigy(spec.model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.total_steps)
    return Schedule(opt, rate=lambda: float(opt.param_groups[0]["d"] * opt.param_groups[0]["lr"]),
                    after_step=sched.step)


def _cosine_on(opt: torch.optim.Optimizer, spec: RunSpec, rate: Callable[[], Any]) -> Schedule:
    """``opt`` with its ``lr`` annealed by CosineAnnealingLR over the run; ``rate()``: the effective rate."""
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.total_steps)
    return Schedule(opt, rate=rate, after_step=sched.step)


#: DoG's initial-movement constant: the package's documented default, and its suggestion for
#: models with BatchNorm.
DOG_REPS_REL = 1e-6
DOG_REPS_REL_BATCHNORM = 1e-4
#: Polynomial-decay averaging of DoG's iterates (the package's averager and default gamma).
DOG_AVERAGING_GAMMA = 8.0


class _AveragedEvaluation:
    """Swap a model's weights for their running average around evaluations, and back."""

    def __init__(self, model: nn.Module, averager: Any) -> None:
        self.model, self.averager, self.saved = model, averager, None

    def eval_mode(self) -> None:
        self.saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.averager.averaged_model.state_dict())

    def train_mode(self) -> None:
        if self.saved is not None:
            self.model.load_state_dict(self.saved)
            self.saved = None


@register_method("dog", "untuned", None,
                 "DoG (dog-optimizer), lr=1, reps_rel 1e-6 (1e-4 with BatchNorm), the task's weight decay on SGD "
                 "tasks (none on Adam tasks), evaluated with its polynomial-decay averaged weights (gamma 8)",
                 available=_needs("dog"))
def dog(spec: RunSpec) -> Schedule:
    from dog import DoG, PolynomialDecayAverager  # optional: the compare extra

    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in spec.model.modules())
    # DoG's decay is an L2 term as in SGD; AdamW's decoupled 0.01 would be a far stronger L2 there
    optim = spec.task.optim
    opt = DoG(spec.model.parameters(), lr=1.0, weight_decay=0.0 if optim.adam_like else optim.weight_decay,
              reps_rel=DOG_REPS_REL_BATCHNORM if has_bn else DOG_REPS_REL)
    averager = PolynomialDecayAverager(spec.model, gamma=DOG_AVERAGING_GAMMA)
    swap = _AveragedEvaluation(spec.model, averager)

    def rate() -> Any:
        eta = opt.param_groups[0].get("eta")
        return eta[0].detach().reshape(()).clone() if eta else 0.0

    return Schedule(opt, rate=rate, after_step=averager.step, eval_mode=swap.eval_mode, train_mode=swap.train_mode,
                    info={"reps_rel": DOG_REPS_REL_BATCHNORM if has_bn else DOG_REPS_REL})


@register_method("dadapt", "untuned", None,
                 "D-Adaptation (dadaptation): DAdaptSGD (momentum 0.9) or DAdaptAdam (decoupled decay for AdamW) "
                 "to match the task's optimizer, lr=1 with cosine annealing, the task's weight decay",
                 available=_needs("dadaptation"), revision=2)  # 2: DAdaptSGD's rate divided by |g_0|
def dadapt(spec: RunSpec) -> Schedule:
    import dadaptation  # optional: the compare extra

    optim = spec.task.optim
    params = spec.model.parameters()
    if optim.adam_like:
        opt = dadaptation.DAdaptAdam(params, lr=1.0, weight_decay=optim.weight_decay,
                                     decouple=optim.kind == "adamw")
    else:
        opt = dadaptation.DAdaptSGD(params, lr=1.0, momentum=SGD_MOMENTUM, weight_decay=optim.weight_decay)

    def rate() -> float:
        # DAdaptSGD steps with d * lr / |g_0| (the first gradient's norm); DAdaptAdam with d * lr
        group = opt.param_groups[0]
        norm = 1.0 if optim.adam_like else group.get("g0_norm", 1.0)
        return float(group["d"] * group["lr"] / norm)

    return _cosine_on(opt, spec, rate)


@register_method("mechanic", "untuned", None,
                 "Mechanic (mechanic-pytorch) wrapping the task's default optimizer at its default rate with "
                 "cosine annealing (the schedule whose scale Mechanic tunes); package defaults otherwise",
                 available=_needs("mechanic_pytorch"))
def mechanic(spec: RunSpec) -> Schedule:
    from mechanic_pytorch import mechanize  # optional: the compare extra

    optim = spec.task.optim
    base = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optim.kind]
    opt = make_optimizer(spec.model, optim, cls=mechanize(base))

    def rate() -> float:
        state = opt.state.get("_mechanic")
        scale = float(state["s"].sum()) if state is not None else 0.0
        return scale * float(opt.param_groups[0]["lr"])

    return _cosine_on(opt, spec, rate)


# -- AutoLR with its defaults --------------------------------------------------------------------
#: The shipped controller ``autolr`` uses: the environment variable (set once by ``compare`` for a
#: whole comparison, so that a controller shipped mid-run does not mix two), else "default" when
#: it is shipped, else "mnist1d-cnn".
AUTOLR_CONTROLLER_ENV = "AUTOLR_EXPERIMENTS_CONTROLLER"
AUTOLR_FALLBACK_CONTROLLER = "mnist1d-cnn"
#: Leave-one-task-out: JSON ``{task: controller file}``, set by ``compare`` for the tasks the
#: shipped controller was trained on; ``autolr`` runs such a task with that file's controller
#: (the same recipe without the task) instead.
AUTOLR_LOTO_ENV = "AUTOLR_EXPERIMENTS_LEAVE_ONE_OUT"


def leave_one_task_out_file(task: str) -> str | None:
    """The leave-one-task-out controller file ``compare`` set for ``task``, if any."""
    return json.loads(os.environ.get(AUTOLR_LOTO_ENV) or "{}").get(task)


def autolr_controller_name() -> str:
    name = os.environ.get(AUTOLR_CONTROLLER_ENV)
    if name:
        return name
    return "default" if "default" in available_pretrained() else AUTOLR_FALLBACK_CONTROLLER


def controller_training_tasks(info: dict) -> list[str]:
    """The task names a controller's ``info`` says it was trained on (``task``, ``tasks``,
    ``training_tasks`` or ``train_tasks``; list entries may be names or dicts with ``task``/``name``)."""
    names: list[str] = []
    for key in ("task", "tasks", "training_tasks", "train_tasks"):
        value = info.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                item = item.get("task") or item.get("name")
            if isinstance(item, str) and item not in names:
                names.append(item)
    return names


def _autolr_missing() -> str | None:
    name = autolr_controller_name()
    if name not in available_pretrained():
        return f"no shipped controller {name!r} (available: {', '.join(available_pretrained()) or 'none'})"
    return None


def _autolr_controller(spec: RunSpec) -> tuple[nn.Module, dict]:
    """The controller an ``autolr`` run uses on ``spec``'s task (the leave-one-task-out one where
    compare set it) and what the record says about it."""
    name = autolr_controller_name()
    loto = leave_one_task_out_file(spec.task.name)
    path = Path(loto) if loto else PRETRAINED_DIR / f"{name}.pt"
    controller = load_controller(path) if loto else load_pretrained(name)
    trained_on = controller_training_tasks(getattr(controller, "info", {}) or {})
    left_out = str(controller.info.get("left_out", "")) if loto else ""
    if loto and (name != "default" or not shares_data(spec.task.name, [left_out])
                 or shares_data(spec.task.name, trained_on)):
        raise ValueError(f"{path} is not the leave-one-task-out controller of {name!r} for {spec.task.name} (its "
                         f"card: left out {left_out!r}, tasks {trained_on})")
    info = {"controller": f"{name} without {dataset_of(spec.task.name)} data" if loto else name,
            "leave_one_task_out": bool(loto), "controller_tasks": trained_on,
            "controller_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "ops": "reference ops" if os.environ.get("AUTOLR_FAST_FORCE_REFERENCE") else "fast ops",
            "trained_on_task": shares_data(spec.task.name, trained_on),
            "optimizer": spec.task.optim.describe()}
    return controller, info


@register_method("autolr", "learned", None,
                 "AutoLR with its defaults: AutoLR(opt, load_pretrained(<controller>), total_steps=<steps>) on the "
                 "task's default optimizer at its default rate; one run, nothing tuned (on a task the controller "
                 "was trained on, compare sets a leave-one-task-out controller)", available=_autolr_missing,
                 revision=4)  # 2: AutoLR's envelope warms up over 5 % of the run; 3: its default envelope is
#                                 wsd; 4: every step of its decay falls below the peak
def autolr(spec: RunSpec) -> Schedule:
    controller, info = _autolr_controller(spec)
    opt = make_optimizer(spec.model, spec.task.optim)
    schedule = autolr_schedule(opt, controller, total_steps=spec.total_steps)
    schedule.info.update(info)
    return schedule


@register_method("autolr-find", "learned", None,
                 "find_anchor_lr with its defaults, then AutoLR with its defaults: cosine-annealed trials of 15 % of "
                 "the run at the task's default rate x 10^(-1, -0.5, 0, 0.5, 1) on the training data minus a "
                 "validation split (20 %, at most 500 samples), scored on that split; of the rates a paired t-test "
                 "over the split's batches cannot tell from the lowest loss (one-sided, 95 %), the one nearest the "
                 "default rate, one rate lower if the next larger one failed, becomes the optimizer's lr; then "
                 "AutoLR(opt, load_pretrained(<controller>), total_steps=<steps>) trains on all the training data "
                 "from the same weights. The trials' CPU time is in the run's",
                 available=_autolr_missing,
                 revision=7)  # 2: records the trials run; 3: annealed trials, nearest within noise, step-down;
#                                 5: AutoLR's envelope warms up over 5 % of the run (4 is taken: the records
#                                 of an extend=2 experiment of find_anchor_lr carry it); 6: the wsd envelope;
#                                 7: every step of its decay falls below the peak
def autolr_find(spec: RunSpec) -> Schedule:
    return _autolr_after_trials(spec)


def _autolr_after_trials(spec: RunSpec, **trial_kwargs: Any) -> Schedule:
    """``anchor_trials`` (``trial_kwargs`` to ``find_anchor_lr``), then AutoLR with its defaults on
    the shipped controller; the trials' decision in ``info.anchor``."""
    controller, info = _autolr_controller(spec)
    opt = make_optimizer(spec.model, spec.task.optim)
    found = anchor_trials(spec, opt, **trial_kwargs)
    schedule = autolr_schedule(opt, controller, total_steps=spec.total_steps)
    schedule.info.update(info)
    schedule.info["anchor"] = found.to_dict()
    return schedule


@register_method("autolr-find-wsd", "learned", None,
                 "ablation of `autolr-find`: its trials follow AutoLR's default envelope without the warm-up (the "
                 "rate held, then a linear decay over the last 20 % of the trial; find_anchor_lr("
                 "trial_schedule='wsd')) instead of a cosine; everything else as `autolr-find`",
                 available=_autolr_missing)
def autolr_find_wsd(spec: RunSpec) -> Schedule:
    return _autolr_after_trials(spec, trial_schedule="wsd")


#: The ProgressMLRSNet of ``meta-train --family --progress-input`` (the shipped recipe, plus the
#: fraction of the run done as a second input): the ablation ``autolr-progress`` runs.
PROGRESS_CONTROLLER = Path(__file__).resolve().parent / "weights" / "progress.pt"
#: The controller file ``autolr-file`` runs (how other variants of the recipe fare, e.g. other seeds).
CONTROLLER_FILE_ENV = "AUTOLR_EXPERIMENTS_CONTROLLER_FILE"


def _progress_missing() -> str | None:
    if not PROGRESS_CONTROLLER.is_file():
        return (f"no progress-input controller at {PROGRESS_CONTROLLER}: `python -m autolr_fast meta-train --family "
                "--progress-input` writes one (progress.pt in its --out); copy it there")
    return None


def _controller_file_missing() -> str | None:
    path = os.environ.get(CONTROLLER_FILE_ENV)
    if not path:
        return f"set {CONTROLLER_FILE_ENV} to a controller file (meta-train --family writes default.pt or progress.pt)"
    if not os.path.isfile(path):
        return f"{CONTROLLER_FILE_ENV}={path!r} is not a file"
    return None


def _autolr_with_file(spec: RunSpec, path: Path) -> Schedule:
    """AutoLR's defaults with the controller in ``path`` (a ``save_controller`` file or a
    progress-input one), refused on the data it was trained on."""
    from .progress_input import ProgressMLRSNet, is_progress_file, load_progress_controller

    controller = load_progress_controller(path) if is_progress_file(path) else load_controller(path)
    trained_on = controller_training_tasks(getattr(controller, "info", {}) or {})
    if shares_data(spec.task.name, trained_on):
        raise MethodUnavailable(f"{path.name} was trained on {spec.task.name}'s data (its tasks: "
                                f"{', '.join(trained_on)}); it is evaluated only on other data")
    if isinstance(controller, ProgressMLRSNet):
        controller.start_run(spec.total_steps)
    opt = make_optimizer(spec.model, spec.task.optim)
    schedule = autolr_schedule(opt, controller, total_steps=spec.total_steps)
    schedule.info.update(controller=str(path), controller_tasks=trained_on, trained_on_task=False,
                         controller_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                         optimizer=spec.task.optim.describe())
    return schedule


@register_method("autolr-progress", "learned", None,
                 "ablation of `autolr`: AutoLR's defaults with a controller that also reads the fraction of the run "
                 "done (ProgressMLRSNet, meta-trained by the shipped recipe: meta-train --family --progress-input); "
                 "refused on the data it was trained on", available=_progress_missing)
def autolr_progress(spec: RunSpec) -> Schedule:
    return _autolr_with_file(spec, PROGRESS_CONTROLLER)


@register_method("autolr-file", "learned", None,
                 f"AutoLR's defaults with the controller file ${CONTROLLER_FILE_ENV} names (meta-train --family's "
                 "default.pt or progress.pt): variants of the recipe, e.g. other controller seeds; refused on the "
                 "data it was trained on. Its runs record the file's sha256: one output folder per file",
                 available=_controller_file_missing)
def autolr_file(spec: RunSpec) -> Schedule:
    return _autolr_with_file(spec, Path(os.environ[CONTROLLER_FILE_ENV]))


def anchor_trials(spec: RunSpec, opt: torch.optim.Optimizer, fraction: float = ANCHOR_FRACTION,
                  batch_seed_offset: int = 0, **kwargs: Any) -> AnchorResult:
    """``find_anchor_lr`` as ``autolr-find`` runs it: trials of ``fraction`` of the run on the
    training data minus the validation split of the tuned reference (20 %, at most 500 samples),
    scored on that split. The trials' batches are drawn in the order of seed ``spec.seed +
    batch_seed_offset`` (0: the run's own first batches). ``kwargs`` go to ``find_anchor_lr``
    (e.g. ``apply=False``)."""
    from .compare import validation_task  # the tuned reference's split (compare imports this module)

    rest = validation_task(spec.task, spec.seed)  # its test data is the held-out split
    bs = spec.batch_size
    val = [(rest.x_test[i:i + bs], rest.y_test[i:i + bs]) for i in range(0, len(rest.x_test), bs)]
    steps = max(1, round(fraction * spec.total_steps))
    train = list(islice(rest.batches(bs, spec.seed + batch_seed_offset, epochs=spec.epochs), steps))
    return find_anchor_lr(spec.model, opt, spec.task.loss_fn, train, val, trial_steps=steps, progress=False, **kwargs)


def official_checkpoint_dir() -> Path | None:
    """The published MLR-SNet checkpoints: ``$AUTOLR_FAST_OFFICIAL_DIR`` (or
    ``$AUTOLR_FAST_FIXTURES``, as the tests use) if set, else the first
    ``shared/fixtures/mlrsnet_official`` found beside the source checkout or any of its parents
    (``../shared`` of a checkout), then beside the current directory or its parents."""
    variables = ("AUTOLR_FAST_OFFICIAL_DIR", "AUTOLR_FAST_FIXTURES")
    candidates = [Path(os.environ[k]) for k in variables if os.environ.get(k)]
    checkout = Path(__file__).resolve().parent.parent
    for base in (checkout, Path.cwd().resolve()):
        for folder in (base, *base.parents):
            candidates.append(folder / "shared" / "fixtures" / "mlrsnet_official")
    for c in candidates:
        if (c / OFFICIAL_CHECKPOINTS[0]).is_file():
            return c
    return None


def learned_schedule(spec: RunSpec, controller: nn.Module, meta: MetaConfig | None = None,
                     gamma: Any = "default") -> Schedule:
    """SGD (momentum 0.9, weight decay 5e-4) driven by AutoLR with ``controller``.

    ``gamma="default"``: the controller's own ``default_gamma`` if it carries one, else
    ``gamma='auto'`` with the task's class count (classification) or the fixed
    ``SGD_DEFAULT_LR`` (regression; documented in docs/compare.md).
    """
    opt = sgd(spec.model, SGD_DEFAULT_LR)
    if gamma == "default":
        gamma = getattr(controller, "default_gamma", None)
        if gamma is None:
            gamma = "auto" if spec.task.is_classification else SGD_DEFAULT_LR
    kwargs = {"num_classes": spec.task.num_classes} if gamma == "auto" else {}
    schedule = autolr_schedule(opt, controller, gamma=gamma, meta=meta, **kwargs)
    schedule.info["gamma"] = str(gamma)
    trained_on = controller_training_tasks(getattr(controller, "info", {}) or {})
    if trained_on:  # reported beside the verdicts (a controller trained on this task's data)
        schedule.info["trained_on_task"] = shares_data(spec.task.name, trained_on)
    return schedule


def _official_missing() -> str | None:
    if official_checkpoint_dir() is None:
        return ("the published MLR-SNet checkpoints were not found (looked for shared/fixtures/"
                "mlrsnet_official beside the project and its parents; set AUTOLR_FAST_OFFICIAL_DIR to their folder)")
    return None


def _official(filename: str, gamma: Any = "default") -> Callable[[RunSpec], Schedule]:
    def build(spec: RunSpec) -> Schedule:
        folder = official_checkpoint_dir()
        if folder is None:
            raise MethodUnavailable(_official_missing())
        return learned_schedule(spec, MLRSNet.from_official(folder / filename), gamma=gamma)

    return build


for _file in OFFICIAL_CHECKPOINTS:
    _epoch = _file[len("mlr_snet_"):-len(".pth")]
    register_method(f"mlrsnet-official-{_epoch}", "learned", None,
                    f"published MLR-SNet checkpoint {_file} plug-and-play (gamma='auto'; regression: fixed gamma)",
                    available=_official_missing)(_official(_file))

register_method("mlrsnet-official-200-fixed", "learned", None,
                f"published checkpoint mlr_snet_200.pth with the fixed gamma {SGD_DEFAULT_LR} on every task "
                "(the common default SGD rate, not tuned): separates the controller from the gamma='auto' rule",
                available=_official_missing)(_official("mlr_snet_200.pth", gamma=SGD_DEFAULT_LR))


def _shipped_missing(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if name not in available_pretrained():
            return (f"no shipped controller {name!r} in {PRETRAINED_DIR} "
                    f"(available: {', '.join(available_pretrained()) or 'none'})")
        return None

    return check


@register_method("shipped", "learned", None,
                 f"this project's shipped controller load_pretrained({SHIPPED_CONTROLLER!r}) with its own gamma",
                 available=_shipped_missing(SHIPPED_CONTROLLER), revision=2)  # 2: records its training data
def shipped(spec: RunSpec) -> Schedule:
    return learned_schedule(spec, load_pretrained(SHIPPED_CONTROLLER))


@register_method("meta-online", "learned", None,
                 f"online meta-training from a fresh MLR-SNet (AutoLR meta=MetaConfig, interval {META_INTERVAL}; "
                 "validation batches drawn from the training set)")
def meta_online(spec: RunSpec) -> Schedule:
    torch.manual_seed(spec.seed + 10_000)
    controller = MLRSNet()
    cfg = MetaConfig(model=spec.model, val_data=spec.val_data, loss_fn=spec.task.loss_fn, interval=META_INTERVAL)
    return learned_schedule(spec, controller, meta=cfg)


@register_method("action", "learned", None,
                 f"this project's action controller load_pretrained({SHIPPED_ACTION_CONTROLLER!r}) on the task's "
                 "default optimizer from its default rate; a relative controller also gets total_steps (its rate "
                 "is lr x the envelope it was trained under (5 % warm-up, cosine) x its level)",
                 available=_shipped_missing(SHIPPED_ACTION_CONTROLLER), revision=4)  # 3: the task's optimizer;
#                                                                   4: AutoLR's envelope warms up over 5 % of the run
def action(spec: RunSpec) -> Schedule:
    return _action_schedule(spec, _shipped_action(spec))


def _shipped_action(spec: RunSpec) -> ActionController:
    """The shipped action controller, refused on the data it was trained on."""
    trained_on = action_training_tasks()
    if shares_data(spec.task.name, trained_on):
        raise MethodUnavailable(
            f"the shipped action controller was trained on {spec.task.name}'s data "
            f"(its tasks: {', '.join(trained_on)}); it is evaluated only on other data"
        )
    return load_pretrained(SHIPPED_ACTION_CONTROLLER)


def _action_schedule(spec: RunSpec, controller: ActionController) -> Schedule:
    """``controller`` on the task's default optimizer from its default rate (with ``total_steps``
    when it is relative: lr x envelope x level)."""
    opt = make_optimizer(spec.model, spec.task.optim)
    relative = controller.relative
    schedule = autolr_schedule(opt, controller, total_steps=spec.total_steps if relative else None)
    schedule.info.update(optimizer=spec.task.optim.describe(), relative=relative)
    return schedule


class _AlwaysAction(nn.Module):
    """Action logits that always pick one action, whatever the features."""

    def __init__(self, actions: int, pick: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(torch.tensor(pick), actions).float())

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1)


@register_method("action-always-raise", "learned", None,
                 "ablation of `action`: the shipped action controller's settings (level, envelope, interval) with a "
                 "model that always picks its largest multiplier, whatever the loss history",
                 available=_shipped_missing(SHIPPED_ACTION_CONTROLLER),
                 revision=2)  # 2: AutoLR's envelope warms up over 5 % of the run
def action_always_raise(spec: RunSpec) -> Schedule:
    cfg = _shipped_action(spec).config()
    top = max(range(len(cfg["multipliers"])), key=lambda a: cfg["multipliers"][a])
    return _action_schedule(spec, ActionController(_AlwaysAction(len(cfg["multipliers"]), top), **cfg))


def action_training_tasks() -> list[str]:
    """The tasks whose collected data trained the shipped action controller (its JSON card)."""
    card = PRETRAINED_DIR / f"{SHIPPED_ACTION_CONTROLLER}.json"
    return list(json.loads(card.read_text()).get("tasks", [])) if card.is_file() else []
