"""The C++/CUDA kernels of ``autolr_fast._C`` as a dispatch backend.

The kernels are registered behind the ops of :mod:`autolr_fast.ops.library`; this module tells
:mod:`autolr_fast.ops.dispatch` what is available (``BACKENDS``) and adapts the dispatch conventions to them:

* backend ``"cpp"`` on the CPU: every op, the MLR-SNet step included;
* backend ``"cpp_cuda"`` on CUDA (only when the extension was compiled with its CUDA kernels):
  the multi-tensor look-ahead / hyper-dot ops. The GPU controller step is the Triton backend's.

Without a built extension the backends are registered as unavailable, with the reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import library, reference

LIST_OPS = ("lookahead", "hyper_dot", "lookahead_sgd", "hyper_dot_sgd", "lookahead_adam", "hyper_dot_adam")
STEP_OPS = ("mlrsnet_step_", "mlrsnet_param_grads")
AVAILABLE = library.EXTENSION is not None
DETAIL = library.EXTENSION_DETAIL
_ops = torch.ops.autolr_fast
if AVAILABLE:
    _step_op = _ops.mlrsnet_step_.default
    _step_fast = library.EXTENSION.mlrsnet_step_cpu
_is_compiling = torch.compiler.is_compiling


def built_with_cuda() -> bool:
    """Whether the loaded extension has CUDA kernels (decided at build time, not by the GPU)."""
    return AVAILABLE and library.has_kernel("lookahead", "CUDA")


# ------------------------------------------------------------------------------------------------
# Callables for dispatch (argument conventions of autolr_fast.dispatch / reference).
# ------------------------------------------------------------------------------------------------
def _as_scalar_tensor(x, dtype=torch.float64) -> Tensor:
    return x if isinstance(x, Tensor) else torch.tensor(float(x), dtype=dtype)


def _step_tensors(steps, n: int) -> list[Tensor]:
    """One step tensor per parameter (a single tensor or number stands for all of them)."""
    return [_as_scalar_tensor(s) for s in reference.per_parameter_steps(steps, n)]


def mlrsnet_step_(loss, h, c, weights, gamma, rate, lr_list, scales, counters=None, ok=None) -> Tensor:
    if ok is not None:  # dispatch's optional output (the GPU path's convention; a copy here)
        return ok.copy_(mlrsnet_step_(loss, h, c, weights, gamma, rate, lr_list, scales, counters))
    # Called every training step. Eager: the kernel straight from Python (the dispatcher's
    # argument conversion costs more than the step); it answers NotImplemented for anything
    # but plain CPU-side tensors/Parameters. Under torch.compile, and for those cases: the op.
    # The kernel is float32-only (the controller's dtype); float64 runs use the reference.
    # The fast entry updates the counters (host memory here) in the same call.
    if h.dtype is not torch.float32:
        return reference.mlrsnet_scheduler_step_(loss, h, c, weights, gamma, rate, lr_list, scales, counters)
    ok = NotImplemented
    if not _is_compiling():
        ok = _step_fast(loss, h, c, weights, gamma, rate, lr_list, scales, counters)
    if ok is NotImplemented:
        ok = torch.empty((), dtype=torch.bool, device=h.device)
        _step_op(loss, h, c, list(weights), gamma, rate, list(lr_list), [float(s) for s in scales], ok, counters)
    return ok


def mlrsnet_param_grads(loss, h, c, weights, grad_p) -> list[Tensor]:
    if h.dtype is not torch.float32:  # float32-only kernel (e.g. float64 finite-difference checks)
        return reference.mlrsnet_param_grads(loss, h, c, weights, grad_p)
    return list(_ops.mlrsnet_param_grads(loss, h, c, list(weights), grad_p))


def lookahead(params, directions, alpha) -> list[Tensor]:
    return list(_ops.lookahead(list(params), list(directions), _as_scalar_tensor(alpha)))


def hyper_dot(a, b) -> Tensor:
    return _ops.hyper_dot(list(a), list(b))


def lookahead_sgd(params, grads, momentum_buffers, alpha, momentum, dampening, weight_decay, nesterov,
                  maximize=False) -> list[Tensor]:
    return list(_ops.lookahead_sgd(
        list(params), list(grads), list(momentum_buffers), _as_scalar_tensor(alpha), float(momentum),
        float(dampening), float(weight_decay), bool(nesterov), bool(maximize)))


def hyper_dot_sgd(val_grads, params, grads, momentum_buffers, momentum, dampening, weight_decay, nesterov,
                  maximize=False) -> Tensor:
    return _ops.hyper_dot_sgd(
        list(val_grads), list(params), list(grads), list(momentum_buffers), float(momentum), float(dampening),
        float(weight_decay), bool(nesterov), bool(maximize))


def lookahead_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, alpha, beta1, beta2, eps,
                   weight_decay, decoupled, maximize=False) -> list[Tensor]:
    return list(_ops.lookahead_adam(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
        _step_tensors(steps, len(params)), _as_scalar_tensor(alpha), float(beta1), float(beta2), float(eps),
        float(weight_decay), bool(decoupled), bool(maximize)))


def hyper_dot_adam(val_grads, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, beta1, beta2, eps,
                   weight_decay, decoupled, maximize=False) -> Tensor:
    return _ops.hyper_dot_adam(
        list(val_grads), list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
        _step_tensors(steps, len(params)), float(beta1), float(beta2), float(eps), float(weight_decay), bool(decoupled),
        bool(maximize))


_ALL = {name: globals()[name] for name in STEP_OPS + LIST_OPS}

# what autolr_fast.ops.dispatch registers: (name, available, detail, devices, ops)
if AVAILABLE:
    BACKENDS = [("cpp", True, DETAIL, ["cpu"], _ALL)]
    if built_with_cuda():
        BACKENDS.append(("cpp_cuda", True, DETAIL + " (with CUDA kernels)", ["cuda"], {k: _ALL[k] for k in LIST_OPS}))
    else:
        BACKENDS.append(("cpp_cuda", False, "autolr_fast._C was built without CUDA kernels", ["cuda"], {}))
else:
    BACKENDS = [("cpp", False, DETAIL, ["cpu"], {})]
