"""``AutoLR``: the drop-in scheduler that takes every step's learning rate from a controller."""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from . import optim_support, rate_scale
from .checks import is_whole_number
from .controllers.mlrsnet import MLRSNet
from .controllers.pretrained import load_pretrained
from .controllers.protocol import Controller
from .distributed import broadcast_from_rank0_, is_distributed, mean_across_ranks
from .host_flags import DeviceCounters
from .meta import MetaConfig, MetaTrainer
from .ops import dispatch, reference
from .rate_scale import RateScale, envelope_args

STATE_VERSION = 2


class AutoLR:
    """Set the optimizer's learning rate from a learned controller, one call per step.

    The canonical loop (the rate used for step ``t`` is a function of the loss at step ``t``)::

        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            sched.step(loss)      # after backward, before optimizer.step()
            optimizer.step()

    ``step(loss)`` takes the loss as a tensor and never waits for the device: on a GPU the rate
    is a 0-dim tensor written into every param group's ``lr`` (PyTorch's optimizers accept a
    tensor ``lr``). For a loop without host syncs on a GPU, the optimizer must read that tensor
    on the device: use ``SGD(..., fused=True)`` or ``Adam/AdamW(..., fused=True)`` (AutoLR
    warns once otherwise). Optimizers that cannot take a tensor get a float rate, which costs a
    sync per step on a GPU (AutoLR says so once). On the CPU the rate is written as a float
    (see ``lr_as_tensor``).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, SGD with momentum, Adam, AdamW, ...).
        controller: an :class:`MLRSNet`, or any module with the :class:`~autolr_fast.controllers.Controller`
            interface (e.g. the action controller), or the name of a shipped one. Default: the
            shipped ``"default"`` MLR-SNet (meta-trained across several tasks and optimizers;
            ``autolr_fast/controllers/weights/default.json`` says how). It is moved to the
            parameters' device.
        gamma: the rate scale: ``rate = gamma * p`` with ``p`` in ``[0, 1]`` (see
            :mod:`autolr_fast.rate_scale`). ``None`` (default): anchored on the optimizer's ``lr``
            (an MLR-SNet controller is settled on the first finite loss and ``gamma = lr / p*``,
            so its first rate is your ``lr``, times the envelope's first factor with
            ``total_steps``, and it moves the rate relative to it; any optimizer, any loss
            scale). ``"controller"``: the ``default_gamma`` a saved controller carries.
            ``"auto"``: the published rule ``|sqrt(L0) * ln(L0 * C) / C**0.25| / 4`` from the
            first finite loss ``L0`` and ``num_classes`` ``C`` (cross-entropy with plain SGD only).
            A float: fixed.
        total_steps: the number of optimizer steps of the run. When given, the scale follows an
            envelope over them (the controller cannot know the run length): by default a linear
            warm-up, the peak held, then a linear decay to 0 over the last ``decay_steps``. The
            envelope counts ``step`` calls, skipped ones (``skip=``, a NaN loss) included: where
            they are is known only on the device.
        warmup_steps: the warm-up's length in optimizer steps: the scale rises linearly,
            ``(t + 1) / warmup_steps`` at step ``t``, to the peak. Default (``None``): 5 % of
            ``total_steps``, none without it. ``0``: no warm-up. Without ``total_steps`` the scale
            stays at the peak after the warm-up. Only for controllers whose rate ``gamma`` scales
            (MLR-SNet, relative action controllers).
        envelope: the shape after the warm-up, with ``total_steps``. ``"wsd"`` (the default,
            ``None``, unless the controller has a ``trained_envelope``: the action controller's is
            ``"cosine"``; an explicit ``decay_steps`` selects ``"wsd"`` too): warm-up, stable,
            decay: the peak until the last ``decay_steps``, then linearly to 0. ``"cosine"``: a
            cosine from 1 to 0 over every step after the warm-up (as ``CosineAnnealingLR``).
        decay_steps: the length of the ``"wsd"`` envelope's final decay. Default (``None``): 20 %
            of ``total_steps``.
        num_classes: ``C`` for ``gamma="auto"``.
        lr_scales: per-param-group multipliers of the rate. Default: each group keeps its
            ratio to the first group's initial ``lr`` (as ``LambdaLR`` keeps ``base_lrs``); the first
            group with a positive ``lr`` when the first has 0, so a group frozen with ``lr=0``
            stays at 0.
        distributed: ``"auto"`` (default): under an initialised process group with more than
            one rank, the controller reads the all-reduced mean loss and starts from rank 0's
            weights, so every rank gets the same rate. ``True``/``False`` force it.
        meta: a :class:`MetaConfig` to meta-train the controller online (see ``meta.py``).
        lr_as_tensor: write the rate into the param groups as a 0-dim tensor (``True``) or a
            float (``False``). Default: a tensor on a GPU (a float would be a host sync per
            step), a float on the CPU (reading it there stalls nothing, while a tensor
            ``lr`` slows torch.optim's CPU step). Pass ``True`` on the CPU for a compiled
            ``optimizer.step`` (a tensor does not recompile when it changes).

    Bad input: a NaN/Inf loss leaves the rate and the controller state as they were (decided on
    the device), counts a skipped step (``skipped_steps``) and warns once. A negative loss is
    clamped to 0 (the controller was trained on non-negative losses) and counted. A loss that
    is not a 1-element tensor, or lives on another device, raises ``ValueError``. The rate is
    always finite and in ``[0, gamma]`` (a relative action controller: ``gamma * level``, the level
    at most its ``max_level``); before the first finite loss it is 0 for an MLR-SNet.

    Gradient accumulation, mixed precision, clipping: pass ``step`` the unscaled mean loss of the
    optimizer step, once per optimizer step (the mean of the micro-batch losses; with a
    ``GradScaler`` the loss before ``scaler.scale``). With meta-training, call
    ``scaler.unscale_(optimizer)`` and clip the gradients before ``step``: the meta-step reads the
    gradients as the optimizer will apply them.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        controller: nn.Module | str | None = None,
        gamma: float | str | None = None,
        *,
        total_steps: int | None = None,
        warmup_steps: int | None = None,
        envelope: str | None = None,
        decay_steps: int | None = None,
        num_classes: int | None = None,
        lr_scales: list[float] | None = None,
        distributed: bool | str = "auto",
        meta: MetaConfig | None = None,
        lr_as_tensor: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"AutoLR needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        controller = _resolve_controller(controller)
        self.optimizer = optimizer
        self.device = optim_support.params_device(optimizer)
        self.controller = controller.to(self.device)
        self._warned: set[str] = set()
        previous = next(iter(autolrs_driving(optimizer)), None)
        # a notebook cell run again builds a second AutoLR on the same optimizer: a group that still
        # holds the earlier one's last rate starts again from its recorded initial_lr (the peak the
        # user meant); a group whose lr the user set since, from that lr
        from_initial = previous.groups_holding_its_rates() if previous is not None else None
        reference_lr = self._init_param_groups(lr_scales, lr_as_tensor, from_initial)
        self.scale = RateScale(gamma, controller, optimizer, self.device, reference_lr, num_classes=num_classes,
                               total_steps=total_steps, warmup_steps=warmup_steps, envelope_shape=envelope,
                               decay_steps=decay_steps, warned=self._warned)
        # an lr other than the recorded initial_lr, where the lr anchors the rate: a torch scheduler
        # or a checkpoint moved it (warned at the first step, unless load_state_dict replaces the
        # anchor before then)
        groups = optimizer.param_groups
        moved = [(float(g["lr"]), float(g["initial_lr"])) for g in groups
                 if "initial_lr" in g and float(g["lr"]) != float(g["initial_lr"])]
        start = controller.initial_rate(reference_lr)
        # the lr anchor, or a controller that starts at the lr (a non-relative action controller)
        starts_at_lr = start == reference_lr and start > 0 and not getattr(controller, "relative", False)
        anchored_on_lr = ((self.scale.mode == "lr" or starts_at_lr) and previous is None
                          and any(float(g["lr"]) > 0 for g in groups))
        self._moved_lr = moved[0] if moved and anchored_on_lr else None
        if getattr(controller, "relative", False) and not self.scale.pending:
            start = self.scale.initial_peak  # rate = gamma x level, level 1
        self.rate = torch.full((), float(start), device=self.device)
        if self.device.type == "cpu" and optim_support.numpy_available():
            self._rate_view = self.rate.numpy()
        self.counters = DeviceCounters(("skipped", "negative"), self.device)
        self._on_cuda = self.device.type == "cuda"
        self._scale_check: DeviceCounters | None = None  # on a GPU, until the scale's verdict arrives
        self._lr_tensors = optim_support.LrTensors(optimizer, self.device)
        # the step's ok flag (unused here): one buffer instead of an allocation per step on a GPU
        self._ok = torch.empty((), dtype=torch.bool, device=self.device) if self._on_cuda else None
        self.step_count = 0
        self._steps_since_optimizer = 0
        self._last_had_skip = False
        self.distributed = is_distributed(distributed)
        # everything that can refuse the arguments comes before the optimizer is touched: a failed
        # AutoLR(...) must leave the optimizer as it was (no hook, float lrs)
        self.meta = None if meta is None else MetaTrainer(self, meta)
        # the warnings first: one turned into an error (python -W error) must leave the optimizer as it was
        if previous is not None:
            lrs = [float(g.get("initial_lr", g["lr"]) if held else g["lr"]) for g, held in zip(groups, from_initial)]
            origin = ("the lr the groups had before it" if all(from_initial) else "the lr you set since" if
                      not any(from_initial) else "the lr you set since, or the one before it where you set none")
            warnings.warn(
                f"AutoLR: this optimizer was still driven by an earlier AutoLR ({previous!r}); it is closed "
                f"(AutoLR.close()) and this one takes over, from {origin}, {lrs}. Close an AutoLR yourself before "
                "building another on its optimizer to silence this",
                RuntimeWarning, stacklevel=optim_support.user_stacklevel())
        # on the float path an lr another scheduler sets is seen at the next step (and warned about then)
        if self.tensor_lr and optim_support.torch_scheduler_built(optimizer):
            optim_support.warn_once(
                self._warned, "torch_scheduler",
                "AutoLR: a torch.optim.lr_scheduler was built on this optimizer at some point (torch leaves its mark "
                "on optimizer.step for good). If it is still stepped: AutoLR sets every group's lr at each step, so "
                "its step() has no effect (or, called between sched.step and optimizer.step, replaces AutoLR's "
                "rate); use one of the two. If not, ignore this",
            )
        if previous is not None:
            previous._hand_over(from_initial)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", float(g["lr"]))
        if self.distributed:
            broadcast_from_rank0_(list(self.controller.parameters()) + list(self.controller.buffers()))
        if self.tensor_lr:
            optim_support.lr_tensors(optimizer, self.device)
            self._write_rate_to_groups()
        self._written_lrs: list = [g["lr"] for g in optimizer.param_groups]  # the float path's last write
        self._initial_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self._first_step = 0  # the step this AutoLR started at (see _start_at_step)
        self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step)
        # optimizer.load_state_dict writes the saved lrs: a resume, not an lr set outside AutoLR
        self._load_hook = optimizer.register_load_state_dict_post_hook(self._after_optimizer_load)
        self._closed = False
        self._paused = False  # during an optimizer step's second and later closure evaluations
        self._steady_step = None  # see _steady_step_fn

    def _init_param_groups(self, lr_scales: list[float] | None, lr_as_tensor: bool | None,
                           from_initial: list[bool] | None = None) -> float:
        """Record each group's scale; decide tensor or float rates. Returns the rate the scales
        are relative to: the first positive group lr (the first group's when none is); a group
        marked in ``from_initial`` counts with its ``initial_lr``."""
        groups = self.optimizer.param_groups
        if any("lr" not in g for g in groups):
            raise TypeError(f"AutoLR sets each param group's 'lr', and {type(self.optimizer).__name__}'s param groups "
                            "have none: use an optimizer with a learning rate")
        from_initial = from_initial or [False] * len(groups)
        lrs = [float(g["initial_lr"] if held and "initial_lr" in g else g["lr"])
               for g, held in zip(groups, from_initial)]
        if not any(r > 0 for r in lrs):
            # an optimizer state loaded before AutoLR(...) holds the last rate, 0 before a first step
            # that wrote tensor rates: the peak an earlier AutoLR recorded is what this run meant
            lrs = [float(g.get("initial_lr", r)) for g, r in zip(groups, lrs)]
        reference, ratios = optim_support.group_lr_scales(lrs)
        explicit = lr_scales is not None
        if lr_scales is None:
            lr_scales = ratios
        if len(lr_scales) != len(groups):
            raise ValueError(f"lr_scales has {len(lr_scales)} entries for {len(groups)} param groups")
        self.lr_scales = check_lr_scales(lr_scales, "lr_scales")
        self._explicit_lr_scales = explicit
        takes_tensor = optim_support.takes_tensor_lr(self.optimizer)
        if lr_as_tensor is None:
            # On the CPU reading the rate stalls nothing, while a tensor lr slows
            # torch.optim's CPU step; on a GPU a float would be a sync per step.
            lr_as_tensor = self.device.type != "cpu"
        self.tensor_lr = bool(lr_as_tensor) and takes_tensor
        # the CPU rate read in place, without a dispatch (NumPy view), when floats are written
        self._rate_view = None
        if lr_as_tensor and not takes_tensor:
            optim_support.warn_once(
                self._warned, "float_lr",
                f"{optim_support.tensor_lr_problem(self.optimizer)}: AutoLR writes a float rate, which reads the "
                "rate on the host (one sync per step on a GPU)",
            )
        elif self.tensor_lr:
            problem = optim_support.sync_free_problem(self.optimizer, self.device)
            if problem:
                optim_support.warn_once(
                    self._warned, "sync",
                    f"AutoLR: {problem}, a host sync per step; to avoid it, {optim_support.SYNC_FREE_HINT}",
                )
        return reference

    # ------------------------------------------------------------------------------------------
    @torch._dynamo.disable
    def _before_optimizer_step(self, optimizer, args, kwargs) -> tuple[tuple, dict] | None:
        # Excluded from torch.compile: it reads host counters that change every step, which
        # would otherwise become guards and recompile a compiled optimizer.step every step.
        self._steps_since_optimizer = 0
        closure = _closure_of(args, kwargs)
        if not callable(closure):
            if self.step_count > 0 or _initialising_state_for_a_checkpoint():
                return None
            raise RuntimeError(
                "optimizer.step() was called before AutoLR.step(loss). AutoLR sets the rate of "
                "step t from the loss of step t: call loss.backward(); sched.step(loss); "
                "optimizer.step() in that order"
            )

        # optimizer.step(closure) (Lightning's automatic optimization, LBFGS-style loops): the
        # closure runs backward and sched.step(loss) inside optimizer.step, after this hook. AutoLR
        # reads the first evaluation (the loss at the step's starting point) and ignores the
        # others of the same optimizer step (LBFGS evaluates many). The first closure of the run is
        # checked as soon as it returns, before the optimizer moves the parameters.
        first_of_run = self.step_count == 0
        evaluations = [0]

        def checked_closure():
            evaluations[0] += 1
            if evaluations[0] > 1:
                self._paused = True
                try:
                    return closure()
                finally:
                    self._paused = False
            loss = closure()
            if first_of_run and self.step_count == 0:
                raise RuntimeError(
                    "optimizer.step(closure) ran a closure that did not call AutoLR.step(loss): inside the "
                    "closure, call loss.backward(); sched.step(loss) before it returns the loss"
                )
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": checked_closure}
        return (args[0], checked_closure, *args[2:]), kwargs

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

    def _check_skip(self, skip: Any) -> Tensor:
        if not isinstance(skip, Tensor) or skip.numel() != 1 or skip.dtype is not torch.bool:
            raise TypeError(f"AutoLR.step's skip must be a 1-element bool tensor, got {skip!r}")
        if skip.device != self.device:
            raise ValueError(f"AutoLR.step's skip is on {skip.device}; pass it on {self.device}")
        return skip.reshape(())

    def _write_rate_to_groups(self) -> None:
        if self.tensor_lr:
            dispatch.write_rates(self.rate, self._lr_tensors(), self.lr_scales)
        else:
            r = float(self.rate if self._rate_view is None else self._rate_view)
            written = self._written_lrs = []
            for g, s in zip(self.optimizer.param_groups, self.lr_scales):
                g["lr"] = r * s
                written.append(g["lr"])

    def step(self, loss: Tensor, skip: Tensor | None = None) -> None:
        """Read this step's loss and set the rate for the coming ``optimizer.step()``.

        ``skip``: a 1-element bool tensor on the device, True when the coming optimizer step will
        not happen (a ``GradScaler`` found Inf/NaN gradients): the controller then reads nothing
        and keeps the rate, as for a NaN loss, and the step is counted in ``skipped_steps``.
        Decided on the device, no sync (the framework integrations pass it).

        On a GPU, the step can be captured in a CUDA graph with the rest of the training step
        (after a few eager steps; see :meth:`_check_capturable`): each replay then runs the
        controller on the replay's loss and writes a new rate.

        Inside ``optimizer.step(closure)`` only the closure's first evaluation is read: an
        optimizer that evaluates it again within the step (LBFGS) does not advance AutoLR."""
        if self._paused:
            return
        fast = self._steady_step
        # a second step without optimizer.step() takes the full step until it has been warned about
        if (fast is not None and skip is None and type(loss) is Tensor
                and (not self._steps_since_optimizer or "double_step" in self._warned)
                and loss.dtype is torch.float32 and loss.dim() == 0 and loss.device == self.device):
            lr_list = self._lr_tensors.cached()
            if lr_list is not None and not dispatch.force_reference():
                self._fast_step(fast, loss, lr_list)
                return
        self._step(loss, skip)

    def _fast_step(self, step_fn, loss: Tensor, lr_list: list[Tensor]) -> None:
        """The steady state (see :meth:`_steady_step_fn`): what :meth:`_step` does there, without
        the decisions that cannot change it, so that on a GPU the host time is the launch's."""
        self._last_had_skip = False
        controller = self.controller
        state = controller._buffers
        x = loss.detach() if loss.requires_grad else loss
        step_fn(x, state["h"], state["c"], controller.flat_weights(), self.scale.gamma, self.rate, lr_list,
                self.lr_scales, self.counters.values, self._ok)
        self.step_count += 1
        self._steps_since_optimizer += 1
        if not self.counters.idle_tick():  # a copy of the counters is due or in flight
            self._after_step_host_checks()

    def _after_optimizer_load(self, optimizer) -> None:
        self._written_lrs = [g["lr"] for g in optimizer.param_groups]
        # a state saved under a scheduler that keeps no initial_lr (ReduceLROnPlateau) would drop
        # the peak AutoLR recorded: a later AutoLR on this optimizer starts from it
        for g, initial in zip(optimizer.param_groups, self._initial_lrs):
            g.setdefault("initial_lr", initial)

    def _warn_if_lrs_were_set(self) -> None:
        """On the float path, warn (once) when a group's lr was set since the last step by someone
        else (the user, a torch.optim.lr_scheduler): AutoLR writes every group's lr at each step, so
        the value would be lost silently. (On the tensor path the value cannot be read without a
        sync, and optimizer.load_state_dict replaces the tensors in a normal resume.)"""
        changed = [(i, g["lr"]) for i, (g, w) in enumerate(zip(self.optimizer.param_groups, self._written_lrs))
                   if g["lr"] != w]
        if changed:
            i, value = changed[0]
            optim_support.warn_once(
                self._warned, "lr_set_outside",
                f"AutoLR: param group {i}'s lr was set to {float(value):g} outside AutoLR, which sets every group's lr "
                "at each step and overwrites it (a torch.optim.lr_scheduler stepped alongside AutoLR has no effect "
                f"either). To change a group's share of the rate, set sched.lr_scales[{i}] (its multiplier of "
                "AutoLR's rate; 0 freezes it); to hand the rate to another schedule, call sched.close() first",
            )

    def _start_at_step(self, step: int) -> None:
        """A fresh AutoLR continuing a run that reached ``step`` under another schedule: the
        envelope goes on from there (the Hugging Face integration switching a checkpoint)."""
        self.step_count = self._first_step = int(step)
        self._steady_step = None

    def groups_holding_its_rates(self) -> list[bool]:
        """For each param group, whether it still holds the rate this AutoLR wrote last (compared
        by value: a range finder fills lr tensors in place), i.e. nobody set its lr since. A
        group added since the last step was never written: False. Reads the rate on the host (a
        sync on a GPU: for a takeover, not for a training step)."""
        r = float(self.rate if self._rate_view is None else self._rate_view)
        held = [math.isclose(float(g["lr"]), r * s, rel_tol=1e-6, abs_tol=1e-12)
                or (self.step_count == 0 and float(g["lr"]) == g.get("initial_lr"))
                for g, s in zip(self.optimizer.param_groups, self.lr_scales)]
        return held + [False] * (len(self.optimizer.param_groups) - len(held))

    def _hand_over(self, held: list[bool]) -> None:
        """Close, and give each param group the peak a new run on this optimizer starts from: its
        ``initial_lr`` where it still holds this AutoLR's rate (``held``, from
        :meth:`groups_holding_its_rates`), else the lr the user set since, which becomes its
        ``initial_lr``."""
        self.close()
        for g, untouched in zip(self.optimizer.param_groups, held):
            if untouched:
                g["lr"] = g.get("initial_lr", g["lr"])
            else:
                g["initial_lr"] = float(g["lr"])

    def close(self) -> None:
        """Take this AutoLR off its optimizer, e.g. before another schedule drives it.

        Removes the step hook (``optimizer.step()`` no longer asks for ``sched.step(loss)``
        first); the groups keep the rate written last, a float or a tensor. A later
        :meth:`step` raises. Calling it again does nothing."""
        self._hook.remove()
        self._load_hook.remove()
        self._closed = True
        self._steady_step = None

    def _steady_step_fn(self):
        """The backend's step function when the next steps can take :meth:`_fast_step`: tensor
        rates (the default on a GPU), an MLR-SNet with a fast path on this device, nothing decided
        on the host per step (the scale is set, no envelope, no meta-training, no
        all-reduce). Else None. Decided after every
        full step; :meth:`load_state_dict` clears it, and a param group added or an lr replaced
        sends the step back to :meth:`_step` through the lr-tensor check."""
        scale, controller = self.scale, self.controller
        if not (self.tensor_lr and self.meta is None and not self.distributed
                and not scale.pending and not scale.varies_at(self.step_count) and self._scale_check is None
                and isinstance(controller, MLRSNet) and controller.gate_order == "train"
                and len(self.optimizer.param_groups) == len(self.lr_scales)):
            return None
        return dispatch.select("mlrsnet_step_", self.device)[1]

    def _step(self, loss: Tensor, skip: Tensor | None) -> None:
        if self._closed:
            raise RuntimeError("AutoLR.step(): this AutoLR was closed (AutoLR.close()) and no longer drives its "
                               "optimizer; build a new AutoLR(optimizer, ...) to schedule it again")
        x = self._check_loss(loss)
        if skip is not None:
            x = torch.where(self._check_skip(skip), torch.full_like(x, float("nan")), x)
        lr_list = self._lr_tensors.cached() if self.tensor_lr else []
        scale = self.scale
        # a CUDA graph capture matters only where the host decides something this step (the
        # counters' poll checks for one itself): the steady state asks the driver nothing
        if (self._on_cuda and (scale.pending or scale.varies_at(self.step_count) or self.meta is not None
                               or lr_list is None or not self.tensor_lr or self._scale_check is not None)
                and torch._C._cuda_isCurrentStreamCapturing()):
            self._check_capturable()
        if len(self.optimizer.param_groups) != len(self.lr_scales):
            self._adopt_added_groups()
        if not self.tensor_lr and "lr_set_outside" not in self._warned:
            self._warn_if_lrs_were_set()
        if self._moved_lr is not None:
            (lr, initial), self._moved_lr = self._moved_lr, None
            optim_support.warn_once(
                self._warned, "moved_lr",
                f"AutoLR: the optimizer's lr ({lr:g}) is not its initial_lr ({initial:g}): an earlier schedule on it "
                "(a torch scheduler, an AutoLR) or a checkpoint of such a run moved it. AutoLR takes the lr as the "
                "rate you mean; if you meant the initial_lr, set each group's 'lr' to its 'initial_lr' before "
                "building AutoLR",
            )
        if self.step_count == 0 and all(p.grad is None for g in self.optimizer.param_groups for p in g["params"]):
            raise RuntimeError(
                "AutoLR.step(loss) was called before loss.backward(): no parameter has a gradient. "
                "Call loss.backward(); sched.step(loss); optimizer.step() in that order"
            )
        # after a step passed with skip= the optimizer step may rightly not have happened
        if self._steps_since_optimizer >= 1 and self.step_count > 0 and not self._last_had_skip:
            optim_support.warn_once(
                self._warned,
                "double_step",
                "AutoLR.step was called twice without optimizer.step() in between (fine if a "
                "GradScaler skipped a step; otherwise call it once per optimizer step)",
            )
        self._last_had_skip = skip is not None
        if self.distributed:
            x = mean_across_ranks(x)
        if scale.pending or scale.varies_at(self.step_count):  # else nothing to update
            scale.update_(x, self.step_count, self.controller)
        if self.meta is not None:
            self.meta.maybe_step(x)
        if lr_list is None:
            lr_list = self._lr_tensors()
        controller = self.controller
        if isinstance(controller, MLRSNet) and controller.gate_order == "train":
            # the whole step, the lr writes and the counters: one launch on the Triton path
            # (buffers read from the dict: Module.__getattr__ is slow on this per-step path)
            state = controller._buffers
            dispatch.mlrsnet_step_(x, state["h"], state["c"], controller.flat_weights(), self.gamma, self.rate,
                                   lr_list, self.lr_scales if lr_list else [], self.counters.values, self._ok)
        else:
            with torch.no_grad():
                # a negative loss is read as 0 by every controller (NaN stays NaN: skipped)
                controller.scheduler_step_(torch.where(torch.isfinite(x), x.clamp_min(0.0), x), self.gamma, self.rate)
                reference.count_step_(self.counters.values, x, torch.isfinite(x))
            if self.tensor_lr:
                dispatch.write_rates(self.rate, lr_list, self.lr_scales)
        if not self.tensor_lr:
            self._write_rate_to_groups()
        self.step_count += 1
        self._steps_since_optimizer += 1
        self._after_step_host_checks()
        self._steady_step = self._steady_step_fn()

    def synchronize(self) -> None:
        """Wait for the device and bring the host's view of the device counters up to date (the
        warnings, the scale's decision). Never needed in a training loop; call it after the
        eager warm-up steps and before capturing ``step`` in a CUDA graph."""
        self.counters.refresh(self.step_count)
        self._after_step_host_checks()
        if self._scale_check is not None:
            self._scale_check.refresh(self.step_count)
            self._after_step_host_checks()

    def _warn_no_scale(self) -> None:
        optim_support.warn_once(
            self._warned, "no_scale",
            f"AutoLR: no usable scale from the first finite loss ({self.scale.mode!r} mode): the "
            f"{type(self.controller).__name__}'s settled output is below "
            f"{rate_scale.MIN_SETTLED_P:g} (or the rule gave no positive value), so the rate stays 0. "
            "Use another controller (e.g. the default), or pass gamma=<float>",
        )

    def _added_group_scales(self, check: bool = True) -> list[float]:
        """The scales of the param groups added since ``AutoLR(...)`` (``optimizer.add_param_group``):
        each group's lr over the lr the others' scales are relative to, as for the groups present
        at the start (a group added with ``lr=0`` stays frozen)."""
        groups = self.optimizer.param_groups
        if len(groups) < len(self.lr_scales):
            raise RuntimeError(f"the optimizer has {len(groups)} param groups but had {len(self.lr_scales)} when "
                               "AutoLR was built: param groups cannot be removed under AutoLR; build a new one")
        added = groups[len(self.lr_scales):]
        if check and added and self.meta is not None:
            self.meta.check_parameters([p for g in added for p in g["params"]], "an added param group's")
        base = self.scale.base_lr
        return [float(g["lr"]) / base if base > 0 else 1.0 for g in added]

    def _adopt_added_groups(self) -> None:
        """Give the param groups added since ``AutoLR(...)`` their scales and the rate."""
        scales = self._added_group_scales()
        for group in self.optimizer.param_groups[len(self.lr_scales):]:
            group.setdefault("initial_lr", float(group["lr"]))
            self._initial_lrs.append(group["initial_lr"])  # what the load hook keeps (see _after_optimizer_load)
        self.lr_scales += scales
        if not self.tensor_lr:
            self._write_rate_to_groups()

    def _check_capturable(self) -> None:
        """Refuse, before anything is recorded, what a CUDA graph cannot replay: it repeats the
        device work of the captured step and none of the host's decisions."""
        problems = []
        if self.step_count == 0 or self.scale.pending or self._scale_check is not None:
            problems.append("the rate scale is not decided yet (it is set from the first finite loss, which "
                            "the host learns of without waiting, a few steps later): run a few eager steps, "
                            "then sched.synchronize(), then capture")
        if self.scale.varies_at(self.step_count):
            problems.append("total_steps / warmup_steps: the envelope is computed on the host for each step, so a "
                            "replay would repeat the captured step's factor; capture without total_steps, after the "
                            f"{self.scale.warmup_steps} warm-up steps (or with warmup_steps=0)")
        if self.meta is not None:
            problems.append("meta: meta-steps run every `interval` steps, decided on the host; capture a "
                            "frozen controller (no MetaConfig)")
        if not self.tensor_lr:
            problems.append("the rate is written as a Python float (lr_as_tensor=False), which a replay "
                            "cannot change; use lr_as_tensor=True with a fused optimizer")
        elif len(self.optimizer.param_groups) != len(self.lr_scales):
            problems.append("a param group was added since the last eager step: run an eager step first")
        elif not all(optim_support.is_lr_tensor(g["lr"], self.device) for g in self.optimizer.param_groups):
            problems.append("a param group's lr is not a 0-dim float32 tensor on the device (a group added "
                            "or an optimizer state loaded after the warm-up): run an eager step first")
        if problems:
            raise RuntimeError("AutoLR.step cannot be captured in a CUDA graph here: " + "; ".join(problems))

    def _after_step_host_checks(self) -> None:
        seen = self.counters.poll(self.step_count, eager=self.scale.pending)
        if self.scale.pending and seen["steps"] - self._first_step > seen["skipped"]:
            usable = self.scale.found()
            if usable is None:  # on a GPU: the verdict comes back like the counters, a few steps later
                self._scale_check = DeviceCounters(("unusable",), self.device)
                self._scale_check.values.copy_(self.scale.unusable_flag())
            elif not usable:
                self._warn_no_scale()
        if self._scale_check is not None:
            verdict = self._scale_check.poll(self.step_count, eager=True)
            if verdict["steps"] > 0:  # arrived
                self._scale_check = None
                if verdict["unusable"]:
                    self._warn_no_scale()
        if seen["skipped"]:
            optim_support.warn_once(
                self._warned,
                "nonfinite",
                "AutoLR: a non-finite (NaN/Inf) loss (or controller output), or a step the GradScaler "
                "skipped, was seen; the rate and the controller state were kept for that step (see "
                "sched.skipped_steps). Check your loss or lower the rate scale.",
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
    def gamma(self) -> Tensor:
        """This step's scale (0-dim device tensor; NaN until the first finite loss sets it)."""
        return self.scale.gamma

    @property
    def gamma_mode(self) -> str:
        return self.scale.mode

    @property
    def last_rate(self) -> Tensor:
        """The current rate of the first param group, as a 0-dim device tensor (no sync)."""
        return self.rate

    @property
    def skipped_steps(self) -> int:
        """Steps whose loss was NaN/Inf, or marked ``skip`` (reads the device: a sync on a GPU)."""
        return self.counters.exact()["skipped"]

    def get_last_lr(self) -> list[float]:
        """The rates of all param groups as floats (reads the device: a sync on a GPU)."""
        r = float(self.rate)
        # a group added since the last step still has the lr it was added with
        added = self.optimizer.param_groups[len(self.lr_scales):]
        return [r * s for s in self.lr_scales] + [float(g["lr"]) for g in added]

    def state_dict(self) -> dict:
        state = {
            "version": STATE_VERSION,
            "controller_type": type(self.controller).__name__,
            "controller": {k: v.detach().clone() for k, v in self.controller.state_dict().items()},
            "scale": self.scale.state_dict(),
            "rate": self.rate.detach().clone(),
            "counters": self.counters.values.detach().clone(),
            "step_count": self.step_count,
            # groups added since the last step are saved with the scales that step will give them,
            # so the checkpoint matches the optimizer's
            "lr_scales": self.lr_scales + self._added_group_scales(check=False),
            "warned": sorted(self._warned),
            "first_step": self._first_step,
        }
        if self.meta is not None:
            state["meta"] = self.meta.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; checked whole before anything changes."""
        self._steady_step = None  # the next step decides again from the loaded state
        if isinstance(state, dict) and "version" not in state and ("base_lrs" in state or "last_epoch" in state):
            raise ValueError(
                "AutoLR.load_state_dict: this is the state of another scheduler (a torch.optim.lr_scheduler: it has "
                "'base_lrs'/'last_epoch'), which AutoLR cannot continue. To switch a run to AutoLR, load the model "
                "and optimizer and start AutoLR fresh (AutoLRTrainer does this with a Trainer checkpoint)"
            )
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not an AutoLR state_dict of version {STATE_VERSION} (got "
                f"{state.get('version') if isinstance(state, dict) else type(state).__name__})"
            )
        required = ("controller", "scale", "rate", "counters", "step_count", "lr_scales")
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
        upgrade = getattr(self.controller, "upgrade_state", None)  # states saved by an older version
        if callable(upgrade):
            ctrl = upgrade(ctrl)
        if set(ctrl) != set(own) or any(tuple(ctrl[k].shape) != tuple(own[k].shape) for k in own):
            raise ValueError("the controller in this state_dict has other parameters or shapes than this AutoLR's")
        weights = {k for k, _ in self.controller.named_parameters()}
        for k, v in ctrl.items():  # an int tensor would be cast silently; a NaN weight skips every step
            # a buffer may hold inf (the lowest loss seen so far starts there), never NaN
            bad = (~torch.isfinite(v.float()) if k in weights else torch.isnan(v.float())) if v.numel() else v.bool()
            if own[k].is_floating_point() and (not v.is_floating_point() or bool(bad.any())):
                raise ValueError(f"the controller in this state_dict has a damaged {k!r} (dtype {v.dtype}"
                                 f"{'' if v.is_floating_point() else ', not floating-point'}; "
                                 f"{'non-finite' if k in weights else 'NaN'} values: {int(bad.sum())}); load it "
                                 "from an undamaged checkpoint")
        n_groups = len(self.optimizer.param_groups)
        if len(state["lr_scales"]) > n_groups:
            raise ValueError(
                f"the state_dict has lr scales for {len(state['lr_scales'])} param groups, this optimizer has "
                f"{n_groups}: add the param groups the saved run had (optimizer.add_param_group) before "
                "load_state_dict")
        self.scale.check_state(state["scale"])
        for key, shape in (("rate", ()), ("counters", tuple(self.counters.values.shape))):
            if not isinstance(state[key], Tensor) or tuple(state[key].shape) != shape:
                raise ValueError(f"the state_dict's {key!r} is not a tensor of shape {shape}")
        rate, counters = state["rate"], state["counters"]
        if not (rate.is_floating_point() and math.isfinite(float(rate)) and float(rate) >= 0):
            raise ValueError(f"the state_dict's 'rate' is {rate!r}; a rate is a finite number >= 0, so this state is "
                             "damaged")
        if counters.is_floating_point() or counters.is_complex() or bool((counters < 0).any()):
            raise ValueError(f"the state_dict's 'counters' are {counters.tolist()}; they count steps (whole numbers "
                             ">= 0), so this state is damaged")
        warned = state.get("warned", [])
        if not (isinstance(warned, (list, tuple, set)) and all(isinstance(w, str) for w in warned)):
            raise ValueError(f"the state_dict's 'warned' is {warned!r}, not a list of warning names")
        step_count = state["step_count"]
        if not is_whole_number(step_count, 0):
            raise ValueError(f"the state_dict's 'step_count' is {step_count!r}, not a whole number >= 0")
        first_step = state.get("first_step", 0)
        if not (is_whole_number(first_step, 0) and first_step <= step_count):
            raise ValueError(f"the state_dict's 'first_step' is {first_step!r}, not a whole number from 0 to the "
                             f"step_count {step_count}")
        lr_scales = check_lr_scales(state["lr_scales"], "the state_dict's 'lr_scales'")
        if (self.meta is None) != ("meta" not in state):
            raise ValueError("the state_dict and this AutoLR disagree on meta-training (meta=...)")
        if self.meta is not None:  # the groups the saved run did not have yet are adopted below
            self.meta.check_state(state["meta"])
            extra = self.optimizer.param_groups[len(state["lr_scales"]):]
            self.meta.check_parameters([p for g in extra for p in g["params"]], "an added param group's")
        self.controller.load_state_dict({k: v.to(self.device) for k, v in ctrl.items()})
        saved_mode, built_mode = state["scale"]["mode"], self.scale.mode
        # an explicit gamma's value, read on the host before the load replaces it (only then: a sync on a GPU)
        built_peak = float(self.scale.peak) if self.scale.user_gamma else None
        saved_envelope = self.scale.load_state_dict(state["scale"])
        self._scale_check = None  # the loaded scale is decided, or decided again from the next loss
        with torch.no_grad():
            self.rate.copy_(state["rate"])
            self.counters.values.copy_(state["counters"])
        self._moved_lr = None  # the loaded scale replaces the anchor taken from the lr
        self._first_step = int(first_step)  # where the loaded run's AutoLR started
        self.step_count = int(step_count)  # a NumPy integer from a checkpoint too
        self.counters.refresh(self.step_count)  # the host's view of the loaded counters, not the old ones
        built_scales, self.lr_scales = self.lr_scales, lr_scales
        if self._explicit_lr_scales:  # groups the state does not cover keep the scales given for them
            self.lr_scales = lr_scales + built_scales[len(lr_scales):]
        self._warned = set(warned)
        if saved_envelope is not None:
            saved, built = (envelope_args(*e) for e in (saved_envelope, self.scale.built_envelope))
            warnings.warn(
                f"AutoLR.load_state_dict: the state was saved with {saved}; this AutoLR was built with {built} "
                f"and keeps that envelope from step {step_count} on (a resumed run extended or shortened follows "
                f"its new length). To resume the saved envelope unchanged, build AutoLR with {saved}",
                RuntimeWarning, stacklevel=optim_support.user_stacklevel())
        common = min(len(lr_scales), len(built_scales))
        if self._explicit_lr_scales and lr_scales[:common] != built_scales[:common]:
            warnings.warn(
                f"AutoLR.load_state_dict: the state's lr_scales {lr_scales} replace the lr_scales={built_scales} this "
                "AutoLR was built with (a resume continues the saved run); set sched.lr_scales after loading to "
                "change them", RuntimeWarning, stacklevel=optim_support.user_stacklevel())
        if built_peak is not None:
            saved_peak = float(self.scale.peak)  # the loaded one
            if saved_mode != built_mode or (built_mode == "fixed" and saved_peak != built_peak):
                warnings.warn(
                    f"AutoLR.load_state_dict: the state's scale is {saved_mode!r} (peak {saved_peak:.4g}); it replaces "
                    f"the {built_mode!r} scale this AutoLR was built with (gamma={built_peak:.4g})",
                    RuntimeWarning, stacklevel=optim_support.user_stacklevel())
        length = self.scale.total_steps
        if saved_envelope is None and length is not None and step_count >= length:
            warnings.warn(
                f"AutoLR.load_state_dict: the loaded run's envelope ended at step {length} (this is step "
                f"{step_count}), so the rate stays 0 from here. To train on, build AutoLR with the new total_steps "
                "before loading", RuntimeWarning, stacklevel=optim_support.user_stacklevel())
        if self.meta is not None:
            self.meta.load_state_dict(state["meta"])
        if len(self.lr_scales) < n_groups:
            self._adopt_added_groups()
        self._write_rate_to_groups()

    def __repr__(self) -> str:
        scale = self.scale
        envelope = f", {scale.describe_envelope()}" if scale.has_envelope else ""
        return (
            f"AutoLR(controller={type(self.controller).__name__}, scale={scale.mode}{envelope}, "
            f"steps={self.step_count}, device={self.device}{', closed' if self._closed else ''})"
        )


DEFAULT_CONTROLLER = "default"


def autolrs_driving(optimizer: torch.optim.Optimizer) -> list[AutoLR]:
    r"""The ``AutoLR``\ s whose step hook is on ``optimizer`` (:meth:`AutoLR.close` removes it)."""
    owners = (getattr(hook, "__self__", None) for hook in getattr(optimizer, "_optimizer_step_pre_hooks", {}).values())
    return [owner for owner in owners if isinstance(owner, AutoLR)]


def check_lr_scales(scales: Any, what: str) -> list[float]:
    """``scales`` as floats, each finite and >= 0 (a group's rate is the rate times its scale);
    ``ValueError`` naming ``what`` otherwise."""
    try:
        values = [float(s) for s in scales]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of numbers, one per param group; got {scales!r}") from None
    bad = [v for v in values if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"{what} must be finite and >= 0 (a group's rate is the rate times its scale); got {bad}")
    return values


def _resolve_controller(controller: nn.Module | str | None) -> nn.Module:
    """The controller AutoLR runs: the shipped ``"default"`` one, a shipped one by name, or the
    module given, which must have the :class:`Controller` interface."""
    if controller is None:
        controller = DEFAULT_CONTROLLER
    if isinstance(controller, str):
        controller = load_pretrained(controller)
    if not isinstance(controller, nn.Module) or not isinstance(controller, Controller):
        raise TypeError(
            f"controller must be an nn.Module with the Controller interface (default_gamma, initial_rate, "
            f"scheduler_step_, reset; e.g. MLRSNet or ActionController), got {type(controller).__name__}"
        )
    return controller


def _initialising_state_for_a_checkpoint() -> bool:
    """Whether torch.distributed.checkpoint's ``set_state_dict``/``get_state_dict`` is creating a
    fresh optimizer's state: it calls ``optimizer.step()`` at lr 0 with zero gradients, which is
    no training step and must not be refused (only looked at on the refusal path)."""
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        if (frame.f_code.co_name == "_init_optim_state"
                and (frame.f_globals.get("__name__") or "").startswith("torch.distributed.checkpoint")):
            return True
        frame = frame.f_back
    return False


def _closure_of(args: tuple, kwargs: dict) -> Any:
    """The ``closure`` of an ``optimizer.step`` call as its step hooks see it (``args[0]`` is the
    optimizer itself), or None."""
    return kwargs.get("closure", args[1] if len(args) > 1 else None)
