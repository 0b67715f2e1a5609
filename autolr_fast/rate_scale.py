"""``gamma``, the scale of the controller's output: ``rate = gamma * p`` with ``p`` in ``[0, 1]``.

Where the scale comes from (``AutoLR(gamma=...)``):

* ``None`` (default), the **lr anchor**: the optimizer's ``lr`` is the peak rate the user means
  (PyTorch's convention, as ``OneCycleLR``'s ``max_lr``). At the first finite loss the MLR-SNet
  controller is run ``SETTLE_STEPS`` times on that loss, to the output ``p*`` it settles at, and
  keeps that state; ``gamma = lr / p*``, so the controller's first rate is the user's ``lr``
  (times the envelope below) and it moves the rate relative to it. This works the same for SGD,
  momentum, Adam and AdamW, for any loss scale, because the user already chose ``lr`` for that
  optimizer. A relative action controller (``rate = gamma * level``, level 1 at the start) takes
  ``gamma = lr`` directly.
* ``"controller"``: the ``default_gamma`` a saved controller carries (the scale it was trained
  with, on its task and optimizer); warned about when it is far from the optimizer's ``lr``.
* ``"auto"``: the published rule from the first loss and the class count (plain SGD only).
* a float: fixed.

``total_steps=T`` multiplies the scale by an envelope (the controller cannot know how long the run
is, and a rate that does not decay ends training at a higher loss). The default, ``envelope="wsd"``
(warm-up, stable, decay): a linear warm-up over the first ``warmup_steps`` ``W`` steps (default 5 %
of ``T``), the peak held, then a linear decay to 0 over the last ``decay_steps`` ``D`` (default 20 %
of ``T``, the cooldown of Hagele et al. 2024). ``envelope="cosine"``: the warm-up, then a cosine
from 1 to 0 over the other ``T - W`` steps. In the comparison (docs/compare.md) the warm-up made
cosine at the user's rate better where that rate was at the edge of stability, and this envelope
alone (``wsd``) at the user's rate was at least as good as cosine at it on 32 of 37 tasks, ahead by
the most where that rate was below the best one. ``warmup_steps`` alone (without ``T``) warms up, then
holds the peak. The envelope scales a rate: it applies to MLR-SNet and to relative action
controllers, not to a controller for which ``gamma`` is only a cap (no warm-up there by default;
one asked for is refused). Everything is computed on the device; the
first finite loss is recognised without a host sync (the scheduler's polled counters).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from . import optim_support
from .checks import is_whole_number, is_whole_value
from .controllers.mlrsnet import MLRSNet
from .ops import reference

SETTLE_STEPS = 300
# p* below this is treated as 0 (no usable anchor): the rate would be lr / p* > 1000 * lr
MIN_SETTLED_P = 1e-3
MODES = ("lr", "controller", "auto", "fixed")
ENVELOPES = ("wsd", "cosine")
DEFAULT_ENVELOPE = "wsd"


# the common default (schedule-free's, HF's usual warmup_ratio range); not tuned here
DEFAULT_WARMUP_FRACTION = 0.05
# the cooldown length Hagele et al. 2024 found to match cosine; not tuned here
DEFAULT_DECAY_FRACTION = 0.2
# why a warm-up is refused for a controller that gamma only caps (constructor and state_dict alike)
_CAP_NO_WARMUP = ("is neither an MLR-SNet nor a relative action controller: it sets its own rate and gamma only "
                  "caps it, so a warm-up would hold the rate at the first step's cap")


def cosine_envelope(step: int, total_steps: int) -> float:
    """``(1 + cos(pi * t / T)) / 2`` for ``t < T``, then 0 (``CosineAnnealingLR`` to 0)."""
    if step >= total_steps:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def envelope(step: int, total_steps: int | None, warmup_steps: int, shape: str = "cosine",
             decay_steps: int | None = None) -> float:
    """The factor of step ``t`` (0-based): ``(t + 1) / W`` during the warm-up (so the first step
    already moves, and step ``W - 1`` is at the peak), then, for ``shape="cosine"``, the cosine
    from 1 to 0 over the remaining ``T - W`` steps; for ``shape="wsd"``, 1 up to the last
    ``decay_steps`` ``D`` steps (default: :func:`resolve_decay`'s), which fall linearly,
    ``(T - t) / (D + 1)``, from ``D / (D + 1)`` to ``1 / (D + 1)`` (0 would be step ``T``, as
    cosine's); 1 after the warm-up without ``T``; 0 from ``T`` on."""
    if shape not in ENVELOPES:
        raise ValueError(f"envelope shape must be one of {ENVELOPES}, got {shape!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    if step >= total_steps:
        return 0.0
    if shape == "wsd":
        if decay_steps is None:
            decay_steps = resolve_decay(None, total_steps, warmup_steps, shape)
        return min(1.0, (total_steps - step) / (decay_steps + 1))
    return cosine_envelope(step - warmup_steps, total_steps - warmup_steps)


def resolve_warmup(warmup_steps: int | None, total_steps: int | None) -> int:
    """The warm-up length ``AutoLR`` uses: ``warmup_steps``, or by default 5 % of ``total_steps``
    (none without ``total_steps``). Raises ``ValueError`` for a value that is not a whole number
    of steps in ``[0, total_steps)``."""
    if warmup_steps is None:
        return 0 if total_steps is None else round(DEFAULT_WARMUP_FRACTION * total_steps)
    if not is_whole_number(warmup_steps, 0):
        raise ValueError(f"warmup_steps must be a whole number of optimizer steps >= 0 (or None for 5 % of "
                         f"total_steps), got {warmup_steps!r}")
    if total_steps is not None and warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps}): the "
                         "decay follows the warm-up within the run")
    return int(warmup_steps)


