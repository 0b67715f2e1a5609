"""Where the host time of one eager ``AutoLR.step`` goes on a GPU, piece by piece, in one run.

Each benchmark calls one piece of the steady-state step (the scheduler of
``test_bench_triton.py``'s ``autolr-step``: MLR-SNet H=50, fused SGD with three param groups,
a fixed gamma) as ``AutoLR.step`` calls it; the group's baseline is the whole step. The pieces
queue at most one tiny kernel each, so the times are the host's. Run on a GPU machine::

    python -m autolr_fast bench --files bench/test_bench_step_pieces.py
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from autolr_fast.ops import dispatch

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks: need a CUDA device (none here)"),
    pytest.mark.skipif(not HAS_TRITON, reason="GPU benchmarks: need triton"),
]
GROUP = "AutoLR.step pieces (cuda host time)"


@pytest.fixture(scope="module")
def sched():
    from gpu_steps import autolr_over_three_groups  # tests/ (bench/conftest.py puts it on sys.path)

    s, _ = autolr_over_three_groups()
    s.loss = torch.tensor(2.3, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # steps without optimizer.step() in between
        for _ in range(50):
            s.step(s.loss)
    s.synchronize()
    return s


def _args(s):
    ctrl = s.controller
    return (s.loss, ctrl.h, ctrl.c, ctrl.flat_weights(), s.gamma, s.rate, s._lr_tensors(), s.lr_scales,
            s.counters.values)


PIECES = {
    "whole AutoLR.step": lambda s: s.step(s.loss),
    "_check_loss": lambda s: s._check_loss(s.loss),
    "capture query": lambda s: torch._C._cuda_isCurrentStreamCapturing(),
    "lr tensors": lambda s: s._lr_tensors(),
    "flat_weights": lambda s: s.controller.flat_weights(),
    "dispatch.select": lambda s: dispatch.select("mlrsnet_step_", s.device),
    "dispatch.mlrsnet_step_": lambda s: dispatch.mlrsnet_step_(*_args(s), s._ok),
    "triton launch_step_bound": None,  # the steady state's launch; filled below (needs triton)
    "triton launch_step_if_supported": None,  # the checked launch; filled below
    "counters.poll": lambda s: s.counters.poll(s.step_count),
    "after-step host checks": lambda s: s._after_step_host_checks(),
    "torch.cuda.current_device": lambda s: torch.cuda.current_device(),
    "torch.empty bool (cuda)": lambda s: torch.empty((), dtype=torch.bool, device="cuda"),
}


@pytest.mark.filterwarnings("ignore:AutoLR.step was called twice")
@pytest.mark.parametrize("piece", list(PIECES))
def test_piece(benchmark, sched, piece):
    fn = PIECES[piece]
    if fn is None:
        from autolr_fast.ops import triton_kernels as k

        launch = k.launch_step_bound if piece == "triton launch_step_bound" else k.launch_step_if_supported

        def fn(s):
            return launch(*_args(s)[:-1], s._ok, s.counters.values)

    benchmark.group = GROUP
    if piece == "whole AutoLR.step":
        benchmark.extra_info["baseline"] = True
    for _ in range(100):
        fn(sched)
    torch.cuda.synchronize()
    benchmark.pedantic(lambda: fn(sched), rounds=200, warmup_rounds=10, iterations=20)
    torch.cuda.synchronize()
