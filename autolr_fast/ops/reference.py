"""Plain PyTorch reference implementations of every computation that has a fast path.

Everything fused (the Triton kernels in :mod:`autolr_fast.ops.triton_kernels`, the C++/CUDA ops
in ``csrc/ops``) is tested against the functions in this module, and the benchmarks import their
baselines from here too, so the two cannot drift apart.

Weight layout used by every implementation (``flat_weights``): for each stacked cell ``l``
eight tensors ``[i2h.0.w, i2h.0.b, i2h.2.w, i2h.2.b, h2h.0.w, h2h.0.b, h2h.2.w, h2h.2.b]``
followed by the output head ``[head.w, head.b]``: ``8 * num_layers + 2`` tensors.
Shapes, with hidden size ``H`` and ``M = H // 2``, for cell 0 (input size 1) and cell
``l > 0`` (input size ``H``): ``i2h.0.w (M, in)``, ``i2h.0.b (M,)``, ``i2h.2.w (4H, M)``,
``i2h.2.b (4H,)``, ``h2h.0.w (M, H)``, ``h2h.0.b (M,)``, ``h2h.2.w (4H, M)``,
``h2h.2.b (4H,)``; head ``(1, H)`` and ``(1,)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

WEIGHTS_PER_CELL = 8


def weight_shapes(num_layers: int, hidden: int, middle: int | None = None) -> list[tuple[int, ...]]:
    """The shape of every tensor of the layout above (``middle`` defaults to ``max(H // 2, 1)``)."""
    m = max(hidden // 2, 1) if middle is None else middle
    shapes: list[tuple[int, ...]] = []
    for layer in range(num_layers):
        fan_in = 1 if layer == 0 else hidden
        shapes += [(m, fan_in), (m,), (4 * hidden, m), (4 * hidden,), (m, hidden), (m,), (4 * hidden, m), (4 * hidden,)]
    return shapes + [(1, hidden), (1,)]

__all__ = [
    "weight_shapes",
    "mlrsnet_cell",
    "mlrsnet_forward",
    "mlrsnet_guarded_step",
    "mlrsnet_scheduler_step_",
    "count_step_",
    "write_rates",
    "mlrsnet_param_grads",
    "mlrsnet_param_grads_explicit",
    "auto_gamma",
    "lookahead",
    "hyper_dot",
    "sgd_direction",
]


def _mlp(x: Tensor, w0: Tensor, b0: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w0, b0)), w2, b2)


def _gates(z: Tensor, metatest: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(i, f, o, g)`` from the pre-activations ``z`` (last dim ``4H``)."""
    zs = z.chunk(4, dim=-1)
    if metatest:  # the published meta-test script's reading: (i, f, g, o), no forget bias
        return torch.sigmoid(zs[0]), torch.sigmoid(zs[1]), torch.sigmoid(zs[3]), torch.tanh(zs[2])
    return torch.sigmoid(zs[0]), torch.sigmoid(zs[1] - 1.0), torch.sigmoid(zs[2]), torch.tanh(zs[3])


def mlrsnet_cell(x: Tensor, h: Tensor, c: Tensor, w: list[Tensor], metatest: bool = False) -> tuple[Tensor, Tensor]:
    """One MLR-SNet cell: ``z = mlp_i2h(x) + mlp_h2h(h)``, then the LSTM update; ``(h_new, c_new)``.

    ``w`` is the cell's eight tensors (module docstring). Gate order (input, forget, output, cell)
    with forget gate ``sigmoid(z_f - 1)``: the code that trained the published checkpoints;
    ``metatest=True`` is the other reading of the same files (see ``MLRSNet``). Scriptable: the
    exported TorchScript module calls this function too.
    """
    z = _mlp(x, w[0], w[1], w[2], w[3]) + _mlp(h, w[4], w[5], w[6], w[7])
    i, f, o, g = _gates(z, metatest)
    c_new = f * c + i * g
    return o * torch.tanh(c_new), c_new


def mlrsnet_forward(
    loss: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor], metatest: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """One MLR-SNet step: returns ``(p, h_new, c_new)``.

    ``loss`` is a 1-element tensor (the controller input), ``h`` and ``c`` are the recurrent
    state of shape ``(num_layers, H)``; ``p`` is a 0-dim tensor in ``[0, 1]`` (the rate before
    the ``gamma`` scale).
    """
    num_layers, hidden = h.shape
    _check_weight_count(weights, num_layers)
    x = loss.reshape(1).to(h.dtype)
    hs, cs = [], []
    for layer in range(num_layers):
        w = list(weights[WEIGHTS_PER_CELL * layer : WEIGHTS_PER_CELL * (layer + 1)])
        x, c_new = mlrsnet_cell(x, h[layer], c[layer], w, metatest)
        hs.append(x)
        cs.append(c_new)
    p = torch.sigmoid(torch.nn.functional.linear(x, weights[-2], weights[-1])).reshape(())
    return p, torch.stack(hs), torch.stack(cs)


def _check_weight_count(weights: Sequence[Tensor], num_layers: int) -> None:
    if len(weights) != WEIGHTS_PER_CELL * num_layers + 2:
        raise ValueError(
            f"expected {WEIGHTS_PER_CELL * num_layers + 2} weight tensors for "
            f"{num_layers} cell(s), got {len(weights)}"
        )


def mlrsnet_guarded_step(
    loss: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Sequence[Tensor],
    gamma: Tensor,
    rate_prev: Tensor,
    metatest: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The scheduler's step: ``(rate, h_new, c_new, finite)`` with the NaN/Inf guard.

    A non-finite ``loss`` keeps the state and the previous rate (decided on the device, no
    host sync); a negative loss is clamped to 0 (the controller was trained on non-negative
    losses). The rate is ``gamma * p`` clamped to ``[0, gamma]``; ``finite`` is a bool 0-dim
    tensor telling whether the step was taken.
    """
    x = loss.detach().reshape(()).to(h.dtype)
    finite = torch.isfinite(x)
    safe = torch.where(finite, x.clamp_min(0.0), torch.zeros_like(x))
    p, h_new, c_new = mlrsnet_forward(safe, h, c, weights, metatest)
    rate = torch.minimum(torch.clamp_min(gamma * p, 0.0), gamma)
    # The state and rate also stay put if the controller itself produced a non-finite value.
    ok = finite & torch.isfinite(rate)
    rate = torch.where(ok, rate, rate_prev)
    h_new = torch.where(ok, h_new, h)
    c_new = torch.where(ok, c_new, c)
    return rate, h_new, c_new, ok


def check_scales(lr_list: Sequence[Tensor], scales: Sequence[float]) -> None:
    """One scale per lr tensor (extra scales are ignored, as the scheduler passes its scales with
    no lr tensors when the optimizer keeps float lrs)."""
    if len(scales) < len(lr_list):
        raise ValueError(f"{len(lr_list)} lr tensors but only {len(scales)} scales: pass one scale per param group")


def write_rates(rate: Tensor, lr_list: Sequence[Tensor], scales: Sequence[float]) -> None:
    """``lr_k <- rate * scale_k`` for every param group's 0-dim ``lr`` tensor, on the device."""
    if not lr_list:
        return
    check_scales(lr_list, scales)
    scales = scales[: len(lr_list)]
    if all(s == 1.0 for s in scales):
        torch._foreach_copy_(list(lr_list), [rate] * len(lr_list))
    else:
        for lr, s in zip(lr_list, scales):
            lr.copy_(rate * s)


def mlrsnet_scheduler_step_(
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
    """The scheduler's step in place: :func:`mlrsnet_guarded_step`, then ``h``, ``c``, ``rate``
    and every ``lr_k = rate * scales[k]`` written, and ``counters`` updated (see
    :func:`count_step_`); returns ``ok``. What every fused step computes."""
    check_scales(lr_list, scales)  # before anything is written
    with torch.no_grad():
        new_rate, h_new, c_new, ok = mlrsnet_guarded_step(loss, h, c, [w.detach() for w in weights], gamma, rate)
        h.copy_(h_new)
        c.copy_(c_new)
        rate.copy_(new_rate)
        write_rates(rate, lr_list, scales)
        if counters is not None:
            count_step_(counters, loss, ok)
    return ok


def count_step_(counters: Tensor, loss: Tensor, ok: Tensor) -> None:
    """The scheduler's int64 counters, in place: ``[0] += not ok`` (a skipped step),
    ``[1] += loss is finite and negative`` (a loss clamped to 0)."""
    x = loss.detach().reshape(()).to(torch.float32)
    counters.add_(torch.stack((~ok, torch.isfinite(x) & (x < 0))).to(counters.dtype))


def mlrsnet_param_grads(
    loss: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor], grad_p: Tensor
) -> list[Tensor]:
    """``grad_p * dp/dtheta`` for every weight tensor, the state held constant.

    This is the backward of :func:`mlrsnet_forward` with respect to the weights (one-step
    truncation: ``h`` and ``c`` are inputs, not functions of theta).
    """
    with torch.enable_grad():
        ws = [w.detach().requires_grad_(True) for w in weights]
        p, _, _ = mlrsnet_forward(loss.detach(), h.detach(), c.detach(), ws)
        return list(torch.autograd.grad(p, ws, grad_outputs=grad_p.reshape(())))


def mlrsnet_param_grads_explicit(
    loss: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor], grad_p: Tensor
) -> list[Tensor]:
    """:func:`mlrsnet_param_grads` with the backward written out, without autograd.

    The op's CPU implementation when the extension is not built: autograd does not record inside
    an operator entered from a dispatch mode (opcheck, FlopCounterMode). The same math as the
    Triton and C++ kernels; tested against the autograd version.
    """
    num_layers, hidden = h.shape
    _check_weight_count(weights, num_layers)
    x = loss.detach().reshape(1).to(h.dtype)
    saved = []
    for layer in range(num_layers):
        w0, b0, w2, b2, v0, d0, v2, d2 = weights[8 * layer: 8 * layer + 8]
        a1 = torch.mv(w0, x) + b0
        a2 = torch.mv(v0, h[layer]) + d0
        r1, r2 = torch.relu(a1), torch.relu(a2)
        gi, gf, go, gg = _gates(torch.mv(w2, r1) + b2 + (torch.mv(v2, r2) + d2), False)
        tc = torch.tanh(gf * c[layer] + gi * gg)
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


def auto_gamma(initial_loss: Tensor | float, num_classes: int) -> Tensor:
    """The published rule ``gamma = |sqrt(L0) * ln(L0 * C) / C**0.25| / 4``.

    ``L0`` is the first training loss and ``C`` the number of classes. Computed on the
    loss's device, so it costs no host sync.
    """
    l0 = torch.as_tensor(initial_loss, dtype=torch.float32).detach().reshape(())
    c = float(num_classes)
    return (torch.sqrt(l0) * torch.log(l0 * c) / c**0.25).abs() / 4.0


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the element-wise math of a ``dtype`` tensor is done in (ATen's opmath type):
    float32 for float16/bfloat16, the dtype itself otherwise. The optimizer's scalars (``lr``,
    Adam's bias corrections) keep this precision too: torch's optimizers never round them to a
    reduced-precision parameter's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


_FLOAT_LIKE = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: dtypes as the C++ kernels' messages name them (c10::ScalarType)
_SCALAR_TYPE = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
                torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                torch.bool: "Bool", torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat",
                torch.complex128: "ComplexDouble", torch.uint16: "UInt16", torch.uint32: "UInt32",
                torch.uint64: "UInt64", torch.float8_e4m3fn: "Float8_e4m3fn", torch.float8_e5m2: "Float8_e5m2"}


def _scalar_type(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE.get(dtype, str(dtype))


#: the lists that may hold None (the optimizer has no state for a parameter yet)
_OPTIONAL_LISTS = frozenset({"momentum_buffers", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"})


def check_lists(op: str, params: Sequence[Tensor], **lists: Sequence) -> None:
    """The C++/CUDA list ops' argument checks (``csrc/ops/ops_common.h``), in their order and
    with their messages: at least one float parameter, and each named list one entry per
    parameter on its device, of its dtype and shape (``None`` allowed in the optimizer-state
    lists). ``steps`` (Adam): one 1-element count per parameter, on the CPU or its device; a single
    number or tensor, which only the reference takes, stands for every parameter."""
    if len(params) == 0:
        raise RuntimeError(f"{op}: needs at least one tensor")
    for i, p in enumerate(params):
        if p.dtype not in _FLOAT_LIKE:
            raise RuntimeError(f"{op}: params[{i}] has dtype {_scalar_type(p.dtype)}; only "
                               "float32/float64/float16/bfloat16 are supported")
    for name, xs in lists.items():
        if name == "steps":
            _check_steps(op, params, xs)
            continue
        optional = name in _OPTIONAL_LISTS
        if len(xs) != len(params):
            what, per = ("entries", "one tensor (or None)") if optional else ("tensors", "one tensor")
            raise RuntimeError(f"{op}: {name} has {len(xs)} {what} but params has {len(params)}; pass {per} "
                               "per parameter")
        for i, (p, x) in enumerate(zip(params, xs)):
            if x is None and optional:
                continue
            if x.device != p.device:
                raise RuntimeError(f"{op}: {name}[{i}] is on {x.device} but params[{i}] is on {p.device}; move them "
                                   "to one device")
            if x.dtype != p.dtype:
                raise RuntimeError(f"{op}: {name}[{i}] has dtype {_scalar_type(x.dtype)} but params[{i}] has "
                                   f"{_scalar_type(p.dtype)}; use one dtype per parameter")
            if x.shape != p.shape:
                raise RuntimeError(f"{op}: {name}[{i}] has shape {list(x.shape)} but params[{i}] has "
                                   f"{list(p.shape)}")


def _check_steps(op: str, params: Sequence[Tensor], steps) -> None:
    if isinstance(steps, (Tensor, int, float)):
        return
    if len(steps) != len(params):
        raise RuntimeError(f"{op}: steps has {len(steps)} tensors but params has {len(params)}; pass each "
                           "parameter's own step count (its optimizer state's 'step', 0 if none)")
    for i, (p, st) in enumerate(zip(params, steps)):
        if not isinstance(st, Tensor):
            continue
        if st.numel() != 1:
            raise RuntimeError(f"{op}: steps[{i}] must be a 1-element tensor, got shape {list(st.shape)}")
        if st.device.type != "cpu" and st.device != p.device:
            raise RuntimeError(f"{op}: steps[{i}] is on {st.device} but params[{i}] is on {p.device}; keep each "
                               "step on the CPU or on its parameter's device")


def check_alpha(op: str, alpha: Tensor) -> None:
    if alpha.numel() != 1:
        raise RuntimeError(f"{op}: alpha must be a 1-element tensor, got shape {list(alpha.shape)}")


def lookahead(params: Sequence[Tensor], directions: Sequence[Tensor], alpha: Tensor) -> list[Tensor]:
    """``w_hat_i = w_i - alpha * d_i`` for every tensor (``alpha`` a 0-dim tensor), computed in the
    opmath dtype and rounded once, as ``param.add_(d, alpha=-lr)`` does."""
    check_lists("lookahead", params, dirs=directions)
    check_alpha("lookahead", alpha)
    return _lookahead(params, directions, alpha)


def _lookahead(params: Sequence[Tensor], directions: Sequence[Tensor], alpha: Tensor) -> list[Tensor]:
    out = []
    for w, d in zip(params, directions):
        f = opmath_dtype(w.dtype)
        out.append((w.to(f) - alpha.to(f) * d.to(f)).to(w.dtype))
    return out


def hyper_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``sum_i <a_i, b_i>`` accumulated in float64, returned as a 0-dim float32 tensor."""
    check_lists("hyper_dot", a, b=b)
    return _hyper_dot(a, b)


def _hyper_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    total = None
    for x, y in zip(a, b, strict=True):
        term = torch.dot(x.reshape(-1).double(), y.reshape(-1).double())
        total = term if total is None else total + term
    return total.float()


def sgd_direction(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool = False,
) -> Tensor:
    """The direction ``d`` that ``torch.optim.SGD`` will apply next: ``w <- w - lr * d``.

    Reads the momentum buffer without changing it. On the optimizer's first step (no buffer
    yet) torch initialises the buffer with the gradient itself, without dampening.
    """
    d = -grad if maximize else grad
    if weight_decay != 0:
        d = d + weight_decay * param
    if momentum != 0:
        buf = d if momentum_buffer is None else momentum_buffer * momentum + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return d


# ------------------------------------------------------------------------------------------------
# Look-ahead and hypergradient dot product with the optimizer's exact direction, fused.
# These are what the C++/CUDA multi-tensor ops compute; ``d`` is recomputed on the fly in both
# (never stored), so a meta-step holds only one extra copy of the parameters (``w_hat``).
# ``d`` is computed in the opmath dtype (:func:`opmath_dtype`) and rounded to the parameter's
# dtype, as the optimizer's stored state is.
# ------------------------------------------------------------------------------------------------
def _opmath_or_none(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def sgd_directions(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool = False,
) -> list[Tensor]:
    """:func:`sgd_direction` of every parameter."""
    out = []
    for w, g, b in zip(params, grads, momentum_buffers):
        f = opmath_dtype(w.dtype)
        d = sgd_direction(w.to(f), g.to(f), _opmath_or_none(b, f), momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        out.append(d.to(w.dtype))
    return out


def per_parameter_steps(steps: Sequence[Tensor | float] | Tensor | float, n: int) -> list[Tensor | float]:
    """One step count per parameter; a single tensor or number stands for all of them."""
    if isinstance(steps, (Tensor, int, float)):
        if isinstance(steps, Tensor) and steps.numel() != 1:
            raise ValueError(f"steps: expected one 1-element tensor per parameter, got a tensor of shape "
                             f"{tuple(steps.shape)}; pass a list with each parameter's state['step']")
        return [steps] * n
    steps = list(steps)
    if len(steps) != n:
        raise ValueError(f"steps has {len(steps)} entries for {n} parameters; pass each parameter's own "
                         "state['step'] (0 for a parameter without state)")
    return steps


def adam_bias_corrections(step: Tensor | float, beta1: float, beta2: float,
                          dtype: torch.dtype) -> tuple[Tensor | float, Tensor | float]:
    """``(1 - beta1**t, sqrt(1 - beta2**t))`` with ``t = step + 1``, in float64, then ``dtype``
    (a tensor ``step`` stays on its device: no host read)."""
    if not isinstance(step, Tensor):
        t = float(step) + 1.0
        return 1.0 - beta1**t, (1.0 - beta2**t) ** 0.5
    t = step.detach().reshape(()).to(torch.float64) + 1.0
    return (1.0 - torch.pow(beta1, t)).to(dtype), torch.sqrt(1.0 - torch.pow(beta2, t)).to(dtype)


def adam_directions(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | None],
    exp_avg_sqs: Sequence[Tensor | None],
    max_exp_avg_sqs: Sequence[Tensor | None],
    steps: Sequence[Tensor | float] | Tensor | float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool = False,
) -> list[Tensor]:
    """The direction of Adam (``decoupled=False``) or AdamW for every parameter.

    ``steps``: each parameter's stored step count (its state's ``step`` before this update, 0
    without state): torch counts steps per parameter, and one that had no gradient on some steps
    has a smaller count, so other bias corrections. A single tensor or number is taken as the
    count of every parameter.
    """
    out = []
    for w, g, m, v, vmax, step in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                      per_parameter_steps(steps, len(params))):
        f = opmath_dtype(w.dtype)
        wf, gg = w.to(f), (-g if maximize else g).to(f)
        m, v, vmax = _opmath_or_none(m, f), _opmath_or_none(v, f), _opmath_or_none(vmax, f)
        if weight_decay != 0 and not decoupled:
            gg = gg + weight_decay * wf
        m_new = gg * (1 - beta1) if m is None else m * beta1 + (1 - beta1) * gg
        v_new = gg * gg * (1 - beta2) if v is None else v * beta2 + (1 - beta2) * gg * gg
        if vmax is not None:
            v_new = torch.maximum(vmax, v_new)  # NaN if either is NaN
        bc1, bc2_sqrt = adam_bias_corrections(step, beta1, beta2, f)
        d = (m_new / bc1) / (v_new.sqrt() / bc2_sqrt + eps)
        if weight_decay != 0 and decoupled:
            d = d + weight_decay * wf
        out.append(d.to(w.dtype))
    return out


# The list ops: the argument checks of the kernels, then the computation. ``dispatch`` calls the
# unchecked bodies: the meta-step builds those lists from the optimizer itself, and the checks
# would cost a few percent of a reference meta-step.
def lookahead_sgd_unchecked(params, grads, momentum_buffers, alpha, momentum, dampening, weight_decay, nesterov,
                            maximize=False):
    return _lookahead(params, sgd_directions(params, grads, momentum_buffers, momentum, dampening,
                                            weight_decay, nesterov, maximize), alpha)


def hyper_dot_sgd_unchecked(val_grads, params, grads, momentum_buffers, momentum, dampening, weight_decay, nesterov,
                            maximize=False):
    return _hyper_dot(val_grads, sgd_directions(params, grads, momentum_buffers, momentum, dampening,
                                               weight_decay, nesterov, maximize))


def lookahead_adam_unchecked(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, alpha, beta1, beta2, eps,
                             weight_decay, decoupled, maximize=False):
    return _lookahead(params, adam_directions(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, beta1,
                                             beta2, eps, weight_decay, decoupled, maximize), alpha)


def hyper_dot_adam_unchecked(val_grads, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, beta1, beta2,
                             eps, weight_decay, decoupled, maximize=False):
    return _hyper_dot(val_grads, adam_directions(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, beta1,
                                                beta2, eps, weight_decay, decoupled, maximize))


def lookahead_sgd(params, grads, momentum_buffers, alpha, momentum, dampening, weight_decay, nesterov, maximize=False):
    """``w_hat = w - alpha * d_SGD`` for every tensor."""
    check_lists("lookahead_sgd", params, grads=grads, momentum_buffers=momentum_buffers)
    check_alpha("lookahead_sgd", alpha)
    return lookahead_sgd_unchecked(params, grads, momentum_buffers, alpha, momentum, dampening, weight_decay,
                                   nesterov, maximize)


def hyper_dot_sgd(val_grads, params, grads, momentum_buffers, momentum, dampening, weight_decay, nesterov,
                  maximize=False):
    """``sum_i <g_val_i, d_SGD_i>``."""
    check_lists("hyper_dot_sgd", params, grads=grads, momentum_buffers=momentum_buffers, val_grads=val_grads)
    return hyper_dot_sgd_unchecked(val_grads, params, grads, momentum_buffers, momentum, dampening, weight_decay,
                                   nesterov, maximize)


def lookahead_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, alpha, beta1, beta2, eps,
                   weight_decay, decoupled, maximize=False):
    """``w_hat = w - alpha * d_Adam`` for every tensor (``steps``: see :func:`adam_directions`)."""
    check_lists("lookahead_adam", params, grads=grads, steps=steps, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                max_exp_avg_sqs=max_exp_avg_sqs)
    check_alpha("lookahead_adam", alpha)
    return lookahead_adam_unchecked(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, alpha, beta1,
                                    beta2, eps, weight_decay, decoupled, maximize)


def hyper_dot_adam(val_grads, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, beta1, beta2, eps,
                   weight_decay, decoupled, maximize=False):
    """``sum_i <g_val_i, d_Adam_i>`` (``steps``: see :func:`adam_directions`)."""
    check_lists("hyper_dot_adam", params, grads=grads, steps=steps, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                max_exp_avg_sqs=max_exp_avg_sqs, val_grads=val_grads)
    return hyper_dot_adam_unchecked(val_grads, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, beta1,
                                    beta2, eps, weight_decay, decoupled, maximize)
