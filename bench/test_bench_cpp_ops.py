"""The C++ ops of ``autolr_fast._C`` beside the plain PyTorch references, on the CPU, in one run.

    python -m pytest bench/test_bench_cpp_ops.py --benchmark-only --benchmark-group-by=group

One group per op (and size); in each, ``reference`` is the eager baseline imported from
:mod:`autolr_fast.ops.reference` and ``cpp`` the C++ op called the way
``autolr_fast.ops.dispatch`` calls it (through ``autolr_fast.ops.cpp_backend``, so the Python ->
dispatcher cost is included):

* ``mlrsnet_step_H{H}_L{L}``: the scheduler's controller step in place (the reference branch
  of ``dispatch.mlrsnet_step_``: ``reference.mlrsnet_guarded_step`` + copies + ``write_rates``);
* ``mlrsnet_param_grads_H50``: the weight gradient of ``p``;
* ``{lookahead,hyper_dot}[_sgd|_adam]_resnet18w32``: the meta-step helpers over the
  parameter list of a ResNet-18 at half width (62 tensors, 2.8M parameters).

All timings use one intra-op thread. After the run a Markdown table of the ratios reference / cpp
(medians) is printed (with ``-s``) and written to ``results/bench_cpp_ops.md``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autolr_experiments.report import markdown_table
from autolr_fast import MLRSNet
from autolr_fast.ops import cpp_backend as cpp
from autolr_fast.ops import reference

pytestmark = pytest.mark.skipif(not cpp.AVAILABLE,
                                reason="C++ extension autolr_fast._C not built (python setup.py build_ext --inplace)")

RESULTS: dict[str, dict[str, float]] = {}  # group -> {"reference"|"cpp": median seconds}


def _record(benchmark, group: str, name: str) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        RESULTS.setdefault(group, {})[name] = benchmark.stats.stats.median


def make_net(hidden: int, layers: int):
    """``(h, c, weights)`` of a controller with its own initialisation (plain tensors)."""
    torch.manual_seed(hidden * 10 + layers)
    net = MLRSNet(hidden, layers)
    return net.h, net.c, [w.detach() for w in net.flat_weights()]


def resnet18_shapes(width: int = 32, classes: int = 100) -> list[tuple[int, ...]]:
    shapes = [(width, 3, 7, 7), (width,), (width,)]
    cin = width
    for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for block in range(2):
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and stage > 0:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(classes, cin), (classes,)]


# ------------------------------------------------------------------------------------------------
# Controller step
# ------------------------------------------------------------------------------------------------
STEP_SIZES = [(50, 1), (17, 1), (128, 2)]


reference_step = reference.mlrsnet_scheduler_step_


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("hidden,layers", STEP_SIZES)
def test_mlrsnet_step(benchmark, impl, hidden, layers):
    group = f"mlrsnet_step_H{hidden}_L{layers}"
    benchmark.group = group
    h, c, weights = make_net(hidden, layers)
    args = (torch.tensor(1.7), h, c, weights, torch.tensor(0.3), torch.tensor(0.1), [torch.tensor(0.1)], [1.0])
    fn = reference_step if impl == "reference" else cpp.mlrsnet_step_
    ok = benchmark(fn, *args)
    assert bool(ok)
    if impl == "reference":
        benchmark.extra_info["baseline"] = True
    _record(benchmark, group, impl)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_mlrsnet_param_grads(benchmark, impl):
    group = "mlrsnet_param_grads_H50"
    benchmark.group = group
    h, c, weights = make_net(50, 1)
    fn = reference.mlrsnet_param_grads if impl == "reference" else cpp.mlrsnet_param_grads
    grads = benchmark(fn, torch.tensor(1.7), h, c, weights, torch.tensor(1.0))
    assert len(grads) == len(weights)
    if impl == "reference":
        benchmark.extra_info["baseline"] = True
    _record(benchmark, group, impl)


# ------------------------------------------------------------------------------------------------
# Multi-tensor look-ahead / hyper-dot over a ResNet-ish parameter list
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet_lists():
    gen = torch.Generator().manual_seed(0)
    shapes = resnet18_shapes()
    mk = lambda: [torch.randn(s, generator=gen) for s in shapes]  # noqa: E731
    w, g, v, m = mk(), mk(), mk(), mk()
    sq = [t.abs() for t in mk()]
    return dict(w=w, g=g, v=v, m=m, sq=sq, alpha=torch.tensor(0.01), step=torch.tensor(10.0))


LIST_CASES = {
    "lookahead": lambda ops, d: ops.lookahead(d["w"], d["g"], d["alpha"]),
    "hyper_dot": lambda ops, d: ops.hyper_dot(d["v"], d["g"]),
    "lookahead_sgd": lambda ops, d: ops.lookahead_sgd(d["w"], d["g"], d["m"], d["alpha"], 0.9, 0.0, 5e-4, True),
    "hyper_dot_sgd": lambda ops, d: ops.hyper_dot_sgd(d["v"], d["w"], d["g"], d["m"], 0.9, 0.0, 5e-4, True),
    "lookahead_adam": lambda ops, d: ops.lookahead_adam(d["w"], d["g"], d["m"], d["sq"], [None] * len(d["w"]),
                                                        d["step"], d["alpha"], 0.9, 0.999, 1e-8, 1e-2, True),
    "hyper_dot_adam": lambda ops, d: ops.hyper_dot_adam(d["v"], d["w"], d["g"], d["m"], d["sq"],
                                                        [None] * len(d["w"]), d["step"], 0.9, 0.999, 1e-8, 1e-2, True),
}


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("op", list(LIST_CASES))
def test_list_op(benchmark, resnet_lists, op, impl):
    group = f"{op}_resnet18w32"
    benchmark.group = group
    ops = reference if impl == "reference" else cpp
    out = benchmark(LIST_CASES[op], ops, resnet_lists)
    assert out is not None
    if impl == "reference":
        benchmark.extra_info["baseline"] = True
    _record(benchmark, group, impl)


def ratio_table() -> str:
    """Markdown table of reference / cpp (medians of this run)."""
    rows = [[group, f"{r['reference'] * 1e6:.1f}", f"{r['cpp'] * 1e6:.1f}", f"{r['reference'] / r['cpp']:.1f}x"]
            for group, r in RESULTS.items() if "reference" in r and "cpp" in r]
    return markdown_table(["op", "reference (us)", "C++ (us)", "speed-up"], rows)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_print_ratios(request):
    """One intra-op thread for every timing (on a small shared CPU, OpenMP spin-waits of the
    many small parallel ops of the eager baselines make multi-threaded timings meaningless);
    after the module, print the table (visible with -s) and keep it beside the benchmark JSON."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if not RESULTS:
        return
    table = ratio_table()
    print("\n" + table)
    # beside the benchmark JSON when one is written (the bench command's --out), else in results/
    json_file = request.config.getoption("benchmark_json", None)
    if json_file is not None:  # a Path (pytest-benchmark's option type), or an open file in older versions
        folder = Path(getattr(json_file, "name", json_file)).parent
    else:
        folder = request.config.rootpath / "results"
    out = folder / "bench_cpp_ops.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# C++ ops vs reference (CPU, medians of one run)\n\n" + table + "\n")
