"""The Triton MLR-SNet kernels and their torch.library ops, against the plain PyTorch reference.

* On every machine (CI has no GPU): the kernels run in Triton's CPU interpreter on fresh random
  inputs (random seed, printed on failure; set ``AUTOLR_FAST_TEST_SEED`` to replay), several
  shapes (H 16/17/50/128, 1 and 2 cells, 1/3/10 param groups) and the NaN/Inf guard; the
  kernels are compiled for sm_90 (Triton's real compiler path, no GPU needed); the ops pass
  ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``.
* With a CUDA device: the same comparisons on the GPU, opcheck on CUDA, CUDA-graph replay and
  AutoLR end to end.

The interpreter cases run in one subprocess with ``TRITON_INTERPRET=1`` set before triton is
imported: Triton picks compile-or-interpret when ``@triton.jit`` is applied (its own library
functions such as ``tl.sum`` at import), so an in-process switch is not reliable once any other
test module (or torch.compile) has imported triton.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from device_kernels import kernel_names

from autolr_fast import MLRSNet
from autolr_fast.ops import dispatch, reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_gpu = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("AUTOLR_FAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
RTOL, ATOL = 1e-5, 1e-6
SHAPES = [(16, 1), (16, 2), (17, 1), (17, 2), (50, 1), (50, 2), (128, 1), (128, 2)]


# ------------------------------------------------------------------------------------------------
# Random inputs
# ------------------------------------------------------------------------------------------------
def make_weights(hidden: int, layers: int, gen: torch.Generator) -> list[torch.Tensor]:
    """The controller's own initialisation, scaled by a random factor so gates also saturate."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = MLRSNet(hidden, layers)
    scale = float(torch.empty(()).uniform_(0.5, 3.0, generator=gen))
    return [w.detach().clone() * scale for w in net.flat_weights()]


def make_step_case(hidden, layers, groups, gen, *, loss=None, lr_dtypes=None, **overrides) -> dict:
    loss = torch.empty(()).uniform_(0.0, 5.0, generator=gen) if loss is None else loss
    scales = [1.0] + [float(torch.empty(()).uniform_(0.1, 4.0, generator=gen)) for _ in range(groups - 1)]
    scales = scales[:groups]
    lr_dtypes = lr_dtypes or [torch.float32] * groups
    case = {
        "op": "step",
        "loss": loss,
        "h": torch.randn(layers, hidden, generator=gen) * 0.7,
        "c": torch.randn(layers, hidden, generator=gen) * 0.7,
        "weights": make_weights(hidden, layers, gen),
        "gamma": torch.empty(()).uniform_(0.05, 2.0, generator=gen),
        "rate": torch.empty(()).uniform_(0.0, 0.05, generator=gen),
        "lr_list": [torch.full((), -1.0, dtype=d) for d in lr_dtypes],
        "scales": scales,
    }
    case.update(overrides)
    return case


def make_grads_case(hidden, layers, gen, *, loss=None) -> dict:
    return {
        "op": "grads",
        "loss": torch.empty(()).uniform_(0.0, 5.0, generator=gen) if loss is None else loss,
        "h": torch.randn(layers, hidden, generator=gen) * 0.7,
        "c": torch.randn(layers, hidden, generator=gen) * 0.7,
        "weights": make_weights(hidden, layers, gen),
        "grad_p": torch.randn((), generator=gen),
    }


def _with_nan_head_bias(case: dict) -> dict:
    case["weights"][-1] = torch.full((1,), float("nan"))
    return case


def _overflowing(case: dict) -> dict:
    """One unit of the first cell's input layer overflows to +inf on a finite float32 loss: the
    reference's gates saturate and the step is taken; the kernels' padding lanes (hidden sizes
    below their power-of-two block) must not turn 0 * inf into NaN."""
    w0 = case["weights"][0] * 1e-30
    w0[0, 0] = 2.0
    case["weights"][0] = w0
    return case


@functools.lru_cache(maxsize=2)
def build_cases(seed: int) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(seed)
    cases: dict[str, dict] = {}
    for hidden, layers in SHAPES:
        for groups in (1, 3):
            cases[f"step-H{hidden}-L{layers}-g{groups}"] = make_step_case(hidden, layers, groups, gen)
        cases[f"grads-H{hidden}-L{layers}"] = make_grads_case(hidden, layers, gen)
    # more param groups than the step kernel's pointer slots; mixed lr dtypes
    cases["step-H17-L1-g10"] = make_step_case(17, 1, 10, gen)
    cases["step-H16-L2-g0"] = make_step_case(16, 2, 0, gen)  # an optimizer that takes no tensor lr
    cases["step-H50-L2-f64lr"] = make_step_case(50, 2, 3, gen, lr_dtypes=[torch.float32, torch.float64, torch.float32])
    cases["grads-H17-L2-negloss"] = make_grads_case(17, 2, gen, loss=torch.tensor(-2.5))
    cases["grads-H50-L2-overflow"] = _overflowing(make_grads_case(50, 2, gen, loss=torch.tensor(3e38)))
    # the guard: (case, expected ok)
    guard = {
        "nan-loss": (make_step_case(17, 2, 3, gen, loss=torch.tensor(float("nan"))), False),
        "inf-loss": (make_step_case(50, 1, 1, gen, loss=torch.tensor(float("inf"))), False),
        "neg-inf-loss": (make_step_case(16, 2, 1, gen, loss=torch.tensor(float("-inf"))), False),
        "f64-loss-overflows-f32": (make_step_case(17, 1, 1, gen, loss=torch.tensor(1e300, dtype=torch.float64)), False),
        "negative-loss-clamped": (make_step_case(17, 2, 3, gen, loss=torch.tensor(-3.0)), True),
        "zero-loss": (make_step_case(17, 2, 1, gen, loss=torch.tensor(0.0)), True),
        "bf16-loss": (make_step_case(50, 2, 1, gen, loss=torch.tensor(1.7, dtype=torch.bfloat16)), True),
        "nan-gamma": (make_step_case(17, 1, 3, gen, gamma=torch.tensor(float("nan"))), False),
        "inf-gamma": (make_step_case(17, 1, 1, gen, gamma=torch.tensor(float("inf"))), False),
        "nan-weight": (_with_nan_head_bias(make_step_case(50, 2, 3, gen)), False),
        "overflow-H17": (_overflowing(make_step_case(17, 1, 1, gen, loss=torch.tensor(3e38))), True),
        "overflow-H50": (_overflowing(make_step_case(50, 2, 1, gen, loss=torch.tensor(3e38))), True),
    }
    for name, (case, expected_ok) in guard.items():
        case["expected_ok"] = expected_ok
        cases[f"guard-{name}"] = case
    return cases


