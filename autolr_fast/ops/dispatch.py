"""Op dispatch: pick the fastest available implementation of each controller computation.

* CUDA tensors: the Triton kernels and the CUDA ops of the C++ extension, when built/importable;
* CPU tensors: the C++ ops of the extension, when built;
* otherwise, or when ``AUTOLR_FAST_FORCE_REFERENCE=1``: the plain PyTorch references of
  :mod:`autolr_fast.ops.reference` (``REFERENCES``).

The backends (:mod:`.cpp_backend`, :mod:`.triton_backend`) are imported on first use, so a
missing or broken optional dependency never breaks the package; each lists what it offers in
its ``BACKENDS``. The scheduler and the meta-step only ever call the functions of this module.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import reference

FORCE_REFERENCE_ENV = "AUTOLR_FAST_FORCE_REFERENCE"
BACKEND_MODULES = ("autolr_fast.ops.cpp_backend", "autolr_fast.ops.triton_backend")

# op name -> its plain PyTorch reference (same arguments as the dispatch function below; a
# backend's mlrsnet_step_ also takes the ``ok`` output, or None, after ``counters``)
REFERENCES: dict[str, Callable] = {
    "mlrsnet_step_": reference.mlrsnet_scheduler_step_,
    "mlrsnet_param_grads": reference.mlrsnet_param_grads,
    "lookahead_sgd": reference.lookahead_sgd_unchecked,
    "hyper_dot_sgd": reference.hyper_dot_sgd_unchecked,
    "lookahead_adam": reference.lookahead_adam_unchecked,
    "hyper_dot_adam": reference.hyper_dot_adam_unchecked,
}

# name -> {"available": bool, "detail": str, "devices": set[str], "ops": {op_name: callable}}
_BACKENDS: dict[str, dict] = {}
# (op, device type) -> (backend_name, fn); emptied whenever a backend registers
_SELECTED: dict[tuple[str, str], tuple[str, Callable | None]] = {}
_loaded = False


def register_backend(name: str, *, available: bool, detail: str, devices: Sequence[str],
                     ops: dict[str, Callable]) -> None:
    """Make a fast path known to the dispatcher."""
    _BACKENDS[name] = {"available": available, "detail": detail, "devices": set(devices), "ops": dict(ops)}
    _SELECTED.clear()


# os.environ's own mapping of encoded names (CPython's os module): a lookup there costs a tenth
# of os.environ.get, which encodes and decodes on every call; select() asks on every step
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_FORCE_KEY = os.environ.encodekey(FORCE_REFERENCE_ENV) if hasattr(os.environ, "encodekey") else None


def force_reference() -> bool:
    if _ENVIRON_DATA is not None and _FORCE_KEY is not None and _FORCE_KEY not in _ENVIRON_DATA:
        return False  # unset: the common case, answered without decoding
    return os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0", "false", "False")


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BACKEND_MODULES:
        try:
            backends = importlib.import_module(module).BACKENDS
        except ImportError as exc:
            backends = [(module.rsplit(".", 1)[-1], False, f"{module} not importable: {exc}", [], {})]
        for name, available, detail, devices, ops in backends:
            register_backend(name, available=available, detail=detail, devices=devices, ops=ops)


def select(op: str, device: torch.device) -> tuple[str, Callable | None]:
    """``(backend_name, fn)`` for ``op`` on ``device``; ``("reference", None)`` if none fits.
    Asked every step: the choice per device type is remembered (``AUTOLR_FAST_FORCE_REFERENCE``
    is still read on every call)."""
    if force_reference():
        return "reference", None
    key = (op, device.type)
    choice = _SELECTED.get(key)
    if choice is None:
        _ensure_loaded()
        choice = "reference", None
        for name, backend in _BACKENDS.items():
            if backend["available"] and device.type in backend["devices"] and op in backend["ops"]:
                choice = name, backend["ops"][op]
                break
        _SELECTED[key] = choice
    return choice


def backend_info() -> dict:
    """What was built, what is importable, and which backend each op uses per device."""
    _ensure_loaded()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "force_reference": force_reference(),
        "backends": {k: {"available": v["available"], "detail": v["detail"], "devices": sorted(v["devices"])}
                     for k, v in _BACKENDS.items()},
        "in_use": {dev: {op: select(op, torch.device(dev))[0] for op in REFERENCES} for dev in devices},
    }


def _call(op: str, device: torch.device, *args):
    """``op`` on the fast path selected for ``device``, else its reference."""
    _, fn = select(op, device)
    return (fn or REFERENCES[op])(*args)


# --------------------------------------------------------------------------------------------
# Controller step
# --------------------------------------------------------------------------------------------
write_rates = reference.write_rates  # the scheduler writes rates through the dispatcher module


def mlrsnet_step_(
    loss: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Sequence[Tensor],
    gamma: Tensor,
    rate: Tensor,
    lr_list: Sequence[Tensor],
    scales: Sequence[float],
    counters: Tensor | None = None,
    ok: Tensor | None = None,
) -> Tensor:
    """The scheduler's MLR-SNet step, in place: updates ``h``, ``c``, ``rate``, the ``lr``
    tensors and (if given) the int64 ``counters`` ``[skipped, negative]``; returns ``ok`` (0-dim
    bool: False when the loss or the output was not finite and everything was left as it was),
    written into ``ok`` if given (a 0-dim bool tensor on the device: no allocation per step).
    See :func:`reference.mlrsnet_scheduler_step_`. One launch on the Triton path."""
    _, fn = select("mlrsnet_step_", loss.device)
    if fn is not None:
        return fn(loss, h, c, weights, gamma, rate, lr_list, scales, counters, ok)
    result = reference.mlrsnet_scheduler_step_(loss, h, c, weights, gamma, rate, lr_list, scales, counters)
    return result if ok is None else ok.copy_(result)


def mlrsnet_param_grads(loss: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor], grad_p: Tensor) -> list[Tensor]:
    """``grad_p * dp/dtheta`` (one-step truncation); see :func:`reference.mlrsnet_param_grads`."""
    return _call("mlrsnet_param_grads", loss.device, loss, h, c, weights, grad_p)


# --------------------------------------------------------------------------------------------
# Meta-step: look-ahead and hypergradient dot product with the optimizer's exact direction
# --------------------------------------------------------------------------------------------
def lookahead_sgd(params, grads, momentum_buffers, alpha, momentum, dampening, weight_decay, nesterov, maximize=False):
    """``w_hat = w - alpha * d`` with SGD's exact next direction; see :mod:`.reference`."""
    return _call("lookahead_sgd", params[0].device, list(params), list(grads), list(momentum_buffers),
                 alpha, momentum, dampening, weight_decay, nesterov, maximize)


