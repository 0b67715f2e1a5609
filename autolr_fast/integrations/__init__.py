"""Glue between :class:`autolr_fast.AutoLR` and training frameworks that own the training loop.

``AutoLR`` needs the loss between ``backward()`` and ``optimizer.step()``, which no framework
hands to an ordinary learning-rate scheduler. Each module here puts ``sched.step(loss)`` at
that point, once per optimizer step, with the mean loss of the accumulated micro-batches, and
saves the scheduler in the framework's own checkpoints:

* :mod:`autolr_fast.integrations.lightning`: ``AutoLRCallback`` for PyTorch Lightning;
* :mod:`autolr_fast.integrations.huggingface`: ``AutoLRTrainer`` for the Hugging Face ``Trainer``.

Each module imports its framework on import, so this package imports nothing; install the
frameworks with ``pip install "autolr_fast[integrations]"``. FSDP2 and DDP need no glue: see
``docs/frameworks.md``.
"""
