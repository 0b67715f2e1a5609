"""``AutoLR``: the drop-in scheduler that takes every step's learning rate from a controller."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import dispatch, optim_support, reference
from .controller import MLRSNet
from .distributed import broadcast_from_rank0_, is_distributed, mean_across_ranks
from .host_flags import DeviceCounters

STATE_VERSION = 1


class AutoLR:
    """Set the optimizer's learning rate from a learned controller, one call per step.

    The canonical loop (the rate used for step ``t`` is a function of the loss at step ``t``)::

        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            sched.step(loss)      # after backward, before optimizer.step()
            optimizer.step()

    ``step(loss)`` takes the loss as a tensor and never waits for the device: the rate is a
    0-dim tensor written into every param group's ``lr`` (PyTorch's optimizers accept a
    tensor ``lr``). For a loop without host syncs on a GPU, the optimizer must read that tensor
    on the device: use ``SGD(..., fused=True)`` or ``Adam/AdamW(..., fused=True)`` (AutoLR
    warns once otherwise). Optimizers that cannot take a tensor get a float rate, which costs a
    sync per step (AutoLR says so once).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, SGD with momentum, Adam, AdamW, ...).
        controller: an :class:`MLRSNet` (or another controller with a ``scheduler_step_``
            method, e.g. the action controller). It is moved to the parameters' device.
        gamma: the rate scale: ``lr = gamma * p`` with ``p`` in ``[0, 1]``. A float, or
            ``"auto"``: the published rule ``|sqrt(L0) * ln(L0 * C) / C**0.25| / 4`` from the
            first finite training loss ``L0`` and ``num_classes`` ``C``. The rule assumes a
            cross-entropy loss (``L0 ~ ln C`` for an untrained classifier); for regression
            there is no class count and no such scale, so ``"auto"`` refuses and asks for a
            float (``find_lr`` gives one). ``None``: the controller's own ``default_gamma``
            (pretrained controllers carry the gamma they were trained with).
        num_classes: ``C`` for ``gamma="auto"``.
        lr_scales: per-param-group multipliers of the rate. Default: each group keeps its
            ratio to the first group's initial ``lr`` (as ``LambdaLR`` keeps ``base_lrs``).
        distributed: ``"auto"`` (default): under an initialised process group with more than
            one rank, the controller reads the all-reduced mean loss and starts from rank 0's
            weights, so every rank gets the same rate. ``True``/``False`` force it.
        meta: a :class:`MetaConfig` to meta-train the controller online (see ``meta.py``).

    Bad input: a NaN/Inf loss leaves the rate and the controller state as they were (decided on
    the device), counts a skipped step (``skipped_steps``) and warns once. A negative loss is
    clamped to 0 (the controller was trained on non-negative losses) and counted. A loss that
    is not a 1-element tensor, or lives on another device, raises ``ValueError``. The rate is
    always finite and in ``[0, gamma]``; before the first finite loss it is 0.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        controller: nn.Module | str | None = None,
        gamma: float | str | None = None,
        *,
        num_classes: int | None = None,
        lr_scales: list[float] | None = None,
        distributed: bool | str = "auto",
        meta: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"AutoLR needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if controller is None:
            controller = MLRSNet()
        elif isinstance(controller, str):
            from .pretrained import load_pretrained

            controller = load_pretrained(controller)
        if not isinstance(controller, nn.Module):
            raise TypeError(f"controller must be an nn.Module (e.g. MLRSNet), got {type(controller).__name__}")
        self.optimizer = optimizer
        self.device = optim_support.params_device(optimizer)
        self.controller = controller.to(self.device)
        self._warned: set[str] = set()

        # -- gamma --------------------------------------------------------------------------
        if gamma is None:
            gamma = getattr(controller, "default_gamma", None)
            if gamma is None:
                raise ValueError(
                    "AutoLR needs gamma (the largest rate): a float, or gamma='auto' with "
                    "num_classes=C for a classifier trained with cross-entropy"
                )
        self.gamma_mode = "auto" if gamma == "auto" else "fixed"
        if self.gamma_mode == "auto":
            if num_classes is None or int(num_classes) < 2:
                raise ValueError(
                    "gamma='auto' needs num_classes >= 2: the published rule scales the rate by the "
                    "initial cross-entropy loss and the class count. For regression (no classes) "
                    "pass a float gamma, e.g. the suggestion of autolr_fast.find_lr"
                )
            self.gamma = torch.full((), float("nan"), device=self.device)
        else:
            g = float(gamma)
            if not math.isfinite(g) or g <= 0:
                raise ValueError(f"gamma must be a positive finite float or 'auto', got {gamma!r}")
            self.gamma = torch.full((), g, device=self.device)
        self.num_classes = None if num_classes is None else int(num_classes)
        self._gamma_pending = self.gamma_mode == "auto"

        # -- param groups ---------------------------------------------------------------------
        base = [float(g["lr"]) for g in optimizer.param_groups]
        for g, b in zip(optimizer.param_groups, base):
            g.setdefault("initial_lr", b)
        if lr_scales is None:
            if base[0] <= 0:
                lr_scales = [1.0] * len(base)
            else:
                lr_scales = [b / base[0] for b in base]
        if len(lr_scales) != len(optimizer.param_groups):
            raise ValueError(f"lr_scales has {len(lr_scales)} entries for {len(optimizer.param_groups)} param groups")
        self.lr_scales = [float(s) for s in lr_scales]
        self.tensor_lr = optim_support.takes_tensor_lr(optimizer)
        if not self.tensor_lr:
            optim_support.warn_once(
                self._warned,
                "float_lr",
                f"{type(optimizer).__name__} is not known to accept a tensor lr: AutoLR writes a float "
                "rate, which reads the rate on the host (one sync per step)",
            )
        else:
            problem = optim_support.sync_free_problem(optimizer, self.device)
            if problem:
                optim_support.warn_once(
                    self._warned, "sync", f"AutoLR: {problem}, a host sync per step; to avoid it, {optim_support.SYNC_FREE_HINT}"
                )

        # -- state ----------------------------------------------------------------------------
        initial = getattr(controller, "initial_rate", None)
        start = float(initial(base[0])) if callable(initial) else 0.0
        self.rate = torch.full((), start, device=self.device)
        self.counters = DeviceCounters(("skipped", "negative"), self.device)
        self.step_count = 0
        self._steps_since_optimizer = 0
        self.distributed = is_distributed(distributed)
        if self.distributed:
            broadcast_from_rank0_(list(self.controller.parameters()) + list(self.controller.buffers()))
        if self.tensor_lr:
            optim_support.lr_tensors(optimizer, self.device)
            self._write_rate_to_groups()
        self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step)

        self.meta = None
        if meta is not None:
            from .meta import MetaTrainer

            self.meta = MetaTrainer(self, meta)

    # ------------------------------------------------------------------------------------------
    @torch._dynamo.disable
    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        # Excluded from torch.compile: it reads host counters that change every step, which
        # would otherwise become guards and recompile a compiled optimizer.step every step.
        if self.step_count == 0:
            raise RuntimeError(
                "optimizer.step() was called before AutoLR.step(loss). AutoLR sets the rate of "
                "step t from the loss of step t: call loss.backward(); sched.step(loss); "
                "optimizer.step() in that order"
            )
        self._steps_since_optimizer = 0

    def _check_loss(self, loss: Any) -> Tensor:
        if (type(loss) is Tensor and loss.dtype is torch.float32 and loss.dim() == 0
                and loss.device == self.device):
            return loss.detach()  # the common case, without the conversions below
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"AutoLR.step takes the loss as a tensor (the one you called .backward() on), got "
                f"{type(loss).__name__}; passing a Python number would force a host sync"
            )
        if loss.numel() != 1:
            raise ValueError(
                f"AutoLR.step needs a scalar loss, got shape {tuple(loss.shape)}; reduce it first "
                "(e.g. loss.mean())"
            )
        if loss.device != self.device:
            raise ValueError(
                f"the loss is on {loss.device} but the optimizer's parameters (and the controller) "
                f"are on {self.device}; pass the loss computed on {self.device}"
            )
        if loss.is_complex():
            raise ValueError("AutoLR.step needs a real-valued loss")
        return loss.detach().reshape(()).to(torch.float32)

    def _write_rate_to_groups(self) -> None:
        if self.tensor_lr:
            dispatch.write_rates(self.rate, optim_support.lr_tensors(self.optimizer, self.device), self.lr_scales)
        else:
            r = float(self.rate)
            for g, s in zip(self.optimizer.param_groups, self.lr_scales):
                g["lr"] = r * s

    def step(self, loss: Tensor) -> None:
        """Read this step's loss and set the rate for the coming ``optimizer.step()``."""
        x = self._check_loss(loss)
        if self.step_count == 0 and all(p.grad is None for g in self.optimizer.param_groups for p in g["params"]):
            raise RuntimeError(
                "AutoLR.step(loss) was called before loss.backward(): no parameter has a gradient. "
                "Call loss.backward(); sched.step(loss); optimizer.step() in that order"
            )
        if self._steps_since_optimizer >= 1 and self.step_count > 0:
            optim_support.warn_once(
                self._warned,
                "double_step",
                "AutoLR.step was called twice without optimizer.step() in between (fine if a "
                "GradScaler skipped a step; otherwise call it once per optimizer step)",
            )
        if self.distributed:
            x = mean_across_ranks(x)
        if self._gamma_pending:
            # gamma='auto' is set from the first finite loss; until the host has seen that
            # happen (polled counters, no sync) this where() keeps it, or sets it once.
            with torch.no_grad():
                candidate = reference.auto_gamma(x, self.num_classes)
                usable = torch.isfinite(candidate) & (candidate > 0)
                candidate = torch.where(usable, candidate, torch.full_like(candidate, float("nan")))
                self.gamma.copy_(torch.where(torch.isfinite(self.gamma), self.gamma, candidate))
        if self.meta is not None:
            self.meta.maybe_step(x)
        lr_list = optim_support.lr_tensors(self.optimizer, self.device) if self.tensor_lr else []
        controller = self.controller
        if isinstance(controller, MLRSNet) and controller.gate_order == "train":
            # the whole step, the lr writes and the counters: one launch on the Triton path
            dispatch.mlrsnet_step_(x, controller.h, controller.c, controller.flat_weights(), self.gamma, self.rate,
                                   lr_list, self.lr_scales, self.counters.values)
        else:
            with torch.no_grad():
                controller.scheduler_step_(x, self.gamma, self.rate)
                reference.count_step_(self.counters.values, x, torch.isfinite(x))
            if self.tensor_lr:
                dispatch.write_rates(self.rate, lr_list, self.lr_scales)
        if not self.tensor_lr:
            self._write_rate_to_groups()
        self.step_count += 1
        self._steps_since_optimizer += 1
        self._after_step_host_checks()

    def _after_step_host_checks(self) -> None:
        seen = self.counters.poll(self.step_count)
        if self._gamma_pending and seen["steps"] > seen["skipped"]:
            self._gamma_pending = False  # a finite loss has set gamma
        if seen["skipped"]:
            optim_support.warn_once(
                self._warned,
                "nonfinite",
                "AutoLR: a non-finite (NaN/Inf) loss (or controller output) was seen; the rate and the "
                "controller state were kept for that step (see sched.skipped_steps). Check your loss or lower the rate scale.",
            )
        if seen["negative"]:
            optim_support.warn_once(
                self._warned,
                "negative",
                "AutoLR: a negative loss was seen and clamped to 0 for the controller, which was "
                "trained on non-negative losses. Shift your loss to be non-negative for a meaningful rate.",
            )

    # ------------------------------------------------------------------------------------------
    @property
    def last_rate(self) -> Tensor:
        """The current rate of the first param group, as a 0-dim device tensor (no sync)."""
        return self.rate

    @property
    def skipped_steps(self) -> int:
        """Steps whose loss was NaN/Inf (reads the device: a sync on a GPU)."""
        return self.counters.exact()["skipped"]

    def get_last_lr(self) -> list[float]:
        """The rates of all param groups as floats (reads the device: a sync on a GPU)."""
        r = float(self.rate)
        return [r * s for s in self.lr_scales]

    def state_dict(self) -> dict:
        state = {
            "version": STATE_VERSION,
            "controller_type": type(self.controller).__name__,
            "controller": {k: v.detach().clone() for k, v in self.controller.state_dict().items()},
            "gamma": self.gamma.detach().clone(),
            "gamma_mode": self.gamma_mode,
            "num_classes": self.num_classes,
            "rate": self.rate.detach().clone(),
            "counters": self.counters.values.detach().clone(),
            "step_count": self.step_count,
            "lr_scales": list(self.lr_scales),
            "warned": sorted(self._warned),
        }
        if self.meta is not None:
            state["meta"] = self.meta.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; checked whole before anything changes."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not an AutoLR state_dict of version {STATE_VERSION} (got "
                f"{state.get('version') if isinstance(state, dict) else type(state).__name__})"
            )
        required = ("controller", "gamma", "rate", "counters", "step_count", "lr_scales", "gamma_mode")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"AutoLR state_dict is missing {missing}")
        if state.get("controller_type") != type(self.controller).__name__:
            raise ValueError(
                f"state_dict is for a {state.get('controller_type')} controller, this AutoLR has a "
                f"{type(self.controller).__name__}"
            )
        own = self.controller.state_dict()
        ctrl = state["controller"]
        if set(ctrl) != set(own) or any(tuple(ctrl[k].shape) != tuple(own[k].shape) for k in own):
            raise ValueError("the controller in this state_dict has other parameters or shapes than this AutoLR's")
        if len(state["lr_scales"]) != len(self.optimizer.param_groups):
            raise ValueError("the state_dict has another number of param groups than this optimizer")
        if (self.meta is None) != ("meta" not in state):
            raise ValueError("the state_dict and this AutoLR disagree on meta-training (meta=...)")
        self.controller.load_state_dict({k: v.to(self.device) for k, v in ctrl.items()})
        with torch.no_grad():
            self.gamma.copy_(state["gamma"])
            self.rate.copy_(state["rate"])
            self.counters.values.copy_(state["counters"])
        self.gamma_mode = state["gamma_mode"]
        self.num_classes = state.get("num_classes")
        self._gamma_pending = self.gamma_mode == "auto"
        self.step_count = int(state["step_count"])
        self.lr_scales = [float(s) for s in state["lr_scales"]]
        self._warned = set(state.get("warned", []))
        if self.meta is not None:
            self.meta.load_state_dict(state["meta"])
        self._write_rate_to_groups()

    def __repr__(self) -> str:
        return (
            f"AutoLR(controller={type(self.controller).__name__}, gamma_mode={self.gamma_mode}, "
            f"steps={self.step_count}, device={self.device})"
        )
