"""Shared fixtures of the overhead benchmarks (pytest-benchmark).

Conventions every ``bench/test_bench_*.py`` follows, so that ``python -m autolr_fast bench``
can render them:

* ``benchmark.group`` (or ``@pytest.mark.benchmark(group=...)``) puts the variants that are
  compared side by side into one group;
* the group's reference variant sets ``benchmark.extra_info["baseline"] = True`` (otherwise a
  name containing ``baseline`` is the reference); the report shows every row's time as a
  ratio to it;
* other numbers go into ``benchmark.extra_info`` (e.g. ``host_syncs_per_step``,
  ``peak_mem_mib``) and appear in the report's last column.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import resource
import tracemalloc
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: Torch CPU threads for the benchmarks (default 1: per-step overheads of small models are
#: steadier on one thread, and a busy machine does not oversubscribe its cores).
BENCH_THREADS = int(os.environ.get("AUTOLR_FAST_BENCH_THREADS", "1"))
torch.set_num_threads(BENCH_THREADS)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add torch and the GPU to pytest-benchmark's machine description."""
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    machine_info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        machine_info["cpu_model"] = platform.processor()


# ------------------------------------------------------------------------------------------------
# Data and models
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mnist1d_task():
    from autolr_fast.tasks import get_task

    return get_task("mnist1d-cnn")


@pytest.fixture(scope="session")
def mnist1d_batches(mnist1d_task) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eight batches of 100 MNIST-1D samples (the CPU benchmarks cycle through them)."""
    return [b for _, b in zip(range(8), mnist1d_task.batches(100, seed=0))]


@pytest.fixture(scope="session")
def official_dir() -> Path:
    from autolr_fast.baselines import official_checkpoint_dir

    folder = official_checkpoint_dir()
    if folder is None:
        pytest.skip("published MLR-SNet checkpoints not found (../shared/fixtures/mlrsnet_official)")
    return folder


@pytest.fixture
def official_controller(official_dir):
    from autolr_fast.controller import MLRSNet

    return MLRSNet.from_official(official_dir / "mlr_snet_200.pth")


@pytest.fixture
def cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU benchmarks run only where one is present")
    return torch.device("cuda")


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


@pytest.fixture
def make_train_step() -> Callable[..., TrainStep]:
    """``make_train_step(model, batches, loss_fn, kind, controller=None, meta=None, fused=False)``
    with ``kind`` ``"cosine"`` (CosineAnnealingLR over 10,000 steps) or ``"autolr"``."""

    def make(model, batches, loss_fn, kind: str, controller=None, meta=None, fused: bool = False, gamma=0.1) -> TrainStep:
        from autolr_fast.scheduler import AutoLR

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=fused or None)
        if kind == "cosine":
            return TrainStep(model, opt, loss_fn, batches, torch_sched=torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10_000))
        if kind == "autolr":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sched = AutoLR(opt, controller, gamma=gamma, meta=meta(model) if callable(meta) else meta)
            return TrainStep(model, opt, loss_fn, batches, autolr=sched)
        raise ValueError(f"kind must be 'cosine' or 'autolr', got {kind!r}")

    return make


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