# ------------------------------------------------------------------------------------------------
# The subprocess that runs the kernels in the interpreter
# ------------------------------------------------------------------------------------------------
WORKER = r"""
import os, sys
assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
import torch
from autolr_fast.ops import triton_kernels as k
cases = torch.load(sys.argv[1], weights_only=False)
out = {}
for name, case in cases.items():
    if case["op"] == "step":
        h, c, rate = case["h"].clone(), case["c"].clone(), case["rate"].clone()
        lrs = [lr.clone() for lr in case["lr_list"]]
        ok = torch.zeros((), dtype=torch.bool)
        counters = torch.tensor([5, 7], dtype=torch.int64)
        k.launch_step(case["loss"], h, c, case["weights"], case["gamma"], rate, lrs, case["scales"], ok, counters)
        out[name] = {"h": h, "c": c, "rate": rate, "lr_list": lrs, "ok": ok, "counters": counters}
    else:
        out[name] = {"grads": k.launch_param_grads(case["loss"], case["h"], case["c"], case["weights"], case["grad_p"])}
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """``(cases, results)``: every case run once through the kernels in Triton's interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    cases = build_cases(SEED)
    folder = tmp_path_factory.mktemp("triton_interpreter")
    inputs, outputs = folder / "cases.pt", folder / "results.pt"
    torch.save(cases, inputs)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", WORKER, str(inputs), str(outputs)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter run failed (seed {SEED}):\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return cases, torch.load(outputs, weights_only=False)


def reference_step(case: dict) -> dict:
    """What ``dispatch.mlrsnet_step_`` does on the reference path, on copies of the case."""
    h, c, rate = case["h"].clone(), case["c"].clone(), case["rate"].clone()
    lrs = [lr.clone() for lr in case["lr_list"]]
    counters = torch.tensor([5, 7], dtype=torch.int64)
    ok = reference.mlrsnet_scheduler_step_(case["loss"], h, c, case["weights"], case["gamma"], rate, lrs,
                                           case["scales"], counters)
    return {"h": h, "c": c, "rate": rate, "lr_list": lrs, "ok": ok, "counters": counters}


def assert_step_matches(got: dict, case: dict, where: str) -> None:
    want = reference_step(case)
    msg = lambda m: f"{where} (seed {SEED}): {m}"  # noqa: E731
    assert bool(got["ok"]) == bool(want["ok"]), msg(f"ok {bool(got['ok'])}, reference {bool(want['ok'])}")
    if "expected_ok" in case:
        assert bool(got["ok"]) == case["expected_ok"], msg("wrong ok flag")
    if "counters" in got:  # [skipped, negative] after starting from [5, 7]
        assert got["counters"].tolist() == want["counters"].tolist(), msg(f"counters {got['counters'].tolist()}")
    # float32 sums of H terms taken in another order differ by about sqrt(H) roundings
    atol = ATOL * max(1.0, (want["h"].shape[-1] / 16) ** 0.5)
    for key in ("h", "c", "rate"):
        torch.testing.assert_close(got[key].cpu(), want[key], rtol=RTOL, atol=atol, msg=lambda m: msg(f"{key}: {m}"))
    if not bool(want["ok"]):  # the guard must leave everything exactly as it was
        for key in ("h", "c", "rate"):
            assert torch.equal(got[key].cpu(), case[key]), msg(f"{key} changed on a skipped step")
    for k, (g, w) in enumerate(zip(got["lr_list"], want["lr_list"])):
        assert g.dtype == w.dtype, msg(f"lr {k} dtype")
        torch.testing.assert_close(g.cpu(), w, rtol=RTOL, atol=ATOL, msg=lambda m: msg(f"lr {k}: {m}"))


def assert_grads_match(got: list, case: dict, where: str) -> None:
    want = reference.mlrsnet_param_grads(case["loss"], case["h"], case["c"], case["weights"], case["grad_p"])
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{where}: weight {k} shape {tuple(g.shape)} != {tuple(w.shape)}"
        scale = max(1.0, float(w.abs().nan_to_num(0.0, 0.0, 0.0).max()))
        # equal_nan: where the reference's gradient is NaN (an overflowed unit), the kernel's must be
        torch.testing.assert_close(g.cpu(), w, rtol=RTOL, atol=ATOL * scale, equal_nan=True,
                                   msg=lambda m: f"{where} (seed {SEED}): grad of weight {k}: {m}")


# ------------------------------------------------------------------------------------------------
# Interpreter: kernels vs reference
# ------------------------------------------------------------------------------------------------
STEP_CASES = [f"step-H{h}-L{l}-g{g}" for h, l in SHAPES for g in (1, 3)] + ["step-H17-L1-g10", "step-H16-L2-g0",
                                                                           "step-H50-L2-f64lr"]
GRAD_CASES = [f"grads-H{h}-L{l}" for h, l in SHAPES] + ["grads-H17-L2-negloss", "grads-H50-L2-overflow"]
GUARD_CASES = ["guard-" + n for n in ("nan-loss", "inf-loss", "neg-inf-loss", "f64-loss-overflows-f32",
                                      "negative-loss-clamped", "zero-loss", "bf16-loss", "nan-gamma", "inf-gamma",
                                      "nan-weight", "overflow-H17", "overflow-H50")]


@needs_triton
@pytest.mark.parametrize("name", STEP_CASES)
def test_step_kernel_matches_reference_interpreted(interpreted, name):
    cases, results = interpreted
    assert_step_matches(results[name], cases[name], name)
    assert bool(results[name]["ok"])


@needs_triton
@pytest.mark.parametrize("name", GUARD_CASES)
def test_step_kernel_guard_interpreted(interpreted, name):
    cases, results = interpreted
    assert_step_matches(results[name], cases[name], name)
    if name == "guard-negative-loss-clamped":  # the same step as a zero loss
        same_state = {k: v for k, v in results[name].items() if k != "counters"}  # counted as negative, though
        assert_step_matches(same_state, dict(cases[name], loss=torch.tensor(0.0)), name + " vs loss 0")
        assert results[name]["counters"].tolist() == [5, 8], "a negative loss must be counted"


@needs_triton
@pytest.mark.parametrize("name", GRAD_CASES)
def test_param_grads_kernel_matches_reference_interpreted(interpreted, name):
    cases, results = interpreted
    assert_grads_match(results[name]["grads"], cases[name], name)


# ------------------------------------------------------------------------------------------------
# Interpreter: one launch per AutoLR.step
# ------------------------------------------------------------------------------------------------
ONE_LAUNCH_WORKER = r"""
import json, os, sys
assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import autolr_fast.ops.triton_backend as tb
from autolr_fast import AutoLR, MLRSNet
from autolr_fast.ops import dispatch
from autolr_fast.ops import triton_kernels as k

gamma_arg, groups = sys.argv[1], int(sys.argv[2])
launches, ops, inside = [], [], [False]


class CountedKernel:  # counts launches; ops the interpreter itself runs are not the step's
    def __init__(self, name, kernel):
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            launches.append(self.name)
            inside[0] = True
            try:
                return launch(*args, **kwargs)
            finally:
                inside[0] = False
        return run


class RecordOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not inside[0]:
            ops.append(str(func))
        return func(*args, **(kwargs or {}))


def step_through_cuda_impl(loss, h, c, weights, gamma, rate, lr_list, scales, counters=None, ok=None):
    # tb.mlrsnet_step_ with the op's CUDA implementation called directly (CPU tensors here)
    ok = torch.empty((), dtype=torch.bool, device=h.device) if ok is None else ok
    tb._step_cuda(loss, h, c, list(weights), gamma, rate, list(lr_list), [float(s) for s in scales], ok, counters)
    return ok


def run(use_kernel):
    dispatch._ensure_loaded()
    dispatch._BACKENDS.clear()
    dispatch._SELECTED.clear()
    if use_kernel:
        k._mlrsnet_step_kernel = CountedKernel("step", kernel_step)
        k._write_lr_kernel = CountedKernel("write_lr", kernel_write)
        dispatch.register_backend("triton-interpreted", available=True, detail="test", devices=["cpu"],
                                  ops={"mlrsnet_step_": step_through_cuda_impl})
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 6) for _ in range(groups)]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(6, 3))
    param_groups = [{"params": l.parameters(), "lr": 0.1 / (i + 1)} for i, l in enumerate(layers)]
    param_groups.append({"params": model[-1].parameters()})
    opt = torch.optim.SGD(param_groups, lr=0.1, momentum=0.9)
    gamma = gamma_arg if gamma_arg == "auto" else float(gamma_arg)
    sched = AutoLR(opt, MLRSNet(17, 2), gamma=gamma, num_classes=3, lr_as_tensor=True)  # as on a GPU
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    expected = "triton-interpreted" if use_kernel else "reference"
    assert dispatch.select("mlrsnet_step_", torch.device("cpu"))[0] == expected
    steps, rates = [], []
    for i in range(6):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if i == 3:
            loss = loss * float("nan")  # a skipped step costs no more than a taken one
        loss.backward()
        launches.clear(); ops.clear()
        with RecordOps():
            sched.step(loss)
        steps.append({"launches": list(launches), "ops": list(ops)})
        rates.append([float(g["lr"]) for g in opt.param_groups])
        opt.step()
    return steps, rates


kernel_step, kernel_write = k._mlrsnet_step_kernel, k._write_lr_kernel
steps, rates = run(True)
_, ref_rates = run(False)
print(json.dumps({"steps": steps, "rates": rates, "ref_rates": ref_rates}))
"""

