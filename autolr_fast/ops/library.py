"""Every op of autolr_fast, in one namespace: ``torch.ops.autolr_fast.<name>``.

Each op is defined here once (its schema), with its fake kernel beside the definition (shapes
only, for ``torch.compile`` and FakeTensor tracing). The kernels behind them:

* CPU: the C++ kernels of ``autolr_fast._C`` (``csrc/ops``) when the extension is built, else
  the plain PyTorch references of :mod:`autolr_fast.ops.reference`, registered here;
* CUDA: the multi-tensor look-ahead / hyper-dot ops in CUDA (``csrc/ops/ops_cuda.cu``, when the
  extension was compiled with them), the controller step and its gradient in Triton
  (:mod:`autolr_fast.ops.triton_backend`).

Semantics of every op: the function of the same name in :mod:`autolr_fast.ops.reference`.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from . import reference
from .sources_digest import stale_reason

NAMESPACE = "autolr_fast"
_REBUILD = "`python setup.py build_ext --inplace` or `pip install --no-build-isolation .`"
# the checkout's C++/CUDA sources (absent from an installed wheel, where nothing is compared)
OPS_SOURCES = Path(__file__).resolve().parents[2] / "csrc" / "ops"


def _load_extension():
    """``(module or None, detail)``. An extension built from other sources than the checkout's is
    not loaded: loading registers its kernels, which may not match the schemas defined below."""
    spec = importlib.util.find_spec("autolr_fast._C")
    if spec is None or spec.origin is None:
        return None, f"autolr_fast._C is not built; build it with {_REBUILD}"
    stale = stale_reason(Path(spec.origin).resolve(), OPS_SOURCES)  # a linked file's record is at its target
    if stale is not None:
        detail = f"autolr_fast._C not loaded: {stale} (a stale build); rebuild it with {_REBUILD}"
        warnings.warn(f"{detail}. Using the PyTorch reference ops meanwhile.", RuntimeWarning, stacklevel=2)
        return None, detail
    try:
        from .. import _C  # noqa: F401  (loading the library registers its kernels)
    except ImportError as exc:  # built against another torch
        return None, f"autolr_fast._C is not importable ({exc}); build it with {_REBUILD}"
    return _C, f"autolr_fast._C loaded from {_C.__file__}"


EXTENSION, EXTENSION_DETAIL = _load_extension()


def qualname(op: str) -> str:
    return f"{NAMESPACE}::{op}"


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``op`` has a kernel of its own for ``"CPU"`` or ``"CUDA"`` (not a fallback)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname(op), device_type)


def _define(op: str, schema: str, fake: Callable, reference_cpu: Callable) -> None:
    torch.library.define(qualname(op), schema)
    torch.library.register_fake(qualname(op), fake)
    if not has_kernel(op, "CPU"):  # no C++ kernel: the reference is the CPU kernel
        torch.library.impl(qualname(op), "CPU", reference_cpu)


def _not_differentiable(op: str) -> None:
    """The C++ extension registers torch's "not implemented" autograd kernel for the list ops
    (``csrc/ops/ops_cpu.cpp``); without it, the same error at backward from here."""
    if has_kernel(op, "Autograd"):
        return

    def backward(ctx, *grads):
        raise RuntimeError(f"derivative for {qualname(op)} is not implemented")

    torch.library.register_autograd(qualname(op), backward, setup_context=lambda ctx, inputs, output: None)


def _nonempty(op: str, params: Sequence[Tensor]) -> Sequence[Tensor]:
    if len(params) == 0:  # the kernels' refusal, instead of an IndexError in the fake kernel
        raise RuntimeError(f"{op}: needs at least one tensor")
    return params


def _like_all(xs: Sequence[Tensor]) -> list[Tensor]:
    return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]


def _scalar_f32(like: Tensor) -> Tensor:
    return like.new_empty((), dtype=torch.float32)


def _contiguous(list_op: Callable) -> Callable:
    """``list_op`` with contiguous outputs, as its fake kernel (and the C++/CUDA kernels) promise:
    the reference keeps a non-contiguous parameter's strides."""
    def kernel(*args, **kwargs) -> list[Tensor]:
        return [t.contiguous() for t in list_op(*args, **kwargs)]
    return kernel


