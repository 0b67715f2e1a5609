"""Hugging Face ``Trainer``: ``AutoLRTrainer`` runs ``AutoLR.step(loss)`` at every optimizer step.

Usage::

    from autolr_fast import AutoLR
    from autolr_fast.integrations.huggingface import AutoLRTrainer

    trainer = AutoLRTrainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=2),
                            train_dataset=ds, autolr=lambda opt: AutoLR(opt))
    trainer.train()                                  # resume: trainer.train(resume_from_checkpoint=True)

Why a ``Trainer`` subclass and not a ``TrainerCallback`` alone: ``Trainer`` calls
``lr_scheduler.step()`` *after* ``optimizer.step()`` with no loss, and no callback sees the loss.
So, per optimizer step:

* ``training_step`` (overridden) adds up what ``Trainer`` back-propagated for each micro-batch:
  ``Trainer`` has already scaled it for gradient accumulation (divided by the number of
  micro-batches in the window, or normalized by the window's token count for models that take
  ``num_items_in_batch``), so the sum is the window's mean loss, also in a shorter last window;
* ``on_pre_optimizer_step`` (a callback this trainer adds), which runs after gradient clipping
  and right before ``optimizer.step()``, hands that mean to ``AutoLR.step`` (with fp16, a step
  the GradScaler will skip for Inf/NaN gradients is passed as ``skip``: the controller does not
  advance on it, as ``Trainer`` does not step its scheduler then);
* ``Trainer.lr_scheduler`` is an adapter whose ``step()`` does nothing (the rate is already set)
  and whose ``state_dict()`` is ``AutoLR.state_dict()``, so ``save_steps`` checkpoints carry it in
  ``scheduler.pt`` and ``resume_from_checkpoint`` restores it.

Mix ``AutoLRTrainerMixin`` into another ``Trainer`` subclass (e.g. TRL's) the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "autolr_fast.integrations.huggingface needs the `transformers` package: "
        'pip install transformers accelerate (or pip install "autolr_fast[integrations]")'
    ) from exc

from autolr_fast import AutoLR, optim_support
from autolr_fast.integrations import warn_if_envelope_misfits
from autolr_fast.integrations.amp import scaler_skips

__all__ = ["AutoLRTrainer", "AutoLRTrainerMixin", "AutoLRSchedulerAdapter"]

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - old transformers only
    raise ImportError(
        "autolr_fast.integrations.huggingface needs TrainerCallback.on_pre_optimizer_step, which this "
        "transformers does not have: upgrade transformers (tested with 5.24)"
    )


class AutoLRSchedulerAdapter:
    """What ``Trainer`` uses as ``lr_scheduler``: a no-op ``step()``, ``get_last_lr()`` for its
    logs, and ``AutoLR``'s ``state_dict`` for its checkpoints."""

    def __init__(self, autolr: AutoLR, hold_warnings: bool = False) -> None:
        self.autolr = autolr
        self.hold_warnings = hold_warnings  # set by AutoLRTrainer, which issues them (see load_state_dict)
        self._held_warnings: list[warnings.WarningMessage] = []
        self.foreign_state: list | str | None = None  # what scheduler.pt held when it was not AutoLR's

    def step(self, *args: Any, **kwargs: Any) -> None:
        pass  # Trainer calls this after optimizer.step(); AutoLR set this step's rate before it

    def get_last_lr(self) -> list[float]:
        # Trainer reads this for its logs after every optimizer step (a host read on a GPU)
        return self.autolr.get_last_lr()

    def state_dict(self) -> dict:
        return self.autolr.state_dict()

    def load_state_dict(self, state: dict) -> None:
        # Trainer loads scheduler.pt under catch_warnings and re-issues only when more than one
        # warning was caught: AutoLR's own (e.g. a resumed run with another length) are held and
        # issued when training begins instead
        if not self.hold_warnings:
            self._load(state)
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self._load(state)
        self._held_warnings = list(caught)

    def _load(self, state: dict) -> None:
        if isinstance(state, dict) and "version" in state:
            self.autolr.load_state_dict(state)
            return
        # A checkpoint of a run with another scheduler (a torch one: LambdaLR, ReduceLROnPlateau,
        # SequentialLR...), switched to AutoLR. Trainer loads optimizer.pt only when scheduler.pt
        # exists, so the file stays and is read here; AutoLR starts afresh, its envelope continuing
        # from the step the run reached, which Trainer knows only once it has read its own state
        # (after this): see start_after_foreign_state.
        self.foreign_state = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__

    def start_after_foreign_state(self, global_step: int) -> None:
        """At the start of training: continue AutoLR's envelope from ``global_step`` when the
        checkpoint's scheduler.pt was another scheduler's (see ``_load``)."""
        if self.foreign_state is None:
            return
        keys, self.foreign_state = self.foreign_state, None
        self.autolr._start_at_step(int(global_step))
        warnings.warn(
            f"AutoLRTrainer: the checkpoint's scheduler.pt is not AutoLR's state (another scheduler's: {keys}), so "
            f"the run did not use AutoLR. AutoLR starts afresh from the lr the optimizer was built with, its envelope "
            f"continuing from step {global_step}; the optimizer's state is loaded as usual",
            RuntimeWarning, stacklevel=optim_support.user_stacklevel())

    def issue_held_warnings(self) -> None:
        held, self._held_warnings = self._held_warnings, []
        for w in held:
            warnings.warn(w.message, w.category, stacklevel=optim_support.user_stacklevel())


