"""Helpers of the overhead benchmarks: a training-step callable, host-sync counting, peak memory.

Kept out of ``conftest.py`` so that benchmark files import them by a unique module name
(``from bench_utils import ...``; pytest puts ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import importlib
import resource
import tracemalloc
import warnings
from typing import Callable, Iterator

import pytest
import torch


def meta_config_class():
    """``autolr_fast.meta.MetaConfig`` if online meta-training is built, else skip the benchmark."""
    try:
        meta = importlib.import_module("autolr_fast.meta")
    except ImportError as exc:  # pragma: no cover - depends on the branch
        pytest.skip(f"online meta-training is not importable yet: {exc}")
    if not hasattr(meta, "MetaTrainer"):
        pytest.skip("online meta-training (autolr_fast.meta.MetaTrainer) is not built yet")
    return meta.MetaConfig


# ------------------------------------------------------------------------------------------------
# One training step
# ------------------------------------------------------------------------------------------------
class TrainStep:
    """A callable training step over a fixed cycle of batches: ``zero_grad; forward; backward;
    (sched.step(loss) for AutoLR); optimizer.step(); (sched.step() for a torch scheduler)``."""

    def __init__(self, model, optimizer, loss_fn, batches, autolr=None, torch_sched=None) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.batches, self.autolr, self.torch_sched = batches, autolr, torch_sched
        self.i = 0

    def __call__(self) -> torch.Tensor:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        if self.autolr is not None:
            self.autolr.step(loss)
        self.optimizer.step()
        if self.torch_sched is not None:
            self.torch_sched.step()
        return loss


# ------------------------------------------------------------------------------------------------
# Host syncs and peak memory
# ------------------------------------------------------------------------------------------------
_HOST_READS = ("item", "__float__", "__int__", "__bool__", "tolist", "__index__")


@contextlib.contextmanager
def count_host_syncs(device: torch.device | str = "cpu") -> Iterator[dict]:
    """Count host reads of tensor values inside the block: ``{"count": n}``.

    CPU: patches ``torch.Tensor.item/__float__/__int__/__bool__/tolist/__index__`` (each would
    be a device sync on a GPU). CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` and counts its
    warnings (every synchronising call, including ones inside PyTorch).
    """
    result = {"count": 0}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield result
            finally:
                torch.cuda.set_sync_debug_mode("default")
        result["count"] = sum("synchroniz" in str(w.message) for w in caught)
        return
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def wrap(orig):
        def counted(self, *args, **kwargs):
            result["count"] += 1
            return orig(self, *args, **kwargs)

        return counted

    try:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, wrap(orig))
        yield result
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def host_syncs_per_step(step: Callable[[], object], device="cpu", steps: int = 10) -> float:
    """Average host reads per call of ``step`` over ``steps`` calls (after one warm-up call)."""
    step()
    with count_host_syncs(device) as c:
        for _ in range(steps):
            step()
    return c["count"] / steps


def peak_memory(fn: Callable[[], object], device="cpu") -> dict:
    """Peak memory of one call of ``fn``.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the call (MiB).
    CPU: the peak of Python-level allocations (``tracemalloc``; tensors' storage is not
    counted there) and the growth of the process's maximum resident set (``ru_maxrss``; 0 when
    the call stays below an earlier high-water mark), both in MiB.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return {"peak_mem_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"py_peak_mib": peak / 2**20, "maxrss_growth_mib": (rss1 - rss0) / 1024}