# -- multi-tensor look-ahead and hypergradient dot product -----------------------------------------
_define("lookahead", "(Tensor[] params, Tensor[] dirs, Tensor alpha) -> Tensor[]",
        lambda params, dirs, alpha: _like_all(params), _contiguous(reference.lookahead))

_define("hyper_dot", "(Tensor[] a, Tensor[] b) -> Tensor",
        lambda a, b: _scalar_f32(_nonempty("hyper_dot", a)[0]), reference.hyper_dot)

_define("lookahead_sgd",
        "(Tensor[] params, Tensor[] grads, Tensor?[] momentum_buffers, Tensor alpha, float momentum, "
        "float dampening, float weight_decay, bool nesterov, bool maximize=False) -> Tensor[]",
        lambda params, *args, **kwargs: _like_all(params), _contiguous(reference.lookahead_sgd))

_define("hyper_dot_sgd",
        "(Tensor[] val_grads, Tensor[] params, Tensor[] grads, Tensor?[] momentum_buffers, float momentum, "
        "float dampening, float weight_decay, bool nesterov, bool maximize=False) -> Tensor",
        lambda val_grads, params, *args, **kwargs: _scalar_f32(_nonempty("hyper_dot_sgd", params)[0]),
        reference.hyper_dot_sgd)

# steps: each parameter's stored step count (torch.optim counts steps per parameter), CPU tensors
# (torch.optim's default, read on the host) or on the parameters' device (read by the kernel).
_define("lookahead_adam",
        "(Tensor[] params, Tensor[] grads, Tensor?[] exp_avgs, Tensor?[] exp_avg_sqs, Tensor?[] max_exp_avg_sqs, "
        "Tensor[] steps, Tensor alpha, float beta1, float beta2, float eps, float weight_decay, bool decoupled, "
        "bool maximize=False) -> Tensor[]",
        lambda params, *args, **kwargs: _like_all(params), _contiguous(reference.lookahead_adam))

_define("hyper_dot_adam",
        "(Tensor[] val_grads, Tensor[] params, Tensor[] grads, Tensor?[] exp_avgs, Tensor?[] exp_avg_sqs, "
        "Tensor?[] max_exp_avg_sqs, Tensor[] steps, float beta1, float beta2, float eps, float weight_decay, "
        "bool decoupled, bool maximize=False) -> Tensor",
        lambda val_grads, params, *args, **kwargs: _scalar_f32(_nonempty("hyper_dot_adam", params)[0]),
        reference.hyper_dot_adam)


for _op in ("lookahead", "hyper_dot", "lookahead_sgd", "hyper_dot_sgd", "lookahead_adam", "hyper_dot_adam"):
    _not_differentiable(_op)


# -- the controller step and its weight gradient ----------------------------------------------------
def _step_reference(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters=None) -> None:
    ok.copy_(reference.mlrsnet_scheduler_step_(loss, h, c, weights, gamma, rate, lr_list, scales, counters))


def _param_grads_reference(loss, h, c, weights, grad_p) -> list[Tensor]:
    with torch.no_grad():
        return reference.mlrsnet_param_grads_explicit(loss, h, c, weights, grad_p)


# In place: h, c, rate, every lr tensor, ok (0-dim bool: was the step taken) and the int64
# counters [skipped, negative]; allocates nothing (safe in CUDA graphs).
_define("mlrsnet_step_",
        "(Tensor loss, Tensor(a!) h, Tensor(b!) c, Tensor[] weights, Tensor gamma, Tensor(c!) rate, "
        "Tensor(d!)[] lr_list, float[] scales, Tensor(e!) ok, Tensor(f!)? counters=None) -> ()",
        lambda *args, **kwargs: None, _step_reference)

_define("mlrsnet_param_grads", "(Tensor loss, Tensor h, Tensor c, Tensor[] weights, Tensor grad_p) -> Tensor[]",
        lambda loss, h, c, weights, grad_p: [torch.empty_like(w) for w in weights], _param_grads_reference)