# ops that launch no kernel on a GPU: views, aliases and allocations from the caching allocator
LAUNCH_FREE_OPS = {"aten.detach.default", "aten.view.default", "aten.alias.default", "aten.empty.memory_format"}


@needs_triton
@pytest.mark.parametrize("gamma,groups", [("0.5", 1), ("auto", 2), ("0.5", 9)])
def test_autolr_step_is_one_kernel_launch_interpreted(gamma, groups):
    """AutoLR.step through the op's CUDA implementation (Triton, interpreted on the CPU): each
    steady-state step launches the step kernel once (plus one lr-write launch per 8 groups past
    the first 8) and runs no other tensor op that would launch a kernel; the rates equal the
    reference path's."""
    import json

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", ONE_LAUNCH_WORKER, gamma, str(groups)], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    groups_total = groups + 1
    want = ["step"] + ["write_lr"] * ((groups_total - 1) // 8)
    # gamma='auto' computes gamma on the device until the host has seen a finite loss: step 0 only
    first_steady = 1 if gamma == "auto" else 0
    for i, step in enumerate(result["steps"]):
        assert step["launches"] == want, f"step {i}: launches {step['launches']}, want {want}"
        if i >= first_steady:
            extra = [op for op in step["ops"] if op not in LAUNCH_FREE_OPS]
            assert not extra, f"step {i}: ops outside the kernel that would launch on a GPU: {extra}"
    assert len(result["rates"][0]) == groups_total
    torch.testing.assert_close(torch.tensor(result["rates"]), torch.tensor(result["ref_rates"]), rtol=1e-5, atol=1e-7)
    assert result["rates"][3] == result["rates"][2], "the NaN step must keep the rates"


# ------------------------------------------------------------------------------------------------
# The real compiler path without a GPU: the kernels compile for sm_90
# ------------------------------------------------------------------------------------------------
def _compile_for_sm90(fn, hidden: int, layers: int, extra_constexprs: dict, types: dict):
    """Triton's full compile (to a cubin, via ptxas) for sm_90, as the launcher would for these sizes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from autolr_fast.ops import triton_kernels as k

    middle = max(hidden // 2, 1)
    block_h, block_m, num_warps = k._blocks(hidden, middle)
    constexprs = dict(H=hidden, M=middle, NUM_LAYERS=layers, BLOCK_H=block_h, BLOCK_M=block_m, **extra_constexprs)
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "*fp32") for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


@needs_triton
@pytest.mark.parametrize("kernel,hidden,layers,count", [("step", 128, 2, False), ("step", 50, 1, True),
                                                        ("grads", 17, 2, False)])
def test_kernels_compile_for_sm90_without_gpu(kernel, hidden, layers, count):
    import triton
    import triton.backends

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton has no NVIDIA backend here")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions, which do not compile")
    try:
        _ = triton.knobs.nvidia.ptxas.path
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no ptxas for the sm_90 compile check: {exc}")
    from autolr_fast.ops import triton_kernels as k

    if kernel == "step":
        # count=True: the variant AutoLR runs, with its int64 counters
        types = {"ok_ptr": "*i1", "lr1": "*fp64", "lr2": "*bf16", "counters_ptr": "*i64",
                 **{f"s{i}": "fp32" for i in range(k.LR_SLOTS)}}
        compiled = _compile_for_sm90(k._mlrsnet_step_kernel, hidden, layers, {"NUM_LR": 3, "COUNT": count}, types)
    else:
        compiled = _compile_for_sm90(k._mlrsnet_param_grads_kernel, hidden, layers, {}, {})
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    assert compiled.metadata.num_warps == k._blocks(hidden, max(hidden // 2, 1))[2]


# ------------------------------------------------------------------------------------------------
# Host-side checks (no kernel launch)
# ------------------------------------------------------------------------------------------------
@needs_triton
def test_unsupported_inputs_are_named():
    from autolr_fast.ops import triton_kernels as k

    gen = torch.Generator().manual_seed(SEED)
    w = make_weights(17, 2, gen)
    h = torch.zeros(2, 17)
    assert k.unsupported_reason(h, h.clone(), w) is None
    assert "stacked cells" in k.unsupported_reason(torch.zeros(3, 17), torch.zeros(3, 17), make_weights(17, 3, gen))
    assert "hidden sizes" in k.unsupported_reason(torch.zeros(1, 129), torch.zeros(1, 129), make_weights(129, 1, gen))
    assert "float32" in k.unsupported_reason(h, h.clone(), [t.double() for t in w])
    assert "contiguous" in k.unsupported_reason(h, h.clone(), w[:4] + [w[4].t().contiguous().t()] + w[5:])
    assert "weight tensors" in k.unsupported_reason(h, h.clone(), w[:-1])
    assert "shape" in k.unsupported_reason(h, h.clone(), w[:2] + [w[2][:-1]] + w[3:])
    assert "middle size" in k.unsupported_reason(h, h.clone(), [torch.zeros(0, 1)] + w[1:])
    # out= of the gradient kernel must have the weights' shapes, not just consistent ones
    other = [torch.zeros(shape) for shape in k._expected_shapes(2, 17, 4)]  # middle size 4, not 8
    with pytest.raises(ValueError, match="out: shapes differ"):
        k.launch_param_grads(torch.tensor(1.0), h, h.clone(), w, torch.tensor(1.0), out=other)
    lr = [torch.zeros(())]
    args = (torch.tensor(1.0), h, h.clone(), w, torch.tensor(0.5), torch.tensor(0.0), lr, [1.0],
            torch.zeros((), dtype=torch.bool))
    assert k.step_unsupported_reason(*args) is None
    bad_ok = args[:-1] + (torch.zeros(()),)
    assert "bool" in k.step_unsupported_reason(*bad_ok)
    assert k.step_unsupported_reason(*args[:7], [1.0, 2.0], args[8]) is None  # extra scales: ignored
    assert "scales" in k.step_unsupported_reason(*args[:6], lr * 2, [1.0], args[8])  # an lr without a scale
    with pytest.raises(ValueError, match="stacked cells"):
        k.launch_step(torch.tensor(1.0), torch.zeros(3, 17), torch.zeros(3, 17), make_weights(17, 3, gen),
                      *args[4:])


def _layout_keys():
    keys = ["python"]
    try:
        from autolr_fast import _C
    except ImportError:
        return keys
    return keys + (["compiled"] if hasattr(_C, "tensor_layout_key") else [])


@pytest.fixture(params=_layout_keys())
def layout_key(request):
    """Each layout check the step plans can use: the Python one and the extension's."""
    from autolr_fast.ops import triton_kernels as k

    previous = k._layout_key
    if request.param == "compiled":
        from autolr_fast._C import tensor_layout_key

        k.use_layout_key(tensor_layout_key)
    else:
        k.use_layout_key(None)
    yield request.param
    k.use_layout_key(previous)


@needs_triton
def test_step_check_is_cached_but_sees_replaced_tensors(layout_key):
    """The per-step argument check remembers accepted tensors, yet a replaced tensor, a new
    ``.data`` or another shape is checked again."""
    from autolr_fast.ops import triton_kernels as k

    gen = torch.Generator().manual_seed(SEED)
    w = make_weights(17, 1, gen)
    h, c = torch.zeros(1, 17), torch.zeros(1, 17)
    rest = (torch.tensor(0.5), torch.tensor(0.0), [torch.zeros(())], [1.0])
    ok = torch.zeros((), dtype=torch.bool)
    assert k.step_unsupported_reason(torch.tensor(1.0), h, c, w, *rest, ok) is None
    plan = k._PLANS[id(h)]
    assert k.step_unsupported_reason(torch.tensor(2.0), h, c, w, *rest, ok) is None
    assert k._PLANS[id(h)] is plan, "the same tensors must reuse the accepted plan"
    accepted = w[2].data  # keeps the accepted memory alive, so new memory gets a new address
    w[2].data = torch.zeros(3, 3)  # same object, other memory and shape
    assert "shape" in k.step_unsupported_reason(torch.tensor(1.0), h, c, w, *rest, ok)
    w[2].data = torch.zeros(4 * 17, 8)
    assert k.step_unsupported_reason(torch.tensor(1.0), h, c, w, *rest, ok) is None
    assert k._PLANS[id(h)] is not plan, "new memory must make a new plan"
    # the same address under another shape, strides or dtype (a view of the accepted memory)
    plan = k._PLANS[id(h)]
    w[2].data = accepted
    assert k.step_unsupported_reason(torch.tensor(1.0), h, c, w, *rest, ok) is None
    for view, why in [(accepted.view(-1)[:9].view(3, 3), "shape"),
                      (accepted.view(8, 4 * 17).t(), "contiguous"),
                      (accepted.view(torch.int32), "float32")]:
        assert view.data_ptr() == accepted.data_ptr()
        w[2].data = view
        reason = k.step_unsupported_reason(torch.tensor(1.0), h, c, w, *rest, ok)
        assert reason is not None and why in reason, f"a {why} change at the same address was not checked again"
    w[2].data = accepted
    w2 = list(w)
    w2[0] = w[0].double()
    assert "float32" in k.step_unsupported_reason(torch.tensor(1.0), h, c, w2, *rest, ok)
    assert "1-element" in k.step_unsupported_reason(torch.zeros(2), h, c, w, *rest, ok), "loss is checked every call"
    assert "bool" in k.step_unsupported_reason(torch.tensor(1.0), h, c, w, *rest, torch.zeros(()))


class _FakeCompiled:
    """Stands in for triton's CompiledKernel: records the calls of its launcher, which writes
    ``ok`` (True) as the kernel would."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            self.calls.append((grid, args, stream))
            _set_ok(args[5])
        return runner


def _set_ok(ok) -> None:
    """Set the kernel's ok flag as a launcher gets it: a tensor, or its address."""
    import ctypes

    if isinstance(ok, torch.Tensor):
        ok.fill_(True)
    else:
        ctypes.c_bool.from_address(ok).value = True


def test_step_plan_launches_through_the_compiled_launcher(monkeypatch):
    """After the first (generic) launch compiled the kernel, a plan calls the compiled kernel's
    launcher with every argument of the kernel's real signature in order: fixed tensors as
    their data pointers, this call's loss and ok as tensors, the constexprs at the end."""
    from autolr_fast.ops import triton_kernels as k

    arg_names = k._mlrsnet_step_kernel.arg_names
    compiled = _FakeCompiled()
    generic = []

    class FakeJit:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                generic.append((args, kwargs))
                args[5].fill_(True)  # ok
                return compiled
            return launch

    monkeypatch.setattr(k, "CompiledKernel", _FakeCompiled)
    monkeypatch.setattr(k, "_mlrsnet_step_kernel", FakeJit())
    monkeypatch.setattr(k, "_current_stream", lambda index: 1234)
    monkeypatch.setattr(k, "_LAUNCHER", k._LauncherCheck())
    FakeJit.arg_names = arg_names
    gen = torch.Generator().manual_seed(SEED)
    hidden, layers = 17, 2
    w = make_weights(hidden, layers, gen)
    h, c = torch.zeros(layers, hidden), torch.zeros(layers, hidden)
    gamma, rate, lrs = torch.tensor(0.5), torch.tensor(0.0), [torch.zeros(()), torch.zeros(())]
    counters = torch.zeros(2, dtype=torch.int64)
    plan, reason = k._plan_for(torch.tensor(1.0), h, c, w, gamma, rate, lrs, [1.0, 2.0],
                               torch.zeros((), dtype=torch.bool), counters)
    assert reason is None
    plan.device_index = 0  # as on a GPU (the CPU tensors here are never read)
    first_loss, first_ok = torch.tensor(1.0), torch.zeros((), dtype=torch.bool)
    plan.launch(first_loss, first_ok)
    # the step, then the launcher check: the generic launch and the launcher on copies of the state
    assert len(generic) == 2 and len(compiled.calls) == 1 and k._LAUNCHER.state == "ok"
    args, kwargs = generic[0]
    assert args[0] is first_loss and args[5] is first_ok
    assert len(args) + len(k.STEP_CONSTEXPRS) == len(arg_names)
    checked = dict(zip(arg_names, generic[1][0]))
    assert checked["h_ptr"] is not h and torch.equal(checked["h_ptr"], h), "the check runs on a copy of the state"
    assert checked["lr2"] is checked["rate_ptr"], "the copies keep the aliases of the unused lr slots"
    compiled.calls.clear()
    loss, ok = torch.tensor(2.0), torch.zeros((), dtype=torch.bool)
    plan.launch(loss, ok)
    assert len(generic) == 2, "the second launch must not go through the generic launcher"
    (grid, fast, stream), = compiled.calls
    assert grid == (1, 1, 1) and stream == 1234
    assert len(fast) == len(arg_names)
    named = dict(zip(arg_names, fast))
    # this call's loss and ok as addresses too: a tensor would cost the launcher a driver query
    assert named["loss_ptr"] == loss.data_ptr() and named["ok_ptr"] == ok.data_ptr()
    assert named["h_ptr"] == h.data_ptr() and named["c_ptr"] == c.data_ptr() and named["rate_ptr"] == rate.data_ptr()
    assert named["counters_ptr"] == counters.data_ptr()
    assert named["b_w2"] == w[10].data_ptr() and named["head_b"] == w[-1].data_ptr()
    assert named["lr1"] == lrs[1].data_ptr() and named["s1"] == 2.0 and named["s2"] == 1.0
    constexprs = (named["H"], named["M"], named["NUM_LAYERS"], named["NUM_LR"], named["COUNT"])
    assert constexprs == (hidden, hidden // 2, 2, 2, True)
    for i, (generic_value, fast_value) in enumerate(zip(args, fast)):  # the same arguments, pointers for tensors
        if i in (k._LOSS, k._OK):
            continue  # this call's, checked above
        if isinstance(generic_value, torch.Tensor) and not isinstance(fast_value, torch.Tensor):
            assert fast_value == generic_value.data_ptr()
    plan.launch(torch.tensor(3.0, dtype=torch.float64), ok)  # another loss dtype: a generic launch again
    assert len(generic) == 3, "the launcher was checked once: no second check"


@pytest.mark.parametrize("hooked", [False, True])
def test_direct_runner_calls_the_c_launcher_unless_a_launch_hook_is_installed(monkeypatch, hooked):
    """The plan's launcher skips Triton's wrapper (which gathers launch metadata for hooks on
    every call) and calls the compiled kernel's C launcher with Triton's own argument order;
    with a launch hook installed (a profiler), it goes through the wrapper, hooks and all."""
    from autolr_fast.ops import triton_kernels as k

    calls = []

    class Compiled:
        function, packed_metadata = 77, (4, 1)

        def run(self, *args):
            calls.append(("c", args))

        def __getitem__(self, grid):
            return lambda *args, stream=None: calls.append(("wrapper", grid, args, stream))

    import triton

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is not None:  # Triton's own, unpatched
        assert k._launch_hooks() == (runtime.launch_enter_hook, runtime.launch_exit_hook)
    hook = (lambda *a: None) if hooked else None
    monkeypatch.setattr(k, "_launch_hooks", lambda: (hook, None))
    runner = k._direct_runner(Compiled())
    runner(11, 22, 3.5, stream=1234)
    if hooked:
        assert calls == [("wrapper", (1, 1, 1), (11, 22, 3.5), 1234)]
    else:
        assert calls == [("c", (1, 1, 1, 1234, 77, (4, 1), None, None, None, 11, 22, 3.5))]
    # the launcher check compares the direct call, with a hook installed or not
    calls.clear()
    runner.direct(11, 22, 3.5, stream=1234)
    assert calls == [("c", (1, 1, 1, 1234, 77, (4, 1), None, None, None, 11, 22, 3.5))]
    assert not k._hooks_active(None) and k._hooks_active(hook or print)
    assert not k._hooks_active(type("EmptyChain", (), {"calls": []})())
    fake = _FakeCompiled()  # no C launcher to call: its own [(1, 1, 1)]
    k._direct_runner(fake)(1, 2, 3, 4, 5, torch.zeros((), dtype=torch.bool), stream=5)
    assert fake.calls[0][0] == (1, 1, 1) and fake.calls[0][2] == 5


def _fake_launch_plans(monkeypatch, runner):
    """Step plans over CPU tensors, as on a GPU, with a fake kernel: its generic launch adds 1 to
    ``h[0, 0]`` and sets ``ok`` (and records the call), its compiled launcher is
    ``runner(*args, stream)``, where ``args[1]`` is h's address and ``args[5]`` the ok tensor.
    Returns ``(module, make_plan, generic_calls)``; ``make_plan()`` gives ``(plan, h)`` for a
    fresh state."""
    from autolr_fast.ops import triton_kernels as k

    generic = []

    class Compiled(_FakeCompiled):
        def __getitem__(self, grid):
            return runner

    class FakeJit:
        arg_names = k._mlrsnet_step_kernel.arg_names

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                generic.append(args)
                args[1].view(-1)[0] += 1.0
                args[5].fill_(True)
                return Compiled()
            return launch

    monkeypatch.setattr(k, "CompiledKernel", _FakeCompiled)
    monkeypatch.setattr(k, "_mlrsnet_step_kernel", FakeJit())
    monkeypatch.setattr(k, "_current_stream", lambda index: 1234)
    monkeypatch.setattr(k, "_LAUNCHER", k._LauncherCheck())
    monkeypatch.setattr(k, "_PLANS", {})
    weights = make_weights(17, 1, torch.Generator().manual_seed(SEED))

    def make_plan():
        h = torch.zeros(1, 17)
        plan, reason = k._plan_for(torch.tensor(1.0), h, torch.zeros(1, 17), weights, torch.tensor(0.5),
                                   torch.tensor(0.0), [torch.zeros(())], [1.0], torch.zeros((), dtype=torch.bool), None)
        assert reason is None
        plan.device_index = 0  # as on a GPU
        return plan, h

    return k, make_plan, generic


def _fake_kernel_through_pointers(args) -> None:
    """What the fake kernel does, as a launcher gets it: ``h[0, 0] += 1`` at h's address, ok set."""
    import ctypes

    ctypes.c_float.from_address(args[1]).value += 1.0
    _set_ok(args[5])


def _launch(plan) -> None:
    plan.launch(torch.tensor(1.0), torch.zeros((), dtype=torch.bool))


@pytest.mark.parametrize("failure", ["raises", "differs"])
def test_step_plan_falls_back_to_the_generic_launch(monkeypatch, failure):
    """The compiled kernel's own launcher is a private Triton convention: if it raises (a
    TypeError, as from another Triton version) or gives other results than Triton's generic
    launch when it is checked, one warning, and every launch of every plan stays generic; each
    step runs exactly once on the real state."""
    runs = []

    def runner(*args, stream=None):
        runs.append(args)
        if failure == "raises":
            raise TypeError("launcher() takes 33 positional arguments but 48 were given")

    k, make_plan, generic = _fake_launch_plans(monkeypatch, runner)
    plan, h = make_plan()
    with pytest.warns(RuntimeWarning, match="generic launch") as caught:
        for step in range(1, 5):
            _launch(plan)
            assert float(h[0, 0]) == step, "each step must run once, on the real state"
        other, other_h = make_plan()
        _launch(other)
    assert len(caught) == 1 and k._LAUNCHER.state == "failed"
    assert len(runs) == 1, "the launcher must not be used after its check failed"
    assert len(generic) == 4 + 1 + 1, "every step (and the check) through the generic launch"
    assert other.runner is None and float(other_h[0, 0]) == 1.0


def test_step_plan_uses_the_checked_launcher_and_falls_back_if_it_raises_later(monkeypatch):
    """A launcher that agrees with the generic launch is used from the second step on (by every
    plan); should it raise TypeError on a later step, that step is launched generically, once,
    with the warning, and so are the steps after it."""
    runs = []

    def runner(*args, stream=None):
        runs.append(args)
        if len(runs) == 4:
            raise TypeError("launcher() got an unexpected argument")
        _fake_kernel_through_pointers(args)

    k, make_plan, generic = _fake_launch_plans(monkeypatch, runner)
    plan, h = make_plan()
    _launch(plan)  # the step (generic), then the check: generic and launcher on copies
    assert k._LAUNCHER.state == "ok" and len(generic) == 2 and len(runs) == 1 and float(h[0, 0]) == 1.0
    _launch(plan)
    assert len(generic) == 2 and len(runs) == 2 and float(h[0, 0]) == 2.0
    other, other_h = make_plan()
    _launch(other)  # a new plan: generic (compiles its variant), then the checked launcher
    _launch(other)
    assert len(generic) == 3 and len(runs) == 3 and float(other_h[0, 0]) == 2.0
    with pytest.warns(RuntimeWarning, match="generic launch"):
        _launch(plan)  # the launcher raises: this step goes through the generic launch
    assert float(h[0, 0]) == 3.0 and k._LAUNCHER.state == "failed" and plan.runner is None
    _launch(plan)
    assert float(h[0, 0]) == 4.0 and len(runs) == 4 and len(generic) == 5


def test_bound_launch_runs_the_steady_state_and_refuses_anything_changed(monkeypatch):
    """``launch_step_bound`` (the scheduler's steady state) launches through the plan's checked
    launcher exactly what the checked path launches, with this call's loss and ok; anything else
    changed (memory, layout, a tensor's role, a scale, the loss's dtype, shape or device, ok, the
    counters) launches nothing and returns False, and so does an input the layout key cannot
    read; the checked path then takes the call. A tensor replaced by another over the same
    memory is the same launch."""
    runs = []

    def runner(*args, stream=None):
        runs.append((args, stream))
        _fake_kernel_through_pointers(args)

    k, _, generic = _fake_launch_plans(monkeypatch, runner)
    weights = make_weights(17, 1, torch.Generator().manual_seed(SEED))
    h, c, gamma, rate = torch.zeros(1, 17), torch.zeros(1, 17), torch.tensor(0.5), torch.tensor(0.0)
    lrs, scales, counters = [torch.zeros(()), torch.zeros(())], [1.0, 2.0], torch.zeros(2, dtype=torch.int64)
    ok = torch.zeros((), dtype=torch.bool)

    def bound(loss=None, ok_=None, **changed):
        args = dict(h=h, c=c, weights=weights, gamma=gamma, rate=rate, lr_list=lrs, scales=scales,
                    counters=counters) | changed
        loss = torch.tensor(1.0) if loss is None else loss
        return k.launch_step_bound(loss, ok=ok if ok_ is None else ok_, **args)

    assert not bound(), "no plan yet"
    plan, reason = k._plan_for(torch.tensor(1.0), h, c, weights, gamma, rate, lrs, scales, ok, counters)
    assert reason is None
    plan.device_index = 0  # as on a GPU
    assert not bound(), "no checked launcher yet"
    plan.launch(torch.tensor(1.0), ok)  # generic launch + the launcher check
    assert plan.runner is not None and float(h[0, 0]) == 1.0
    loss, other_ok = torch.tensor(3.0), torch.zeros((), dtype=torch.bool)
    assert bound(loss, other_ok) and len(runs) == 2 and float(h[0, 0]) == 2.0 and bool(other_ok)
    plan.launch(loss, other_ok)  # the checked path's launch of the same call
    (bound_args, bound_stream), (checked_args, checked_stream) = runs[1], runs[2]
    assert bound_args == checked_args and bound_stream == checked_stream == 1234
    named = dict(zip(k._mlrsnet_step_kernel.arg_names, bound_args))
    assert named["loss_ptr"] == loss.data_ptr() and named["ok_ptr"] == other_ok.data_ptr()
    alias = [weights[0].view(weights[0].shape)] + weights[1:]  # another object, the same memory and layout
    assert bound(weights=alias) and float(h[0, 0]) == 4.0
    refused = {
        "a scale": dict(scales=[1.0, 3.0]),
        "a scale list of another length": dict(scales=[1.0]),
        "an lr tensor replaced": dict(lr_list=[lrs[0], torch.zeros(())]),
        "an lr group added": dict(lr_list=[*lrs, torch.zeros(())], scales=[*scales, 1.0]),
        "an lr tensor passed as a weight": dict(weights=[*weights, lrs[0]], lr_list=[lrs[1]]),
        "a weight of other memory": dict(weights=[weights[0].clone()] + weights[1:]),
        "another c": dict(c=torch.zeros(1, 17)),
        "a sparse c": dict(c=torch.zeros(1, 17).to_sparse()),
        "no counters": dict(counters=None),
        "a float64 loss": dict(loss=torch.tensor(1.0, dtype=torch.float64)),
        "a 2-element loss": dict(loss=torch.zeros(2)),
        "a float ok": dict(ok_=torch.zeros(())),
        "a 2-element ok": dict(ok_=torch.zeros(2, dtype=torch.bool)),
    }
    for what, change in refused.items():
        assert not bound(**change), f"{what}: the bound launch must refuse"
    plan.device_id = 0  # the state on cuda:0, the loss and ok here on the CPU
    assert not bound(), "a loss and ok on another device than the state's"
    plan.device_id = -1
    assert len(runs) == 4 and float(h[0, 0]) == 4.0, "a refused bound launch must launch nothing"
    accepted = h.data
    h.data = torch.zeros(1, 17)  # the same object, other memory
    assert not bound(), "h's memory changed under the same object"
    h.data = accepted
    assert bound() and float(h[0, 0]) == 5.0 and len(generic) == 2

    def refusing_runner(*args, stream=None):
        raise TypeError("launcher() takes 33 positional arguments but 48 were given")

    plan.runner = refusing_runner
    with pytest.warns(RuntimeWarning, match="generic launch"):
        assert not bound(), "a launcher that raises launched nothing: the checked path must take the call"
    assert k._LAUNCHER.state == "failed" and plan.runner is None and float(h[0, 0]) == 5.0
    assert not bound(), "no launcher after it failed"


def test_bound_launch_leaves_more_than_eight_lr_groups_to_the_checked_path(monkeypatch):
    """Groups past the kernel's 8 lr slots need the extra launch of the checked path."""
    k, _, generic = _fake_launch_plans(monkeypatch, lambda *args, stream=None: _fake_kernel_through_pointers(args))
    extra = []
    monkeypatch.setattr(k, "_write_lr_kernel", type("FakeWrite", (), {
        "__getitem__": lambda self, grid: lambda *args, **kwargs: extra.append(args)})())
    weights = make_weights(17, 1, torch.Generator().manual_seed(SEED))
    h, c, gamma, rate = torch.zeros(1, 17), torch.zeros(1, 17), torch.tensor(0.5), torch.tensor(0.0)
    lrs, scales, ok = [torch.zeros(()) for _ in range(10)], [1.0] * 10, torch.zeros((), dtype=torch.bool)
    plan, reason = k._plan_for(torch.tensor(1.0), h, c, weights, gamma, rate, lrs, scales, ok, None)
    assert reason is None and plan.extra
    plan.device_index = 0
    plan.launch(torch.tensor(1.0), ok)
    plan.launch(torch.tensor(1.0), ok)
    assert plan.runner is not None and len(extra) == 2
    assert not k.launch_step_bound(torch.tensor(1.0), h, c, weights, gamma, rate, lrs, scales, ok)
    assert float(h[0, 0]) == 2.0 and len(extra) == 2


# ------------------------------------------------------------------------------------------------
# Interpreter: the lr scales of a cached plan
# ------------------------------------------------------------------------------------------------
SCALES_WORKER = r"""
import os, sys
assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
import torch
from autolr_fast.ops import triton_kernels as k
case = torch.load(sys.argv[1], weights_only=False)
h, c, rate = case["h"].clone(), case["c"].clone(), case["rate"].clone()
lrs = [torch.full((), -1.0) for _ in range(10)]  # past the kernel's 8 slots: the extra launch too
scales = [1.0 + 0.5 * i for i in range(10)]
out = []
for change in ("first", "in place", "new list", "same values, new list"):
    if change == "in place":
        scales[1], scales[9] = 3.0, 7.5  # the list AutoLR keeps, edited (lr_scales)
    elif change == "new list":
        scales = [2.0] * 10  # a new list (load_state_dict)
    elif change == "same values, new list":
        scales = list(scales)
    ok = torch.zeros((), dtype=torch.bool)
    k.launch_step(case["loss"], h, c, case["weights"], case["gamma"], rate, lrs, scales, ok)
    out.append({"rate": rate.clone(), "lrs": [lr.clone() for lr in lrs], "scales": list(scales)})
torch.save(out, sys.argv[2])
"""


@needs_triton
def test_step_plan_writes_changed_lr_scales_interpreted(tmp_path):
    """The scales are baked into a cached plan's arguments: a change of their values (same
    count, same list or a new one) must make a new plan, so every lr gets rate * its scale."""
    gen = torch.Generator().manual_seed(SEED)
    inputs, outputs = tmp_path / "case.pt", tmp_path / "out.pt"
    torch.save(make_step_case(17, 1, 1, gen), inputs)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCALES_WORKER, str(inputs), str(outputs)], cwd=PROJECT_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter run failed (seed {SEED}):\n{proc.stdout}\n{proc.stderr[-6000:]}"
    for i, launch in enumerate(torch.load(outputs, weights_only=False)):
        want = torch.stack([launch["rate"] * s for s in launch["scales"]])
        torch.testing.assert_close(torch.stack(launch["lrs"]), want, rtol=1e-6, atol=0,
                                   msg=lambda m: f"launch {i}, scales {launch['scales']} (seed {SEED}): {m}")


def test_backend_registered_with_dispatch():
    import autolr_fast.ops.triton_backend as tb

    info = dispatch.backend_info()
    assert "triton" in info["backends"]
    entry = info["backends"]["triton"]
    assert entry["devices"] == ["cuda"]
    assert entry["available"] == (HAS_TRITON and torch.version.cuda is not None) == tb.AVAILABLE
    name, fn = dispatch.select("mlrsnet_step_", torch.device("cuda"))
    if tb.AVAILABLE and not dispatch.force_reference():
        assert name == "triton" and fn is tb.mlrsnet_step_
        assert dispatch.select("mlrsnet_param_grads", torch.device("cuda"))[0] == "triton"
    assert dispatch.select("mlrsnet_step_", torch.device("cpu"))[0] != "triton"


# ------------------------------------------------------------------------------------------------
# The ops on the CPU (their reference implementations): opcheck, torch.compile, explicit backward
# ------------------------------------------------------------------------------------------------
def _op_args(case: dict) -> tuple:
    return (case["loss"], case["h"].clone(), case["c"].clone(), case["weights"], case["gamma"], case["rate"].clone(),
            [lr.clone() for lr in case["lr_list"]], case["scales"],
            torch.zeros((), dtype=torch.bool, device=case["h"].device))


@pytest.mark.parametrize("hidden,layers,groups", [(17, 1, 1), (16, 2, 3), (16, 1, 0)])
def test_opcheck_cpu(hidden, layers, groups):
    import autolr_fast.ops.triton_backend  # noqa: F401

    gen = torch.Generator().manual_seed(SEED)
    case = make_step_case(hidden, layers, groups, gen)
    torch.library.opcheck(torch.ops.autolr_fast.mlrsnet_step_, _op_args(case))
    counters = torch.tensor([2, 3], dtype=torch.int64)
    torch.library.opcheck(torch.ops.autolr_fast.mlrsnet_step_, _op_args(case) + (counters,))
    g = make_grads_case(hidden, layers, gen)
    torch.library.opcheck(torch.ops.autolr_fast.mlrsnet_param_grads,
                          (g["loss"], g["h"], g["c"], g["weights"], g["grad_p"]))


@pytest.mark.parametrize("hidden,layers", [(16, 1), (17, 2), (50, 2), (128, 1)])
def test_explicit_param_grads_match_autograd_reference(hidden, layers):
    param_grads_explicit = reference.mlrsnet_param_grads_explicit

    gen = torch.Generator().manual_seed(SEED + hidden)
    g = make_grads_case(hidden, layers, gen)
    assert_grads_match(param_grads_explicit(g["loss"], g["h"], g["c"], g["weights"], g["grad_p"]), g, "explicit")


def test_step_op_on_cpu_matches_reference_and_guard():
    import autolr_fast.ops.triton_backend as tb

    gen = torch.Generator().manual_seed(SEED)
    for loss, expected_ok in ((torch.tensor(1.2), True), (torch.tensor(float("nan")), False)):
        case = make_step_case(17, 2, 3, gen, loss=loss)
        args = _op_args(case)
        torch.ops.autolr_fast.mlrsnet_step_(*args)
        got = {"h": args[1], "c": args[2], "rate": args[5], "lr_list": args[6], "ok": args[8]}
        assert bool(got["ok"]) == expected_ok
        assert_step_matches(got, case, "cpu op")
        # and through the dispatch-facing wrapper (allocates ok)
        h, c, rate = case["h"].clone(), case["c"].clone(), case["rate"].clone()
        lrs = [lr.clone() for lr in case["lr_list"]]
        ok = tb.mlrsnet_step_(case["loss"], h, c, case["weights"], case["gamma"], rate, lrs, case["scales"])
        assert ok.dtype == torch.bool and bool(ok) == expected_ok
        assert torch.equal(h, got["h"]) and torch.equal(rate, got["rate"])


def test_ops_under_torch_compile_fullgraph():
    import autolr_fast.ops.triton_backend  # noqa: F401

    gen = torch.Generator().manual_seed(SEED)
    case = make_step_case(17, 2, 3, gen)

    def step_then_grads(loss, h, c, weights, gamma, rate, lr_list, ok):
        torch.ops.autolr_fast.mlrsnet_step_(loss, h, c, weights, gamma, rate, lr_list, case["scales"], ok)
        grads = torch.ops.autolr_fast.mlrsnet_param_grads(loss, h, c, weights, rate)
        return grads[0] * 2.0, grads[-1] + 1.0

    def run(fn):
        args = _op_args(case)
        out = fn(args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[8])
        return args, out

    torch._dynamo.reset()
    compiled = torch.compile(step_then_grads, fullgraph=True, backend="aot_eager")
    (ca, cout), (ea, eout) = run(compiled), run(step_then_grads)
    assert not torch.equal(ca[1], case["h"]), "the compiled step must update h in place"
    for i in (1, 2, 5, 8):
        assert torch.equal(ca[i], ea[i])
    for a, b in zip(ca[6], ea[6]):
        assert torch.equal(a, b)
    for a, b in zip(cout, eout):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
def _to_cuda(case: dict) -> dict:
    out = {}
    for k, v in case.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.cuda()
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.cuda() for t in v]
        else:
            out[k] = v
    return out


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", STEP_CASES + GUARD_CASES + GRAD_CASES)
def test_kernels_on_gpu(name):
    from autolr_fast.ops import triton_kernels as k

    case = build_cases(SEED)[name]
    cuda = _to_cuda(case)
    if case["op"] == "step":
        h, c, rate = cuda["h"].clone(), cuda["c"].clone(), cuda["rate"].clone()
        lrs = [lr.clone() for lr in cuda["lr_list"]]
        ok = torch.zeros((), dtype=torch.bool, device="cuda")
        counters = torch.tensor([5, 7], dtype=torch.int64, device="cuda")  # the variant AutoLR runs: counting
        k.launch_step(cuda["loss"], h, c, cuda["weights"], cuda["gamma"], rate, lrs, case["scales"], ok, counters)
        assert_step_matches({"h": h, "c": c, "rate": rate, "lr_list": lrs, "ok": ok, "counters": counters}, case,
                            f"gpu {name}")
    else:
        grads = k.launch_param_grads(cuda["loss"], cuda["h"], cuda["c"], cuda["weights"], cuda["grad_p"])
        assert_grads_match(grads, case, f"gpu {name}")


