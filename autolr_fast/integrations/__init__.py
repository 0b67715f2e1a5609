"""Glue between :class:`autolr_fast.AutoLR` and training frameworks that own the training loop.

``AutoLR`` needs the loss between ``backward()`` and ``optimizer.step()``, which no framework
hands to an ordinary learning-rate scheduler. Each module here puts ``sched.step(loss)`` at
that point, once per optimizer step, with the mean loss of the accumulated micro-batches, and
saves the scheduler in the framework's own checkpoints:

* :mod:`autolr_fast.integrations.lightning`: ``AutoLRCallback`` for PyTorch Lightning;
* :mod:`autolr_fast.integrations.huggingface`: ``AutoLRTrainer`` for the Hugging Face ``Trainer``.

Each module imports its framework on import; this package itself imports none (it holds the
check both share, that AutoLR's ``total_steps`` matches the framework's step count). Install the
frameworks with ``pip install "autolr_fast[integrations]"``. FSDP2 and DDP need no glue: see
``docs/frameworks.md``.
"""

from __future__ import annotations

import warnings

from autolr_fast import optim_support


def warn_if_envelope_misfits(sched, steps: int, who: str, run: str, counted_by: str, advice: str) -> None:
    """Warn when ``sched``'s ``total_steps`` is not the ``steps`` optimizer steps the framework will
    take (its envelope would reach 0 before the end, or never)."""
    total = sched.scale.total_steps
    if total is None or total == steps:
        return
    warnings.warn(
        f"{who}: AutoLR(total_steps={total}), but this {run} takes {steps} optimizer steps ({counted_by}, after "
        "gradient accumulation): its envelope " + ("reaches 0 before the end" if total < steps else "does not reach 0")
        + f"; {advice}", RuntimeWarning, stacklevel=optim_support.user_stacklevel())
