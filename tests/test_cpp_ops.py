"""The C++/CUDA ops of ``autolr_fast._C`` against the plain PyTorch references.

Fresh random inputs every run: the seed comes from ``os.urandom`` and is printed in every
assertion message (rerun with ``AUTOLR_FAST_TEST_SEED=<seed>`` to reproduce). Tolerances are
per dtype. The CUDA section is skipped without a GPU; every test skips with the reason when
the extension is not built. The build-switch logic is tested without building anything.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from autolr_fast.ops import dispatch, reference

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_support  # noqa: E402

try:
    from autolr_fast.ops import cpp_backend as _cpp_backend
except ImportError as exc:  # pragma: no cover - the backend module itself never raises
    _cpp_backend = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = "" if _cpp_backend.AVAILABLE else _cpp_backend.DETAIL

needs_ext = pytest.mark.skipif(
    _cpp_backend is None or not _cpp_backend.AVAILABLE,
    reason=f"C++ extension autolr_fast._C not built ({_IMPORT_ERROR}); run `python setup.py build_ext --inplace`",
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or _cpp_backend is None or not _cpp_backend.built_with_cuda(),
    reason="CUDA section: needs a CUDA GPU and an extension built with its CUDA kernels",
)

SEED = int(os.environ.get("AUTOLR_FAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}
SHAPES = [[(7,)], [(3, 5), (17,), (1,)], [(33, 9), (4, 3, 3, 3), (65537,), (2,)]]
ops = torch.ops.autolr_fast if (_cpp_backend is not None and _cpp_backend.AVAILABLE) else None


def step_op(*args):
    """The step op with its ``ok`` output allocated (the schema takes it as an argument)."""
    ok = torch.empty((), dtype=torch.bool, device=args[1].device)
    ops.mlrsnet_step_(*args, ok)
    return ok


@pytest.fixture(autouse=True)
def _seed(request):
    # a different but reproducible stream per test
    torch.manual_seed(SEED + sum(map(ord, request.node.name)))


def msg(what: str) -> str:
    return f"{what} (seed {SEED}: rerun with AUTOLR_FAST_TEST_SEED={SEED})"


def close(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: msg(f"{what}: {m}"))


def dot_tol(vals, dirs, rtol: float, atol: float = 1e-3) -> dict:
    """Tolerance of ``sum_i <vals_i, dirs_i>`` where the kernel and the reference each round the
    direction to a half-precision dtype: an ulp of difference in float32 (nvcc contracts to FMA,
    torch does not) flips the rounding of some elements, and each flip moves the sum by a bf16 ulp
    of that term. The flips add like a random walk, so the bound scales with the 2-norm of the
    terms, not with the sum (which cancels: -129 from terms of norm ~2200 has been seen)."""
    if dirs[0].dtype not in (torch.bfloat16, torch.float16):
        return dict(rtol=rtol, atol=atol)
    norm = sum(float((a.double() * d.double()).square().sum()) for a, d in zip(vals, dirs)) ** 0.5
    return dict(rtol=rtol, atol=max(atol, 5e-4 * norm))


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def make_net(hidden: int, layers: int, device="cpu"):
    mid = hidden // 2
    weights = []
    for layer in range(layers):
        inp = 1 if layer == 0 else hidden
        for shape in [(mid, inp), (mid,), (4 * hidden, mid), (4 * hidden,), (mid, hidden), (mid,),
                      (4 * hidden, mid), (4 * hidden,)]:
            fan_in = shape[-1] if len(shape) == 2 else mid
            weights.append(torch.randn(shape, device=device) / math.sqrt(fan_in))
    weights += [torch.randn(1, hidden, device=device) / math.sqrt(hidden), torch.randn(1, device=device)]
    h = torch.randn(layers, hidden, device=device) * 0.5
    c = torch.randn(layers, hidden, device=device)
    return h, c, weights


def tensors(shapes, dtype, device="cpu"):
    return [torch.randn(s, dtype=dtype, device=device) for s in shapes]


def maybe_none(shapes, dtype, device="cpu", positive=False):
    """A state list with a None entry (first optimizer step for that parameter)."""
    out = []
    for i, s in enumerate(shapes):
        if i % 3 == 1:
            out.append(None)
        else:
            t = torch.randn(s, dtype=dtype, device=device)
            out.append(t.abs() if positive else t)
    return out


# ------------------------------------------------------------------------------------------------
# Build switch (pure functions, no compiler involved)
# ------------------------------------------------------------------------------------------------
def test_decide_cuda_modes():
    assert build_support.decide_cuda("auto", "13.0", "/cuda")[0] is True
    assert build_support.decide_cuda("auto", None, "/cuda")[0] is False
    assert build_support.decide_cuda("auto", "13.0", None)[0] is False
    assert build_support.decide_cuda("0", "13.0", "/cuda")[0] is False
    assert build_support.decide_cuda("1", "13.0", "/cuda")[0] is True
    assert "CPU-only" in build_support.decide_cuda("auto", None, "/cuda")[1]
    with pytest.raises(RuntimeError, match="AUTOLR_FAST_CUDA=1"):
        build_support.decide_cuda("1", "13.0", None)
    with pytest.raises(RuntimeError, match="CPU-only"):
        build_support.decide_cuda("1", None, "/cuda")
    with pytest.raises(ValueError, match="not one of"):
        build_support.decide_cuda("yes", "13.0", "/cuda")


def test_find_cuda_toolkit_follows_nvcc_wrapper(tmp_path):
    real = tmp_path / "cuda-13.0"
    (real / "include").mkdir(parents=True)
    (real / "include" / "cuda_runtime.h").write_text("")
    (real / "lib").mkdir()
    (real / "lib" / "libcudart.so.13").write_text("")
    (real / "bin").mkdir()
    (real / "bin" / "nvcc").write_text("")
    wrapper = tmp_path / "wrapbin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {real}/bin/nvcc \"$@\"\n")
    assert build_support.is_cuda_toolkit(str(real))
    assert not build_support.is_cuda_toolkit(str(tmp_path / "wrapbin"))
    # nvcc only as a wrapper script on PATH, no CUDA_HOME: the real toolkit is found
    found = build_support.find_cuda_toolkit(environ={}, which=lambda _: str(wrapper),
                                            is_toolkit=lambda p: p == str(real))
    assert found == str(real)
    # an explicit, valid CUDA_HOME wins; an invalid one is skipped
    assert build_support.find_cuda_toolkit(environ={"CUDA_HOME": str(real)}, which=lambda _: None) == str(real)
    assert build_support.find_cuda_toolkit(environ={"CUDA_HOME": str(tmp_path)}, which=lambda _: None,
                                           is_toolkit=lambda p: p == str(real)) is None


def test_extension_modules_follow_the_switches(monkeypatch):
    monkeypatch.setenv("AUTOLR_FAST_BUILD_EXT", "0")
    assert build_support.extension_modules() == []
    monkeypatch.setenv("AUTOLR_FAST_BUILD_EXT", "1")
    monkeypatch.setenv("AUTOLR_FAST_CUDA", "0")
    (ext,) = build_support.extension_modules()
    assert ext.name == "autolr_fast._C" and not any(src.endswith(".cu") for src in ext.sources)
    # the sources' digest is on every compile command (a changed source recompiles everything)
    digest = build_support._digest_module().sources_digest(os.path.join(build_support.ROOT, build_support.OPS_DIR))
    assert ("AUTOLR_FAST_SOURCES_DIGEST", digest) in ext.define_macros
    # auto without a toolkit: CPU-only, whatever the GPU situation
    monkeypatch.setenv("AUTOLR_FAST_CUDA", "auto")
    monkeypatch.setattr(build_support, "find_cuda_toolkit", lambda *a, **k: None)
    (ext,) = build_support.extension_modules()
    assert not any(src.endswith(".cu") for src in ext.sources)
    monkeypatch.setenv("AUTOLR_FAST_CUDA", "1")
    with pytest.raises(RuntimeError, match="no CUDA toolkit"):
        build_support.extension_modules()


@needs_ext
def test_cuda_sources_were_compiled_where_a_toolkit_exists():
    """Where torch is a CUDA build and a toolkit is found (CI: nvcc 13, no GPU), the extension
    must carry its CUDA kernels: the build retries CPU-only on a failed CUDA compile (with a
    warning), and this is what catches that."""
    if os.environ.get("AUTOLR_FAST_CUDA", "auto") == "0":
        pytest.skip("AUTOLR_FAST_CUDA=0: CUDA kernels switched off")
    toolkit = build_support.find_cuda_toolkit()
    wanted, reason = build_support.decide_cuda("auto", torch.version.cuda, toolkit)
    if not wanted:
        pytest.skip(f"no CUDA build expected here: {reason}")
    assert _cpp_backend.built_with_cuda(), (
        f"torch {torch.version.cuda} and a CUDA toolkit at {toolkit} are present, but autolr_fast._C was built "
        "without its CUDA kernels: the CUDA compile failed. Reinstall with `pip install -v --no-build-isolation "
        "-e .` and read the nvcc error")


def _run_host_check(name: str, tmp_path, *args: str) -> str:
    """Compile ``csrc/ops/tests/<name>.cpp`` (sanitized where the compiler can) and run it; its stdout."""
    import shutil
    import subprocess

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++/c++/clang++) on PATH")
    source = ROOT / "csrc" / "ops" / "tests" / f"{name}.cpp"
    exe = tmp_path / name
    flags = ["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror"]
    sanitized = subprocess.run([cxx, *flags, "-fsanitize=address,undefined", "-o", str(exe), str(source)],
                               capture_output=True, text=True)
    if sanitized.returncode != 0:  # a compiler without sanitizer runtimes: build plain
        plain = subprocess.run([cxx, *flags, "-o", str(exe), str(source)], capture_output=True, text=True)
        assert plain.returncode == 0, f"{name} does not compile:\n{plain.stderr[-4000:]}"
    run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, msg(f"{name} failed:\n{run.stderr[-4000:]}")
    assert run.stdout.startswith("ok "), run.stdout
    return run.stdout


def test_chunk_tables_of_the_cuda_launcher(tmp_path):
    """The CUDA launcher's chunk tables (csrc/ops/chunk_table.h), planned and walked on the host
    with the kernel's own lookup: every element once, pointers right, global chunk indices
    independent of how a long list is split into launches (see the C++ file)."""
    _run_host_check("chunk_table_test", tmp_path, str(SEED))


def test_directions_amsgrad_maximum_propagates_nan(tmp_path):
    """The per-element directions (csrc/ops/directions.h, compiled into the CUDA kernels too) as
    plain scalar code: AMSGrad's running maximum is NaN when either operand is, as
    torch.maximum (a plain ``a > b ? a : b`` keeps the other operand)."""
    _run_host_check("directions_test", tmp_path)


# ------------------------------------------------------------------------------------------------
# MLR-SNet step (CPU)
# ------------------------------------------------------------------------------------------------
def reference_step(loss, h, c, weights, gamma, rate, lrs, scales):
    rate_new, h_new, c_new, ok = reference.mlrsnet_guarded_step(loss, h, c, weights, gamma, rate)
    lrs_new = [(rate_new * s).to(lr.dtype) for lr, s in zip(lrs, scales)]
    return rate_new, h_new, c_new, ok, lrs_new


def run_step(loss, h, c, weights, gamma, rate, lrs, scales):
    h2, c2, rate2, lrs2 = h.clone(), c.clone(), rate.clone(), [lr.clone() for lr in lrs]
    ok = step_op(loss, h2, c2, weights, gamma, rate2, lrs2, scales)
    return rate2, h2, c2, ok, lrs2


@needs_ext
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("hidden", [16, 17, 50, 64, 128])
def test_mlrsnet_step_matches_reference(hidden, layers):
    h, c, weights = make_net(hidden, layers)
    for loss_value in [2.3, 0.01, -0.5, 37.0]:
        loss = torch.tensor(loss_value)
        gamma = torch.tensor(0.7)
        rate = torch.tensor(0.123)
        lrs = [torch.tensor(0.0), torch.tensor(0.0, dtype=torch.float64)]
        scales = [1.0, 0.25]
        exp = reference_step(loss, h, c, weights, gamma, rate, lrs, scales)
        got = run_step(loss, h, c, weights, gamma, rate, lrs, scales)
        for name, g, e in zip(["rate", "h", "c", "ok"], got[:4], exp[:4]):
            if name == "ok":
                assert bool(g) == bool(e), msg(f"ok flag, H={hidden} L={layers} loss={loss_value}")
            else:
                close(g, e, torch.float32, f"{name}, H={hidden} L={layers} loss={loss_value}")
        for k, (g, e) in enumerate(zip(got[4], exp[4])):
            close(g, e.to(g.dtype), torch.float32, f"lr[{k}], H={hidden} L={layers}")
        h, c = got[1], got[2]  # carry the state, like a training run


@needs_ext
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_mlrsnet_step_guard_keeps_state_on_non_finite_loss(bad):
    h, c, weights = make_net(17, 2)
    h0, c0 = h.clone(), c.clone()
    rate, lrs = torch.tensor(0.05), [torch.tensor(9.0), torch.tensor(9.0)]
    ok = step_op(torch.tensor(bad), h, c, weights, torch.tensor(0.5), rate, lrs, [1.0, 2.0])
    assert ok.dtype == torch.bool and not bool(ok), msg("ok must be False for a non-finite loss")
    assert torch.equal(h, h0) and torch.equal(c, c0), msg("state changed on a non-finite loss")
    assert rate.item() == pytest.approx(0.05), msg("rate changed on a non-finite loss")
    # the lr tensors are (re)written with the kept rate, like dispatch's reference branch
    assert lrs[0].item() == pytest.approx(0.05) and lrs[1].item() == pytest.approx(0.1), msg("lr values")


@needs_ext
def test_mlrsnet_step_guard_sees_a_nan_made_inside_the_net():
    # a finite but huge loss overflows layer 0 into a NaN state; layer 1's relu must keep the NaN
    # (as torch.relu), or the output stays finite and the NaN state is stored as a good step
    h, c, weights = make_net(8, 2)
    weights[0] = weights[0].abs() + 2.0  # every w0 x > FLT_MAX: every relu is +inf
    weights[2][:, 0], weights[2][:, 1] = 1.0, -1.0  # every gate row then sums inf - inf = NaN
    loss, gamma, rate = torch.tensor(3e38), torch.tensor(0.5), torch.tensor(0.05)
    exp = reference_step(loss, h, c, weights, gamma, rate, [], [])
    got = run_step(loss, h, c, weights, gamma, rate, [], [])
    assert not bool(exp[3]), msg("the reference must refuse this step (test setup)")
    assert not bool(got[3]), msg("ok must be False when the net's state turns NaN")
    assert torch.equal(got[1], h) and torch.equal(got[2], c), msg("state changed on a refused step")


@needs_ext
def test_mlrsnet_step_guard_non_finite_output():
    h, c, weights = make_net(16, 1)
    h0 = h.clone()
    rate = torch.tensor(0.05)
    ok = step_op(torch.tensor(1.0), h, c, weights, torch.tensor(float("nan")), rate, [], [])
    assert not bool(ok) and torch.equal(h, h0) and rate.item() == pytest.approx(0.05), msg("NaN gamma")


@needs_ext
def test_mlrsnet_step_rejects_bad_weights():
    h, c, weights = make_net(16, 1)
    with pytest.raises(RuntimeError, match="weight tensors"):
        step_op(torch.tensor(1.0), h, c, weights[:-1], torch.tensor(1.0), torch.tensor(0.1), [], [])
    bad = list(weights)
    bad[2] = bad[2][:, :3].contiguous()
    h0 = h.clone()
    with pytest.raises(RuntimeError, match="i2h.2.weight"):
        step_op(torch.tensor(1.0), h, c, bad, torch.tensor(1.0), torch.tensor(0.1), [], [])
    assert torch.equal(h, h0), "bad input must not corrupt the state"
    with pytest.raises(RuntimeError, match="scale per param group"):
        step_op(torch.tensor(1.0), h, c, weights, torch.tensor(1.0), torch.tensor(0.1),
                          [torch.tensor(0.0)], [])
    # float lrs in the optimizer: no lr tensors, one scale per group (dispatch's zip semantics)
    assert bool(step_op(torch.tensor(1.0), h, c, weights, torch.tensor(1.0), torch.tensor(0.1), [],
                                  [1.0, 0.5]))


@needs_ext
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("hidden", [16, 17, 50])
def test_mlrsnet_param_grads_matches_reference(hidden, layers):
    h, c, weights = make_net(hidden, layers)
    loss, grad_p = torch.tensor(1.7), torch.tensor(-0.8)
    exp = reference.mlrsnet_param_grads(loss, h, c, weights, grad_p)
    got = ops.mlrsnet_param_grads(loss, h, c, weights, grad_p)
    assert len(got) == len(exp)
    for i, (g, e) in enumerate(zip(got, exp)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=lambda m: msg(f"grad of weight {i}: {m}"))


@needs_ext
def test_mlrsnet_step_fast_entry_matches_op():
    """_C.mlrsnet_step_cpu (no dispatcher) == the op; NotImplemented for tensor subclasses."""
    from autolr_fast import _C

    h, c, weights = make_net(50, 2)
    params = [torch.nn.Parameter(w) for w in weights]  # what the controller hands over
    outs = []
    for call in (_C.mlrsnet_step_cpu, step_op):
        hh, cc, rate, lrs = h.clone(), c.clone(), torch.tensor(0.1), [torch.tensor(0.0), torch.tensor(0.0)]
        ok = call(torch.tensor(0.8), hh, cc, params, torch.tensor(0.4), rate, lrs, (1.0, 0.5))
        outs.append((hh, cc, rate, *lrs, ok))
    for a, b in zip(*outs):
        assert torch.equal(a, b), msg("fast entry differs from the op")

    class Sub(torch.Tensor):
        pass

    sub_h = h.clone().as_subclass(Sub)
    assert _C.mlrsnet_step_cpu(torch.tensor(1.0), sub_h, c, weights, torch.tensor(0.4), torch.tensor(0.1), [],
                               []) is NotImplemented
    with pytest.raises(RuntimeError, match="expected 18 weight tensors"):
        _C.mlrsnet_step_cpu(torch.tensor(1.0), h, c, weights[:-1], torch.tensor(0.4), torch.tensor(0.1), [], [])
    # the backend callable falls back to the op for the subclass
    ok = _cpp_backend.mlrsnet_step_(torch.tensor(1.0), sub_h, c.clone(), weights, torch.tensor(0.4),
                                    torch.tensor(0.1), [], [])
    assert bool(ok)


@needs_ext
def test_mlrsnet_step_bumps_the_version_of_what_it_writes():
    """The kernel writes through raw pointers; like the reference's in-place ops it bumps every
    written tensor's version: autograd refuses a graph that saved an overwritten lr, and an
    inference tensor is refused outside InferenceMode before anything is written."""
    from autolr_fast import _C

    h, c, weights = make_net(16, 1)
    counters = torch.zeros(2, dtype=torch.int64)
    for call in (_C.mlrsnet_step_cpu, step_op):
        hh, cc, rate, lr = h.clone(), c.clone(), torch.tensor(0.1), torch.tensor(0.1, requires_grad=True)
        lr_leaf = lr.detach().requires_grad_(True)
        scaled = lr_leaf * 1.0
        kept = (scaled * scaled).sum()  # saves `scaled` for its backward
        before = [t._version for t in (hh, cc, rate, scaled)]
        args = (torch.tensor(0.8), hh, cc, weights, torch.tensor(0.4), rate, [scaled], (1.0,))
        with torch.no_grad():
            call(*args, counters) if call is _C.mlrsnet_step_cpu else call(*args)
        assert all(t._version > v for t, v in zip((hh, cc, rate, scaled), before)), call
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            kept.backward()
    assert counters._version > 0
    # a float64 loss is counted as the step reads it, in float32 (as the reference does)
    for value, negative in ((-1e-50, 0), (-1e300, 0), (-0.5, 1)):
        counts = torch.zeros(2, dtype=torch.int64)
        _C.mlrsnet_step_cpu(torch.tensor(value, dtype=torch.float64), h.clone(), c.clone(), weights,
                            torch.tensor(0.4), torch.tensor(0.1), [], (), counts)
        want = torch.zeros(2, dtype=torch.int64)
        reference.count_step_(want, torch.tensor(value, dtype=torch.float64), (counts[0] == 0).clone())
        assert counts.tolist() == want.tolist() and int(counts[1]) == negative, value
    with torch.inference_mode():
        frozen = h.clone()
    with pytest.raises(RuntimeError, match="(?i)inference"):
        step_op(torch.tensor(0.8), frozen, c.clone(), weights, torch.tensor(0.4), torch.tensor(0.1), [], ())


def _layout_variants(base: torch.Tensor) -> list[torch.Tensor]:
    """Tensors over ``base``'s memory: itself, and same-address views under another layout."""
    flat = base.view(-1)
    square = flat[:16].view(4, 4)  # and square.t(): the same address and shape, other strides
    return [base, base.view(base.shape), flat, flat[: flat.numel() // 2], base.t(), square, square.t(),
            base.view(torch.int32), base.unsqueeze(0), base.detach(), torch.nn.Parameter(base)]


@needs_ext
def test_tensor_layout_key_matches_python_layout():
    """_C.tensor_layout_key (what the Triton step's cached launch compares every step) is equal
    exactly when kernels.mlrsnet_step._layout (pointer, strides, shape, dtype) is."""
    pytest.importorskip("triton")
    from autolr_fast import _C
    from autolr_fast.ops.triton_kernels import _layout

    a, b = torch.randn(6, 4), torch.randn(6, 4)
    pool = _layout_variants(a) + _layout_variants(b) + [torch.randn(()), torch.zeros(2, dtype=torch.int64),
                                                        torch.randn(6, 4).to(torch.bfloat16)]
    for i, p in enumerate(pool):  # every pair of single tensors: each attribute alone
        for j, q in enumerate(pool):
            same_py, same_c = _layout([p]) == _layout([q]), _C.tensor_layout_key([p]) == _C.tensor_layout_key([q])
            assert same_py == same_c, f"layout keys disagree for pool[{i}] vs pool[{j}]: python {same_py}, C++ {same_c}"
    gen = torch.Generator().manual_seed(SEED)
    outcomes = set()
    for _ in range(400):
        first = torch.randint(len(pool), (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
        # the second list: the first with a few entries swapped for random ones (often a twin
        # of the same layout: base, base.view(shape), base.detach() and the Parameter)
        second = [j if torch.rand((), generator=gen) < 0.7 else int(torch.randint(len(pool), (1,), generator=gen))
                  for j in first]
        x, y = [pool[i] for i in first], [pool[i] for i in second]
        same_py, same_c = _layout(x) == _layout(y), _C.tensor_layout_key(x) == _C.tensor_layout_key(tuple(y))
        assert same_py == same_c, msg(f"layout keys disagree for {first} vs {second}: python {same_py}, C++ {same_c}")
        outcomes.add(same_py)
    assert outcomes == {True, False}, msg("the random lists must give both equal and different layouts")
    twins = _layout_variants(a)
    assert _C.tensor_layout_key([twins[0], twins[1]]) == _C.tensor_layout_key([twins[-2], twins[-1]])
    assert _C.tensor_layout_key([a, b]) != _C.tensor_layout_key([b, a])
    assert _C.tensor_layout_key([]) == b""
    with pytest.raises(TypeError, match="entry 1 is a float, not a tensor"):
        _C.tensor_layout_key([a, 1.0])
    with pytest.raises(TypeError, match="list or tuple"):
        _C.tensor_layout_key(a)


@needs_ext
def test_backend_float64_controller_uses_the_reference():
    """The kernels are float32; a float64 controller (finite-difference checks) still works."""
    h, c, weights = make_net(17, 2)
    h, c, weights = h.double(), c.double(), [w.double() for w in weights]
    loss, grad_p = torch.tensor(0.9, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    got = _cpp_backend.mlrsnet_param_grads(loss, h, c, weights, grad_p)
    for g, e in zip(got, reference.mlrsnet_param_grads(loss, h, c, weights, grad_p)):
        assert g.dtype == torch.float64 and torch.equal(g, e)
    gamma, rate = torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    exp = reference.mlrsnet_guarded_step(loss, h, c, weights, gamma, rate)
    ok = _cpp_backend.mlrsnet_step_(loss, h, c, weights, gamma, rate, [], [])
    assert bool(ok) and torch.equal(h, exp[1]) and torch.equal(rate, exp[0])


@needs_ext
def test_dispatch_uses_cpp_on_cpu():
    assert dispatch.select("mlrsnet_step_", torch.device("cpu"))[0] == "cpp"
    assert dispatch.select("hyper_dot_adam", torch.device("cpu"))[0] == "cpp"
    info = dispatch.backend_info()
    assert info["backends"]["cpp"]["available"]


@needs_ext
def test_dispatch_step_matches_reference_branch(monkeypatch):
    h, c, weights = make_net(50, 1)
    args = (torch.tensor(0.9), torch.tensor(0.4), torch.tensor(0.2))
    outs = []
    for force in ("0", "1"):
        monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, force)
        hh, cc, rate, lr = h.clone(), c.clone(), args[2].clone(), torch.tensor(0.0)
        ok = dispatch.mlrsnet_step_(args[0], hh, cc, weights, args[1], rate, [lr], [0.5])
        outs.append((hh, cc, rate, lr, ok))
    for a, b in zip(*outs):
        close(a, b, torch.float32, "dispatch cpp vs reference branch")


# ------------------------------------------------------------------------------------------------
# Multi-tensor ops (CPU)
# ------------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
@pytest.mark.parametrize("shapes", SHAPES)
def test_lookahead_and_hyper_dot(shapes, dtype):
    w, d = tensors(shapes, dtype), tensors(shapes, dtype)
    alpha = torch.tensor(0.37)
    for g, e in zip(ops.lookahead(w, d, alpha), reference.lookahead(w, d, alpha)):
        close(g, e, dtype, "lookahead")
    got, exp = ops.hyper_dot(w, d), reference.hyper_dot(w, d)
    assert got.dtype == torch.float32 and got.dim() == 0
    close(got, exp, torch.float32, "hyper_dot")


SGD_CASES = [  # momentum, dampening, weight_decay, nesterov, maximize
    (0.0, 0.0, 0.0, False, False),
    (0.9, 0.0, 0.0, False, False),
    (0.9, 0.1, 1e-2, False, True),
    (0.8, 0.0, 5e-3, True, False),
]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
@pytest.mark.parametrize("case", SGD_CASES)
@pytest.mark.parametrize("shapes", SHAPES)
def test_sgd_ops(shapes, case, dtype):
    w, g, v = tensors(shapes, dtype), tensors(shapes, dtype), tensors(shapes, dtype)
    bufs = maybe_none(shapes, dtype)
    alpha = torch.tensor(0.05)
    for a, b in zip(ops.lookahead_sgd(w, g, bufs, alpha, *case), reference.lookahead_sgd(w, g, bufs, alpha, *case)):
        close(a, b, dtype, f"lookahead_sgd {case}")
    got = ops.hyper_dot_sgd(v, w, g, bufs, *case)
    close(got, reference.hyper_dot_sgd(v, w, g, bufs, *case), torch.float32, f"hyper_dot_sgd {case}")


ADAM_CASES = [  # beta1, beta2, eps, weight_decay, decoupled, maximize, amsgrad
    (0.9, 0.999, 1e-8, 0.0, False, False, False),
    (0.9, 0.999, 1e-8, 1e-2, True, False, False),
    (0.8, 0.99, 1e-6, 1e-2, False, True, True),
]


def own_steps(m: list, stored_step: float, device="cpu") -> list[torch.Tensor]:
    """Each parameter's own step count, as torch.optim keeps them: 0 for one without state (no
    moments yet), else a different count per parameter (some had no gradient on some steps)."""
    return [torch.tensor(0.0 if mm is None else stored_step + 3.0 * i, device=device) for i, mm in enumerate(m)]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
@pytest.mark.parametrize("stored_step", [0.0, 7.0])
@pytest.mark.parametrize("case", ADAM_CASES)
@pytest.mark.parametrize("shapes", SHAPES)
def test_adam_ops(shapes, case, stored_step, dtype):
    b1, b2, eps, wd, decoupled, maximize, amsgrad = case
    w, g, v = tensors(shapes, dtype), tensors(shapes, dtype), tensors(shapes, dtype)
    if stored_step == 0.0:
        m = sq = vmax = [None] * len(shapes)
    else:
        m, sq = maybe_none(shapes, dtype), maybe_none(shapes, dtype, positive=True)
        vmax = maybe_none(shapes, dtype, positive=True) if amsgrad else [None] * len(shapes)
    steps, alpha = own_steps(m, stored_step), torch.tensor(1e-3)
    args = (b1, b2, eps, wd, decoupled, maximize)
    exp = reference.lookahead_adam(w, g, m, sq, vmax, steps, alpha, *args)
    for a, b in zip(ops.lookahead_adam(w, g, m, sq, vmax, steps, alpha, *args), exp):
        close(a, b, dtype, f"lookahead_adam {case} steps={[float(t) for t in steps]}")
    got = ops.hyper_dot_adam(v, w, g, m, sq, vmax, steps, *args)
    exp_dot = reference.hyper_dot_adam(v, w, g, m, sq, vmax, steps, *args)
    torch.testing.assert_close(got, exp_dot, rtol=1e-4 if dtype != torch.bfloat16 else 1e-3, atol=1e-4,
                               msg=lambda s: msg(f"hyper_dot_adam {case} steps={[float(t) for t in steps]}: {s}"))


@needs_ext
def test_adam_ops_take_one_step_count_per_parameter():
    """The step list must have one 1-element tensor per parameter; the Python entry points also
    take a single tensor or number, as the count of every parameter."""
    shapes = [(5, 3), (7,)]
    w, g = tensors(shapes, torch.float32), tensors(shapes, torch.float32)
    none, adam = [None, None], (0.9, 0.999, 1e-8, 0.0, False, False)
    with pytest.raises(RuntimeError, match="steps has 1 tensors but params has 2"):
        ops.hyper_dot_adam(w, w, g, none, none, none, [torch.tensor(1.0)], *adam)
    with pytest.raises(RuntimeError, match=r"steps\[1\] must be a 1-element tensor"):
        ops.hyper_dot_adam(w, w, g, none, none, none, [torch.tensor(1.0), torch.zeros(2)], *adam)
    same = [torch.tensor(4.0), torch.tensor(4.0)]
    want = ops.hyper_dot_adam(w, w, g, none, none, none, same, *adam)
    for single in (torch.tensor(4.0), 4.0, 4):
        assert torch.equal(_cpp_backend.hyper_dot_adam(w, w, g, none, none, none, single, *adam), want)
        assert torch.equal(reference.hyper_dot_adam(w, w, g, none, none, none, single, *adam),
                           reference.hyper_dot_adam(w, w, g, none, none, none, same, *adam))
    with pytest.raises(RuntimeError, match="steps has 3 tensors but params has 2"):  # the kernels' words
        reference.hyper_dot_adam(w, w, g, none, none, none, same + same[:1], *adam)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_amsgrad_maximum_propagates_nan(dtype):
    """AMSGrad's running maximum is torch.maximum: a NaN in max_exp_avg_sq gives a NaN direction
    (as torch's own AMSGrad step gives a NaN parameter), not the other operand."""
    shapes = [(4, 5), (9,)]
    w, g, v = tensors(shapes, dtype), tensors(shapes, dtype), tensors(shapes, dtype)
    m, sq = tensors(shapes, dtype), [t.abs() for t in tensors(shapes, dtype)]
    vmax = [t.abs() for t in tensors(shapes, dtype)]
    vmax[0].view(-1)[3] = float("nan")
    sq[1][2] = float("nan")
    step, alpha, adam = torch.tensor(5.0), torch.tensor(0.01), (0.9, 0.999, 1e-8, 1e-2, True, False)
    got = _cpp_backend.lookahead_adam(w, g, m, sq, vmax, step, alpha, *adam)  # (every parameter at step 5)
    want = reference.lookahead_adam(w, g, m, sq, vmax, step, alpha, *adam)
    assert torch.isnan(got[0].view(-1)[3]) and torch.isnan(got[1][2]), msg("a NaN maximum must give a NaN w_hat")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype], equal_nan=True, msg=lambda s: msg(f"lookahead_adam: {s}"))
    assert torch.isnan(_cpp_backend.hyper_dot_adam(v, w, g, m, sq, vmax, step, *adam)), msg("hyper_dot_adam")
    # torch's own AMSGrad step with that state
    p = torch.nn.Parameter(w[0].clone())
    opt = torch.optim.AdamW([p], lr=0.01, weight_decay=1e-2, amsgrad=True)
    opt.state[p] = {"step": torch.tensor(5.0), "exp_avg": m[0].clone(), "exp_avg_sq": sq[0].clone(),
                    "max_exp_avg_sq": vmax[0].clone()}
    p.grad = g[0].clone()
    opt.step()
    assert torch.isnan(p.detach().view(-1)[3]), "torch's AMSGrad propagates the NaN (the premise of this test)"


# ------------------------------------------------------------------------------------------------
# Reduced precision: the ops against torch's own optimizer steps on bfloat16 parameters
# ------------------------------------------------------------------------------------------------
def _list_op_impls() -> list:
    impls = [pytest.param("reference", id="reference")]
    impls.append(pytest.param("cpu", id="cpp-cpu", marks=needs_ext))
    impls.append(pytest.param("cuda", id="cpp-cuda", marks=[needs_ext, needs_cuda, pytest.mark.gpu]))
    return impls


def _list_ops(impl: str):
    """``(module, device)``: the reference, or the extension's ops through cpp_backend."""
    return (reference, "cpu") if impl == "reference" else (_cpp_backend, impl)


BF16_SHAPES = [(257, 129), (40_000,), (3, 3, 3, 64)]
# 0.012298 rounds to 0.012268 in bfloat16: a rate rounded to the parameters' dtype is 0.24 % off
BF16_ALPHA = 0.012298


def _coherent_ratio(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """``<got, want> / <want, want>`` in float64: 1 + the systematic relative error; the
    per-element rounding differences (either sign) average out over the ~75k elements."""
    num = sum(float((a.double() * b.double()).sum()) for a, b in zip(got, want))
    return num / sum(float((b.double() ** 2).sum()) for b in want)


def _bf16_params_at_zero(dev: str, make_opt, steps: int):
    """bfloat16 parameters, ``steps`` real optimizer steps on random gradients (the optimizer
    state), then the parameters set to 0 and new gradients: a step from 0 is read off exactly."""
    params = [torch.nn.Parameter(torch.randn(s, device=dev).to(torch.bfloat16)) for s in BF16_SHAPES]
    opt = make_opt(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    with torch.no_grad():
        for p in params:
            p.zero_()
            p.grad = torch.randn_like(p)
    return params, opt


def _real_step(params, opt, lr: float) -> list[torch.Tensor]:
    """The parameters after one real step with ``lr``, taken on a copy (the state stays)."""
    import copy

    params2, opt2 = copy.deepcopy((params, opt))
    for a, b in zip(params2, params):
        a.grad = b.grad.clone()
    for g in opt2.param_groups:
        g["lr"] = lr
    opt2.step()
    return [p.detach() for p in params2]


@pytest.mark.parametrize("impl", _list_op_impls())
@pytest.mark.parametrize("nesterov", [False, True])
def test_bf16_lookahead_sgd_matches_torch_sgd(impl, nesterov):
    """bfloat16 parameters: ``w_hat`` from ``lookahead_sgd`` against a real fused
    ``torch.optim.SGD`` step with ``lr = alpha`` (rate and arithmetic in float32, one rounding):
    no systematic scale (alpha rounded to bfloat16 is 0.24 % off). Torch's non-fused CPU SGD
    rounds ``lr`` to the parameters' dtype itself; the ops follow the float32 semantics."""
    ops_, dev = _list_ops(impl)
    torch.manual_seed(SEED)
    params, opt = _bf16_params_at_zero(dev, lambda p: torch.optim.SGD(
        p, lr=0.01, momentum=0.9, dampening=0.0 if nesterov else 0.1, weight_decay=1e-2, nesterov=nesterov,
        fused=True), steps=2)
    g = opt.param_groups[0]
    w = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"] for p in params]
    got = ops_.lookahead_sgd(w, [p.grad for p in params], bufs, torch.tensor(BF16_ALPHA, device=dev),
                             g["momentum"], g["dampening"], g["weight_decay"], nesterov, False)
    want = _real_step(params, opt, BF16_ALPHA)
    ratio = _coherent_ratio(got, want)
    assert abs(ratio - 1.0) < 5e-4, msg(f"{impl}: w_hat is {ratio:.5f} x torch's step (alpha rounded to bf16?)")


@pytest.mark.parametrize("impl", _list_op_impls())
@pytest.mark.parametrize("stored_step", [1, 3])
@pytest.mark.parametrize("decoupled", [False, True])
def test_bf16_adam_ops_match_torch_adam(impl, stored_step, decoupled):
    """bfloat16 parameters: Adam's direction from the ops against a real ``torch.optim.Adam`` /
    ``AdamW`` step with ``lr = alpha`` (``d = -w_after / lr`` from 0), whose bias corrections are
    float64 and its rate float32: ``<v, d>`` (``v`` along ``d``) and ``w_hat`` without a
    systematic error (bias corrections and alpha rounded to bfloat16: 0.3 to 0.6 % off)."""
    ops_, dev = _list_ops(impl)
    torch.manual_seed(SEED)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    params, opt = _bf16_params_at_zero(dev, lambda p: cls(p, lr=1e-3, weight_decay=1e-2), steps=stored_step)
    state = [opt.state[p] for p in params]
    tensors = ([p.detach().clone() for p in params], [p.grad for p in params], [s["exp_avg"] for s in state],
               [s["exp_avg_sq"] for s in state], [None] * len(params), [s["step"] for s in state])
    g = opt.param_groups[0]
    adam = (*g["betas"], g["eps"], g["weight_decay"], decoupled, False)
    w_after = _real_step(params, opt, BF16_ALPHA)
    d_real = [-(a.double() / BF16_ALPHA) for a in w_after]
    v = [d.to(torch.bfloat16) for d in d_real]  # a validation gradient along d: <v, d> adds up coherently
    dot = float(ops_.hyper_dot_adam(v, *tensors, *adam))
    want = sum(float((a.double() * b).sum()) for a, b in zip(v, d_real))
    assert abs(dot / want - 1.0) < 1e-3, msg(f"{impl}: <v, d> {dot} vs torch's step {want}")
    ratio = _coherent_ratio(ops_.lookahead_adam(*tensors, torch.tensor(BF16_ALPHA, device=dev), *adam), w_after)
    assert abs(ratio - 1.0) < 1e-3, msg(f"{impl}: w_hat is {ratio:.5f} x torch's step")


@needs_ext
def test_hyper_dot_is_bitwise_deterministic():
    shapes = [(300_001,), (64, 3, 7, 7), (1000, 257)]
    a, b, w = tensors(shapes, torch.float32), tensors(shapes, torch.float32), tensors(shapes, torch.float32)
    bufs = maybe_none(shapes, torch.float32)
    sq = maybe_none(shapes, torch.float32, positive=True)
    calls = {
        "hyper_dot": lambda: ops.hyper_dot(a, b),
        "hyper_dot_sgd": lambda: ops.hyper_dot_sgd(a, w, b, bufs, 0.9, 0.0, 1e-4, True, False),
        "hyper_dot_adam": lambda: ops.hyper_dot_adam(a, w, b, bufs, sq, [None] * 3, [torch.tensor(3.0)] * 3,
                                                     0.9, 0.999, 1e-8, 0.0, False, False),
    }
    threads = torch.get_num_threads()
    try:
        for name, fn in calls.items():
            first = fn()
            for n_threads in (1, max(2, threads), threads):
                torch.set_num_threads(n_threads)
                for _ in range(3):
                    assert torch.isfinite(first) and torch.equal(fn(), first), \
                        msg(f"{name} differs between calls ({n_threads} threads)")
    finally:
        torch.set_num_threads(threads)


@needs_ext
def test_list_ops_reject_mismatched_lists():
    w = tensors([(3,), (4,)], torch.float32)
    with pytest.raises(RuntimeError, match="dirs has 1 tensors but params has 2"):
        ops.lookahead(w, w[:1], torch.tensor(0.1))
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
        ops.lookahead_sgd(w, [w[0], torch.zeros(5)], [None, None], torch.tensor(0.1), 0.9, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="no tensor arguments"):
        ops.hyper_dot([], [])


# ------------------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, dispatcher registration) for every op
# ------------------------------------------------------------------------------------------------
def _opcheck_cases():
    shapes = [(5, 3), (7,)]
    w, g, v = tensors(shapes, torch.float32), tensors(shapes, torch.float32), tensors(shapes, torch.float32)
    bufs = [torch.randn(5, 3), None]
    sq = [torch.rand(5, 3), None]
    h, c, weights = make_net(17, 2)
    steps, alpha = [torch.tensor(3.0), torch.tensor(0.0)], torch.tensor(0.01)
    adam = (0.9, 0.999, 1e-8, 1e-2, True, False)
    return {
        "lookahead": (w, g, alpha),
        "hyper_dot": (w, g),
        "lookahead_sgd": (w, g, bufs, alpha, 0.9, 0.0, 1e-4, True, False),
        "hyper_dot_sgd": (v, w, g, bufs, 0.9, 0.1, 0.0, False, True),
        "lookahead_adam": (w, g, bufs, sq, sq, steps, alpha, *adam),
        "hyper_dot_adam": (v, w, g, bufs, sq, [None, None], steps, *adam),
        "mlrsnet_step_": (torch.tensor(1.3), h, c, weights, torch.tensor(0.5), torch.tensor(0.1),
                          [torch.tensor(0.0), torch.tensor(0.0)], [1.0, 0.5], torch.tensor(False),
                          torch.zeros(2, dtype=torch.int64)),
        "mlrsnet_param_grads": (torch.tensor(1.3), h, c, weights, torch.tensor(1.0)),
    }


@needs_ext
@pytest.mark.parametrize("op_name", list(_cpp_backend.LIST_OPS + _cpp_backend.STEP_OPS) if _cpp_backend else [])
def test_opcheck(op_name):
    args = _opcheck_cases()[op_name]
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    if op_name in _cpp_backend.LIST_OPS:  # their autograd kernel raises at backward (the step ops fall through)
        checks += ("test_autograd_registration",)
    torch.library.opcheck(getattr(ops, op_name).default, args, test_utils=checks)


@needs_ext
@pytest.mark.parametrize("op_name", list(_cpp_backend.LIST_OPS) if _cpp_backend else [])
def test_backward_through_a_list_op_raises(op_name):
    """Not differentiable: outputs of parameters that require grad are not cut silently from the
    graph; backward says so."""
    args = list(_opcheck_cases()[op_name])
    first = 0 if op_name in ("lookahead", "hyper_dot", "lookahead_sgd", "lookahead_adam") else 1
    args[first] = [t.detach().requires_grad_() for t in args[first]]
    out = getattr(ops, op_name)(*args)
    total = sum(t.sum() for t in out) if isinstance(out, list) else out
    with pytest.raises(RuntimeError, match=f"derivative for autolr_fast::{op_name} is not implemented"):
        total.backward()


@needs_ext
def test_ops_under_torch_compile():
    """The fake kernels let torch.compile trace the ops (fullgraph, mutation of the step included)."""
    import torch._dynamo

    torch._dynamo.reset()
    shapes = [(5, 3), (7,)]
    w, g, v = tensors(shapes, torch.float32), tensors(shapes, torch.float32), tensors(shapes, torch.float32)
    bufs = [torch.randn(5, 3), None]
    h, c, weights = make_net(17, 1)
    alpha = torch.tensor(0.1)

    def fn(loss, h, c, rate, lr):
        w_hat = ops.lookahead_sgd(w, g, bufs, alpha, 0.9, 0.0, 1e-4, False, False)
        dot = ops.hyper_dot_sgd(v, w, g, bufs, 0.9, 0.0, 1e-4, False, False)
        ok = step_op(loss, h, c, weights, torch.tensor(0.5), rate, [lr], [1.0])
        return w_hat, dot, ok

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    h1, c1, r1, l1 = h.clone(), c.clone(), torch.tensor(0.1), torch.tensor(0.0)
    h2, c2, r2, l2 = h.clone(), c.clone(), torch.tensor(0.1), torch.tensor(0.0)
    got = compiled(torch.tensor(1.2), h1, c1, r1, l1)
    exp = fn(torch.tensor(1.2), h2, c2, r2, l2)
    for a, b in zip(got[0], exp[0]):
        assert torch.equal(a, b)
    assert torch.equal(got[1], exp[1]) and bool(got[2]) == bool(exp[2])
    assert torch.equal(h1, h2) and torch.equal(c1, c2) and torch.equal(r1, r2) and torch.equal(l1, l2), \
        "the in-place updates of mlrsnet_step_ must survive torch.compile"


# ------------------------------------------------------------------------------------------------
# CUDA section
# ------------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shapes", SHAPES + [[(300_001,), (5, 5), (0,), (40_000,)] * 20])
def test_cuda_ops_match_reference(shapes, dtype):
    dev = "cuda"
    w, g, v = tensors(shapes, dtype, dev), tensors(shapes, dtype, dev), tensors(shapes, dtype, dev)
    bufs = maybe_none(shapes, dtype, dev)
    sq = maybe_none(shapes, dtype, dev, positive=True)
    alpha = torch.tensor(0.05, device=dev)
    for a, b in zip(ops.lookahead(w, g, alpha), reference.lookahead(w, g, alpha)):
        close(a, b, dtype, "cuda lookahead")
    close(ops.hyper_dot(w, g), reference.hyper_dot(w, g), torch.float32, "cuda hyper_dot")
    sgd = (0.9, 0.1, 1e-2, True, False)
    for a, b in zip(ops.lookahead_sgd(w, g, bufs, alpha, *sgd), reference.lookahead_sgd(w, g, bufs, alpha, *sgd)):
        close(a, b, dtype, "cuda lookahead_sgd")
    torch.testing.assert_close(ops.hyper_dot_sgd(v, w, g, bufs, *sgd), reference.hyper_dot_sgd(v, w, g, bufs, *sgd),
                               **dot_tol(v, reference.sgd_directions(w, g, bufs, *sgd),
                                         rtol=1e-3 if dtype == torch.bfloat16 else 1e-5),
                               msg=lambda s: msg(f"cuda hyper_dot_sgd: {s}"))
    adam = (0.9, 0.999, 1e-8, 1e-2, True, False)
    # each parameter's own step: on the CPU (torch.optim's default: read on the host), on the device
    # (capturable/fused: read by the kernel), on the device as int64, and a mix (copied to the device)
    cpu_steps = own_steps(bufs, 4.0)
    mixed = [s.to(dev) if i % 2 else s for i, s in enumerate(cpu_steps)]
    for steps in (cpu_steps, [s.to(dev) for s in cpu_steps], [s.to(dev, torch.int64) for s in cpu_steps], mixed):
        exp = reference.lookahead_adam(w, g, bufs, sq, sq, steps, alpha, *adam)
        for a, b in zip(ops.lookahead_adam(w, g, bufs, sq, sq, steps, alpha, *adam), exp):
            close(a, b, dtype, "cuda lookahead_adam")
        torch.testing.assert_close(ops.hyper_dot_adam(v, w, g, bufs, sq, sq, steps, *adam),
                                   reference.hyper_dot_adam(v, w, g, bufs, sq, sq, steps, *adam),
                                   **dot_tol(v, reference.adam_directions(w, g, bufs, sq, sq, steps, *adam),
                                             rtol=1e-3 if dtype == torch.bfloat16 else 1e-4),
                                   msg=lambda s: msg(f"cuda hyper_dot_adam: {s}"))


@needs_ext
@pytest.mark.gpu
@needs_cuda
def test_cuda_hyper_dot_deterministic_and_opcheck():
    shapes = [(1_000_003,), (64, 64, 3, 3), (10,)] * 8
    a, b = tensors(shapes, torch.float32, "cuda"), tensors(shapes, torch.float32, "cuda")
    first = ops.hyper_dot(a, b)
    for _ in range(5):
        assert torch.equal(ops.hyper_dot(a, b), first), msg("cuda hyper_dot not bitwise deterministic")
    for name in _cpp_backend.LIST_OPS:
        args = _opcheck_cases()[name]
        cuda_args = tuple([x.cuda() if isinstance(x, torch.Tensor) else x for x in a] if isinstance(a, list)
                          else a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(getattr(ops, name).default, cuda_args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@needs_ext
@pytest.mark.gpu
@needs_cuda
def test_cuda_list_ops_longer_than_one_launch_table():
    """More tensors than one kernel-argument table holds (several launches): same results as
    the reference, and the dot product keeps its bits run to run."""
    shapes = [(3,), (17,), (0,), (16385,)] * 300  # 1200 tensors, over the Depth-6 capacity
    dtype = torch.float32
    w, g, v = tensors(shapes, dtype, "cuda"), tensors(shapes, dtype, "cuda"), tensors(shapes, dtype, "cuda")
    m, sq = tensors(shapes, dtype, "cuda"), [t.abs() for t in tensors(shapes, dtype, "cuda")]
    alpha, steps = torch.tensor(0.05, device="cuda"), own_steps(m, 3.0, "cuda")
    adam = (0.9, 0.999, 1e-8, 1e-2, True, False)
    for a, b in zip(ops.lookahead_adam(w, g, m, sq, sq, steps, alpha, *adam),
                    reference.lookahead_adam(w, g, m, sq, sq, steps, alpha, *adam)):
        close(a, b, dtype, "cuda lookahead_adam, several launches")
    first = ops.hyper_dot_adam(v, w, g, m, sq, sq, steps, *adam)
    torch.testing.assert_close(first, reference.hyper_dot_adam(v, w, g, m, sq, sq, steps, *adam), rtol=1e-4, atol=1e-3)
    assert torch.equal(ops.hyper_dot_adam(v, w, g, m, sq, sq, steps, *adam), first), msg("not deterministic")


@needs_ext
@pytest.mark.gpu
@needs_cuda
def test_cuda_list_ops_replay_in_a_cuda_graph():
    """Captured once, replayed on new values written into the same tensors: the chunk table
    travels in the kernel arguments, so a replay reads the new data."""
    shapes = [(33, 9), (65537,), (2,), (0,)]
    dtype = torch.float32
    w, g, v = tensors(shapes, dtype, "cuda"), tensors(shapes, dtype, "cuda"), tensors(shapes, dtype, "cuda")
    bufs = maybe_none(shapes, dtype, "cuda")
    alpha = torch.tensor(0.05, device="cuda")
    sgd = (0.9, 0.1, 1e-2, True, False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        ops.lookahead_sgd(w, g, bufs, alpha, *sgd)
        ops.hyper_dot_sgd(v, w, g, bufs, *sgd)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w_hat = ops.lookahead_sgd(w, g, bufs, alpha, *sgd)
        dot = ops.hyper_dot_sgd(v, w, g, bufs, *sgd)
    for trial in range(3):
        for t in w + g + v + [b for b in bufs if b is not None]:
            t.copy_(torch.randn_like(t))
        alpha.fill_(0.01 * (trial + 1))
        graph.replay()
        for a, b in zip(w_hat, reference.lookahead_sgd(w, g, bufs, alpha, *sgd)):
            close(a, b, dtype, f"graph replay {trial}: lookahead_sgd")
        torch.testing.assert_close(dot, reference.hyper_dot_sgd(v, w, g, bufs, *sgd), rtol=1e-5, atol=1e-3,
                                   msg=lambda s: msg(f"graph replay {trial}: hyper_dot_sgd: {s}"))


@needs_ext
@pytest.mark.parametrize("loss", [1.3, -0.7, float("nan"), float("inf")])
def test_mlrsnet_step_op_counters_match_reference(loss):
    """The op's ``ok`` output and its int64 counters [skipped, negative] == reference.count_step_."""
    h, c, weights = make_net(17, 1)
    x = torch.tensor(loss)
    expected = torch.tensor([3, 5], dtype=torch.int64)
    ok_ref = reference.mlrsnet_scheduler_step_(x, h.clone(), c.clone(), weights, torch.tensor(0.5),
                                               torch.tensor(0.1), [], [], expected)
    counters = torch.tensor([3, 5], dtype=torch.int64)
    ok = torch.tensor(not bool(ok_ref))
    ops.mlrsnet_step_(x, h.clone(), c.clone(), weights, torch.tensor(0.5), torch.tensor(0.1), [], [], ok, counters)
    assert bool(ok) == bool(ok_ref)
    assert counters.tolist() == expected.tolist()
    from autolr_fast import _C  # the fast entry counts in the same call

    fast = torch.tensor([3, 5], dtype=torch.int64)
    ok_fast = _C.mlrsnet_step_cpu(x, h.clone(), c.clone(), weights, torch.tensor(0.5), torch.tensor(0.1), [], [], fast)
    assert bool(ok_fast) == bool(ok_ref) and fast.tolist() == expected.tolist()


@needs_ext
@pytest.mark.parametrize("entry, bad", [(entry, bad) for entry in ("op", "fast")
                                        for bad in ("second_lr_int64", "lr_two_elements", "rate_bf16", "counters_int32",
                                                    "ok_float")
                                        if (entry, bad) != ("fast", "ok_float")])  # the fast entry returns ok
def test_mlrsnet_step_refuses_bad_outputs_before_touching_the_state(entry, bad):
    """Every output is checked before the first write: a refused call leaves h, c, rate, the lrs
    and the counters exactly as they were."""
    from autolr_fast import _C

    torch.manual_seed(SEED)
    h, c, weights = make_net(17, 1)
    rate = torch.tensor(0.1)
    lrs = [torch.tensor(0.1), torch.tensor(0.05)]
    counters, ok = torch.tensor([3, 5], dtype=torch.int64), torch.tensor(False)
    if bad == "second_lr_int64":
        lrs[1] = torch.tensor(1, dtype=torch.int64)
    elif bad == "lr_two_elements":
        lrs[1] = torch.zeros(2)
    elif bad == "rate_bf16":
        rate = rate.to(torch.bfloat16)
    elif bad == "counters_int32":
        counters = counters.to(torch.int32)
    elif bad == "ok_float":
        ok = torch.tensor(0.0)
    before = [t.clone() for t in (h, c, rate, *lrs, counters)]
    args = (torch.tensor(1.3), h, c, weights, torch.tensor(0.5), rate, lrs, [1.0, 0.5])
    with pytest.raises(RuntimeError, match="lrs|rate|counters|ok"):
        if entry == "op":
            torch.ops.autolr_fast.mlrsnet_step_(*args, ok, counters)
        else:
            _C.mlrsnet_step_cpu(*args, counters)
    for a, b in zip((h, c, rate, *lrs, counters), before):
        assert torch.equal(a, b), "a refused call changed the state"


@needs_ext
def test_a_stale_extension_is_not_loaded(tmp_path, monkeypatch):
    """An extension whose recorded sources differ from the checkout's is refused before it is
    loaded (its kernels would register against schemas they may not match), with a warning
    that says to rebuild; a matching record passes; an installed wheel (no sources) is not checked."""
    from autolr_fast.ops import library, sources_digest

    ops = tmp_path / "csrc_ops"
    ops.mkdir()
    (ops / "kernel.cpp").write_text("int f() { return 1; }\n")
    ext = tmp_path / "_C.so"
    ext.write_bytes(b"")
    assert "no record" in sources_digest.stale_reason(ext, ops)
    sources_digest.sidecar_of(ext).write_text(sources_digest.sources_digest(ops) + "\n")
    assert sources_digest.stale_reason(ext, ops) is None
    (ops / "kernel.cpp").write_text("int f() { return 2; }\n")
    assert "other sources" in sources_digest.stale_reason(ext, ops)
    assert sources_digest.stale_reason(ext, tmp_path / "no_sources") is None

    monkeypatch.setattr(library, "OPS_SOURCES", ops)  # the checkout's sources changed since the build
    with pytest.warns(RuntimeWarning, match="stale build.*rebuild"):
        module, detail = library._load_extension()
    assert module is None and "not loaded" in detail


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpp", marks=needs_ext)])
def test_scales_pair_with_lr_tensors_the_same_way_everywhere(impl):
    """Extra scales are ignored (the scheduler passes its scales with no lr tensors when the
    optimizer keeps float lrs); an lr tensor without a scale is refused before any write."""
    step = reference.mlrsnet_scheduler_step_ if impl == "reference" else _cpp_backend.mlrsnet_step_
    torch.manual_seed(SEED)
    h, c, weights = make_net(17, 1)
    rate, lrs = torch.tensor(0.1), [torch.tensor(0.1)]
    step(torch.tensor(1.3), h, c, weights, torch.tensor(0.5), rate, lrs, [0.5, 2.0])
    torch.testing.assert_close(lrs[0], rate * 0.5)
    before = [t.clone() for t in (h, c, rate)]
    with pytest.raises((ValueError, RuntimeError), match="scale"):
        step(torch.tensor(1.3), h, c, weights, torch.tensor(0.5), rate, lrs * 2, [1.0])
    assert all(torch.equal(a, b) for a, b in zip((h, c, rate), before))


_WITHOUT_EXTENSION = """
import importlib.util, torch
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name == "autolr_fast._C" else find_spec(name, *a, **k)
from autolr_fast.ops import library
importlib.util.find_spec = find_spec
assert library.EXTENSION is None, library.EXTENSION_DETAIL
ops = torch.ops.autolr_fast
w, g, b = torch.randn(4, 3).t(), torch.randn(3, 4), torch.randn(3, 4)  # w is not contiguous
steps, alpha = [torch.tensor(3.0)], torch.tensor(0.1)
cases = {"lookahead": ([w], [g], alpha), "lookahead_sgd": ([w], [g], [b], alpha, 0.9, 0.0, 1e-4, True),
         "lookahead_adam": ([w], [g], [b], [b.abs()], [None], steps, alpha, 0.9, 0.99, 1e-8, 0.01, True)}
for name, args in cases.items():
    torch.library.opcheck(getattr(ops, name).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                      "test_autograd_registration"))
out = ops.lookahead([w.detach().requires_grad_()], [g], alpha)[0]
try:
    out.sum().backward()
except RuntimeError as e:
    assert "derivative for autolr_fast::lookahead is not implemented" in str(e), e
else:
    raise AssertionError("backward through the reference lookahead did not raise")
print("ok")
"""


def test_the_reference_kernels_keep_the_fake_kernels_promises_without_the_extension():
    """Without autolr_fast._C the references are the CPU kernels: their outputs must have the
    strides the fake kernels promise (contiguous), or torch.compile traces the wrong layout."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# Bad arguments: the references refuse what the C++ kernels refuse, with the same message
# ------------------------------------------------------------------------------------------------
def _bad_list_calls():
    w, a = [torch.randn(3), torch.randn(2, 2)], torch.tensor(0.1)
    sgd, adam = (0.9, 0.0, 0.0, False), (0.9, 0.999, 1e-8, 0.0, False)
    none, steps = [None, None], [torch.tensor(1.0)] * 2
    short, f64 = [torch.randn(3)], [torch.randn(3).double(), torch.randn(2, 2)]
    shape, ints = [torch.randn(3), torch.randn(4)], [torch.arange(3), torch.arange(4).view(2, 2)]
    return {
        "lookahead, dirs short": ("lookahead", (w, short, a)),
        "lookahead, dirs dtype": ("lookahead", (w, f64, a)),
        "lookahead, dirs shape": ("lookahead", (w, shape, a)),
        "lookahead, empty": ("lookahead", ([], [], a)),
        "lookahead, int params": ("lookahead", (ints, ints, a)),
        "hyper_dot, b short": ("hyper_dot", (w, short)),
        "hyper_dot, b dtype": ("hyper_dot", (w, f64)),
        "lookahead_sgd, grads short": ("lookahead_sgd", (w, short, none, a, *sgd)),
        "lookahead_sgd, buffer shape": ("lookahead_sgd", (w, w, [None, torch.randn(5)], a, *sgd)),
        "lookahead_sgd, buffers short": ("lookahead_sgd", (w, w, [None], a, *sgd)),
        "hyper_dot_sgd, val_grads dtype": ("hyper_dot_sgd", (f64, w, w, none, *sgd)),
        "lookahead_adam, exp_avgs short": ("lookahead_adam", (w, w, [None], none, none, steps, a, *adam)),
        "lookahead_adam, exp_avg_sqs dtype": ("lookahead_adam", (w, w, none, [None, torch.randn(2, 2).double()],
                                                                 none, steps, a, *adam)),
        "hyper_dot_adam, val_grads shape": ("hyper_dot_adam", (shape, w, w, none, none, none, steps, *adam)),
        "lookahead_adam, steps short": ("lookahead_adam", (w, w, none, none, none, steps[:1], a, *adam)),
        "lookahead_adam, steps and exp_avgs short": ("lookahead_adam", (w, w, [None], none, none, steps[:1], a,
                                                                        *adam)),
        "hyper_dot_adam, a step of 2 elements": ("hyper_dot_adam", (w, w, w, none, none, none,
                                                                    [torch.ones(2), torch.ones(1)], *adam)),
        "lookahead, alpha of 2 elements": ("lookahead", (w, w, torch.ones(2))),
        "lookahead_sgd, alpha of 2 elements": ("lookahead_sgd", (w, w, none, torch.ones(2), *sgd)),
        "lookahead_adam, alpha of 2 elements": ("lookahead_adam", (w, w, none, none, none, steps, torch.ones(2),
                                                                   *adam)),
    }


@pytest.mark.parametrize("case", list(_bad_list_calls()))
def test_reference_list_ops_refuse_what_the_kernels_refuse(case):
    op, args = _bad_list_calls()[case]
    with pytest.raises(RuntimeError) as ref_error:
        getattr(reference, op)(*args)
    assert str(ref_error.value).startswith(f"{op}: ")
    if ops is not None:
        with pytest.raises(RuntimeError) as cpp_error:
            getattr(ops, op)(*args)
        assert str(cpp_error.value).split("\n")[0] == str(ref_error.value), case


def test_reference_hyper_dot_refuses_empty_lists():
    # the C++ ops cannot be reached with no tensor argument: torch's dispatcher refuses first
    for op, args in (("hyper_dot", ([], [])), ("hyper_dot_sgd", ([], [], [], [], 0.9, 0.0, 0.0, False))):
        with pytest.raises(RuntimeError, match="needs at least one tensor"):
            getattr(reference, op)(*args)
