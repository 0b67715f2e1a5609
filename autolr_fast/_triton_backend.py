"""Triton backend: the MLR-SNet step and its weight gradient as ``torch.library`` ops.

Two operators in the ``autolr_fast`` namespace, defined with ``torch.library.define`` and an
implementation per device (plus a fake for tracing), so that they work under
``torch.compile`` (``fullgraph=True``) and inside CUDA graphs, and pass
``torch.library.opcheck``:

* ``torch.ops.autolr_fast.mlrsnet_step_(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters=None)``
  (returns nothing; mutates ``h``, ``c``, ``rate``, every ``lr_list[k]`` and ``ok``): the
  guarded scheduler step of :func:`autolr_fast.reference.mlrsnet_guarded_step` with
  ``lr_k <- rate * scales[k]``; ``ok`` (0-dim bool) receives whether the step was taken.
* ``torch.ops.autolr_fast.mlrsnet_param_grads(loss, h, c, weights, grad_p) -> Tensor[]``:
  ``grad_p * dp/dtheta`` per weight tensor (:func:`autolr_fast.reference.mlrsnet_param_grads`).

CPU: the plain PyTorch reference (for the gradient: :func:`param_grads_explicit`, the
reference's math without autograd, which cannot record inside an operator). CUDA: one Triton launch (``autolr_fast.kernels``), or the
reference where the kernels do not take the input (e.g. more than 2 stacked cells, ``H > 128``,
float64 weights; a warning says why, once per reason). The ``step`` op takes its ``ok`` output
as an argument so that it allocates nothing; :func:`mlrsnet_step_` (what ``dispatch`` calls)
allocates that 1-byte flag.

Importing this module registers the backend ``"triton"`` with :mod:`autolr_fast.dispatch`
(CUDA tensors only); it is available when triton and the kernels import and torch is a CUDA
build.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor

from . import dispatch, reference

__all__ = ["STEP_OP", "PARAM_GRADS_OP", "mlrsnet_step_", "mlrsnet_param_grads", "param_grads_explicit", "AVAILABLE", "DETAIL"]

NAMESPACE = "autolr_fast"
STEP_OP = f"{NAMESPACE}::mlrsnet_step_"
PARAM_GRADS_OP = f"{NAMESPACE}::mlrsnet_param_grads"
STEP_SCHEMA = (
    "(Tensor loss, Tensor(a!) h, Tensor(b!) c, Tensor[] weights, Tensor gamma, Tensor(c!) rate, "
    "Tensor(d!)[] lr_list, float[] scales, Tensor(e!) ok, Tensor(f!)? counters=None) -> ()"
)
PARAM_GRADS_SCHEMA = "(Tensor loss, Tensor h, Tensor c, Tensor[] weights, Tensor grad_p) -> Tensor[]"

# -- the kernels (optional) ---------------------------------------------------------------------
try:
    import triton

    from autolr_fast.kernels import mlrsnet_step as _kernels

    _KERNEL_DETAIL = f"triton {triton.__version__}, kernels from {_kernels.__name__}"
except Exception as exc:  # noqa: BLE001 - any import failure means: no Triton path
    _kernels = None
    _KERNEL_DETAIL = f"triton kernels not importable: {type(exc).__name__}: {exc}"

if _kernels is not None:
    # the step's per-call layout check, compiled when the extension is built (~0.5 us, not ~3.5)
    try:
        from ._C import tensor_layout_key as _tensor_layout_key
    except ImportError:
        pass
    else:
        _kernels.use_layout_key(_tensor_layout_key)

AVAILABLE = _kernels is not None and torch.version.cuda is not None
DETAIL = _KERNEL_DETAIL if torch.version.cuda is not None else f"{_KERNEL_DETAIL}; torch is not a CUDA build"

_warned: set[str] = set()


def _fallback_warning(op: str, reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"autolr_fast {op}: the Triton kernel does not take this input ({reason}); "
                      "using the PyTorch reference", stacklevel=3)


# -- implementations ----------------------------------------------------------------------------
def _step_reference(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters=None) -> None:
    ok.copy_(reference.mlrsnet_scheduler_step_(loss, h, c, weights, gamma, rate, lr_list, scales, counters))


def _step_cuda(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters=None) -> None:
    reason = "triton kernels not importable" if _kernels is None else _kernels.launch_step_if_supported(
        loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters)
    if reason is not None:
        _fallback_warning("mlrsnet_step_", reason)
        with torch.no_grad():
            _step_reference(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters)


def param_grads_explicit(loss: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor], grad_p: Tensor) -> list[Tensor]:
    """:func:`reference.mlrsnet_param_grads` with the backward written out in plain torch ops.

    The op's CPU implementation. ``reference.mlrsnet_param_grads`` runs autograd, which does
    not record inside an operator implementation entered from a dispatch mode (opcheck's
    schema check, FlopCounterMode, ...); this does the same math without autograd (the math of
    the Triton kernel too) and is tested against the autograd version.
    """
    num_layers, hidden = h.shape
    if len(weights) != reference.WEIGHTS_PER_CELL * num_layers + 2:
        raise ValueError(f"expected {reference.WEIGHTS_PER_CELL * num_layers + 2} weight tensors for "
                         f"{num_layers} cell(s), got {len(weights)}")
    x = loss.detach().reshape(1).to(h.dtype)
    saved = []
    for layer in range(num_layers):
        w0, b0, w2, b2, v0, d0, v2, d2 = weights[8 * layer: 8 * layer + 8]
        a1 = torch.mv(w0, x) + b0
        a2 = torch.mv(v0, h[layer]) + d0
        r1, r2 = torch.relu(a1), torch.relu(a2)
        z = torch.mv(w2, r1) + b2 + (torch.mv(v2, r2) + d2)
        zi, zf, zo, zg = z.chunk(4)
        gi, gf, go, gg = torch.sigmoid(zi), torch.sigmoid(zf - 1.0), torch.sigmoid(zo), torch.tanh(zg)
        c_new = gf * c[layer] + gi * gg
        tc = torch.tanh(c_new)
        saved.append((x, a1, a2, r1, r2, gi, gf, go, gg, tc))
        x = go * tc
    head_w, head_b = weights[-2], weights[-1]
    p = torch.sigmoid(torch.dot(head_w[0], x) + head_b[0])
    dlogit = grad_p.reshape(()).to(p.dtype) * (1.0 - p) * p
    grads: list[Tensor] = [torch.empty(0)] * len(weights)
    grads[-2] = (dlogit * x).reshape(1, hidden)
    grads[-1] = dlogit.reshape(1)
    dh = dlogit * head_w[0]
    for layer in reversed(range(num_layers)):
        w0, _, w2, _, _, _, v2, _ = weights[8 * layer: 8 * layer + 8]
        x, a1, a2, r1, r2, gi, gf, go, gg, tc = saved[layer]
        do = dh * tc
        dc = dh * go * (1.0 - tc * tc)
        dz = torch.cat([dc * gg * gi * (1.0 - gi), dc * c[layer] * gf * (1.0 - gf),
                        do * go * (1.0 - go), dc * gi * (1.0 - gg * gg)])
        zero = torch.zeros((), dtype=dz.dtype)
        da1 = torch.where(a1 > 0, torch.mv(w2.t(), dz), zero)
        da2 = torch.where(a2 > 0, torch.mv(v2.t(), dz), zero)
        grads[8 * layer: 8 * layer + 8] = [
            torch.outer(da1, x), da1, torch.outer(dz, r1), dz,
            torch.outer(da2, h[layer]), da2.clone(), torch.outer(dz, r2), dz.clone(),
        ]
        if layer > 0:
            dh = torch.mv(w0.t(), da1)
    return grads


def _param_grads_reference(loss, h, c, weights, grad_p) -> list[Tensor]:
    with torch.no_grad():
        return param_grads_explicit(loss, h, c, weights, grad_p)


def _param_grads_cuda(loss, h, c, weights, grad_p) -> list[Tensor]:
    reason = "triton kernels not importable" if _kernels is None else _kernels.param_grads_unsupported_reason(
        loss, h, c, weights, grad_p)
    if reason is None:
        return _kernels.launch_param_grads(loss, h, c, weights, grad_p, check=False)
    _fallback_warning("mlrsnet_param_grads", reason)
    return _param_grads_reference(loss, h, c, weights, grad_p)


def _step_fake(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters=None) -> None:
    return None


def _param_grads_fake(loss, h, c, weights, grad_p) -> list[Tensor]:
    return [torch.empty_like(w) for w in weights]


def _op_exists(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)


if _op_exists("mlrsnet_step_") or _op_exists("mlrsnet_param_grads"):
    # Another module (e.g. the C++ extension) owns these names: do not fight over them.
    raise ImportError(f"{STEP_OP} / {PARAM_GRADS_OP} are already defined elsewhere; the Triton backend stays off")

torch.library.define(STEP_OP, STEP_SCHEMA)
torch.library.impl(STEP_OP, "CPU", _step_reference)
torch.library.impl(STEP_OP, "CUDA", _step_cuda)
torch.library.register_fake(STEP_OP, _step_fake)

torch.library.define(PARAM_GRADS_OP, PARAM_GRADS_SCHEMA)
torch.library.impl(PARAM_GRADS_OP, "CPU", _param_grads_reference)
torch.library.impl(PARAM_GRADS_OP, "CUDA", _param_grads_cuda)
torch.library.register_fake(PARAM_GRADS_OP, _param_grads_fake)


# -- what dispatch calls ------------------------------------------------------------------------
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
) -> Tensor:
    """:func:`autolr_fast.dispatch.mlrsnet_step_`: one launch, the counters included; returns
    ``ok`` (0-dim bool).

    Eager calls on plain CUDA tensors run the op's CUDA implementation directly (the dispatcher
    round trip of a Python op costs several microseconds, more than the rest of the host work);
    under ``torch.compile``, an active dispatch mode or tensor subclasses the call goes through
    ``torch.ops.autolr_fast.mlrsnet_step_``. Both launch the same kernel.
    """
    ok = torch.empty((), dtype=torch.bool, device=h.device)
    if (h.is_cuda and type(loss) is torch.Tensor and type(h) is torch.Tensor
            and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()):
        _step_cuda(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters)
        return ok
    with torch.no_grad():
        torch.ops.autolr_fast.mlrsnet_step_(loss, h, c, list(weights), gamma, rate, list(lr_list),
                                            [float(s) for s in scales], ok, counters)
    return ok


def mlrsnet_param_grads(loss: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor], grad_p: Tensor) -> list[Tensor]:
    """:func:`autolr_fast.dispatch.mlrsnet_param_grads` through the op."""
    with torch.no_grad():
        return list(torch.ops.autolr_fast.mlrsnet_param_grads(loss, h, c, list(weights), grad_p))


dispatch.register_backend(
    "triton",
    available=AVAILABLE,
    detail=DETAIL,
    devices=["cuda"],
    ops={"mlrsnet_step_": mlrsnet_step_, "mlrsnet_param_grads": mlrsnet_param_grads},
)
