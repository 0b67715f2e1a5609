"""The C++/CUDA ops of ``autolr_fast._C`` as a dispatch backend.

Importing this module loads the compiled extension (which registers the ``autolr_fast_C``
ops with torch's dispatcher), registers the fake (meta) kernels that let ``torch.compile``
trace the ops, and tells :mod:`autolr_fast.dispatch` what is available:

* backend ``"cpp"`` on the CPU: every op, including the MLR-SNet step;
* backend ``"cpp_cuda"`` on CUDA (only when the extension was compiled with its CUDA
  kernels): the multi-tensor look-ahead / hyper-dot ops. The GPU controller step is the
  Triton backend's job.

Without a built extension the backends are registered as unavailable, with the reason.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import dispatch, reference

OPS_NAMESPACE = "autolr_fast_C"
LIST_OPS = ("lookahead", "hyper_dot", "lookahead_sgd", "hyper_dot_sgd", "lookahead_adam", "hyper_dot_adam")
STEP_OPS = ("mlrsnet_step_", "mlrsnet_param_grads")

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    AVAILABLE = True
    _step_op = torch.ops.autolr_fast_C.mlrsnet_step_.default
    _step_fast = _C.mlrsnet_step_cpu
    _is_compiling = torch.compiler.is_compiling
    DETAIL = f"autolr_fast._C loaded from {_C.__file__}"
except ImportError as exc:  # not built, or built against another torch
    AVAILABLE = False
    DETAIL = (f"autolr_fast._C is not importable ({exc}); build it with "
              "`python setup.py build_ext --inplace` or `pip install --no-build-isolation .`")


def built_with_cuda() -> bool:
    """Whether the loaded extension has CUDA kernels (decided at build time, not by the GPU)."""
    return AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(f"{OPS_NAMESPACE}::lookahead", "CUDA")


# ------------------------------------------------------------------------------------------------
# Fake kernels (shapes/dtypes only) for torch.compile / FakeTensor tracing.
# ------------------------------------------------------------------------------------------------
def _like_all(xs: Sequence[Tensor]) -> list[Tensor]:
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


def _scalar_f32(like: Tensor) -> Tensor:
    return like.new_empty((), dtype=torch.float32)


def _register_fakes() -> None:
    reg = torch.library.register_fake
    ns = OPS_NAMESPACE

    @reg(f"{ns}::lookahead")
    def _(params, dirs, alpha):
        return _like_all(params)

    @reg(f"{ns}::hyper_dot")
    def _(a, b):
        return _scalar_f32(a[0])

    @reg(f"{ns}::lookahead_sgd")
    def _(params, grads, momentum_buffers, alpha, momentum, dampening, weight_decay, nesterov, maximize=False):
        return _like_all(params)

    @reg(f"{ns}::hyper_dot_sgd")
    def _(val_grads, params, grads, momentum_buffers, momentum, dampening, weight_decay, nesterov, maximize=False):
        return _scalar_f32(params[0])

    @reg(f"{ns}::lookahead_adam")
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, alpha, beta1, beta2, eps, weight_decay,
          decoupled, maximize=False):
        return _like_all(params)

    @reg(f"{ns}::hyper_dot_adam")
    def _(val_grads, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, beta1, beta2, eps, weight_decay,
          decoupled, maximize=False):
        return _scalar_f32(params[0])

    @reg(f"{ns}::mlrsnet_step_")
    def _(loss, h, c, weights, gamma, rate, lrs, scales):
        return h.new_empty((), dtype=torch.bool)

    @reg(f"{ns}::mlrsnet_param_grads")
    def _(loss, h, c, weights, grad_p):
        return _like_all(weights)


# ------------------------------------------------------------------------------------------------
# Callables for dispatch (argument conventions of autolr_fast.dispatch / reference).
# ------------------------------------------------------------------------------------------------
def _as_scalar_tensor(x, dtype=torch.float64) -> Tensor:
    return x if isinstance(x, Tensor) else torch.tensor(float(x), dtype=dtype)


def mlrsnet_step_(loss, h, c, weights, gamma, rate, lr_list, scales, counters=None) -> Tensor:
    # Called every training step. Eager: the kernel straight from Python (the dispatcher's
    # argument conversion costs more than the step); it answers NotImplemented for anything
    # but plain CPU-side tensors/Parameters. Under torch.compile, and for those cases: the op.
    # The kernel is float32-only (the controller's dtype); float64 runs use the reference.
    # The counters (host memory here) are updated with two tiny ops after the kernel.
    if h.dtype is not torch.float32:
        return reference.mlrsnet_scheduler_step_(loss, h, c, weights, gamma, rate, lr_list, scales, counters)
    ok = NotImplemented
    if not _is_compiling():
        ok = _step_fast(loss, h, c, weights, gamma, rate, lr_list, scales)
    if ok is NotImplemented:
        ok = _step_op(loss, h, c, weights, gamma, rate, lr_list, scales)
    if counters is not None:
        _count_step_on_host(counters, loss, ok)
    return ok


def _count_step_on_host(counters: Tensor, loss: Tensor, ok: Tensor) -> None:
    """:func:`reference.count_step_` for CPU tensors, read and written through NumPy views
    (host memory: no device involved; a dozen torch dispatches cost more than the step)."""
    if counters.device.type != "cpu" or loss.device.type != "cpu" or not counters.is_contiguous():
        reference.count_step_(counters, loss, ok)
        return
    x = loss.detach().reshape(())
    v = float((x if x.dtype == torch.float32 else x.to(torch.float32)).numpy())
    view = counters.numpy()
    view[0] += 0 if ok.numpy() else 1
    view[1] += 1 if (v < 0.0 and v == v and v != float("-inf")) else 0


def mlrsnet_param_grads(loss, h, c, weights, grad_p) -> list[Tensor]:
    if h.dtype is not torch.float32:  # float32-only kernel (e.g. float64 finite-difference checks)
        return reference.mlrsnet_param_grads(loss, h, c, weights, grad_p)
    return list(torch.ops.autolr_fast_C.mlrsnet_param_grads(loss, h, c, list(weights), grad_p))


def lookahead(params, directions, alpha) -> list[Tensor]:
    return list(torch.ops.autolr_fast_C.lookahead(list(params), list(directions), _as_scalar_tensor(alpha)))


def hyper_dot(a, b) -> Tensor:
    return torch.ops.autolr_fast_C.hyper_dot(list(a), list(b))


def lookahead_sgd(params, grads, momentum_buffers, alpha, momentum, dampening, weight_decay, nesterov,
                  maximize=False) -> list[Tensor]:
    return list(torch.ops.autolr_fast_C.lookahead_sgd(
        list(params), list(grads), list(momentum_buffers), _as_scalar_tensor(alpha), float(momentum),
        float(dampening), float(weight_decay), bool(nesterov), bool(maximize)))


def hyper_dot_sgd(val_grads, params, grads, momentum_buffers, momentum, dampening, weight_decay, nesterov,
                  maximize=False) -> Tensor:
    return torch.ops.autolr_fast_C.hyper_dot_sgd(
        list(val_grads), list(params), list(grads), list(momentum_buffers), float(momentum), float(dampening),
        float(weight_decay), bool(nesterov), bool(maximize))


def lookahead_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, alpha, beta1, beta2, eps,
                   weight_decay, decoupled, maximize=False) -> list[Tensor]:
    return list(torch.ops.autolr_fast_C.lookahead_adam(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
        _as_scalar_tensor(step), _as_scalar_tensor(alpha), float(beta1), float(beta2), float(eps),
        float(weight_decay), bool(decoupled), bool(maximize)))


def hyper_dot_adam(val_grads, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, beta1, beta2, eps,
                   weight_decay, decoupled, maximize=False) -> Tensor:
    return torch.ops.autolr_fast_C.hyper_dot_adam(
        list(val_grads), list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
        _as_scalar_tensor(step), float(beta1), float(beta2), float(eps), float(weight_decay), bool(decoupled),
        bool(maximize))


_ALL = {name: globals()[name] for name in STEP_OPS + LIST_OPS}

if AVAILABLE:
    _register_fakes()
    dispatch.register_backend("cpp", available=True, detail=DETAIL, devices=["cpu"], ops=_ALL)
    if built_with_cuda():
        dispatch.register_backend("cpp_cuda", available=True, detail=DETAIL + " (with CUDA kernels)",
                                  devices=["cuda"], ops={k: _ALL[k] for k in LIST_OPS})
    else:
        dispatch.register_backend("cpp_cuda", available=False, detail="autolr_fast._C was built without CUDA kernels",
                                  devices=["cuda"], ops={})
else:
    dispatch.register_backend("cpp", available=False, detail=DETAIL, devices=["cpu"], ops={})
