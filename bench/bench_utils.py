"""Helpers of the overhead benchmarks: a training-step callable, host-sync counting, peak memory.

Kept out of ``conftest.py`` so that benchmark files import them by a unique module name
(``from bench_utils import ...``; pytest puts ``bench/`` on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import resource
import tracemalloc
import warnings
from collections.abc import Callable, Iterator

import torch
from host_sync_probe import HostReadCounter

from autolr_experiments.training import Schedule, train_step


# ------------------------------------------------------------------------------------------------
# One training step
# ------------------------------------------------------------------------------------------------
class TrainStep:
    """A callable training step over a fixed cycle of batches: the harness's
    :func:`~autolr_experiments.training.train_step` with ``schedule`` (``schedule.autolr`` is the
    AutoLR, if any)."""

    def __init__(self, model, schedule: Schedule, loss_fn, batches) -> None:
        self.model, self.schedule, self.loss_fn, self.batches = model, schedule, loss_fn, batches
        self.i = 0

    def __call__(self) -> torch.Tensor:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return train_step(self.model, self.schedule, self.loss_fn, batch)


# ------------------------------------------------------------------------------------------------
# Host syncs and peak memory
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def count_host_syncs(device: torch.device | str = "cpu") -> Iterator[dict]:
    """Count host reads of tensor values inside the block: ``{"count": n}``.

    CPU: the tests' dispatch-mode probe (``tests/host_sync_probe.py``), which sees every ATen op
    that reads a value on the host (``_local_scalar_dense``, ``is_nonzero``, ``nonzero``,
    ``equal``, ``item``), also inside PyTorch's C++ code. CUDA: ``torch.cuda.set_sync_debug_mode
    ("warn")`` and counts its warnings (every synchronising call).
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
    with HostReadCounter() as probe:
        yield result
    result["count"] = probe.count


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