class _StepBeforeOptimizer(TrainerCallback):
    def __init__(self, trainer: AutoLRTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # after Trainer has loaded scheduler.pt, outside its catch_warnings
        if isinstance(self.trainer.lr_scheduler, AutoLRSchedulerAdapter):
            self.trainer.lr_scheduler.issue_held_warnings()
            self.trainer.lr_scheduler.start_after_foreign_state(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._autolr_step()


def _warn_about_unused_arguments(args: Any) -> None:
    """Say which ``TrainingArguments`` AutoLR makes moot, instead of ignoring them silently."""
    unused = []
    kind = str(getattr(getattr(args, "lr_scheduler_type", "linear"), "value", getattr(args, "lr_scheduler_type", "")))
    if kind != "linear":
        unused.append(f"lr_scheduler_type={kind!r}")
    for name in ("warmup_steps", "warmup_ratio"):
        if getattr(args, name, 0):
            unused.append(f"{name}={getattr(args, name)!r}")
    if getattr(args, "lr_scheduler_kwargs", None):
        unused.append("lr_scheduler_kwargs")
    if unused:
        warnings.warn(
            f"AutoLRTrainer: AutoLR sets the learning rate, so {', '.join(unused)} "
            f"{'has' if len(unused) == 1 else 'have'} no effect. For a warm-up and a decay to 0 over the run, "
            "build AutoLR with total_steps (autolr=lambda opt: AutoLR(opt, total_steps=N)): with its default "
            "controller it warms up over 5 % of the run (warmup_steps=W: over W steps), holds the peak and "
            "decays linearly to 0 over the last 20 % (decay_steps=D: the last D steps; envelope='cosine': a "
            "cosine after the warm-up)",
            UserWarning, stacklevel=3)
    if getattr(args, "save_only_model", False):
        warnings.warn(
            "AutoLRTrainer: with save_only_model=True the checkpoints hold no scheduler.pt, so "
            "resume_from_checkpoint restarts AutoLR (its controller state, scale and step count) "
            "from scratch", UserWarning, stacklevel=3)


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # accelerate wraps the optimizer (AcceleratedOptimizer keeps the torch one as .optimizer);
    # AutoLR must hook and write the torch optimizer that actually steps.
    while not type(optimizer).__module__.startswith("torch.") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class AutoLRTrainerMixin:
    """Adds ``autolr=`` to a ``Trainer`` class; see the module docstring.

    Args:
        autolr: ``autolr(optimizer) -> AutoLR``, called with the torch optimizer once
            ``Trainer`` has built it (at the start of ``train()``).

    Attributes:
        autolr: the ``AutoLR`` during and after ``train()`` (None before).
        autolr_last_loss: this process's loss at the last optimizer step; under DDP the
            controller reads the mean of it across ranks.
    """

    def __init__(self, *args: Any, autolr: Callable[[torch.optim.Optimizer], AutoLR], **kwargs: Any) -> None:
        if not callable(autolr):
            raise TypeError(
                "AutoLRTrainer needs autolr=<function optimizer -> AutoLR>, e.g. "
                "autolr=lambda opt: AutoLR(opt)"
            )
        optimizers = kwargs.get("optimizers")
        if optimizers is not None and len(optimizers) > 1 and optimizers[1] is not None:
            raise ValueError(
                "AutoLRTrainer builds its own lr_scheduler (AutoLR sets the rate): pass optimizers=(optimizer, None)"
            )
        self._make_autolr = autolr
        self.autolr: AutoLR | None = None
        self.autolr_last_loss: Tensor | None = None
        self._autolr_window: Tensor | None = None
        super().__init__(*args, **kwargs)
        self.add_callback(_StepBeforeOptimizer(self))
        _warn_about_unused_arguments(self.args)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            opt = _torch_optimizer(optimizer if optimizer is not None else self.optimizer)
            old = self.autolr if self.autolr is not None and self.autolr.optimizer is opt else None
            if old is not None:
                # a later train() on the same optimizer: its groups hold the last run's final rate.
                # Start again from the peak the first AutoLR recorded, as Trainer's own schedulers
                # (which read initial_lr) do, with the old AutoLR off the optimizer; an lr the user
                # set since (by hand, find_anchor_lr) is the new run's peak instead.
                old._hand_over(old.groups_holding_its_rates())
            sched = self._make_autolr(opt)
            if sched is old:
                raise ValueError(
                    "autolr= returned the AutoLR of the previous train(), whose run has ended: build a new one "
                    "in the function (autolr=lambda opt: AutoLR(opt, ...)), as Trainer builds a new scheduler"
                )
            if not isinstance(sched, AutoLR):
                raise TypeError(f"autolr= must return an AutoLR, got {type(sched).__name__}")
            if sched.optimizer is not opt:
                raise ValueError(
                    "autolr= built an AutoLR for another optimizer; build it for the optimizer it is given"
                )
            warn_if_envelope_misfits(sched, num_training_steps, "AutoLRTrainer", "train()", "Trainer's count",
                                     f"build AutoLR(opt, total_steps={num_training_steps})")
            self.autolr = sched
            self._autolr_window = None
            self.lr_scheduler = AutoLRSchedulerAdapter(sched, hold_warnings=True)
            self._created_lr_scheduler = True  # Trainer then builds a new one at the next train()
        return self.lr_scheduler

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        loss = super().training_step(*args, **kwargs)
        # what Trainer back-propagated: this micro-batch's share of the window's mean loss
        part = loss.detach().to(torch.float32)
        self._autolr_window = part if self._autolr_window is None else self._autolr_window + part
        return loss

    def _autolr_step(self) -> None:
        if self.autolr is None:
            raise RuntimeError("AutoLRTrainer: the optimizer is about to step but no AutoLR was built")
        if isinstance(self.lr_scheduler, AutoLRSchedulerAdapter):
            self.lr_scheduler.issue_held_warnings()
        if self._autolr_window is None:
            raise RuntimeError(
                "AutoLRTrainer: the optimizer is about to step, but no loss of this step reached AutoLR. "
                "AutoLRTrainer.training_step hands each micro-batch's loss to AutoLR: a subclass that overrides "
                "training_step must call super().training_step(model, inputs, ...) for the forward and backward "
                "(and return its loss)"
            )
        loss, self._autolr_window = self._autolr_window, None
        scaler = getattr(self.accelerator, "scaler", None)
        self.autolr.step(loss, skip=scaler_skips(scaler, self.autolr.optimizer, self.autolr.device))
        self.autolr_last_loss = loss


class AutoLRTrainer(AutoLRTrainerMixin, Trainer):
    """``transformers.Trainer`` whose learning rate ``AutoLR`` sets from the loss, every optimizer step."""