def envelope_args(total_steps: int | None, warmup_steps: int, shape: str, decay_steps: int | None) -> str:
    """The ``AutoLR`` arguments that build this envelope, as text for messages."""
    text = f"total_steps={total_steps}, warmup_steps={warmup_steps}, envelope={shape!r}"
    return text + (f", decay_steps={decay_steps}" if decay_steps is not None else "")


def resolve_shape(shape: str | None) -> str:
    """The envelope's shape: ``shape``, or by default ``"wsd"``."""
    if shape is None:
        return DEFAULT_ENVELOPE
    if not isinstance(shape, str) or shape not in ENVELOPES:
        raise ValueError(f"envelope must be one of {ENVELOPES} (or None for {DEFAULT_ENVELOPE!r}), got {shape!r}")
    return shape


def resolve_decay(decay_steps: int | None, total_steps: int | None, warmup_steps: int, shape: str,
                  fraction: float = DEFAULT_DECAY_FRACTION) -> int | None:
    """The length of the final decay of a ``"wsd"`` envelope: ``decay_steps``, or by default
    ``fraction`` (20 %) of ``total_steps`` (at least 1, and never into the warm-up). ``None`` for a
    cosine envelope or without ``total_steps``. Raises ``ValueError`` for a value that does not fit
    the run."""
    if decay_steps is not None:
        if shape != "wsd":
            raise ValueError(f"decay_steps={decay_steps!r} sets the final decay of envelope='wsd'; the cosine "
                             "envelope decays over every step after the warm-up: pass envelope='wsd' with "
                             "decay_steps, or leave decay_steps unset")
        if total_steps is None:
            raise ValueError(f"decay_steps={decay_steps!r} needs total_steps: the decay ends the run")
        if not is_whole_number(decay_steps, 1) or decay_steps > total_steps - warmup_steps:
            raise ValueError(f"decay_steps must be a whole number of optimizer steps from 1 to total_steps - "
                             f"warmup_steps ({total_steps - warmup_steps}), got {decay_steps!r}")
        return int(decay_steps)
    if shape != "wsd" or total_steps is None:
        return None
    return max(1, min(round(fraction * total_steps), total_steps - warmup_steps))


