"""Online meta-training of the controller (MLR-SNet, Algorithm 1), with the exact one-step
look-ahead hypergradient and no second-order graph.

Every ``interval`` scheduler steps, with the gradient the user already computed:

1. ``p = controller(L)`` from the current state (not advanced), ``alpha = gamma * p``;
2. ``w_hat = w - alpha * d`` with ``d`` the direction the optimizer is about to take
   (SGD: weight decay, momentum, dampening, Nesterov; Adam/AdamW: the bias-corrected Adam
   update, each parameter with its own step count, plus AdamW's decoupled decay), one fused
   pass per (device, dtype) of a param group, ``d`` never stored;
3. ``L_val(w_hat)`` on the next validation batch (:class:`~autolr_fast.model_swap.ModelSwap`; the
   forward runs on copies of the buffers, so BatchNorm's running statistics do not move);
4. since ``d`` does not depend on theta,
   ``dL_val/dtheta = -gamma * <grad L_val(w_hat), d> * dp/dtheta`` exactly;
5. theta takes one step of its own optimizer (Adam, lr 1e-3, weight decay 1e-4).

The model's parameters, gradients, optimizer state and buffers are bit-identical before and
after a meta-step. Under DDP the scalar ``<grad L_val, d>`` is averaged over ranks, so theta
stays identical everywhere. A non-finite training or validation loss skips the update (theta
and its optimizer state are restored on the device, no host sync).
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

try:  # sharded parameters (FSDP2, tensor parallel); absent from builds without torch.distributed
    from torch.distributed.tensor import DTensor
except ImportError:
    DTensor = None

from . import optim_support
from .batches import default_unpack, to_device
from .checks import is_whole_number, is_whole_value
from .controllers.mlrsnet import MLRSNet
from .controllers.pretrained import save_controller
from .distributed import mean_across_ranks
from .model_swap import ModelSwap
from .ops import dispatch
from .training_snapshot import clone_state

_END = object()  # next(iterator, _END): the end of a pass over val_data


@dataclass
class MetaConfig:
    """How ``AutoLR`` meta-trains its controller online.

    Args:
        model: the model being trained (the optimizer's parameters must be its parameters; a
            ``DistributedDataParallel`` wrapper is unwrapped).
        val_data: an iterable of validation batches, cycled (re-iterated when exhausted). The
            number of batches used in the current pass is part of ``AutoLR.state_dict()``; a
            resumed run skips that many (reads and drops them) in a fresh pass, so a resume is
            exact when every pass yields the same batches in the same order (a list, a
            ``DataLoader`` without shuffling, or a sampler that reseeds itself per pass).
        loss_fn: ``loss_fn(model_output, target) -> scalar tensor``.
        interval: a meta-step every ``interval`` scheduler steps (published: 300; 1 works).
        lr, weight_decay: of the controller's Adam (published: 1e-3, 1e-4).
        unpack: ``unpack(batch) -> (inputs, targets)``; default takes ``(x, y)`` pairs (a
            longer tuple is refused) or dicts with keys such as ``"input"``/``"target"`` or
            ``"x"``/``"y"`` (those of :func:`autolr_fast.find_lr`). Batches are moved to the
            model's device.
        snapshot_dir, snapshot_every: save the controller (theta and gamma) every
            ``snapshot_every`` steps (e.g. once per epoch) as ``controller_XXXX.pt``, loadable
            with :func:`autolr_fast.load_controller` for plug-and-play use. Writing a file reads
            theta and gamma to the host: on a GPU that step has a host sync (the others none).
        optimizer: a factory ``params -> torch.optim.Optimizer`` replacing the default Adam.
        low_memory: True (default): validation gradients are folded into the hypergradient
            while backward runs, ``fold_bytes`` (default 4 MiB) at a time, and freed, so a
            meta-step holds one extra copy of the parameters (``w_hat``) plus the validation
            activations (plus at most ~``fold_bytes``). Look-ahead weights that fit in
            ``fold_bytes`` take the batched path below (the same bound, without a gradient hook
            per parameter). False: all gradients first, then one fused multi-tensor dot per
            param group (one more parameter-sized buffer). Either way, the copies of the model's
            buffers that the validation forward runs on stay allocated between meta-steps.
    """

    model: nn.Module
    val_data: Iterable
    loss_fn: Callable[[Any, Any], Any]
    interval: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    unpack: Callable[[Any], tuple[Any, Any]] | None = None
    snapshot_dir: str | None = None
    snapshot_every: int | None = None
    optimizer: Callable[[Iterable[Tensor]], torch.optim.Optimizer] | None = None
    low_memory: bool = True
    fold_bytes: int = 4 << 20


def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


class MetaTrainer:
    """The meta-step machinery of one ``AutoLR`` (created by it from a :class:`MetaConfig`)."""

    def __init__(self, sched, config: MetaConfig) -> None:
        if not isinstance(sched.controller, MLRSNet) or sched.controller.gate_order != "train":
            raise TypeError("online meta-training needs an MLRSNet controller (gate_order='train')")
        bad = [] if is_whole_value(config.interval, 1) else [f"interval={config.interval!r} (a whole number >= 1)"]
        if config.snapshot_every is not None and not is_whole_value(config.snapshot_every, 0):
            bad.append(f"snapshot_every={config.snapshot_every!r} (a whole number; 0 or None: no snapshots)")
        if not (isinstance(config.fold_bytes, numbers.Real) and not isinstance(config.fold_bytes, bool)
                and config.fold_bytes >= 0):
            bad.append(f"fold_bytes={config.fold_bytes!r} (a number of bytes >= 0)")
        val = config.val_data
        if val is None or isinstance(val, torch.utils.data.Dataset) or not (
                hasattr(val, "__iter__") or hasattr(val, "__getitem__")):
            bad.append(f"val_data={type(val).__name__} (an iterable of validation batches: a list of "
                       "(inputs, targets) or a DataLoader, not a Dataset)")
        if not callable(config.loss_fn):
            bad.append(f"loss_fn={config.loss_fn!r} (loss_fn(model_output, target) -> scalar tensor)")
        if bad:
            raise ValueError(f"MetaConfig: {'; '.join(bad)}")
        opt = sched.optimizer
        if not isinstance(opt, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(
                f"meta-training supports torch.optim.SGD, Adam and AdamW (it must know the optimizer's exact "
                f"direction), got {type(opt).__name__}"
            )
        model = config.model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.sched = sched
        self.config = config
        self.model = model
        self.interval = int(config.interval)  # a whole float (2.0) too
        self.unpack = config.unpack or functools.partial(default_unpack, how="MetaConfig(unpack=fn)")
        sharded = [n for n, p in model.named_parameters() if _is_dtensor(p)]
        if sharded:
            raise NotImplementedError(
                f"the meta-step does not support sharded parameters: {len(sharded)} parameter(s) of MetaConfig.model "
                f"(e.g. {sharded[0]!r}) are DTensors, as FSDP2 (fully_shard) or tensor parallelism make them. It "
                "builds the look-ahead w - alpha*d from each rank's full parameters, gradients and optimizer state "
                "and runs the validation forward on it, which a sharded model does not have. Meta-train the "
                "controller without sharding (one process or DDP, e.g. on a smaller model), save it "
                "(MetaConfig(snapshot_dir=...)), and use it frozen under FSDP: AutoLR(opt, load_controller(path)) "
                "with meta=None"
            )
        sparse = [n for n, m in model.named_modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "sparse", False)]
        if sparse:
            raise NotImplementedError(
                f"the meta-step does not support sparse gradients: {sparse[0]!r} of MetaConfig.model is an embedding "
                "with sparse=True. Build it with sparse=False for meta-training, or use the controller frozen "
                "(meta=None)"
            )
        self._swap = ModelSwap(model)
        self.check_parameters([p for g in opt.param_groups for p in g["params"]], "optimizer")
        params = list(sched.controller.parameters())
        self.optimizer = (
            config.optimizer(params) if config.optimizer is not None
            else torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
        )
        val = config.val_data
        if isinstance(val, Sequence) and not isinstance(val, (str, bytes)) and len(val) > 0:
            # a list of batches is read here, not 300 steps into training (an iterator or a
            # DataLoader is not: reading it would use up or reshuffle a batch)
            self.unpack(val[0])
        self._val_iter = None
        self._val_used = 0  # batches taken from the current pass over val_data
        self.meta_steps = 0
        # Adam's betas may be tensors; on a GPU reading one is a host sync, so each is read here
        # and again only after it changed (see _host_float)
        self._floats: dict[tuple[int, int], tuple[Tensor, int, float]] = {}
        for group in opt.param_groups:
            for i, beta in enumerate(group.get("betas", ())):
                self._host_float(group, i, beta)
        self._scratch: tuple[Tensor, Tensor, Tensor] | None = None
        # GPU: the skip of a non-finite meta-step is decided on the device (no sync); the CPU
        # reads the flag directly. True forces the device-side path (tests use it on the CPU).
        self.device_side_guard = False
        self.last_val_loss = torch.full((), float("nan"), device=sched.device)
        self.last_hypergrad = torch.zeros((), device=sched.device)

    def check_parameters(self, params: list[Tensor], whose: str) -> None:
        """Raise unless every tensor of ``params`` is a parameter of the model (of the modules it
        had when this trainer was built: the look-ahead is swapped into those)."""
        known = self._swap.parameter_ids()
        missing = [p for p in params if id(p) not in known]
        if missing:
            raise ValueError(
                f"{len(missing)} {whose} parameter(s) are not parameters of MetaConfig.model (of the modules it had "
                "when AutoLR(...) was built); pass the model whose parameters the optimizer updates, and build a "
                "new AutoLR after adding modules to it"
            )

    # ------------------------------------------------------------------------------------------
    def _next_val_batch(self) -> tuple[Any, Any]:
        if self._val_iter is None:
            self._val_iter = iter(self.config.val_data)
            # resuming mid-pass (load_state_dict): drop the batches the saved run had used
            used = 0
            while used < self._val_used and next(self._val_iter, _END) is not _END:
                used += 1
            self._val_used = used
        batch = next(self._val_iter, _END)
        if batch is _END:
            used, self._val_iter = self._val_used, iter(self.config.val_data)
            self._val_used = 0
            batch = next(self._val_iter, _END)
            if batch is _END and used:
                raise ValueError(
                    f"MetaConfig.val_data ran out after {used} batch(es) and gave none on the next pass: a one-shot "
                    "iterator (a generator, iter(loader)) cannot be cycled; pass a list of batches, a DataLoader "
                    "or an endless iterator"
                )
            if batch is _END:
                raise ValueError("MetaConfig.val_data is empty")
        self._val_used += 1
        x, y = self.unpack(batch)
        return to_device(x, self.sched.device, non_blocking=True), to_device(y, self.sched.device, non_blocking=True)

    def _direction_args(self, group: dict, params: list[Tensor]) -> tuple[bool, tuple, tuple]:
        """``(is_sgd, tensors, hyper)``: what the optimizer's direction ``d`` is made of, as the
        fused ops take it: ``lookahead_*(*tensors, alpha, *hyper)`` and
        ``hyper_dot_*(val_grads, *tensors, *hyper)``."""
        opt = self.sched.optimizer
        state = [opt.state.get(p, {}) for p in params]
        weights = [p.detach() for p in params]
        grads = [p.grad for p in params]
        maximize = group.get("maximize", False)
        if isinstance(opt, torch.optim.SGD):
            tensors = (weights, grads, [s.get("momentum_buffer") for s in state])
            hyper = (group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"], maximize)
            return True, tensors, hyper
        beta1, beta2 = group["betas"]
        # torch counts steps per parameter (one without a gradient on some steps has fewer); one
        # without state yet gets a 0 where the others' steps are (device steps stay on the device)
        steps = [s.get("step") for s in state]
        like = next((t for t in steps if isinstance(t, Tensor)), None)
        steps = [(0.0 if like is None else torch.zeros_like(like)) if t is None else t for t in steps]
        tensors = (weights, grads, [s.get("exp_avg") for s in state], [s.get("exp_avg_sq") for s in state],
                   [s.get("max_exp_avg_sq") for s in state], steps)
        decoupled = isinstance(opt, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        hyper = (self._host_float(group, 0, beta1), self._host_float(group, 1, beta2), group["eps"],
                 group["weight_decay"], decoupled, maximize)
        return False, tensors, hyper

    def _host_float(self, group: dict, index: int, value: Any) -> float:
        """``float(value)`` for hyper-parameter ``index`` of ``group``; a tensor is read once and
        again only when it was changed in place (its version) or replaced."""
        if not isinstance(value, Tensor):
            return float(value)
        key = (id(group), index)
        seen = self._floats.get(key)
        if seen is None or seen[0] is not value or seen[1] != value._version:
            seen = self._floats[key] = (value, value._version, float(value))
        return seen[2]

    @staticmethod
    def _by_device_and_dtype(params: list[Tensor]) -> list[list[int]]:
        """Indices of ``params`` per (device, dtype), in order: a list op's CUDA kernel takes one
        dtype on one device per call, and a param group may mix them."""
        parts: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, q in enumerate(params):
            parts.setdefault((q.device, q.dtype), []).append(i)
        return list(parts.values())

    @staticmethod
    def _pick(lists: Sequence[list], index: list[int]) -> list[list]:
        return [[xs[i] for i in index] for xs in lists]

    def _group_args(self, group: dict, params: list[Tensor]) -> tuple[bool, tuple, tuple, list[list[int]]]:
        """``_direction_args`` and the (device, dtype) parts of ``params``: read once per meta-step,
        by the look-ahead and again by the dot (the optimizer does not step in between)."""
        return (*self._direction_args(group, params), self._by_device_and_dtype(params))

    def _group_lookahead(self, params: list[Tensor], alpha: Tensor, args: tuple) -> list[Tensor]:
        is_sgd, tensors, hyper, parts = args
        op = dispatch.lookahead_sgd if is_sgd else dispatch.lookahead_adam
        if len(parts) == 1:
            return op(*tensors, alpha, *hyper)
        hats: list[Tensor] = list(params)
        for index in parts:
            a = alpha.to(params[index[0]].device, non_blocking=True)
            for i, h in zip(index, op(*self._pick(tensors, index), a, *hyper)):
                hats[i] = h
        return hats

    def _group_hyper_dot(self, val_grads: list[Tensor], args: tuple) -> Tensor:
        is_sgd, tensors, hyper, parts = args
        op = dispatch.hyper_dot_sgd if is_sgd else dispatch.hyper_dot_adam
        if len(parts) == 1:
            return op(val_grads, *tensors, *hyper)
        dots = [op([val_grads[i] for i in index], *self._pick(tensors, index), *hyper).to(
            self.sched.device, non_blocking=True) for index in parts]
        return torch.stack(dots).sum()

    @contextlib.contextmanager
    def _own_random_stream(self):
        """The validation batch and forward (a shuffling loader, dropout) draw from a stream of
        their own, seeded from the run's initial seed and the meta-step count: the training run's
        stream is put back afterwards (meta-steps do not shift its masks and shuffles), and the
        validation masks are not the next training step's (a resumed run draws the same ones)."""
        device = self.sched.device
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else []):
            self._seed_stream(0)
            yield

    def _seed_stream(self, part: int) -> None:
        """Seed the stream of this meta-step's ``part``: 0 the validation batch, 1 its forward.
        The forward's masks must not depend on whether fetching the batch drew from the stream
        (a DataLoader draws its workers' seed when a new pass starts, and a resumed run starts
        one where the original run was mid-pass)."""
        # part 0 keeps the formula of states saved before the forward had a stream of its own
        multiplier = 1_000_003 if part == 0 else 2_000_029
        seed = (torch.initial_seed() * multiplier + self.meta_steps + 1) % (1 << 63)
        torch.default_generator.manual_seed(seed)
        device = self.sched.device
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)  # host-side generator state: no sync

    def _scratch_state(self) -> tuple[Tensor, Tensor, Tensor]:
        """Copies of the controller state and the rate, in buffers kept from one meta-step to the
        next: the controller step on them finds its cached launch plan (a new tensor each time
        would make a new plan and push the scheduler's own out of the cache)."""
        ctrl, rate = self.sched.controller, self.sched.rate
        scratch = self._scratch
        if scratch is None or any(a.shape != b.shape or a.dtype != b.dtype or a.device != b.device
                                  for a, b in zip(scratch, (ctrl.h, ctrl.c, rate))):
            scratch = self._scratch = (torch.empty_like(ctrl.h), torch.empty_like(ctrl.c), torch.empty_like(rate))
        for dst, src in zip(scratch, (ctrl.h, ctrl.c, rate)):
            dst.copy_(src)
        return scratch

    # ------------------------------------------------------------------------------------------
    def hypergradient(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """``(theta_grads, val_loss, ok)`` for the training loss ``x`` at the current state.

        Reads the model and optimizer, changes nothing. ``theta_grads`` follow
        ``controller.flat_weights()``.
        """
        sched = self.sched
        ctrl = sched.controller
        weights = [w.detach() for w in ctrl.flat_weights()]
        finite = torch.isfinite(x)
        safe_x = torch.where(finite, x.clamp_min(0.0), torch.zeros_like(x))
        with torch.no_grad():
            # alpha = gamma * p(theta) at the current state: the guarded step on copies of the
            # state (so the controller does not advance), fused on the fast paths.
            h, c, alpha = self._scratch_state()
            dispatch.mlrsnet_step_(safe_x, h, c, ctrl.flat_weights(), sched.gamma, alpha, [], [])

        # look-ahead weights, per param group (each with its own hyper-parameters and scale)
        w_hat: dict[int, Tensor] = {}  # id(parameter) -> its look-ahead
        groups = []
        for group, scale in zip(sched.optimizer.param_groups, sched.lr_scales):
            params = [q for q in group["params"] if q.grad is not None]
            if not params:
                continue
            args = self._group_args(group, params)
            with torch.no_grad():
                hats = self._group_lookahead(params, alpha * scale, args)
            hats = [h.requires_grad_(True) for h in hats]
            for q, h in zip(params, hats):
                w_hat[id(q)] = h
            groups.append((group, scale, params, hats, args))
        if not groups:
            raise RuntimeError("meta-step: no parameter has a gradient; call loss.backward() before sched.step(loss)")
        with torch.enable_grad(), self._own_random_stream():
            xv, yv = self._next_val_batch()
            self._seed_stream(1)
            # parameters without a look-ahead run detached (ModelSwap): no graph is recorded for them
            out = self._swap(w_hat, xv)
            val_loss = self.config.loss_fn(out, yv)
            # dL_val/dp = -gamma * sum_k scale_k * <g_val_k, d_k>
            hat_bytes = sum(h.numel() * h.element_size() for _, _, _, hats, _ in groups for h in hats)
            if self.config.low_memory and hat_bytes > int(self.config.fold_bytes):
                dot = self._streamed_hyper_dot(val_loss, groups)
            else:
                dot = self._batched_hyper_dot(val_loss, groups)
        if sched.distributed:
            dot = mean_across_ranks(dot)
        grad_p = -sched.gamma * dot
        ok = finite & torch.isfinite(grad_p) & torch.isfinite(val_loss.detach())
        grad_p = torch.where(ok, grad_p, torch.zeros_like(grad_p))
        theta_grads = dispatch.mlrsnet_param_grads(safe_x, ctrl.h, ctrl.c, weights, grad_p)
        self.last_hypergrad = dot.detach()
        return theta_grads, val_loss.detach(), ok

    def _batched_hyper_dot(self, val_loss: Tensor, groups: list) -> Tensor:
        """All validation gradients at once, then one fused dot per param group (fewest
        launches; holds a second parameter-sized buffer, the gradients, for a moment)."""
        all_hats = [h for _, _, _, hats, _ in groups for h in hats]
        val_grads = torch.autograd.grad(val_loss, all_hats, allow_unused=True)
        val_grads = [torch.zeros_like(h) if g is None else g for h, g in zip(all_hats, val_grads)]
        dot = torch.zeros((), dtype=torch.float32, device=val_loss.device)
        i = 0
        for _, scale, _, hats, args in groups:
            n = len(hats)
            dot = dot + scale * self._group_hyper_dot(val_grads[i : i + n], args)
            i += n
        return dot

    def _streamed_hyper_dot(self, val_loss: Tensor, groups: list) -> Tensor:
        """Validation gradients are folded into the dot product while backward runs: gathered
        as backward produces them (and taken off ``w_hat``), and folded with one fused call per
        param group whenever ``fold_bytes`` of them are pending, then freed. Beyond ``w_hat`` at
        most about ``fold_bytes`` of gradients exist at a time."""
        budget = int(self.config.fold_bytes)
        partials: list[Tensor] = []
        pending: dict[int, tuple[dict, float, list, list]] = {}
        pending_bytes = 0

        def flush() -> None:
            nonlocal pending_bytes
            for group, scale, params, grads in pending.values():  # a subset of the group: its own args
                partials.append(scale * self._group_hyper_dot(grads, self._group_args(group, params)))
            pending.clear()
            pending_bytes = 0

        handles = []
        for group, scale, params, hats, _ in groups:
            for q, h in zip(params, hats):
                def gather(t: Tensor, group=group, scale=scale, q=q) -> None:
                    nonlocal pending_bytes
                    entry = pending.setdefault(id(group), (group, scale, [], []))
                    entry[2].append(q)
                    entry[3].append(t.grad)
                    pending_bytes += t.grad.numel() * t.grad.element_size()
                    t.grad = None
                    if pending_bytes >= budget:
                        flush()

                handles.append(h.register_post_accumulate_grad_hook(gather))
        try:
            all_hats = [h for _, _, _, hats, _ in groups for h in hats]
            torch.autograd.backward(val_loss, inputs=all_hats)
            flush()
        finally:
            for handle in handles:
                handle.remove()
        if not partials:
            return torch.zeros((), dtype=torch.float32, device=val_loss.device)
        return torch.stack(partials).sum()  # backward's order is fixed: deterministic

    def maybe_step(self, x: Tensor) -> None:
        """Called by ``AutoLR.step`` before the controller step (Algorithm 1: theta first)."""
        step = self.sched.step_count
        if (step + 1) % self.interval == 0:
            self.step(x)
        every = self.config.snapshot_every
        if self.config.snapshot_dir and every and (step + 1) % int(every) == 0:
            self.save_snapshot((step + 1) // int(every))

    def step(self, x: Tensor) -> None:
        """One meta-step: update theta from the hypergradient at the training loss ``x``."""
        ctrl = self.sched.controller
        params = ctrl.flat_weights()
        theta_grads, val_loss, ok = self.hypergradient(x)
        if self.sched.device.type == "cpu" and not self.device_side_guard:
            # CPU: ``ok`` is host memory, reading it is no sync; skip the update outright.
            if bool(optim_support.host_scalar(ok)):
                self._apply_theta_grads(params, theta_grads)
        else:
            self._guarded_update_on_device(params, theta_grads, ok)
        self.last_val_loss = val_loss
        self.meta_steps += 1

    def _apply_theta_grads(self, params: list[Tensor], theta_grads: list[Tensor]) -> None:
        """One step of the meta-optimizer on theta with the given gradients."""
        for q, g in zip(params, theta_grads):
            q.grad = g.to(q.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _guarded_update_on_device(self, params: list[Tensor], theta_grads: list[Tensor], ok: Tensor) -> None:
        """Update theta, then undo it on the device if ``ok`` is False (no host sync).

        The gradient is already zeroed when not ok; every tensor the step changed (theta and
        the meta-optimizer's state) is set to ``x * ok + backup * (1 - ok)`` with foreach ops
        (a handful of dispatches in all). State that the step created (the first meta-step) has
        no backup. For Adam and AdamW (the default is Adam) it is zeroed: zero moments and a
        zero step count are what a fresh state starts from, so the next good step is the first
        one. Another ``MetaConfig.optimizer`` keeps what its step with a zero gradient created
        (undoing it exactly would need a host read of ``ok``).
        """
        def tracked() -> list[tuple[tuple[int, str], Tensor]]:
            return [((id(q), k), v) for q in params for k, v in self.optimizer.state.get(q, {}).items()
                    if isinstance(v, Tensor) and v.is_floating_point()]

        before = tracked()
        backup_params = torch._foreach_add(params, 0.0)
        saved = dict(zip((key for key, _ in before), torch._foreach_add([v for _, v in before], 0.0))) if before else {}
        self._apply_theta_grads(params, theta_grads)
        zero_is_fresh = isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW))
        with torch.no_grad():
            not_ok = (~ok).to(params[0].dtype)
            targets, backups = list(params), list(backup_params)
            for key, v in tracked():
                backup = saved.get(key)
                if backup is None:  # created by this step
                    if not zero_is_fresh:
                        continue
                    backup = torch.zeros_like(v)
                targets.append(v)
                backups.append(backup)
            # x <- x * ok + backup * not_ok: exact both ways (x is finite: its gradient was zeroed)
            for indices in self._by_device_and_dtype(targets):
                device = targets[indices[0]].device
                flag = not_ok if device == not_ok.device else self._flag_on(device, not_ok)
                torch._foreach_mul_([targets[i] for i in indices], 1.0 - flag)
                torch._foreach_mul_([backups[i] for i in indices], flag)
                torch._foreach_add_([targets[i] for i in indices], [backups[i] for i in indices])

    def _flag_on(self, device: torch.device, flag: Tensor) -> Tensor:
        """``flag`` copied to ``device``, for meta-optimizer state kept there (a non-fused,
        non-capturable optimizer keeps its step count on the CPU): a host sync, warned once."""
        optim_support.warn_once(
            self.sched._warned, "meta_state_device",
            f"AutoLR: the meta-optimizer ({type(self.optimizer).__name__}) keeps state on {device}, away from the "
            f"controller on {flag.device}: undoing a skipped meta-step there reads the device, a host sync per "
            "meta-step; use a fused or capturable meta-optimizer (the default, Adam(fused=True), is)",
        )
        return flag.to(device)

    # ------------------------------------------------------------------------------------------
    def save_snapshot(self, index: int) -> str | None:
        """Write ``controller_{index:04d}.pt`` (theta and the peak scale, not this step's
        envelope). It reads them to the host: a host sync on a GPU, once per ``snapshot_every``
        steps (``MetaConfig``). Skipped, with a warning, while the scale is not set yet."""
        peak = float(self.sched.scale.peak)
        if not (math.isfinite(peak) and peak > 0):
            optim_support.warn_once(self.sched._warned, "snapshot_no_scale",
                                    "AutoLR: a controller snapshot was skipped: the scale is not set yet "
                                    "(no finite loss seen, or no usable anchor)")
            return None
        path = os.path.join(self.config.snapshot_dir, f"controller_{index:04d}.pt")
        # every rank holds the same controller: rank 0 writes it (ranks sharing a folder would race)
        if self.sched.distributed and torch.distributed.get_rank() != 0:
            return path
        os.makedirs(self.config.snapshot_dir, exist_ok=True)
        save_controller(self.sched.controller, path, gamma=peak)
        return path

    def state_dict(self) -> dict:
        """The meta-optimizer's state, the meta-step count and the position in ``val_data`` (the
        batches used in the current pass), all a resumed run needs to continue exactly."""
        # cloned: a state kept in memory (a "best so far" copy) must not follow the live optimizer
        return {"optimizer": clone_state(self.optimizer.state_dict()), "optimizer_type": type(self.optimizer).__name__,
                "meta_steps": self.meta_steps, "val_batches": self._val_used}

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` is a :meth:`state_dict` this trainer can load (checked
        before the scheduler changes anything)."""
        if not isinstance(state, dict) or not {"optimizer", "meta_steps"} <= set(state):
            raise ValueError("the state_dict's 'meta' entry is not a meta-trainer state (it needs 'optimizer' and "
                             "'meta_steps')")
        saved = state["optimizer"]
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(groups, list) or "state" not in saved:
            raise ValueError("the state_dict's meta-optimizer state is not an optimizer state_dict")
        own = [len(g["params"]) for g in self.optimizer.param_groups]
        theirs = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
        if own != theirs:
            raise ValueError(f"the state_dict's meta-optimizer has param groups of sizes {theirs}, this AutoLR's "
                             f"{type(self.optimizer).__name__} has {own}: save and load with the same "
                             "MetaConfig.optimizer and controller")
        kind = state.get("optimizer_type")  # absent in states saved before it was recorded
        if kind is not None and kind != type(self.optimizer).__name__:
            raise ValueError(f"the state_dict's meta-optimizer is a {kind}, this AutoLR's is a "
                             f"{type(self.optimizer).__name__}: save and load with the same MetaConfig.optimizer")
        steps = state["meta_steps"]
        if not is_whole_number(steps, 0):
            raise ValueError(f"the state_dict's 'meta_steps' is {steps!r}, not a whole number >= 0")

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.meta_steps = int(state["meta_steps"])
        # the next validation batch starts a fresh pass past the batches the saved run had used
        self._val_iter = None
        self._val_used = int(state.get("val_batches", 0))
        if self.sched.distributed:
            # a state saved on one rank holds that rank's position; each rank's own follows from the
            # meta-step count (one batch each) where its val_data has a length
            try:
                n = len(self.config.val_data)
            except TypeError:
                n = 0
            if n > 0:
                self._val_used = (self.meta_steps - 1) % n + 1 if self.meta_steps > 0 else 0