def hyper_dot_sgd(val_grads, params, grads, momentum_buffers, momentum, dampening, weight_decay, nesterov,
                  maximize=False):
    """``sum_i <g_val_i, d_i>`` with SGD's exact next direction; see :mod:`.reference`."""
    return _call("hyper_dot_sgd", params[0].device, list(val_grads), list(params), list(grads),
                 list(momentum_buffers), momentum, dampening, weight_decay, nesterov, maximize)


def lookahead_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, alpha, beta1, beta2, eps,
                   weight_decay, decoupled, maximize=False):
    """``w_hat = w - alpha * d`` with Adam/AdamW's exact next direction, ``steps`` each parameter's
    stored step count; see :func:`.reference.adam_directions`."""
    return _call("lookahead_adam", params[0].device, list(params), list(grads), list(exp_avgs),
                 list(exp_avg_sqs), list(max_exp_avg_sqs), steps, alpha, beta1, beta2, eps,
                 weight_decay, decoupled, maximize)


def hyper_dot_adam(val_grads, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, beta1, beta2, eps,
                   weight_decay, decoupled, maximize=False):
    """``sum_i <g_val_i, d_i>`` with Adam/AdamW's exact next direction, ``steps`` each parameter's
    stored step count; see :func:`.reference.adam_directions`."""
    return _call("hyper_dot_adam", params[0].device, list(val_grads), list(params), list(grads),
                 list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), steps, beta1, beta2, eps,
                 weight_decay, decoupled, maximize)


def main(argv: list[str] | None = None) -> int:
    """``python -m autolr_fast info``: print :func:`backend_info` as JSON."""
    import argparse

    argparse.ArgumentParser(prog="python -m autolr_fast info", description="which implementation each op uses, "
                            "and what was built, as JSON").parse_args(argv)
    print(json.dumps(backend_info(), indent=2))
    return 0
