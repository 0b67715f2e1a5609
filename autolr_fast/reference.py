"""Plain PyTorch reference implementations of every computation that has a fast path.

Everything fused (the Triton kernels in ``autolr_fast.kernels``, the C++/CUDA ops in
``csrc/``) is tested against the functions in this module, and the benchmarks import their
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

from typing import Sequence

import torch
from torch import Tensor

WEIGHTS_PER_CELL = 8

__all__ = [
    "mlrsnet_forward",
    "mlrsnet_guarded_step",
    "mlrsnet_scheduler_step_",
    "count_step_",
    "write_rates",
    "mlrsnet_param_grads",
    "auto_gamma",
    "lookahead",
    "hyper_dot",
    "sgd_direction",
]


def _mlp(x: Tensor, w0: Tensor, b0: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w0, b0)), w2, b2)


def mlrsnet_forward(
    loss: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """One MLR-SNet step: returns ``(p, h_new, c_new)``.

    ``loss`` is a 1-element tensor (the controller input), ``h`` and ``c`` are the recurrent
    state of shape ``(num_layers, H)``; ``p`` is a 0-dim tensor in ``[0, 1]`` (the rate before
    the ``gamma`` scale). Gate order (input, forget, output, cell), forget gate
    ``sigmoid(z1 - 1)``: the cell of the code that trained the published checkpoints.
    """
    num_layers, hidden = h.shape
    if len(weights) != WEIGHTS_PER_CELL * num_layers + 2:
        raise ValueError(
            f"expected {WEIGHTS_PER_CELL * num_layers + 2} weight tensors for "
            f"{num_layers} cell(s), got {len(weights)}"
        )
    x = loss.reshape(1, 1).to(h.dtype)
    hs, cs = [], []
    for layer in range(num_layers):
        w = weights[WEIGHTS_PER_CELL * layer : WEIGHTS_PER_CELL * (layer + 1)]
        h_prev = h[layer : layer + 1]
        z = _mlp(x, *w[0:4]) + _mlp(h_prev, *w[4:8])
        zi, zf, zo, zg = z.chunk(4, dim=1)
        i = torch.sigmoid(zi)
        f = torch.sigmoid(zf - 1.0)
        o = torch.sigmoid(zo)
        g = torch.tanh(zg)
        c_new = f * c[layer : layer + 1] + i * g
        h_new = o * torch.tanh(c_new)
        hs.append(h_new)
        cs.append(c_new)
        x = h_new
    p = torch.sigmoid(torch.nn.functional.linear(x, weights[-2], weights[-1])).reshape(())
    return p, torch.cat(hs, 0), torch.cat(cs, 0)


def mlrsnet_forward_metatest_order(
    loss: Tensor, h: Tensor, c: Tensor, weights: Sequence[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """The cell as the published *meta-test* script reads the checkpoints.

    Gate order (input, forget, cell, output) and no ``-1`` on the forget gate. Only for
    reproducing the published transfer runs: it is a different function of the same weights.
    """
    num_layers, hidden = h.shape
    x = loss.reshape(1, 1).to(h.dtype)
    hs, cs = [], []
    for layer in range(num_layers):
        w = weights[WEIGHTS_PER_CELL * layer : WEIGHTS_PER_CELL * (layer + 1)]
        z = _mlp(x, *w[0:4]) + _mlp(h[layer : layer + 1], *w[4:8])
        zi, zf, zg, zo = z.chunk(4, dim=1)
        c_new = torch.sigmoid(zf) * c[layer : layer + 1] + torch.sigmoid(zi) * torch.tanh(zg)
        h_new = torch.sigmoid(zo) * torch.tanh(c_new)
        hs.append(h_new)
        cs.append(c_new)
        x = h_new
    p = torch.sigmoid(torch.nn.functional.linear(x, weights[-2], weights[-1])).reshape(())
    return p, torch.cat(hs, 0), torch.cat(cs, 0)


def mlrsnet_guarded_step(
    loss: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Sequence[Tensor],
    gamma: Tensor,
    rate_prev: Tensor,
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
    p, h_new, c_new = mlrsnet_forward(safe, h, c, weights)
    rate = torch.minimum(torch.clamp_min(gamma * p, 0.0), gamma)
    # The state and rate also stay put if the controller itself produced a non-finite value.
    ok = finite & torch.isfinite(rate)
    rate = torch.where(ok, rate, rate_prev)
    h_new = torch.where(ok, h_new, h)
    c_new = torch.where(ok, c_new, c)
    return rate, h_new, c_new, ok


def write_rates(rate: Tensor, lr_list: Sequence[Tensor], scales: Sequence[float]) -> None:
    """``lr_k <- rate * scale_k`` for every param group's 0-dim ``lr`` tensor, on the device."""
    if not lr_list:
        return
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


