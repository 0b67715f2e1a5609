"""GPU benchmarks of the MLR-SNet scheduler step and its weight gradient, side by side.

Step (per shape ``H``/cells, 3 param groups with scales), each variant doing exactly what
``dispatch.mlrsnet_step_`` promises (state, rate and every ``lr`` updated in place):

* ``reference-eager``: the reference branch of ``dispatch.mlrsnet_step_`` (the baseline,
  ``reference.mlrsnet_guarded_step`` plus the copies and ``reference.write_rates``);
* ``reference-compiled``: the same function under ``torch.compile(fullgraph=True)`` (inductor);
* ``reference-eager-cudagraph``: the eager reference captured once, replayed;
* ``triton-op``: ``torch.ops.autolr_fast.mlrsnet_step_`` through the dispatch-facing wrapper
  (what AutoLR runs on CUDA: one Triton launch + the ``ok`` allocation);
* ``triton-launch``: ``triton_kernels.launch_step`` called directly (no dispatcher, no allocation; the
  cached argument check and the compiled kernel's own launcher, see ``_StepPlan``);
* ``triton-cudagraph``: the op captured in a CUDA graph, replayed;
* ``autolr-step``: a whole eager ``AutoLR.step(loss)`` (argument checks, dispatch, the launch,
  the host-side counter poll) on an optimizer with the same three groups, to hold against the
  floor below and ``triton-cudagraph``;
* ``floor-tiny-triton-kernel`` (the group's baseline): one trivial Triton kernel launch (a load
  and a store): the launch-overhead floor any one-launch step pays without a graph;
* ``published-eager-float``: what the published training script does every step: the controller
  in eager PyTorch (the reference's kernels), then ``float(lr)`` (a host sync) written into the
  three groups as Python floats.

``test_device_work`` (last in the file: a process that ran the profiler times later launches
differently) records, for ``autolr-step``, ``triton-op`` and ``published-eager-float``,
``kernels_per_step`` (the profiler's count of device kernels over ``STEPS`` steps) and
``syncs_per_step`` (``set_sync_debug_mode("warn")`` warnings).

Gradient (``grad_p * dp/dtheta``): ``reference-autograd`` (``reference.mlrsnet_param_grads``),
``reference-explicit`` (the op's CPU math, on the GPU), ``triton-op`` and ``triton-launch``
(into preallocated outputs).

Each benchmarked call runs ``STEPS`` steps and then synchronizes, so the reported times are per
``STEPS`` steps; ``extra_info["us_per_step"]`` is the median per step. Run on a GPU machine::

    python -m pytest bench/test_bench_triton.py --benchmark-columns=min,median,iqr,rounds \\
        --benchmark-group-by=group --benchmark-sort=median

Ratios are only meaningful within one run (same machine, same moment).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from gpu_steps import SCALES  # tests/ (bench/conftest.py puts it on sys.path)

from autolr_fast import MLRSNet
from autolr_fast.ops import reference
from autolr_fast.ops import triton_backend as tb

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks: need a CUDA device (none here)"),
    pytest.mark.skipif(not HAS_TRITON, reason="GPU benchmarks: need triton"),
]

STEPS = 100
DEVICE = "cuda"
SHAPES = {"H50-L1": (50, 1), "H128-L2": (128, 2)}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tiny_kernel(ptr):
        tl.store(ptr, tl.load(ptr) + 1.0)


reference_step_ = reference.mlrsnet_scheduler_step_  # the baseline every variant must equal


class StepInputs:
    """Controller weights, state, rate and three ``lr`` tensors on the GPU."""

    def __init__(self, hidden: int, layers: int) -> None:
        torch.manual_seed(0)
        dev = torch.device(DEVICE)
        net = MLRSNet(hidden, layers).to(dev)
        self.weights = [w.detach() for w in net.flat_weights()]
        self.loss = torch.tensor(2.3, device=dev)
        self.h = torch.zeros(layers, hidden, device=dev)
        self.c = torch.zeros(layers, hidden, device=dev)
        self.gamma = torch.tensor(0.5, device=dev)
        self.rate = torch.zeros((), device=dev)
        self.lrs = [torch.tensor(0.1, device=dev) for _ in SCALES]
        self.ok = torch.zeros((), dtype=torch.bool, device=dev)
        self.grad_p = torch.tensor(0.7, device=dev)
        self.grad_out = [torch.empty_like(w) for w in self.weights]

    def args(self):
        return self.loss, self.h, self.c, self.weights, self.gamma, self.rate, self.lrs, SCALES


def _graph_of(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the capture (compiles, initialises the allocator)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _autolr_on_gpu(s: StepInputs):
    """``AutoLR`` with the inputs' controller shape over a fused SGD of ``len(SCALES)`` groups
    (their lrs in the ratios of SCALES); gradients exist, so ``step`` may be called at once."""
    from gpu_steps import autolr_over_three_groups  # tests/ (bench/conftest.py puts it on sys.path)

    layers, hidden = s.h.shape
    return autolr_over_three_groups(hidden, layers)


def make_step_variant(name: str, s: StepInputs):
    from autolr_fast.ops import triton_kernels as k  # needs triton (optional)

    if name == "autolr-step":
        sched, s.optimizer = _autolr_on_gpu(s)
        s.rate = sched.rate  # what the checks after the run compare the lrs with
        s.lrs = [group["lr"] for group in s.optimizer.param_groups]
        s.h = sched.controller.h
        return lambda: sched.step(s.loss)
    if name == "reference-eager":
        return lambda: reference_step_(*s.args())
    if name == "reference-compiled":
        compiled = torch.compile(reference_step_, fullgraph=True)
        return lambda: compiled(*s.args())
    if name == "reference-eager-cudagraph":
        return _graph_of(lambda: reference_step_(*s.args()))
    if name == "triton-op":
        return lambda: tb.mlrsnet_step_(*s.args())
    if name == "triton-launch":
        return lambda: k.launch_step(*s.args(), s.ok)
    if name == "triton-cudagraph":
        return _graph_of(lambda: torch.ops.autolr_fast.mlrsnet_step_(*s.args(), s.ok))
    if name == "floor-tiny-triton-kernel":
        return lambda: _tiny_kernel[(1,)](s.rate)
    if name == "published-eager-float":
        groups = [{"lr": 0.1 * scale} for scale in SCALES]

        def published():
            reference_step_(s.loss, s.h, s.c, s.weights, s.gamma, s.rate, [], [])
            lr = float(s.rate)
            for group, scale in zip(groups, SCALES, strict=True):
                group["lr"] = lr * scale

        s.groups = groups  # the floats the checks compare
        return published
    raise ValueError(name)


def make_grads_variant(name: str, s: StepInputs):
    from autolr_fast.ops import triton_kernels as k  # needs triton (optional)

    args = (s.loss, s.h, s.c, s.weights, s.grad_p)
    if name == "reference-autograd":
        return lambda: reference.mlrsnet_param_grads(*args)
    if name == "reference-explicit":
        return lambda: reference.mlrsnet_param_grads_explicit(*args)
    if name == "triton-op":
        return lambda: tb.mlrsnet_param_grads(*args)
    if name == "triton-launch":
        return lambda: k.launch_param_grads(*args, out=s.grad_out, check=False)
    raise ValueError(name)


def _run_timed(benchmark, group: str, step) -> None:
    def many_steps():
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()

    many_steps()  # warm-up: Triton/inductor compilation, caches
    benchmark.group = group
    benchmark.extra_info["steps_per_call"] = STEPS
    benchmark.pedantic(many_steps, rounds=20, warmup_rounds=2, iterations=1)
    benchmark.extra_info["us_per_step"] = benchmark.stats.stats.median / STEPS * 1e6


STEP_VARIANTS = ["reference-eager", "reference-compiled", "reference-eager-cudagraph", "triton-op", "triton-launch",
                 "triton-cudagraph", "autolr-step", "floor-tiny-triton-kernel", "published-eager-float"]
GRAD_VARIANTS = ["reference-autograd", "reference-explicit", "triton-op", "triton-launch"]


def _device_work_per_step(step) -> dict:
    """Kernels (profiler) and synchronising calls (sync debug mode) per call of ``step``."""
    import warnings

    from device_kernels import kernel_names  # tests/ (bench/conftest.py puts it on sys.path)
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    kernels = kernel_names(prof)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(STEPS):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return {"kernels_per_step": len(kernels) / STEPS, "kernel_names": sorted(set(kernels))[:3],
            "syncs_per_step": syncs / STEPS}


@pytest.mark.filterwarnings("ignore:AutoLR.step was called twice")  # autolr-step: no optimizer.step()
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_step(benchmark, variant, shape):
    torch._dynamo.reset()
    s = StepInputs(*SHAPES[shape])
    step = make_step_variant(variant, s)
    if variant == "floor-tiny-triton-kernel":
        benchmark.extra_info["baseline"] = True
    _run_timed(benchmark, f"mlrsnet_step {shape}", step)
    if variant != "floor-tiny-triton-kernel":
        # the variant really stepped: the state moved and every lr is rate * scale
        assert float(s.h.abs().sum()) > 0
        lrs = [torch.tensor(g["lr"], device=DEVICE) for g in s.groups] if hasattr(s, "groups") else s.lrs
        for lr, scale in zip(lrs, SCALES, strict=True):
            torch.testing.assert_close(lr, s.rate * scale)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("variant", GRAD_VARIANTS)
def test_param_grads(benchmark, variant, shape):
    s = StepInputs(*SHAPES[shape])
    s.h.normal_()
    s.c.normal_()
    grads = make_grads_variant(variant, s)
    _run_timed(benchmark, f"mlrsnet_param_grads {shape}", grads)
    got = grads()
    got = s.grad_out if got is None else got
    want = reference.mlrsnet_param_grads(s.loss, s.h, s.c, s.weights, s.grad_p)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:AutoLR.step was called twice")
@pytest.mark.parametrize("variant", ["autolr-step", "triton-op", "published-eager-float"])
def test_device_work(benchmark, variant):
    """Kernels and synchronising calls per step, counted (H50-L1); runs after every timing."""
    s = StepInputs(*SHAPES["H50-L1"])
    step = make_step_variant(variant, s)
    for _ in range(STEPS):  # warm-up: compiles, decides the launcher check
        step()
    torch.cuda.synchronize()
    benchmark.group = "device work per step (H50-L1)"
    benchmark.extra_info.update(_device_work_per_step(step))
    benchmark.pedantic(step, rounds=1, iterations=1)
