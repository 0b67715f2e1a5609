"""Host-side (CPU) work of one step on the Triton path, side by side, measurable without a GPU.

On a GPU the eager ``AutoLR.step`` should cost about one tiny kernel launch. Most of a Triton
launch's cost is Python on the host, and it grows with the kernel's argument count: Triton's
generic launch binds and specializes every argument on every call (the step kernel has 41). This
file times, in one run:

* ``triton_bind_tiny_kernel``: Triton's generic per-launch binding + cache key for a
  one-argument kernel (what the floor, one tiny kernel launch, pays before its C launcher);
* ``triton_bind_step_kernel``: the same for the MLR-SNet step kernel's 41 arguments (what a
  step would pay without the cached launch plan);
* ``autolr_step_triton_path``: a whole steady-state ``AutoLR.step`` on the Triton path as on a
  GPU (argument check, dispatch, the bound launch's checks, the call of the compiled launcher),
  with the compiled launcher itself replaced by a no-op, since there is no GPU here.

None of them includes the C launcher and ``cuLaunchKernel``, which every variant pays once.
Private Triton APIs (the binder factory, the CUDA backend object) are used; the file skips if
they moved.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from autolr_fast import AutoLR, MLRSNet
from autolr_fast.ops import dispatch
from autolr_fast.ops import triton_backend as tb

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
GROUP = "triton step host work (cpu)"


def _binder_of(fn):
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import compute_cache_key, create_function_from_signature
    except ImportError as exc:  # pragma: no cover - depends on the Triton version
        pytest.skip(f"Triton's launch internals moved: {exc}")
    bind = create_function_from_signature(fn.signature, fn.params, CUDABackend(GPUTarget("cuda", 90, 32)))
    cache: dict = {}

    def bind_and_key(*args, **kwargs):
        _, specialization, options = bind(*args, **kwargs, debug=False, instrumentation_mode="")
        return compute_cache_key(cache, specialization, options)

    return bind_and_key


@pytest.fixture
def step_args():
    from autolr_fast.ops import triton_kernels as k  # needs triton (optional)

    hidden, layers = 50, 1
    net = MLRSNet(hidden, layers)
    rate = torch.tensor(0.0)
    lrs = [torch.tensor(0.1) for _ in range(3)]
    args = (torch.tensor(1.0), net.h, net.c, torch.tensor(0.5), rate, torch.zeros((), dtype=torch.bool),
            torch.zeros(2, dtype=torch.int64), *k._weight_args(net.flat_weights(), layers),
            *k._lr_args(lrs, [1.0, 0.5, 2.0], rate))
    block_h, block_m, num_warps = k._blocks(hidden, hidden // 2)
    constexprs = dict(H=hidden, M=hidden // 2, NUM_LAYERS=layers, NUM_LR=3, BLOCK_H=block_h, BLOCK_M=block_m,
                      COUNT=True, num_warps=num_warps)
    return args, constexprs


@pytest.mark.benchmark(group=GROUP)
def test_triton_bind_tiny_kernel(benchmark):
    import triton
    import triton.language as tl

    @triton.jit
    def tiny(ptr):
        tl.store(ptr, tl.load(ptr) + 1.0)

    bind = _binder_of(tiny)
    x = torch.zeros(())
    benchmark(bind, x)


@pytest.mark.benchmark(group=GROUP)
def test_triton_bind_step_kernel(benchmark, step_args):
    from autolr_fast.ops import triton_kernels as k  # needs triton (optional)

    args, constexprs = step_args
    bind = _binder_of(k._mlrsnet_step_kernel)
    benchmark(lambda: bind(*args, **constexprs))
    benchmark.extra_info["arguments"] = len(args)


@pytest.mark.benchmark(group=GROUP)
def test_autolr_step_triton_path(benchmark, monkeypatch):
    from autolr_fast.ops import triton_kernels as k  # needs triton (optional)

    def no_op_launcher(*args):
        return None

    class NoOpCompiled:  # the compiled kernel, with a C launcher (run) that does nothing here
        function, packed_metadata = 0, ()
        run = staticmethod(no_op_launcher)

        def __getitem__(self, grid):
            return lambda *args, stream=None: None

    class CompilingJit:  # the generic launch: "compiles" and returns the compiled kernel
        arg_names = k._mlrsnet_step_kernel.arg_names

        def __getitem__(self, grid):
            return lambda *args, **kwargs: NoOpCompiled()

    def step_through_the_cuda_impl(loss, h, c, weights, gamma, rate, lr_list, scales, counters=None, ok=None):
        ok = torch.empty((), dtype=torch.bool, device=h.device) if ok is None else ok
        tb._step_cuda(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters)
        return ok

    monkeypatch.setattr(k, "CompiledKernel", NoOpCompiled)
    monkeypatch.setattr(k, "_mlrsnet_step_kernel", CompilingJit())
    monkeypatch.setattr(k, "_current_stream", lambda index: 0)
    monkeypatch.setattr(k, "_LAUNCHER", k._LauncherCheck("ok"))  # the fake launcher is not checkable
    dispatch._ensure_loaded()
    monkeypatch.setattr(dispatch, "_BACKENDS", {})
    monkeypatch.setattr(dispatch, "_SELECTED", {})
    dispatch.register_backend("triton-host-only", available=True, detail="launch stubbed", devices=["cpu"],
                              ops={"mlrsnet_step_": step_through_the_cuda_impl})
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(3)])
    opt = torch.optim.SGD([{"params": m.parameters(), "lr": 0.1 * (i + 1)} for i, m in enumerate(model)], lr=0.1,
                          momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    sched = AutoLR(opt, MLRSNet(50, 1), gamma=0.5, lr_as_tensor=True)  # as on a GPU
    # as on a GPU: one ok buffer for every step, and the counters' poll idle between two polls
    # (every 32nd step copies them; on the CPU they would be read in place every step)
    sched._ok = torch.zeros((), dtype=torch.bool)
    sched.counters.idle_tick = lambda: True
    loss = torch.tensor(1.0)
    warnings.simplefilter("ignore")  # repeated steps without optimizer.step() warn once
    sched.step(loss)
    plan = k._PLANS[id(sched.controller.h)]
    plan.device_index = 0  # as on a GPU, where the plan keeps the compiled launcher
    sched.step(loss)
    assert plan.runner is not None, "the plan did not keep the compiled launcher"
    benchmark.extra_info["layout_check"] = k._layout_key.__name__  # tensor_layout_key from _C, or _layout
    benchmark(sched.step, loss)
    k._PLANS.pop(id(sched.controller.h), None)  # the plan holds stubbed state: do not leave it cached