class RateScale:
    """The scale tensors of one ``AutoLR``: ``peak`` (0-dim, NaN until known) and ``gamma``, what
    the controller step reads (``peak`` times the envelope; the same tensor without one)."""

    def __init__(self, gamma: float | str | None, controller: nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device, base_lr: float, *, num_classes: int | None, total_steps: int | None,
                 warned: set, warmup_steps: int | None = 0, envelope_shape: str | None = None,
                 decay_steps: int | None = None) -> None:
        self.device = device
        self.base_lr = float(base_lr)
        if num_classes is not None and not is_whole_value(num_classes, 1):
            raise ValueError(f"num_classes must be a whole number >= 1 (the number of classes), got {num_classes!r}")
        self.num_classes = None if num_classes is None else int(num_classes)
        if total_steps is not None and not is_whole_number(total_steps, 1):
            raise ValueError(f"total_steps must be a positive whole number of optimizer steps, got {total_steps!r}")
        if isinstance(gamma, bool) or not (gamma is None or isinstance(gamma, (str, int, float))):
            raise TypeError(f"gamma must be a float, None, 'controller' or 'auto', got {gamma!r}")
        self.user_gamma = gamma is not None
        self.total_steps = None if total_steps is None else int(total_steps)
        # gamma scales the rate (an MLR-SNet's p, a relative controller's level) rather than capping it
        self.scales_rate = isinstance(controller, MLRSNet) or bool(getattr(controller, "relative", False))
        self.warmup_steps = self._warmup(warmup_steps)
        self.shape = self._shape(envelope_shape, decay_steps, controller)
        self.decay_steps = resolve_decay(decay_steps, self.total_steps, self.warmup_steps, self.shape)
        # the envelope asked for when built: a loaded state with another one does not replace it
        self.built_envelope = (self.total_steps, self.warmup_steps, self.shape, self.decay_steps)
        self.warmup_given = warmup_steps is not None
        self.shape_given = envelope_shape is not None
        self.decay_given = decay_steps is not None
        self.mode = self._mode(gamma, controller)
        nan = float("nan")
        # an MLR-SNet is settled on the first loss to find its anchor; a relative controller's is lr
        self.settles = self.mode == "lr" and isinstance(controller, MLRSNet)
        if self.mode == "lr":
            if not (math.isfinite(self.base_lr) and self.base_lr > 0):
                raise ValueError(
                    f"AutoLR takes its scale from the optimizer's lr (the first param group's that is positive), "
                    f"and no group has a positive lr (the first has {base_lr!r}): construct the "
                    "optimizer with the peak rate you mean (e.g. SGD(params, lr=0.1) or AdamW(params, lr=1e-3)), "
                    "or pass gamma=<float>"
                )
            start = nan if self.settles else self.base_lr
        elif self.mode == "auto":
            if self.num_classes is None or self.num_classes < 2:
                raise ValueError(
                    "gamma='auto' needs num_classes >= 2: the published rule scales the rate by the "
                    "initial cross-entropy loss and the class count. Leave gamma unset to take the scale "
                    "from the optimizer's lr, or pass a float"
                )
            start = nan
        else:
            start = float(controller.default_gamma if self.mode == "controller" else gamma)
            if not math.isfinite(start) or start <= 0:
                raise ValueError(f"gamma must be a positive finite float, None, 'controller' or 'auto', got {start!r}")
        self.initial_peak = start  # the peak known on the host at construction (NaN until the first loss)
        self.peak = torch.full((), start, device=device)
        self.gamma = self.peak.clone() if self.has_envelope else self.peak
        self.pending = self.mode == "auto" or self.settles
        self._warn_about_choice(optimizer, warned)

    @staticmethod
    def _shape(envelope_shape: str | None, decay_steps: int | None, controller: nn.Module) -> str:
        """The shape asked for; else ``"wsd"`` when ``decay_steps`` is given (only it has one); else
        the one the controller learned its response under (``trained_envelope``); else ``"wsd"``."""
        if envelope_shape is not None or decay_steps is not None:
            return resolve_shape("wsd" if envelope_shape is None else envelope_shape)
        trained = getattr(controller, "trained_envelope", None)
        if trained is not None and trained not in ENVELOPES:
            raise ValueError(f"{type(controller).__name__}.trained_envelope is {trained!r}, not one of {ENVELOPES}: "
                             "fix the controller's attribute, or pass envelope= to AutoLR")
        return resolve_shape(trained)

    def _warmup(self, warmup_steps: int | None) -> int:
        steps = resolve_warmup(warmup_steps, self.total_steps)
        if self.scales_rate:
            return steps
        # gamma only caps this controller's own rate: a warm-up would clamp it to the first step's
        # cap, and the controller, which multiplies that rate, would never climb back
        if warmup_steps:
            raise ValueError(f"warmup_steps={warmup_steps!r}: this controller {_CAP_NO_WARMUP}; pass warmup_steps=0 "
                             "(or None), or use a relative controller")
        return 0

    @property
    def has_envelope(self) -> bool:
        """Whether ``gamma`` is its own tensor: ``peak`` times a factor the host computes."""
        return self.total_steps is not None or self.warmup_steps > 0

    def varies_at(self, step: int) -> bool:
        """Whether the host computes ``gamma`` at ``step``: every step with ``total_steps``, the
        warm-up's steps without (after them ``gamma`` holds the peak)."""
        return self.total_steps is not None or step < self.warmup_steps

    def _mode(self, gamma, controller: nn.Module) -> str:
        if gamma is None:
            if self.scales_rate:
                return "lr"
            if controller.default_gamma is None:
                raise ValueError(
                    f"AutoLR needs gamma for a {type(controller).__name__} without a default_gamma: pass a float")
            return "controller"
        if isinstance(gamma, str):
            if gamma == "controller":
                if controller.default_gamma is None:
                    raise ValueError(
                        f"gamma='controller' needs a controller that carries its own gamma (a saved or shipped "
                        f"one); this {type(controller).__name__} has none: leave gamma unset to take the scale "
                        "from the optimizer's lr")
                return "controller"
            if gamma == "auto":
                return gamma
            if gamma == "lr":
                if not self.scales_rate:
                    raise ValueError(f"gamma='lr' (the lr anchor) needs an MLRSNet or a relative action controller, "
                                     f"not a {type(controller).__name__}: pass a float, or leave gamma unset")
                return gamma
            raise ValueError(f"gamma must be a float, None, 'controller' or 'auto', got {gamma!r}")
        return "fixed"

    def _warn_about_choice(self, optimizer: torch.optim.Optimizer, warned: set) -> None:
        momentum = max(float(g.get("momentum", 0.0) or 0.0) for g in optimizer.param_groups)
        name = type(optimizer).__name__
        # a controller whose gamma is only a cap (the action controller starts at lr) is not
        # warned about when the user did not choose gamma
        if self.mode in ("controller", "fixed") and self.base_lr > 0 and self.user_gamma:
            g = float(self.peak)
            if not 0.1 <= g / self.base_lr <= 10.0:
                what = "the controller's own gamma" if self.mode == "controller" else "gamma"
                optim_support.warn_once(
                    warned, "gamma_far_from_lr",
                    f"AutoLR: {what} {g:g} is {g / self.base_lr:.3g}x the lr {self.base_lr:g} that {name} was "
                    "given, so the rate will be far from the rate you chose for this optimizer. Leave gamma "
                    "unset to scale the controller to the optimizer's lr",
                )
        plain_sgd = isinstance(optimizer, torch.optim.SGD) and momentum == 0
        if self.mode == "auto" and not plain_sgd:
            optim_support.warn_once(
                warned, "auto_gamma_optimizer",
                f"AutoLR: gamma='auto' is the published rule for plain SGD (no momentum); with {name}"
                f"{f' (momentum {momentum:g})' if momentum else ''} its scale is not calibrated (too large with "
                "momentum or an adaptive step) and training may diverge. Leave gamma unset to scale the "
                "controller to the optimizer's lr",
            )

    # ------------------------------------------------------------------------------------------
    def update_(self, loss: Tensor, step: int, controller: nn.Module) -> None:
        """Before the controller step ``step`` (0-based) reads ``loss``: set the peak once from the
        first finite loss, then ``gamma`` for this step. No host sync; nothing at all in the
        steady state without an envelope (this runs every step)."""
        if self.pending:
            with torch.no_grad():
                # only a finite loss decides the peak, and only once
                unset = ~torch.isfinite(self.peak) & torch.isfinite(loss)
                candidate = (reference.auto_gamma(loss, self.num_classes) if self.mode == "auto"
                             else self._anchor(loss, controller, unset))
                usable = torch.isfinite(candidate) & (candidate > 0)
                # 0 when it gave no usable value (the rate stays 0 and the scheduler says so), so
                # that it is not tried again every step
                decided = torch.where(usable, candidate, torch.zeros_like(candidate))
                self.peak.copy_(torch.where(unset, decided, self.peak))
        if self.has_envelope:
            torch.mul(self.peak, self.factor(step), out=self.gamma)

    def factor(self, step: int) -> float:
        """The envelope's factor at ``step`` (0-based)."""
        return envelope(step, self.total_steps, self.warmup_steps, self.shape, self.decay_steps)

    def describe_envelope(self) -> str:
        """The ``AutoLR`` arguments of the envelope in use, as text for messages."""
        return envelope_args(self.total_steps, self.warmup_steps, self.shape, self.decay_steps)

    def _anchor(self, loss: Tensor, controller: MLRSNet, unset: Tensor) -> Tensor:
        """``lr / p*``; settles the controller's state on ``loss`` where ``unset`` (kept elsewhere)."""
        h, c = controller.h.clone(), controller.c.clone()
        p = controller.settle_(loss, SETTLE_STEPS)
        controller.h.copy_(torch.where(unset, controller.h, h))
        controller.c.copy_(torch.where(unset, controller.c, c))
        p = torch.where(p >= MIN_SETTLED_P, p, torch.zeros_like(p))
        return self.base_lr / p

    def unusable_flag(self) -> Tensor:
        """``[1]`` (int64, on the device) if the decided peak is not a positive finite number, else ``[0]``."""
        return (~(torch.isfinite(self.peak) & (self.peak > 0))).to(torch.int64).reshape(1)

    def found(self) -> bool | None:
        """The host has seen a finite loss: the peak is set, or the rule had no usable value.
        Returns whether the peak is usable where that is known without a device sync (CPU
        tensors), else None."""
        self.pending = False
        if self.peak.device.type != "cpu":
            return None
        return not optim_support.host_scalar(self.unusable_flag())

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"mode": self.mode, "peak": self.peak.detach().clone(), "gamma": self.gamma.detach().clone(),
                "base_lr": self.base_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "envelope": self.shape, "decay_steps": self.decay_steps, "num_classes": self.num_classes}

    def check_state(self, state: dict) -> None:
        """Raise ``ValueError`` unless ``state`` is a complete :meth:`state_dict` (checked before
        the scheduler changes anything)."""
        mode = state.get("mode") if isinstance(state, dict) else None
        if mode not in MODES:
            raise ValueError(f"the state_dict's rate scale has an unknown mode {mode!r} (expected one of {MODES})")
        missing = [k for k in ("peak", "gamma", "base_lr", "total_steps", "num_classes") if k not in state]
        if missing:
            raise ValueError(f"the state_dict's rate scale is missing {missing}")
        for key in ("peak", "gamma"):
            value = state[key]
            if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
                raise ValueError(f"the state_dict's rate scale has a bad {key!r} (a 1-element floating-point tensor "
                                 "is expected)")
            # NaN: not decided yet (the lr anchor and 'auto' wait for a finite loss); 0: no usable scale
            v = float(value)
            undecided = math.isnan(v) and mode in ("lr", "auto")
            if not (undecided or (math.isfinite(v) and v >= 0)):
                raise ValueError(f"the state_dict's rate scale has {key} {v!r}; a rate scale is finite and >= 0, so "
                                 "this state is damaged")
        base_lr = state["base_lr"]
        if not (isinstance(base_lr, numbers.Real) and not isinstance(base_lr, bool) and math.isfinite(base_lr)
                and base_lr >= 0):
            raise ValueError(f"the state_dict's rate scale has a bad 'base_lr' {base_lr!r} (a finite number >= 0 "
                             "is expected)")
        classes, fewest = state["num_classes"], 2 if mode == "auto" else 1  # only 'auto' reads it
        if not (is_whole_number(classes, fewest) or (classes is None and mode != "auto")):
            raise ValueError(f"the state_dict's rate scale has a bad 'num_classes' {classes!r} (a whole number >= "
                             f"{fewest}{'' if mode == 'auto' else ', or None'} is expected)")
        total = state["total_steps"]
        if total is not None and not is_whole_number(total, 1):
            raise ValueError(f"the state_dict's rate scale has a bad 'total_steps' {total!r}")
        warmup = state.get("warmup_steps", 0)
        if not is_whole_number(warmup, 0):
            raise ValueError(f"the state_dict's rate scale has a bad 'warmup_steps' {warmup!r} (a whole number >= 0 "
                             "is expected)")
        try:
            resolve_warmup(warmup, total)
        except ValueError as exc:
            raise ValueError(f"the state_dict's rate scale has a bad 'warmup_steps': {exc}") from None
        if warmup and not self.scales_rate:
            raise ValueError(f"the state_dict's rate scale has warmup_steps={warmup}, but this controller "
                             f"{_CAP_NO_WARMUP}; set state['scale']['warmup_steps'] = 0 to load it")
        shape = state.get("envelope", "cosine")  # saved before the shape was: the cosine envelope
        decay = state.get("decay_steps")
        try:
            if shape not in ENVELOPES:
                raise ValueError(f"envelope {shape!r} is not one of {ENVELOPES}")
            if shape == "wsd" and total is not None:
                if decay is None:
                    raise ValueError("a 'wsd' envelope with total_steps needs its decay_steps")
                resolve_decay(decay, total, warmup, shape)
            elif decay is not None:
                raise ValueError(f"decay_steps {decay!r} belongs to a 'wsd' envelope with total_steps")
        except ValueError as exc:
            raise ValueError(f"the state_dict's rate scale has a bad envelope: {exc}") from None

    def load_state_dict(self, state: dict) -> tuple | None:
        """Load ``state``. The envelope (``total_steps``, ``warmup_steps``, its shape and
        ``decay_steps``) is the saved one, unless this scale was built with another
        ``total_steps`` (or the same one and an explicit other warm-up, shape or decay): a run
        resumed to be extended (or shortened) keeps the envelope it was built with, as a
        framework's own schedulers rebuilt from the new length do. Returns the saved envelope in
        that case."""
        self.mode = state["mode"]
        self.base_lr = float(state["base_lr"])
        self.num_classes = state["num_classes"]
        # a state without the keys: no warm-up, the cosine envelope
        saved = (state["total_steps"], int(state.get("warmup_steps", 0)), state.get("envelope", "cosine"),
                 state.get("decay_steps"))
        # built with a length: another saved length, or a warm-up or shape given explicitly and saved
        # otherwise, is replaced; with the same length and the defaults the saved one stands (exact resume)
        built_total, built_warmup, built_shape, built_decay = self.built_envelope
        replaced = built_total is not None and (
            saved[0] != built_total
            or (self.warmup_given and saved[1] != built_warmup)
            or (self.shape_given and saved[2] != built_shape)
            or (self.decay_given and saved[3] != built_decay))
        self.total_steps, self.warmup_steps, self.shape, self.decay_steps = (
            self.built_envelope if replaced else saved)
        with torch.no_grad():
            self.peak.copy_(state["peak"].reshape(()))
            if not self.has_envelope:
                self.gamma = self.peak
            else:
                if self.gamma is self.peak:  # a tensor of its own from now on
                    self.gamma = self.peak.clone()
                self.gamma.copy_(state["gamma"].reshape(()))  # in place otherwise: a captured graph reads this tensor
        self.pending = self.mode in ("lr", "auto") and not bool(torch.isfinite(self.peak))
        return saved if replaced else None