def auto_gamma(initial_loss: Tensor | float, num_classes: int) -> Tensor:
    """The published rule ``gamma = |sqrt(L0) * ln(L0 * C) / C**0.25| / 4``.

    ``L0`` is the first training loss and ``C`` the number of classes. Computed on the
    loss's device, so it costs no host sync.
    """
    l0 = torch.as_tensor(initial_loss, dtype=torch.float32).detach().reshape(())
    c = float(num_classes)
    return (torch.sqrt(l0) * torch.log(l0 * c) / c**0.25).abs() / 4.0


def lookahead(params: Sequence[Tensor], directions: Sequence[Tensor], alpha: Tensor) -> list[Tensor]:
    """``w_hat_i = w_i - alpha * d_i`` for every tensor (``alpha`` a 0-dim tensor)."""
    return [w - alpha.to(w.dtype) * d for w, d in zip(params, directions)]


def hyper_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``sum_i <a_i, b_i>`` accumulated in float64, returned as a 0-dim float32 tensor."""
    total = None
    for x, y in zip(a, b):
        term = torch.dot(x.reshape(-1).double(), y.reshape(-1).double())
        total = term if total is None else total + term
    if total is None:
        raise ValueError("hyper_dot needs at least one tensor pair")
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
# ------------------------------------------------------------------------------------------------
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
    return [
        sgd_direction(w, g, b, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                      nesterov=nesterov, maximize=maximize)
        for w, g, b in zip(params, grads, momentum_buffers)
    ]


def adam_directions(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | None],
    exp_avg_sqs: Sequence[Tensor | None],
    max_exp_avg_sqs: Sequence[Tensor | None],
    step: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool = False,
) -> list[Tensor]:
    """``step`` is the optimizer's stored step count (before this update; 0 if none yet)."""
    t = float(step) + 1.0 if not isinstance(step, Tensor) else None
    out = []
    for w, g, m, v, vmax in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs):
        tt = t if t is not None else (step.to(torch.float64) + 1.0)
        beta1_t = beta1**tt if t is not None else torch.pow(torch.tensor(beta1, dtype=torch.float64, device=tt.device), tt)
        beta2_t = beta2**tt if t is not None else torch.pow(torch.tensor(beta2, dtype=torch.float64, device=tt.device), tt)
        gg = -g if maximize else g
        if weight_decay != 0 and not decoupled:
            gg = gg + weight_decay * w
        m_new = gg * (1 - beta1) if m is None else m * beta1 + (1 - beta1) * gg
        v_new = gg * gg * (1 - beta2) if v is None else v * beta2 + (1 - beta2) * gg * gg
        if vmax is not None:
            v_new = torch.maximum(vmax, v_new)
        bc1 = (1 - beta1_t)
        bc2_sqrt = (1 - beta2_t) ** 0.5
        if isinstance(bc1, Tensor):
            bc1 = bc1.to(w.dtype)
            bc2_sqrt = bc2_sqrt.to(w.dtype)
        d = (m_new / bc1) / (v_new.sqrt() / bc2_sqrt + eps)
        if weight_decay != 0 and decoupled:
            d = d + weight_decay * w
        out.append(d)
    return out


def lookahead_sgd(params, grads, momentum_buffers, alpha, momentum, dampening, weight_decay, nesterov, maximize=False):
    """``w_hat = w - alpha * d_SGD`` for every tensor."""
    return lookahead(params, sgd_directions(params, grads, momentum_buffers, momentum, dampening,
                                            weight_decay, nesterov, maximize), alpha)


def hyper_dot_sgd(val_grads, params, grads, momentum_buffers, momentum, dampening, weight_decay, nesterov, maximize=False):
    """``sum_i <g_val_i, d_SGD_i>``."""
    return hyper_dot(val_grads, sgd_directions(params, grads, momentum_buffers, momentum, dampening,
                                               weight_decay, nesterov, maximize))


def lookahead_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, alpha, beta1, beta2, eps,
                   weight_decay, decoupled, maximize=False):
    """``w_hat = w - alpha * d_Adam`` for every tensor."""
    return lookahead(params, adam_directions(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, beta1,
                                             beta2, eps, weight_decay, decoupled, maximize), alpha)


def hyper_dot_adam(val_grads, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, beta1, beta2, eps,
                   weight_decay, decoupled, maximize=False):
    """``sum_i <g_val_i, d_Adam_i>``."""
    return hyper_dot(val_grads, adam_directions(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, beta1,
                                                beta2, eps, weight_decay, decoupled, maximize))