@pytest.mark.gpu
@needs_gpu
def test_opcheck_cuda():
    import autolr_fast.ops.triton_backend as tb

    gen = torch.Generator().manual_seed(SEED)
    case = _to_cuda(make_step_case(50, 2, 3, gen))
    g = _to_cuda(make_grads_case(50, 2, gen))
    # the kernels themselves, not the reference the CUDA implementation falls back to
    with mock.patch.object(tb, "_fallback_warning", side_effect=AssertionError("fell back to the reference")):
        torch.library.opcheck(torch.ops.autolr_fast.mlrsnet_step_, _op_args(case))
        torch.library.opcheck(torch.ops.autolr_fast.mlrsnet_step_,
                              _op_args(case) + (torch.tensor([2, 3], dtype=torch.int64, device="cuda"),))
        torch.library.opcheck(torch.ops.autolr_fast.mlrsnet_param_grads,
                              (g["loss"], g["h"], g["c"], g["weights"], g["grad_p"]))


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_replay_of_the_step():
    import autolr_fast.ops.triton_backend as tb

    gen = torch.Generator().manual_seed(SEED)
    case = make_step_case(50, 1, 3, gen)
    cuda = _to_cuda(case)
    loss = cuda["loss"].clone()
    h, c, rate = cuda["h"].clone(), cuda["c"].clone(), cuda["rate"].clone()
    lrs = [lr.clone() for lr in cuda["lr_list"]]
    ok = torch.zeros((), dtype=torch.bool, device="cuda")
    op = torch.ops.autolr_fast.mlrsnet_step_
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    # warm-up outside the capture, on the tensors captured next (compiles the kernel and builds the
    # plan the capture records: the steady-state launch AutoLR replays)
    with torch.cuda.stream(stream):
        for _ in range(3):
            op(loss, h, c, cuda["weights"], cuda["gamma"], rate, lrs, case["scales"], ok)
            stream.synchronize()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(loss, h, c, cuda["weights"], cuda["gamma"], rate, lrs, case["scales"], ok)
    # replay on a sequence of losses: each replay against the reference stepping the state the
    # replay started from (a skipped step must leave that state bit for bit)
    for value in (2.0, 1.5, float("nan"), -1.0, 0.7):
        before = {"h": h.cpu(), "c": c.cpu(), "rate": rate.cpu(), "lr_list": [lr.cpu() for lr in lrs]}
        loss.fill_(value)
        graph.replay()
        step = dict(case, loss=torch.tensor(value), **before)
        got = {"h": h, "c": c, "rate": rate, "lr_list": lrs, "ok": ok}
        assert_step_matches(got, step, f"graph replay loss={value}")
    assert tb.AVAILABLE


