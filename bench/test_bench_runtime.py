"""Step cost of the dependency-free C runtime beside the Python reference, in one run.

    python -m pytest bench/test_bench_runtime.py --benchmark-only [--benchmark-group-by=group]

Benchmarks (group ``controller_step``, MLR-SNet H=50, the published checkpoint when present):

* ``reference_eager``: ``reference.mlrsnet_forward`` (the baseline: plain PyTorch eager);
* ``torchscript``: the exported module's ``step`` through ``torch.jit.load`` in Python;
* ``runtime_ctypes``: ``autolr_step`` of the C runtime's shared library through ctypes
  (includes the ctypes call overhead);
* ``runtime_cpp_loop``: a plain C++ loop over ``autolr_step`` (``step_timing`` binary), the
  cost an embedding C/C++ trainer sees; reported in ``extra_info["ns_per_step"]`` (median
  over batches of 1000 steps; ``min_``/``mean_ns_per_step`` beside it).

The last test prints a Markdown table with the ratios to the eager reference.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess

import pytest
import torch

from autolr_experiments.report import markdown_table
from autolr_fast import AutoLR, MLRSNet
from autolr_fast import exporting as ex
from autolr_fast.ops import dispatch, reference

_OFFICIAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "mlrsnet_official",
                         "mlr_snet_200.pth")
RESULTS: dict[str, float] = {}  # name -> seconds per step (median)


@pytest.fixture(scope="module")
def controller_file(tmp_path_factory):
    if os.path.exists(_OFFICIAL):
        net = MLRSNet.from_official(_OFFICIAL)
    else:
        torch.manual_seed(0)
        net = MLRSNet(hidden_size=50)
    path = tmp_path_factory.mktemp("ctrl") / "controller.pt"
    ex.export(net, path, gamma=0.1)
    return net, str(path)


@pytest.fixture(scope="module")
def runtime_build(tmp_path_factory):
    if ex.find_cmake() is None:
        pytest.skip("cmake not found (pip install cmake)")
    build = tmp_path_factory.mktemp("runtime_bench_build")
    return ex.build_runtime(build, bench=True, jobs=2)


def _record(name, benchmark):
    if benchmark.stats is not None:  # None under --benchmark-disable
        RESULTS[name] = benchmark.stats.stats.median


def test_reference_eager(benchmark, controller_file):
    net, _ = controller_file
    benchmark.group = "controller_step"
    w = [t.detach() for t in net.flat_weights()]
    state = {"h": torch.zeros(1, 50), "c": torch.zeros(1, 50)}
    loss = torch.tensor([[1.5]])

    def step():
        with torch.no_grad():
            p, state["h"], state["c"] = reference.mlrsnet_forward(loss, state["h"], state["c"], w)
        return p

    benchmark.extra_info["baseline"] = True
    benchmark(step)
    _record("reference_eager", benchmark)


def _scheduler_step_args(net):
    """Arguments of ``dispatch.mlrsnet_step_`` as AutoLR passes them (one param group)."""
    w = [t.detach() for t in net.flat_weights()]
    return (torch.tensor(1.5), torch.zeros(1, 50), torch.zeros(1, 50), w, torch.tensor(0.1), torch.zeros(()),
            [torch.zeros(())], [1.0])


def test_fused_op_step(benchmark, controller_file):
    """The guarded step + lr write as AutoLR dispatches it on the CPU (the C++ op when built)."""
    net, _ = controller_file
    benchmark.group = "controller_step"
    benchmark.extra_info["backend"] = dispatch.select("mlrsnet_step_", torch.device("cpu"))[0]
    args = _scheduler_step_args(net)
    benchmark(dispatch.mlrsnet_step_, *args)
    _record("fused_op", benchmark)


def test_torch_compile_reference(benchmark, controller_file):
    """``torch.compile`` (inductor, CPU) of the guarded reference step (compiled before timing)."""
    net, _ = controller_file
    benchmark.group = "controller_step"
    w = [t.detach() for t in net.flat_weights()]
    try:
        fn = torch.compile(reference.mlrsnet_guarded_step, dynamic=False)
        args = (torch.tensor(1.5), torch.zeros(1, 50), torch.zeros(1, 50), w, torch.tensor(0.1), torch.zeros(()))
        with torch.no_grad():
            fn(*args)
    except Exception as exc:  # no C++ toolchain for inductor, etc.
        pytest.skip(f"torch.compile is not usable here: {type(exc).__name__}: {exc}")

    def step():
        with torch.no_grad():
            return fn(*args)

    benchmark(step)
    _record("torch_compile", benchmark)


def test_autolr_step(benchmark, controller_file):
    """The whole ``AutoLR.step(loss)`` (checks, dispatch, counters) on the CPU."""
    net, _ = controller_file
    benchmark.group = "controller_step"
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, net, gamma=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    loss = torch.tensor(1.5)

    def step():
        sched.step(loss)
        sched._steps_since_optimizer = 0  # no optimizer step in this loop

    benchmark(step)
    _record("autolr_step", benchmark)


def test_one_tiny_op_floor(benchmark):
    """The floor: one tiny eager torch op (a 0-dim add) through the dispatcher."""
    benchmark.group = "controller_step"
    a, b = torch.tensor(1.0), torch.tensor(2.0)
    benchmark(torch.add, a, b)
    _record("tiny_op_floor", benchmark)


def test_torchscript(benchmark, controller_file):
    _, path = controller_file
    benchmark.group = "controller_step"
    mod = ex.load_torchscript(path)
    loss = torch.tensor(1.5)

    def step():
        with torch.no_grad():
            return mod.step(loss)

    benchmark(step)
    _record("torchscript", benchmark)


def test_runtime_ctypes(benchmark, controller_file, runtime_build):
    _, path = controller_file
    benchmark.group = "controller_step"
    lib = ctypes.CDLL(ex.shared_library_path(runtime_build))
    lib.autolr_open_file.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.autolr_step.argtypes = [ctypes.c_void_p, ctypes.c_float]
    lib.autolr_step.restype = ctypes.c_float
    lib.autolr_free.argtypes = [ctypes.c_void_p]
    h = ctypes.c_void_p()
    assert lib.autolr_open_file(path.encode(), ctypes.byref(h)) == 0
    step = lib.autolr_step
    rate = benchmark(step, h, 1.5)
    assert 0.0 <= rate <= 0.1
    lib.autolr_free(h)
    _record("runtime_ctypes", benchmark)


def test_runtime_cpp_loop(benchmark, controller_file, runtime_build):
    _, path = controller_file
    benchmark.group = "controller_step_cpp_loop"
    exe = os.path.join(runtime_build, "step_timing")
    if not os.path.exists(exe):
        pytest.skip("step_timing was not built")
    out = {}

    def run():
        proc = subprocess.run([exe, path, "100000"], capture_output=True, text=True, check=True)
        out.update(json.loads(proc.stdout))

    benchmark.pedantic(run, rounds=3, iterations=1)
    assert out["ns_per_step"] > 0 and 0.0 <= out["final_rate"] <= 0.1
    for key in ("ns_per_step", "min_ns_per_step", "mean_ns_per_step"):
        benchmark.extra_info[key] = out[key]
    RESULTS["runtime_cpp_loop"] = out["ns_per_step"] * 1e-9


def test_summary_table(controller_file):
    if "reference_eager" not in RESULTS:
        pytest.skip("run the whole file (benchmarks disabled or skipped)")
    base = RESULTS["reference_eager"]
    rows = [[name, f"{RESULTS[name] * 1e6:.2f} us", f"{base / RESULTS[name]:.1f}x"]
            for name in ("reference_eager", "torchscript", "runtime_ctypes", "runtime_cpp_loop") if name in RESULTS]
    print("\n" + markdown_table(["step", "time per step", "speed-up vs eager reference"], rows))
