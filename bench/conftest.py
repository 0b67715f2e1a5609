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

import copy
import os
import platform
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# the benchmarks use the tests' references and probes (tests/host_sync_probe.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_utils import TrainStep  # noqa: E402

from autolr_experiments.baselines import official_checkpoint_dir
from autolr_experiments.tasks import get_task
from autolr_experiments.training import Schedule, autolr_schedule, torch_schedule
from autolr_fast import MLRSNet, optim_support
from autolr_fast.ops import reference

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
    return get_task("mnist1d-cnn")


@pytest.fixture(scope="session")
def mnist1d_batches(mnist1d_task) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eight batches of 100 MNIST-1D samples (the CPU benchmarks cycle through them)."""
    return [b for _, b in zip(range(8), mnist1d_task.batches(100, seed=0), strict=False)]


@pytest.fixture(scope="session")
def official_dir() -> Path:
    folder = official_checkpoint_dir()
    if folder is None:
        pytest.skip("published MLR-SNet checkpoints not found (../shared/fixtures/mlrsnet_official)")
    return folder


@pytest.fixture
def official_controller(official_dir):
    return MLRSNet.from_official(official_dir / "mlr_snet_200.pth")


@pytest.fixture
def cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU benchmarks run only where one is present")
    return torch.device("cuda")


def published_schedule(optimizer: torch.optim.Optimizer, controller: MLRSNet, gamma: float) -> Schedule:
    """What the published training script does every step: the controller in eager PyTorch on
    the loss, then ``float(lr)`` (a host sync on a GPU) into every param group."""
    controller = copy.deepcopy(controller).to(optim_support.params_device(optimizer))
    state = (controller.h, controller.c, [w.detach() for w in controller.flat_weights()])
    gamma_t = torch.tensor(float(gamma), device=controller.h.device)
    rate = torch.zeros((), device=controller.h.device)

    def before_step(loss: torch.Tensor) -> None:
        with torch.no_grad():
            reference.mlrsnet_scheduler_step_(loss.detach(), *state, gamma_t, rate, [], [])
        lr = float(rate)
        for group in optimizer.param_groups:
            group["lr"] = lr

    return Schedule(optimizer, rate=lambda: rate, before_step=before_step)


@pytest.fixture
def make_train_step() -> Callable[..., TrainStep]:
    """``make_train_step(model, batches, loss_fn, kind, controller=None, meta=None, fused=False)``
    with ``kind`` ``"cosine"`` (CosineAnnealingLR over 10,000 steps), ``"autolr"`` (``controller``
    at ``gamma``), ``"autolr-defaults"`` (``AutoLR(opt)``) or ``"published"``
    (:func:`published_schedule`)."""

    def make(model, batches, loss_fn, kind: str, controller=None, meta=None, fused: bool = False,
             gamma=0.1) -> TrainStep:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=fused or None)
        if kind == "cosine":
            schedule = torch_schedule(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10_000))
        elif kind == "autolr":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                schedule = autolr_schedule(opt, controller, gamma=gamma, meta=meta(model) if callable(meta) else meta)
        elif kind == "autolr-defaults":
            schedule = autolr_schedule(opt, None)
        elif kind == "published":
            schedule = published_schedule(opt, controller, gamma)
        else:
            raise ValueError(f"kind must be 'cosine', 'autolr', 'autolr-defaults' or 'published', got {kind!r}")
        return TrainStep(model, schedule, loss_fn, batches)

    return make