def _tiny_cuda_training(controller: MLRSNet):
    """A 2-layer net on CUDA with fused SGD (two param groups) driven by AutoLR, and one batch."""
    from autolr_fast import AutoLR

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).cuda()
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.05}]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, fused=True)
    sched = AutoLR(opt, controller, gamma=0.5)
    batch = torch.randn(64, 8, device="cuda"), torch.randint(0, 3, (64,), device="cuda")
    return model, opt, sched, batch


def _train_step(model, opt, batch) -> torch.Tensor:
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    return loss


@pytest.mark.gpu
@needs_gpu
def test_autolr_on_gpu_uses_triton_and_matches_reference(monkeypatch):
    def run(force_reference: bool) -> list[float]:
        monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1" if force_reference else "0")
        expected = "reference" if force_reference else "triton"
        assert dispatch.select("mlrsnet_step_", torch.device("cuda"))[0] == expected
        model, opt, sched, batch = _tiny_cuda_training(copy.deepcopy(controller))
        rates = []
        for _ in range(20):
            sched.step(_train_step(model, opt, batch))
            rates.append(torch.stack([g["lr"] for g in opt.param_groups]).cpu())
            opt.step()
        return rates

    controller = MLRSNet(50, 1)
    fast, ref = run(False), run(True)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@needs_gpu
