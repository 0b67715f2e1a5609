"""PyTorch Lightning: ``AutoLRCallback`` runs ``AutoLR.step(loss)`` at every optimizer step.

Usage (automatic optimization; ``configure_optimizers`` returns the optimizer only)::

    from autolr_fast import AutoLR
    from autolr_fast.integrations.lightning import AutoLRCallback

    autolr = AutoLRCallback(lambda opt: AutoLR(opt))
    trainer = lightning.pytorch.Trainer(callbacks=[autolr], accumulate_grad_batches=2, precision="bf16-mixed")
    trainer.fit(model, loader)                 # resume: trainer.fit(model, loader, ckpt_path=...)

How it maps onto Lightning's hooks:

* ``on_before_backward`` sees every micro-batch's loss; Lightning has divided it by
  ``accumulate_grad_batches`` (and, with ``precision="16-mixed"``, multiplied it by the
  GradScaler's scale, which is undone here), so the sum over an accumulation window is the
  window's mean loss. A shorter last window of an epoch is rescaled to its own mean.
* ``on_before_optimizer_step`` runs after the last backward of the window and before the
  parameters move: there the controller reads that mean, once per optimizer step (an optimizer
  that evaluates the closure several times, as LBFGS does, is read at its first evaluation).
  With ``16-mixed``, a step the GradScaler will skip (Inf/NaN gradients), or one the AMP plugin
  leaves out because the window's last ``training_step`` returned None, is passed as ``skip``, so
  the controller does not advance on it.
* With meta-training (``AutoLR(..., meta=...)``), the meta-step reads the gradients as the
  optimizer will apply them: Lightning clips only after this hook, so the callback runs the
  module's ``configure_gradient_clipping`` first (norm clipping of clipped gradients moves them by
  a relative 1e-6 / max_norm at most; an overridden hook runs twice per step).
* The callback's ``state_dict`` holds ``AutoLR.state_dict()``, so Lightning's checkpoints
  (``ModelCheckpoint``, ``trainer.save_checkpoint``) carry it and ``fit(ckpt_path=...)``
  resumes with the same rates.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "autolr_fast.integrations.lightning needs the `lightning` package: "
        'pip install lightning (or pip install "autolr_fast[integrations]")'
    ) from exc

from autolr_fast import AutoLR, optim_support
from autolr_fast.integrations import warn_if_envelope_misfits
from autolr_fast.integrations.amp import scaler_skips

__all__ = ["AutoLRCallback"]


class AutoLRCallback(Callback):
    """Let an :class:`~autolr_fast.AutoLR` set the learning rate of a ``LightningModule``.

    Args:
        make_scheduler: ``make_scheduler(optimizer) -> AutoLR``, called with the optimizer that
            ``configure_optimizers`` returned, e.g.
            ``lambda opt: AutoLR(opt, load_pretrained("mnist1d-cnn"))``.

    Attributes:
        scheduler: the ``AutoLR``; None until the first optimizer step of a ``fit`` (see
            ``_scheduler_for``).
        last_loss: this rank's loss at the last optimizer step (0-dim tensor); under DDP the
            controller reads the mean of it across ranks.

    Needs automatic optimization and one optimizer, without an ``lr_scheduler`` from
    ``configure_optimizers`` (AutoLR is the scheduler). With manual optimization call
    ``sched.step(loss)`` yourself between ``manual_backward`` and ``opt.step()``.
    """

    def __init__(self, make_scheduler: Callable[[torch.optim.Optimizer], AutoLR]) -> None:
        if not callable(make_scheduler):
            raise TypeError(
                "AutoLRCallback takes a function optimizer -> AutoLR, e.g. "
                "AutoLRCallback(lambda opt: AutoLR(opt))"
            )
        self.make_scheduler = make_scheduler
        self.scheduler: AutoLR | None = None
        self.last_loss: Tensor | None = None
        self._pending_state: dict | None = None
        self._train_start_step = 0  # trainer.global_step at this fit's first step (on_train_start)
        self._autolr_start_step = 0  # ... at the first step of the AutoLR it drives (kept in checkpoints)
        self._window_sum: Tensor | None = None
        self._window_count = 0
        self._backward_in_batch = False  # whether this batch's training_step gave a loss to backward
        # trainer.global_step when AutoLR last read a loss: an optimizer that evaluates its closure
        # again within the step (LBFGS) reaches the hook again with the same global_step
        self._read_at_step: int | None = None

    # -- checks ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "AutoLRCallback works with automatic optimization. With manual optimization, call "
                "sched.step(loss) yourself after self.manual_backward(loss) and before opt.step()"
            )
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"AutoLRCallback drives one optimizer, configure_optimizers returned {len(trainer.optimizers)}; "
                "use one AutoLR per optimizer in manual optimization instead"
            )
        if trainer.lr_scheduler_configs:
            raise RuntimeError(
                "configure_optimizers returned an lr_scheduler, but AutoLR sets the learning rate itself: "
                "return only the optimizer"
            )
        # A new fit has a new optimizer: build a new AutoLR for it. A state restored from
        # ckpt_path (load_state_dict runs before this hook) stays pending until then.
        self.scheduler = None
        self._read_at_step = None
        self._reset_window()
        self._scheduler_added_warned = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the fit's first step: after a checkpoint's training state is restored, before any batch
        self._train_start_step = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.lr_scheduler_configs and not getattr(self, "_scheduler_added_warned", False):
            # a callback added one during the fit (StochasticWeightAveraging adds SWALR at swa_epoch_start)
            self._scheduler_added_warned = True
            names = ", ".join(type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs)
            warnings.warn(
                f"AutoLRCallback: a learning-rate scheduler was added during the fit ({names}, e.g. by "
                "StochasticWeightAveraging); AutoLR keeps setting the lr at every step, so its rates are not "
                "applied: use one of the two",
                RuntimeWarning, stacklevel=optim_support.user_stacklevel())

    # -- the loss of each micro-batch, and the step ---------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._backward_in_batch = False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        part = loss.detach().to(torch.float32)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            # 16-mixed: Lightning passes the loss after GradScaler.scale(). get_scale() reads the
            # scale on the host (a sync per micro-batch on a GPU; bf16-mixed has no scaler).
            part = part / scaler.get_scale()
        self._window_sum = part if self._window_sum is None else self._window_sum + part
        self._window_count += 1
        self._backward_in_batch = True

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._window_count == 0 or self._read_at_step == trainer.global_step:
            # every training_step of this window returned None, or the optimizer re-evaluates
            # its closure within one step (LBFGS): nothing (more) to read
            self._reset_window()
            return
        loss = self._window_sum
        accumulate = trainer.accumulate_grad_batches
        if self._window_count != accumulate:
            # Lightning divides by accumulate_grad_batches even in a shorter last window
            loss = loss * (accumulate / self._window_count)
        sched = self._scheduler_for(optimizer, trainer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if sched.meta is not None:
            self._gradients_as_applied(trainer, pl_module, optimizer, scaler)
        skip = scaler_skips(scaler, optimizer, sched.device)
        if scaler is not None and not self._backward_in_batch:
            # Lightning's AMP plugin calls scaler.step only when the window's last training_step
            # gave a loss; after one that returned None the optimizer does not step
            skip = torch.ones((), dtype=torch.bool, device=sched.device)
        sched.step(loss, skip=skip)
        self._read_at_step = trainer.global_step
        self.last_loss = loss
        self._reset_window()

    def _gradients_as_applied(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                              optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        """Before a meta-step: the gradients as the optimizer will apply them (unscaled, clipped)."""
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise RuntimeError(
                f"AutoLR meta-training reads the gradients before optimizer.step(), and with precision "
                f"'16-mixed' {type(optimizer).__name__} unscales them only inside its step (a fused optimizer): "
                "use precision='bf16-mixed', or the optimizer without fused=True"
            )
        # Lightning's own clipping hook (a module may override it), which Lightning calls again
        # right after this callback: clipping clipped gradients again is (nearly) a no-op
        pl_module.configure_gradient_clipping(optimizer, gradient_clip_val=trainer.gradient_clip_val,
                                              gradient_clip_algorithm=trainer.gradient_clip_algorithm)

    def _scheduler_for(self, optimizer: torch.optim.Optimizer, trainer: pl.Trainer) -> AutoLR:
        # Built here, at the first optimizer step (inside Lightning's optimizer.step(closure)),
        # not in on_fit_start: Lightning restores callbacks before the optimizer, so a restored
        # state is applied only now, after the optimizer's param groups (which hold the rate).
        if self.scheduler is None:
            sched = self.make_scheduler(optimizer)
            if not isinstance(sched, AutoLR):
                raise TypeError(f"make_scheduler must return an AutoLR, got {type(sched).__name__}")
            if sched.optimizer is not optimizer:
                raise ValueError(
                    "make_scheduler built an AutoLR for another optimizer; build it for the optimizer it is given"
                )
            if self._pending_state is not None:  # resumed: the step its AutoLR started at was saved with it
                sched.load_state_dict(self._pending_state)
                self._pending_state = None
            else:  # a new AutoLR: from this fit's first step (after a continued fit's earlier ones)
                self._autolr_start_step = self._train_start_step
            _check_total_steps(sched, trainer, self._autolr_start_step)
            self.scheduler = sched
        return self.scheduler

    def _reset_window(self) -> None:
        self._window_sum = None
        self._window_count = 0

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        start = {"autolr_start_step": self._autolr_start_step}
        if self.scheduler is not None:
            return {"autolr": self.scheduler.state_dict(), **start}
        if self._pending_state is not None:  # restored, not stepped yet: keep it in the next checkpoint
            return {"autolr": self._pending_state, **start}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied when the AutoLR is built at the next optimizer step, after Lightning has
        # restored the optimizer (whose param groups hold the rate as a tensor lr).
        self._pending_state = state_dict.get("autolr")
        self._autolr_start_step = int(state_dict.get("autolr_start_step", 0))


def _check_total_steps(sched: AutoLR, trainer: pl.Trainer, start_step: int) -> None:
    """Warn when AutoLR's envelope is not as long as its part of the fit (e.g. ``epochs *
    len(loader)`` with ``accumulate_grad_batches > 1``): it would end before the fit does, or never
    reach 0. Its part: the fit's steps from ``start_step`` (0 for an AutoLR resumed with the run; the
    step the fit started at for a new AutoLR on a continued fit)."""
    try:
        fit_steps = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - Lightning cannot always tell (e.g. no length); nothing to compare
        return
    if not math.isfinite(fit_steps) or fit_steps < 1:
        return  # -1: Lightning cannot tell (an iterable dataset without a length, no max_steps)
    steps = int(fit_steps) - start_step
    if steps < 1:
        return
    if start_step == 0:
        counted_by, total = "trainer.estimated_stepping_batches", "trainer.estimated_stepping_batches"
    else:  # a fit continued without AutoLR's state: the new AutoLR runs the rest of it
        counted_by = f"trainer.estimated_stepping_batches less the {start_step} before this fit"
        total = "trainer.estimated_stepping_batches - trainer.global_step"
    warn_if_envelope_misfits(sched, steps, "AutoLRCallback", "fit", counted_by,
                             f"build AutoLR(opt, total_steps={total}) in make_scheduler")
