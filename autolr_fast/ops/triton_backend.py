"""Triton backend: the CUDA kernels of ``autolr_fast::mlrsnet_step_`` and
``autolr_fast::mlrsnet_param_grads`` (defined in :mod:`autolr_fast.ops.library`).

CUDA: one Triton launch (:mod:`autolr_fast.ops.triton_kernels`), or the reference where the
kernels do not take the input (e.g. more than 2 stacked cells, ``H > 128``, float64 weights; a
warning says why, once per reason).

Its ``BACKENDS`` entry, backend ``"triton"`` in :mod:`autolr_fast.ops.dispatch`, is for CUDA
tensors only; it is available when triton and the kernels import and torch is a CUDA
build.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from . import library, reference

# -- the kernels (optional) ---------------------------------------------------------------------
try:
    import triton

    from . import triton_kernels as _kernels

    _KERNEL_DETAIL = f"triton {triton.__version__}, kernels from {_kernels.__name__}"
except Exception as exc:  # noqa: BLE001 - any import failure means: no Triton path
    _kernels = None
    _KERNEL_DETAIL = f"triton kernels not importable: {type(exc).__name__}: {exc}"

if _kernels is not None and library.EXTENSION is not None:
    # the step's per-call layout check in C++ when the extension is built
    _kernels.use_layout_key(library.EXTENSION.tensor_layout_key)

AVAILABLE = _kernels is not None and torch.version.cuda is not None
DETAIL = _KERNEL_DETAIL if torch.version.cuda is not None else f"{_KERNEL_DETAIL}; torch is not a CUDA build"

_warned: set[str] = set()


def _fallback_warning(op: str, reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"autolr_fast {op}: the Triton kernel does not take this input ({reason}); "
                      "using the PyTorch reference", stacklevel=3)


# -- implementations ----------------------------------------------------------------------------
def _step_cuda(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters=None) -> None:
    if _kernels is not None and _kernels.launch_step_bound(loss, h, c, weights, gamma, rate, lr_list, scales, ok,
                                                           counters):
        return  # the steady state: the last launch's arguments with a new loss, checked and launched
    reason = "triton kernels not importable" if _kernels is None else _kernels.launch_step_if_supported(
        loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters)
    if reason is not None:
        _fallback_warning("mlrsnet_step_", reason)
        with torch.no_grad():
            ok.copy_(reference.mlrsnet_scheduler_step_(loss, h, c, weights, gamma, rate, lr_list, scales, counters))


def _param_grads_cuda(loss, h, c, weights, grad_p) -> list[Tensor]:
    reason = "triton kernels not importable" if _kernels is None else _kernels.param_grads_unsupported_reason(
        loss, h, c, weights, grad_p)
    if reason is None:
        return _kernels.launch_param_grads(loss, h, c, weights, grad_p, check=False)
    _fallback_warning("mlrsnet_param_grads", reason)
    with torch.no_grad():
        return reference.mlrsnet_param_grads_explicit(loss, h, c, weights, grad_p)


torch.library.impl(library.qualname("mlrsnet_step_"), "CUDA", _step_cuda)
torch.library.impl(library.qualname("mlrsnet_param_grads"), "CUDA", _param_grads_cuda)


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
    ok: Tensor | None = None,
) -> Tensor:
    """:func:`autolr_fast.ops.dispatch.mlrsnet_step_`: one launch, the counters included; returns
    ``ok`` (0-dim bool; written into ``ok`` if given).

    Eager calls on plain CUDA tensors run the op's CUDA implementation directly (the dispatcher
    round trip of a Python op costs more than the rest of the host work);
    under ``torch.compile``, an active dispatch mode or tensor subclasses the call goes through
    ``torch.ops.autolr_fast.mlrsnet_step_``. Both launch the same kernel.
    """
    if ok is None:
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
    """:func:`autolr_fast.ops.dispatch.mlrsnet_param_grads` through the op."""
    with torch.no_grad():
        return list(torch.ops.autolr_fast.mlrsnet_param_grads(loss, h, c, list(weights), grad_p))


# what autolr_fast.ops.dispatch registers: (name, available, detail, devices, ops)
BACKENDS = [("triton", AVAILABLE, DETAIL, ["cuda"],
             {"mlrsnet_step_": mlrsnet_step_, "mlrsnet_param_grads": mlrsnet_param_grads})]