def test_autolr_step_launches_one_kernel_on_gpu():
    """Profiled on the GPU: each steady-state AutoLR.step runs exactly one kernel, and the
    counters' poll copy (every 32nd step) is the only memcpy."""
    import warnings

    from torch.profiler import DeviceType, ProfilerActivity, profile

    model, opt, sched, batch = _tiny_cuda_training(MLRSNet(50, 1))
    losses = []
    for _ in range(40):
        loss = _train_step(model, opt, batch)
        sched.step(loss)
        opt.step()
        losses.append(loss.detach())
    steps = 31
    with warnings.catch_warnings():  # AutoLR warns about steps without optimizer.step() in between
        warnings.simplefilter("ignore")
        for loss in losses[:5]:  # warm-up: compiles the kernel
            sched.step(loss)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for loss in losses[5:5 + steps]:
                sched.step(loss)
            torch.cuda.synchronize()
    device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels = kernel_names(prof)
    copies = [e.name for e in device_events if e.name.lower().startswith("memcpy")]
    assert len(kernels) == steps, f"{len(kernels)} kernels for {steps} steps: {sorted(set(kernels))}"
    assert all("mlrsnet_step" in name for name in kernels), sorted(set(kernels))
    assert len(copies) <= 1 + steps // 32, copies


@pytest.mark.gpu
@needs_gpu
def test_compiled_step_on_gpu():
    import autolr_fast.ops.triton_backend as tb

    gen = torch.Generator().manual_seed(SEED)
    case = make_step_case(50, 2, 3, gen)
    cuda = _to_cuda(case)

    def step(loss, h, c, weights, gamma, rate, lrs):
        return tb.mlrsnet_step_(loss, h, c, weights, gamma, rate, lrs, case["scales"])

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    h, c, rate = cuda["h"].clone(), cuda["c"].clone(), cuda["rate"].clone()
    lrs = [lr.clone() for lr in cuda["lr_list"]]
    ok = compiled(cuda["loss"], h, c, cuda["weights"], cuda["gamma"], rate, lrs)
    assert_step_matches({"h": h, "c": c, "rate": rate, "lr_list": lrs, "ok": ok}, case, "compiled gpu")
