"""One-launch Triton kernels for the MLR-SNet scheduler step and its weight gradient.

Two kernels, each a single program (one CTA) that does all of its work in registers:

* :func:`launch_step` - the guarded scheduler step of
  :func:`autolr_fast.ops.reference.mlrsnet_guarded_step`: both input MLPs of every stacked cell,
  the four gates (input, forget, output, cell; forget ``sigmoid(z1 - 1)``), the state update
  written in place into ``h`` and ``c``, the output head, ``rate = min(max(gamma * p, 0),
  gamma)``, the NaN/Inf guard (a non-finite loss or rate keeps ``h``, ``c`` and ``rate``; a
  negative loss is clamped to 0), the new rate written into ``rate`` and into every
  optimizer ``lr`` tensor as ``lr_k = rate * scale_k``, and the ``ok`` flag.
* :func:`launch_param_grads` - ``grad_p * dp/dtheta`` for every weight tensor with the state
  held constant (the backward of :func:`autolr_fast.ops.reference.mlrsnet_forward` with respect to
  the weights, as :func:`autolr_fast.ops.reference.mlrsnet_param_grads`): the forward is recomputed
  in registers and back-propagated in the same launch.

Supported: float32 state and weights (contiguous, in the layout of :mod:`autolr_fast.ops.reference`),
``1 <= num_layers <= 2`` stacked cells, any hidden size ``2 <= H <= 128`` (odd sizes are
masked inside power-of-two blocks). :func:`unsupported_reason` says why an input is not
supported; the backend (``autolr_fast.ops.triton_backend``) then uses the reference instead.

Param groups: the step kernel takes up to ``LR_SLOTS`` (8) ``lr`` tensors as pointer
arguments, with their scales as float arguments (unused slots get a dummy pointer that is
never touched). With more groups, the remaining ones are written by :data:`_write_lr_kernel`,
one extra launch per further 8 groups, which reads the rate the step kernel just wrote (same
stream, so ordered). No host sync, no allocation: safe inside CUDA graphs.

Launch configuration: ``BLOCK_H``/``BLOCK_M`` are the next powers of two of ``H`` and
``M = H // 2``; ``num_warps`` grows with the tile (about 16 tile elements per thread, 1..16
warps). One compiled variant per (H, cells, number of lr tensors and their dtypes); register use
and spills per configuration are recorded in ``docs/kernels.md``.

The kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before triton was first imported (Triton decides between
compiling and interpreting when ``@triton.jit`` is applied, and its own library functions such
as ``tl.sum`` are decorated at import): ``tests/test_triton_kernels.py`` runs them that way in
a subprocess.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import warnings
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel

from ..optim_support import user_stacklevel
from .reference import WEIGHTS_PER_CELL, weight_shapes

__all__ = [
    "LR_SLOTS",
    "MAX_HIDDEN",
    "MAX_LAYERS",
    "unsupported_reason",
    "step_unsupported_reason",
    "param_grads_unsupported_reason",
    "launch_step",
    "launch_step_bound",
    "launch_step_if_supported",
    "launch_param_grads",
]

LR_SLOTS = 8
MAX_HIDDEN = 128
MAX_LAYERS = 2


# ------------------------------------------------------------------------------------------------
# Device helpers. Vectors of length H live along axis 1 as [1, BLOCK_H] tensors, vectors of length
# M = H // 2 (the input MLPs' hidden units) along axis 0 as [BLOCK_M, 1]; a matrix-vector product
# is a broadcast multiply plus a sum over the other axis, so no layout conversion is needed.
# ------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # Portable tanh (libdevice is not available in the interpreter): an odd polynomial near 0,
    # where (1 - e) / (1 + e) would cancel, and the exponential form elsewhere. NaN stays NaN.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    return tl.where(ax < 0.0625, small, tl.where(x < 0.0, -big, big))


@triton.jit
def _relu(a):
    # where() rather than maximum(): a NaN stays NaN, as in torch.relu.
    return tl.where(a < 0.0, 0.0, a)


@triton.jit
def _min_nan(a, b):
    # torch.minimum: NaN if either operand is NaN.
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def _is_finite(x):
    return tl.abs(x) <= 3.4028234663852886e38


@triton.jit
def _hidden_from_row(w0, b0, x_row, offs_m, offs_h, mask_m, mask_mh, H: tl.constexpr):
    # a = W0 @ x + b0 with W0 (M, H) row-major, x [1, BLOCK_H] -> [BLOCK_M, 1]
    w = tl.load(w0 + offs_m * H + offs_h, mask=mask_mh, other=0.0)
    return tl.sum(w * x_row, axis=1, keep_dims=True) + tl.load(b0 + offs_m, mask=mask_m, other=0.0)


@triton.jit
def _gate_preact(w2, b2, v2, d2, GATE: tl.constexpr, r1, r2, offs_m, offs_h, mask_h, mask_mh,
                 H: tl.constexpr, M: tl.constexpr):
    # z_gate = W2[gate] @ r1 + b2[gate] + V2[gate] @ r2 + d2[gate]; W2, V2 (4H, M) row-major,
    # read transposed as [BLOCK_M, BLOCK_H] tiles -> [1, BLOCK_H]
    rows = GATE * H + offs_h
    wt = tl.load(w2 + rows * M + offs_m, mask=mask_mh, other=0.0)
    vt = tl.load(v2 + rows * M + offs_m, mask=mask_mh, other=0.0)
    z = tl.sum(wt * r1, axis=0, keep_dims=True) + tl.sum(vt * r2, axis=0, keep_dims=True)
    z = z + tl.load(b2 + rows, mask=mask_h, other=0.0) + tl.load(d2 + rows, mask=mask_h, other=0.0)
    return tl.where(mask_h, z, 0.0)  # padding lanes: 0 * inf would be NaN


@triton.jit
def _cell_forward(x, h_prev, c_prev, w0, b0, w2, b2, v0, d0, v2, d2, offs_m, offs_h, mask_m, mask_h, mask_mh,
                  H: tl.constexpr, M: tl.constexpr, X_SCALAR: tl.constexpr):
    """One MLR-SNet cell; returns the activations the backward needs."""
    if X_SCALAR:
        # cell 0: input size 1, W0 is (M, 1)
        a1 = tl.load(w0 + offs_m, mask=mask_m, other=0.0) * x + tl.load(b0 + offs_m, mask=mask_m, other=0.0)
    else:
        a1 = _hidden_from_row(w0, b0, x, offs_m, offs_h, mask_m, mask_mh, H)
    a2 = _hidden_from_row(v0, d0, h_prev, offs_m, offs_h, mask_m, mask_mh, H)
    a1 = tl.where(mask_m, a1, 0.0)
    a2 = tl.where(mask_m, a2, 0.0)
    r1 = _relu(a1)
    r2 = _relu(a2)
    gi = tl.sigmoid(_gate_preact(w2, b2, v2, d2, 0, r1, r2, offs_m, offs_h, mask_h, mask_mh, H, M))
    gf = tl.sigmoid(_gate_preact(w2, b2, v2, d2, 1, r1, r2, offs_m, offs_h, mask_h, mask_mh, H, M) - 1.0)
    go = tl.sigmoid(_gate_preact(w2, b2, v2, d2, 2, r1, r2, offs_m, offs_h, mask_h, mask_mh, H, M))
    gg = _tanh(_gate_preact(w2, b2, v2, d2, 3, r1, r2, offs_m, offs_h, mask_h, mask_mh, H, M))
    c_new = gf * c_prev + gi * gg
    tc = _tanh(c_new)
    h_new = go * tc
    return a1, a2, gi, gf, go, gg, tc, c_new, h_new


@triton.jit
def _gate_backward(w2, v2, gw2, gb2, gv2, gd2, GATE: tl.constexpr, dz, r1, r2, offs_m, offs_h, mask_h, mask_mh,
                   H: tl.constexpr, M: tl.constexpr):
    # stores dW2[gate] = dz r1^T, dV2[gate] = dz r2^T, db2[gate] = dd2[gate] = dz;
    # returns the gate's contributions to dr1 = W2^T dz and dr2 = V2^T dz ([BLOCK_M, 1] each)
    rows = GATE * H + offs_h
    tl.store(gw2 + rows * M + offs_m, r1 * dz, mask=mask_mh)
    tl.store(gv2 + rows * M + offs_m, r2 * dz, mask=mask_mh)
    tl.store(gb2 + rows, dz, mask=mask_h)
    tl.store(gd2 + rows, dz, mask=mask_h)
    wt = tl.load(w2 + rows * M + offs_m, mask=mask_mh, other=0.0)
    vt = tl.load(v2 + rows * M + offs_m, mask=mask_mh, other=0.0)
    return tl.sum(wt * dz, axis=1, keep_dims=True), tl.sum(vt * dz, axis=1, keep_dims=True)


@triton.jit
def _cell_backward(dh, x, h_prev, c_prev, a1, a2, gi, gf, go, gg, tc,
                   w0, w2, v2, gw0, gb0, gw2, gb2, gv0, gd0, gv2, gd2,
                   offs_m, offs_h, mask_m, mask_h, mask_mh,
                   H: tl.constexpr, M: tl.constexpr, X_SCALAR: tl.constexpr):
    """Stores the cell's weight gradients given dL/dh_new; returns dL/dx ([1, BLOCK_H])."""
    do = dh * tc
    dc = dh * go * (1.0 - tc * tc)
    dzi = dc * gg * gi * (1.0 - gi)
    dzf = dc * c_prev * gf * (1.0 - gf)
    dzo = do * go * (1.0 - go)
    dzg = dc * gi * (1.0 - gg * gg)
    r1 = _relu(a1)
    r2 = _relu(a2)
    p1, q1 = _gate_backward(w2, v2, gw2, gb2, gv2, gd2, 0, dzi, r1, r2, offs_m, offs_h, mask_h, mask_mh, H, M)
    p2, q2 = _gate_backward(w2, v2, gw2, gb2, gv2, gd2, 1, dzf, r1, r2, offs_m, offs_h, mask_h, mask_mh, H, M)
    p3, q3 = _gate_backward(w2, v2, gw2, gb2, gv2, gd2, 2, dzo, r1, r2, offs_m, offs_h, mask_h, mask_mh, H, M)
    p4, q4 = _gate_backward(w2, v2, gw2, gb2, gv2, gd2, 3, dzg, r1, r2, offs_m, offs_h, mask_h, mask_mh, H, M)
    # relu backward as torch: the gradient passes where the output is > 0
    da1 = tl.where(a1 > 0.0, (p1 + p2) + (p3 + p4), 0.0)
    da2 = tl.where(a2 > 0.0, (q1 + q2) + (q3 + q4), 0.0)
    tl.store(gb0 + offs_m, da1, mask=mask_m)
    tl.store(gd0 + offs_m, da2, mask=mask_m)
    tl.store(gv0 + offs_m * H + offs_h, da2 * h_prev, mask=mask_mh)
    if X_SCALAR:
        tl.store(gw0 + offs_m, da1 * x, mask=mask_m)
        dx = tl.zeros_like(dh)
    else:
        tl.store(gw0 + offs_m * H + offs_h, da1 * x, mask=mask_mh)
        w = tl.load(w0 + offs_m * H + offs_h, mask=mask_mh, other=0.0)
        dx = tl.sum(w * da1, axis=0, keep_dims=True)
    return dx


@triton.jit
def _head_logit(head_w, head_b, x_row, offs_h, mask_h):
    hw = tl.load(head_w + offs_h, mask=mask_h, other=0.0)
    return tl.sum(tl.sum(hw * x_row, axis=1), axis=0) + tl.load(head_b)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _store_lrs(rate, lr0, lr1, lr2, lr3, lr4, lr5, lr6, lr7, s0, s1, s2, s3, s4, s5, s6, s7, NUM_LR: tl.constexpr):
    """``lr_k <- rate * s_k`` for the first ``NUM_LR`` slots (float32 product, stored in the lr
    tensor's dtype). Triton has no arrays of pointers: one argument per slot."""
    if NUM_LR > 0:
        tl.store(lr0, rate * s0)
    if NUM_LR > 1:
        tl.store(lr1, rate * s1)
    if NUM_LR > 2:
        tl.store(lr2, rate * s2)
    if NUM_LR > 3:
        tl.store(lr3, rate * s3)
    if NUM_LR > 4:
        tl.store(lr4, rate * s4)
    if NUM_LR > 5:
        tl.store(lr5, rate * s5)
    if NUM_LR > 6:
        tl.store(lr6, rate * s6)
    if NUM_LR > 7:
        tl.store(lr7, rate * s7)


@triton.jit(do_not_specialize_on_alignment=["loss_ptr", "ok_ptr"])  # new tensors every call
def _mlrsnet_step_kernel(
    loss_ptr, h_ptr, c_ptr, gamma_ptr, rate_ptr, ok_ptr, counters_ptr,
    a_w0, a_b0, a_w2, a_b2, a_v0, a_d0, a_v2, a_d2,  # cell 0
    b_w0, b_b0, b_w2, b_b2, b_v0, b_d0, b_v2, b_d2,  # cell 1 (dummies, never read, with one cell)
    head_w, head_b,
    lr0, lr1, lr2, lr3, lr4, lr5, lr6, lr7,
    s0, s1, s2, s3, s4, s5, s6, s7,
    H: tl.constexpr, M: tl.constexpr, NUM_LAYERS: tl.constexpr, NUM_LR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, COUNT: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)[None, :]
    offs_m = tl.arange(0, BLOCK_M)[:, None]
    mask_h = offs_h < H
    mask_m = offs_m < M
    mask_mh = mask_m & mask_h

    x = tl.load(loss_ptr).to(tl.float32)
    finite = _is_finite(x)
    safe = tl.where(finite, tl.where(x < 0.0, 0.0, x), 0.0)

    h0 = tl.load(h_ptr + offs_h, mask=mask_h, other=0.0)
    c0 = tl.load(c_ptr + offs_h, mask=mask_h, other=0.0)
    _, _, _, _, _, _, _, c_new0, h_new0 = _cell_forward(
        safe, h0, c0, a_w0, a_b0, a_w2, a_b2, a_v0, a_d0, a_v2, a_d2,
        offs_m, offs_h, mask_m, mask_h, mask_mh, H, M, True)
    top = h_new0
    if NUM_LAYERS == 2:
        h1 = tl.load(h_ptr + H + offs_h, mask=mask_h, other=0.0)
        c1 = tl.load(c_ptr + H + offs_h, mask=mask_h, other=0.0)
        _, _, _, _, _, _, _, c_new1, h_new1 = _cell_forward(
            h_new0, h1, c1, b_w0, b_b0, b_w2, b_b2, b_v0, b_d0, b_v2, b_d2,
            offs_m, offs_h, mask_m, mask_h, mask_mh, H, M, False)
        top = h_new1
    p = tl.sigmoid(_head_logit(head_w, head_b, top, offs_h, mask_h))

    gamma = tl.load(gamma_ptr)
    r = gamma * p
    r = _min_nan(tl.where(r < 0.0, 0.0, r), gamma)
    ok = finite & _is_finite(r)
    rate = tl.where(ok, r, tl.load(rate_ptr))

    # Not ok: h and c are left untouched (masked stores), as torch.where(ok, new, old) would.
    store_mask = tl.where(ok, mask_h, False)  # (not mask_h & ok: the interpreter cannot broadcast that)
    tl.store(h_ptr + offs_h, h_new0, mask=store_mask)
    tl.store(c_ptr + offs_h, c_new0, mask=store_mask)
    if NUM_LAYERS == 2:
        tl.store(h_ptr + H + offs_h, h_new1, mask=store_mask)
        tl.store(c_ptr + H + offs_h, c_new1, mask=store_mask)
    tl.store(rate_ptr, rate)
    tl.store(ok_ptr, ok)
    if COUNT:  # the scheduler's counters (int64): [skipped steps, negative losses]
        tl.store(counters_ptr, tl.load(counters_ptr) + tl.where(ok, 0, 1).to(tl.int64))
        tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + tl.where(finite & (x < 0.0), 1, 0).to(tl.int64))
    _store_lrs(rate, lr0, lr1, lr2, lr3, lr4, lr5, lr6, lr7, s0, s1, s2, s3, s4, s5, s6, s7, NUM_LR)


@triton.jit
def _write_lr_kernel(
    rate_ptr,
    lr0, lr1, lr2, lr3, lr4, lr5, lr6, lr7,
    s0, s1, s2, s3, s4, s5, s6, s7,
    NUM_LR: tl.constexpr,
):
    """``lr_k <- rate * s_k`` for param groups beyond the step kernel's ``LR_SLOTS``."""
    _store_lrs(tl.load(rate_ptr), lr0, lr1, lr2, lr3, lr4, lr5, lr6, lr7, s0, s1, s2, s3, s4, s5, s6, s7, NUM_LR)


@triton.jit
def _mlrsnet_param_grads_kernel(
    loss_ptr, h_ptr, c_ptr, grad_p_ptr,
    a_w0, a_b0, a_w2, a_b2, a_v0, a_d0, a_v2, a_d2,  # cell 0 weights
    b_w0, b_b0, b_w2, b_b2, b_v0, b_d0, b_v2, b_d2,  # cell 1 weights (dummies with one cell)
    head_w, head_b,
    ga_w0, ga_b0, ga_w2, ga_b2, ga_v0, ga_d0, ga_v2, ga_d2,  # gradients, same layout
    gb_w0, gb_b0, gb_w2, gb_b2, gb_v0, gb_d0, gb_v2, gb_d2,
    g_head_w, g_head_b,
    H: tl.constexpr, M: tl.constexpr, NUM_LAYERS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)[None, :]
    offs_m = tl.arange(0, BLOCK_M)[:, None]
    mask_h = offs_h < H
    mask_m = offs_m < M
    mask_mh = mask_m & mask_h

    # forward, keeping the activations (as reference.mlrsnet_forward: the loss unguarded)
    x0 = tl.load(loss_ptr).to(tl.float32)
    h0 = tl.load(h_ptr + offs_h, mask=mask_h, other=0.0)
    c0 = tl.load(c_ptr + offs_h, mask=mask_h, other=0.0)
    a1_0, a2_0, gi0, gf0, go0, gg0, tc0, c_new0, h_new0 = _cell_forward(
        x0, h0, c0, a_w0, a_b0, a_w2, a_b2, a_v0, a_d0, a_v2, a_d2,
        offs_m, offs_h, mask_m, mask_h, mask_mh, H, M, True)
    top = h_new0
    if NUM_LAYERS == 2:
        h1 = tl.load(h_ptr + H + offs_h, mask=mask_h, other=0.0)
        c1 = tl.load(c_ptr + H + offs_h, mask=mask_h, other=0.0)
        a1_1, a2_1, gi1, gf1, go1, gg1, tc1, c_new1, h_new1 = _cell_forward(
            h_new0, h1, c1, b_w0, b_b0, b_w2, b_b2, b_v0, b_d0, b_v2, b_d2,
            offs_m, offs_h, mask_m, mask_h, mask_mh, H, M, False)
        top = h_new1
    p = tl.sigmoid(_head_logit(head_w, head_b, top, offs_h, mask_h))

    # backward
    dlogit = tl.load(grad_p_ptr).to(tl.float32) * (1.0 - p) * p
    tl.store(g_head_w + offs_h, dlogit * top, mask=mask_h)
    tl.store(g_head_b, dlogit)
    dh = dlogit * tl.load(head_w + offs_h, mask=mask_h, other=0.0)
    if NUM_LAYERS == 2:
        dh = _cell_backward(dh, h_new0, h1, c1, a1_1, a2_1, gi1, gf1, go1, gg1, tc1,
                            b_w0, b_w2, b_v2, gb_w0, gb_b0, gb_w2, gb_b2, gb_v0, gb_d0, gb_v2, gb_d2,
                            offs_m, offs_h, mask_m, mask_h, mask_mh, H, M, False)
    _cell_backward(dh, x0, h0, c0, a1_0, a2_0, gi0, gf0, go0, gg0, tc0,
                   a_w0, a_w2, a_v2, ga_w0, ga_b0, ga_w2, ga_b2, ga_v0, ga_d0, ga_v2, ga_d2,
                   offs_m, offs_h, mask_m, mask_h, mask_mh, H, M, True)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _expected_shapes(num_layers: int, hidden: int, middle: int) -> tuple[tuple[int, ...], ...]:
    return tuple(weight_shapes(num_layers, hidden, middle))


def unsupported_reason(h: torch.Tensor, c: torch.Tensor, weights: Sequence[torch.Tensor]) -> str | None:
    """``None`` if the kernels take this state and these weights, else what is not supported."""
    if h.dim() != 2 or c.shape != h.shape:
        return f"h and c must both be (num_layers, H), got {tuple(h.shape)} and {tuple(c.shape)}"
    num_layers, hidden = h.shape
    if not 1 <= num_layers <= MAX_LAYERS:
        return f"the Triton kernels take 1..{MAX_LAYERS} stacked cells, got {num_layers}"
    if not 2 <= hidden <= MAX_HIDDEN:
        return f"the Triton kernels take hidden sizes 2..{MAX_HIDDEN}, got {hidden}"
    if len(weights) != WEIGHTS_PER_CELL * num_layers + 2:
        expected = WEIGHTS_PER_CELL * num_layers + 2
        return f"expected {expected} weight tensors for {num_layers} cell(s), got {len(weights)}"
    device = h.device
    f32 = torch.float32
    for name, t in (("h", h), ("c", c)):
        if t.dtype != f32 or not t.is_contiguous() or t.device != device:
            return f"{name} must be a contiguous float32 tensor on {device} (got {t.dtype} on {t.device})"
    middle = weights[0].shape[0] if weights[0].dim() == 2 else -1
    if not 1 <= middle <= MAX_HIDDEN:  # the block sizes (and the registers) follow it
        return f"the Triton kernels take a middle size 1..{MAX_HIDDEN} (the first weight's rows), got {middle}"
    for k, (w, shape) in enumerate(zip(weights, _expected_shapes(num_layers, hidden, middle))):
        if w.shape != shape or w.dtype != f32 or not w.is_contiguous() or w.device != device:
            if w.shape != shape:
                return f"weight {k} has shape {tuple(w.shape)}, expected {shape} (layout of autolr_fast.ops.reference)"
            return f"weight {k} must be a contiguous float32 tensor on {device} (got {w.dtype} on {w.device})"
    return None


def _scalar_reason(name: str, t: torch.Tensor, device: torch.device, kind: str) -> str | None:
    if t.numel() != 1 or t.device != device:
        return f"{name} must be a 1-element tensor on {device}, got shape {tuple(t.shape)} on {t.device}"
    if kind == "float32" and t.dtype != torch.float32:
        return f"{name} must be float32, got {t.dtype}"
    if kind == "float" and not t.dtype.is_floating_point:
        return f"{name} must have a floating-point dtype, got {t.dtype}"
    if kind == "bool" and t.dtype != torch.bool:
        return f"{name} must be a bool tensor, got {t.dtype}"
    return None


def _state_reason(h, c, weights, gamma, rate, lr_list, scales, counters) -> str | None:
    """What :func:`step_unsupported_reason` checks besides the per-call ``loss`` and ``ok``."""
    reason = unsupported_reason(h, c, weights)
    if reason is not None:
        return reason
    device = h.device
    if counters is not None and not (counters.device == device and counters.dtype == torch.int64
                                     and counters.numel() == 2 and counters.is_contiguous()):
        return "counters must be a contiguous int64 tensor of 2 elements on the state's device"
    if len(scales) < len(lr_list):  # the reference it falls back to raises
        return f"{len(lr_list)} lr tensors but only {len(scales)} scales"
    checks = [("gamma", gamma, "float32"), ("rate", rate, "float32")]
    checks += [(f"lr_list[{k}]", lr, "float") for k, lr in enumerate(lr_list)]
    for name, t, kind in checks:
        reason = _scalar_reason(name, t, device, kind)
        if reason is not None:
            return reason
    return None


def step_unsupported_reason(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters=None) -> str | None:
    """``None`` if :func:`launch_step` takes these arguments, else why not.

    Called every step, so what it accepted is remembered (see :class:`_StepPlan`): the same
    tensor objects over the same memory, with the same strides, shape and dtype, are not checked
    again, only ``loss`` and ``ok``, which are new every step (the cost of each way is in
    ``docs/bench_results``).
    """
    return _plan_for(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters)[1]


def param_grads_unsupported_reason(loss, h, c, weights, grad_p) -> str | None:
    """``None`` if :func:`launch_param_grads` takes these arguments, else why not."""
    reason = unsupported_reason(h, c, weights)
    if reason is None:
        reason = _scalar_reason("loss", loss, h.device, "float") or _scalar_reason("grad_p", grad_p, h.device, "float")
    return reason


@functools.lru_cache(maxsize=64)
def _blocks(hidden: int, middle: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_M, num_warps): about 16 tile elements per thread, 1..16 warps."""
    block_h, block_m = triton.next_power_of_2(hidden), triton.next_power_of_2(middle)
    return block_h, block_m, max(1, min(16, block_h * block_m // 512))


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: switch to the tensors' device if it differs."""
    # torch._C._cuda_getDevice: torch.cuda.current_device without its Python-level init checks
    # (a CUDA tensor exists, so CUDA is initialised)
    if t.is_cuda and t.get_device() != torch._C._cuda_getDevice():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _weight_args(weights: Sequence[torch.Tensor], num_layers: int) -> list[torch.Tensor]:
    cell0 = list(weights[:WEIGHTS_PER_CELL])
    cell1 = list(weights[WEIGHTS_PER_CELL:2 * WEIGHTS_PER_CELL]) if num_layers == 2 else cell0
    return cell0 + cell1 + list(weights[-2:])


def _lr_args(lrs: Sequence[torch.Tensor], scales: Sequence[float], dummy: torch.Tensor) -> list:
    ptrs = list(lrs) + [dummy] * (LR_SLOTS - len(lrs))
    vals = [float(s) for s in scales] + [1.0] * (LR_SLOTS - len(scales))
    return ptrs + vals


def _hooks_owner():
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    return runtime if runtime is not None and hasattr(runtime, "launch_enter_hook") else CompiledKernel


_HOOKS_OWNER = _hooks_owner()


def _launch_hooks() -> tuple:
    """Triton's launch enter/exit hooks (profilers such as proton install them): ``knobs.runtime``
    in Triton 3.4+, attributes of ``CompiledKernel`` before. Read at every launch: a profiler
    may install them at any time."""
    return getattr(_HOOKS_OWNER, "launch_enter_hook", None), getattr(_HOOKS_OWNER, "launch_exit_hook", None)


def _hooks_active(hook) -> bool:
    # None in most Triton versions when nothing is installed; a HookChain with no calls in others
    return hook is not None and bool(getattr(hook, "calls", True))


def _direct_runner(compiled):
    """A launcher for ``compiled`` with the signature of ``compiled[(1, 1, 1)]``
    (``runner(*args, stream=...)``) that calls the compiled kernel's C launcher itself when no
    launch hook is installed: the wrapper Triton puts around it gathers launch metadata for the
    hooks on every call. With a hook installed (a profiler), every call goes through Triton's
    wrapper. Any object without the three attributes (another Triton, a test's fake) gets its
    own ``[(1, 1, 1)]``."""
    wrapped = compiled[(1, 1, 1)]
    run, function, packed = (getattr(compiled, name, None) for name in ("run", "function", "packed_metadata"))
    if not callable(run) or function is None or packed is None:
        return wrapped

    def direct(*args, stream):
        run(1, 1, 1, stream, function, packed, None, None, None, *args)

    def runner(*args, stream):
        enter, leave = _launch_hooks()
        # _hooks_active, inlined: two calls of it cost about 4 % of a steady-state step's host work
        if ((enter is not None and getattr(enter, "calls", True))
                or (leave is not None and getattr(leave, "calls", True))):
            wrapped(*args, stream=stream)
        else:  # none installed (None, or an empty chain): the call the launcher check compared
            run(1, 1, 1, stream, function, packed, None, None, None, *args)

    # what the launcher check compares with the generic launch, whatever hooks are installed at
    # that moment (the wrapper is Triton's own path)
    runner.direct = direct
    return runner


def _current_stream(device_index: int) -> int:
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Triton's own launcher uses
    return get(device_index) if get is not None else torch.cuda.current_stream(device_index).cuda_stream


# The step kernel's constexpr parameters, in the order of its signature (after the pointers and
# the scales): the compiled launcher takes every argument positionally.
STEP_CONSTEXPRS = ("H", "M", "NUM_LAYERS", "NUM_LR", "BLOCK_H", "BLOCK_M", "COUNT")
_LOSS, _OK = 0, 5  # positions of the two per-call arguments


# Positions in the step kernel's argument list of the tensors it writes besides ``ok``: h, c,
# rate, counters (the rate again without counters) and the lr slots (unused slots: the rate).
_WRITTEN = (1, 2, 4, 6) + tuple(range(7 + 2 * WEIGHTS_PER_CELL + 2, 7 + 2 * WEIGHTS_PER_CELL + 2 + LR_SLOTS))
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as integers of its size: compared bit for bit (a NaN equals the same NaN)."""
    return t.view(_SAME_SIZE_INT[t.element_size()]) if t.is_floating_point() else t


class _LauncherCheck:
    """Whether the compiled kernel's own launcher takes the arguments as :class:`_StepPlan`
    passes them (every argument positionally, pointers as integers, the constexprs last): a
    private Triton convention, so it is checked once per process, at the first launch that
    compiled the kernel, by running the step through Triton's generic launch and through the
    launcher on two scratch copies of the state and comparing them bit for bit. The comparison
    is read without a host sync (a copy to pinned memory and an event); until it arrives the
    plans keep Triton's generic launch. If the launcher raises or differs: one warning, and the
    generic launch from then on (a few microseconds more per step, nothing else changes).

    ``state``: ``"unchecked"``, ``"pending"``, ``"ok"`` or ``"failed"`` (a test with a fake
    kernel may start from ``"ok"``).
    """

    __slots__ = ("state", "flag", "event")

    def __init__(self, state: str = "unchecked") -> None:
        self.state = state
        self.flag: torch.Tensor | None = None
        self.event = None

    def expect(self, same: torch.Tensor) -> None:
        """Wait, without blocking, for ``same`` (a bool tensor: the two launches agreed)."""
        if same.is_cuda:
            self.flag = torch.empty(same.shape, dtype=torch.bool, pin_memory=True)
            self.flag.copy_(same, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.flag, self.event = same, None
        self.state = "pending"

    def usable(self) -> bool:
        """Whether the launcher may be used now (deciding the check if its result arrived)."""
        if self.state == "pending" and (self.event is None or self.event.query()):
            if all(self.flag.tolist()):
                self.state = "ok"
            else:
                self.fail("its result differs from Triton's generic launch")
            self.flag = self.event = None
        return self.state == "ok"

    def fail(self, why: str) -> None:
        if self.state != "failed":
            self.state = "failed"
            warnings.warn(
                f"autolr_fast: the launcher of the compiled Triton {triton.__version__} step kernel does not take "
                f"the arguments as autolr_fast passes them ({why}); the controller step uses Triton's generic "
                "launch instead (a few microseconds more per step, same results)",
                RuntimeWarning, stacklevel=user_stacklevel())


_LAUNCHER = _LauncherCheck()
# set to 1: never use the compiled launcher directly, always Triton's generic launch (a way out
# should a Triton version take the launcher's arguments differently without raising)
GENERIC_LAUNCH_ENV = "AUTOLR_FAST_TRITON_GENERIC_LAUNCH"


class _StepPlan:
    """One argument set the step kernel accepted, and how to launch it again cheaply.

    Holds the state tensors (so their ids cannot be reused while the plan is cached) with their
    memory layout (:func:`_layout`), the lr scales (their values are baked into the arguments),
    and the kernel's argument list. After the first launch compiled the kernel, later launches
    call the compiled kernel's launcher directly with the fixed pointers as integers: Triton's
    generic launch binds and specializes every argument on every call, and this kernel has 41
    (``bench/test_bench_host_overhead.py`` measures both). That launcher convention is checked
    once against the generic launch (:class:`_LauncherCheck`), which stays in use if it fails.
    ``loss`` and ``ok`` are new tensors every step: their addresses are passed per call (the
    kernel does not specialize on their alignment), and a ``loss`` of another dtype goes through
    Triton's generic launch (which compiles that variant).

    :meth:`launch_bound` is the steady state's launch: the same call with no new decision to
    make costs the checks that can fail between two steps and the launcher's call.
    """

    __slots__ = ("tensors", "layout", "scales", "counts", "h", "args", "constexprs", "num_warps", "extra",
                 "device_index", "device_id", "runner", "runner_args", "loss_dtype")

    def __init__(self, h, c, weights, gamma, rate, lr_list, scales, counters, tensors) -> None:
        self.tensors = tensors
        self.layout = _layout_key(tensors)
        self.scales = tuple(scales)
        self.counts = (len(weights), len(lr_list))
        self.h = h
        self.device_id = h.get_device()  # -1 on the CPU: compared with the loss's and ok's
        num_layers, hidden = h.shape
        middle = weights[0].shape[0]
        block_h, block_m, self.num_warps = _blocks(hidden, middle)
        first = list(lr_list[:LR_SLOTS])
        self.args = [None, h, c, gamma, rate, None, counters if counters is not None else rate,
                     *_weight_args(weights, num_layers), *_lr_args(first, scales[:LR_SLOTS], rate)]
        self.constexprs = dict(H=hidden, M=middle, NUM_LAYERS=num_layers, NUM_LR=len(first), BLOCK_H=block_h,
                               BLOCK_M=block_m, COUNT=counters is not None)
        self.extra = [_lr_args(list(lr_list[i:i + LR_SLOTS]), scales[i:i + LR_SLOTS], rate)
                      + [len(lr_list[i:i + LR_SLOTS])] for i in range(LR_SLOTS, len(lr_list), LR_SLOTS)]
        self.device_index = h.device.index if h.is_cuda else None
        self.runner = None
        self.runner_args: list = []
        self.loss_dtype = None

    def matches(self, tensors, scales: Sequence[float]) -> bool:
        return (self.scales == tuple(scales) and len(self.tensors) == len(tensors)
                and all(map(operator.is_, self.tensors, tensors))
                and self.layout == _layout_key(tensors))

    def launch_bound(self, loss, tensors, counts, scales, ok) -> bool:
        """Launch through the checked compiled launcher when ``tensors`` (ordered as
        :func:`_plan_for` orders them) have this plan's memory layout, the scales its values,
        ``loss`` and ``ok`` are what the plan's launcher takes and the state's device is the
        current one: the steady state of a scheduler, checked without building anything.
        Otherwise launch nothing and return False: the caller takes the checked path.

        Tensors are compared by memory, not identity: equal layout keys mean that the tensors
        passed now have the addresses, strides, shapes and dtypes baked into the plan's
        arguments, which is all the kernel reads and writes. ``counts`` (the number of weight
        and lr tensors) keeps each tensor in its role."""
        if (self.runner is None or self.extra or counts != self.counts or loss.dtype is not self.loss_dtype
                or ok.dtype is not torch.bool or loss.numel() != 1 or ok.numel() != 1
                or loss.get_device() != self.device_id or ok.get_device() != self.device_id
                or self.scales != tuple(scales)
                or (self.device_id >= 0 and torch._C._cuda_getDevice() != self.device_index)):
            return False
        try:
            if _layout_key(tensors) != self.layout:
                return False
        except (RuntimeError, TypeError, ValueError):  # e.g. a sparse tensor: the checked path says why
            return False
        return self._call_runner(loss, ok)

    def launch(self, loss: torch.Tensor, ok: torch.Tensor) -> None:
        # Triton launches on the current device: switch only when it is not the state's (the
        # common case skips the context manager's cost)
        if self.h.is_cuda and self.device_index != torch._C._cuda_getDevice():
            with torch.cuda.device(self.device_index):
                self._launch(loss, ok)
        else:
            self._launch(loss, ok)

    def _launch(self, loss: torch.Tensor, ok: torch.Tensor) -> None:
        if self.runner is not None and loss.dtype is self.loss_dtype:
            if not self._call_runner(loss, ok):
                self._generic_launch(loss, ok)
        else:
            compiled = self._generic_launch(loss, ok)
            self._keep_launcher(compiled, loss, ok)
        for extra in self.extra:
            _write_lr_kernel[(1,)](self.args[4], *extra[:-1], NUM_LR=extra[-1], num_warps=1)

    def _call_runner(self, loss: torch.Tensor, ok: torch.Tensor) -> bool:
        """Launch through the checked compiled launcher; False if it refused the arguments
        (nothing was launched; the launcher is dropped, one warning for every plan)."""
        # addresses, not tensors: for each tensor the launcher would look up data_ptr and ask
        # the driver about it (cuPointerGetAttribute); the callers checked both. The plan's own
        # list: this call's two addresses replace the last's (not re-entrant)
        args = self.runner_args
        args[_LOSS], args[_OK] = loss.data_ptr(), ok.data_ptr()
        try:
            self.runner(*args, stream=_current_stream(self.device_index))
        except TypeError as exc:  # the launcher refused the arguments: nothing was launched
            _LAUNCHER.fail(f"{type(exc).__name__}: {exc}")
            self.runner = None
            return False
        return True

    def _generic_launch(self, loss: torch.Tensor, ok: torch.Tensor, args: list | None = None):
        args = (self.args if args is None else args).copy()
        args[_LOSS], args[_OK] = loss, ok
        return _mlrsnet_step_kernel[(1,)](*args, **self.constexprs, num_warps=self.num_warps)

    def _keep_launcher(self, compiled, loss: torch.Tensor, ok: torch.Tensor) -> None:
        # a compiled kernel (not the interpreter's None, not a test's wrapper) of this signature
        if self.device_index is None or not isinstance(compiled, CompiledKernel) or _LAUNCHER.state == "failed":
            return
        if os.environ.get(GENERIC_LAUNCH_ENV, "0") not in ("", "0"):
            return
        if tuple(getattr(_mlrsnet_step_kernel, "arg_names", ())[-len(STEP_CONSTEXPRS):]) != STEP_CONSTEXPRS:
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return  # no check inside a CUDA graph capture: the next launch outside one decides
        fixed = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in self.args]
        runner_args = fixed + [self.constexprs[name] for name in STEP_CONSTEXPRS]
        runner = _direct_runner(compiled)
        if _LAUNCHER.state == "unchecked":
            try:
                _LAUNCHER.expect(self._compare_launches(runner, runner_args, loss, ok))
            except Exception as exc:  # noqa: BLE001 - any failure of the launcher means: do not use it
                _LAUNCHER.fail(f"{type(exc).__name__}: {exc}")
        if _LAUNCHER.usable():
            self.runner, self.runner_args, self.loss_dtype = runner, runner_args, loss.dtype

    def _compare_launches(self, runner, runner_args: list, loss: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """The step through Triton's generic launch and through ``runner`` on two copies of the
        state it writes (the state itself is left alone): a bool tensor, whether all agree."""
        copies: tuple[dict, dict] = ({}, {})
        generic_args, launcher_args = list(self.args), list(runner_args)
        for i in _WRITTEN:
            t = self.args[i]
            if id(t) not in copies[0]:  # aliases (the rate in unused slots) keep sharing one copy
                copies[0][id(t)], copies[1][id(t)] = t.clone(), t.clone()
            generic_args[i] = copies[0][id(t)]
            launcher_args[i] = copies[1][id(t)].data_ptr()
        # opposite starting values: an ok that one of them does not write is a difference
        ok_generic, ok_launcher = torch.zeros_like(ok), torch.ones_like(ok)
        self._generic_launch(loss, ok_generic, generic_args)
        launcher_args[_LOSS], launcher_args[_OK] = loss.data_ptr(), ok_launcher.data_ptr()
        getattr(runner, "direct", runner)(*launcher_args, stream=_current_stream(self.device_index))
        pairs = [(copies[0][key], copies[1][key]) for key in copies[0]] + [(ok_generic, ok_launcher)]
        return torch.stack([(_bits(a) == _bits(b)).all() for a, b in pairs])


_SHAPE_AND_DTYPE = operator.attrgetter("shape", "dtype")


def _layout(tensors) -> tuple:
    """Where each tensor's memory is and how it is laid out: pointer, strides, shape, dtype.

    The plan's tensors are the same objects every step, but ``t.data = other`` (or ``set_``)
    swaps memory and metadata under the same object, and the new memory may start at the old
    address (the allocator reuses it, or ``other`` is a view of the old storage); all four are
    compared so such a tensor is checked again. The device needs no entry: under CUDA's unified
    addressing no two devices (or host memory) share an address.

    :func:`use_layout_key` installs a compiled equivalent (faster; see ``docs/bench_results``).
    """
    return (tuple(map(torch.Tensor.data_ptr, tensors)), tuple(map(torch.Tensor.stride, tensors)),
            tuple(map(_SHAPE_AND_DTYPE, tensors)))


_layout_key = _layout


def use_layout_key(fn=None) -> None:
    """Make the plans compare layouts with ``fn(tensors)`` (any value that is equal exactly when
    :func:`_layout`'s is, such as ``autolr_fast._C.tensor_layout_key``, which
    ``autolr_fast.ops.triton_backend`` installs when the extension is built); ``None`` restores
    :func:`_layout`. Cached plans are dropped, as their keys came from the other function."""
    global _layout_key
    _layout_key = _layout if fn is None else fn
    _PLANS.clear()


# Plans by id(h) (a plan holds its h, so the id stays valid while it is cached)
_PLANS: dict[int, _StepPlan] = {}
_PLANS_MAX = 16


def _step_tensors(h, c, weights, gamma, rate, lr_list, counters) -> tuple:
    """The tensors a plan is checked on, in the order of its layout key."""
    if counters is None:
        return (h, c, gamma, rate, *weights, *lr_list)
    return (h, c, gamma, rate, counters, *weights, *lr_list)


def _plan_for(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters) -> tuple[_StepPlan | None, str | None]:
    """``(plan, None)`` for arguments the step kernel takes, else ``(None, reason)``."""
    tensors = _step_tensors(h, c, weights, gamma, rate, lr_list, counters)
    plan = _PLANS.get(id(h))
    if plan is None or not plan.matches(tensors, scales):
        reason = _state_reason(h, c, weights, gamma, rate, lr_list, scales, counters)
        if reason is not None:
            return None, reason
        if len(_PLANS) >= _PLANS_MAX and id(h) not in _PLANS:  # replacing h's own plan evicts nothing
            _PLANS.pop(next(iter(_PLANS)))
        plan = _PLANS[id(h)] = _StepPlan(h, c, weights, gamma, rate, lr_list, scales, counters, tensors)
    device = h.device
    if (loss.device == device and ok.device == device and ok.dtype is torch.bool and loss.dtype.is_floating_point
            and loss.numel() == 1 and ok.numel() == 1):
        return plan, None  # the common case, in one expression
    reason = _scalar_reason("loss", loss, device, "float") or _scalar_reason("ok", ok, device, "bool")
    return (None, reason) if reason is not None else (plan, None)


def launch_step_bound(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters=None) -> bool:
    """:func:`launch_step` for the arguments of the last launch on ``h`` with a new ``loss`` and
    ``ok``, through that launch's plan (:meth:`_StepPlan.launch_bound`): True if launched, False
    (nothing launched) when anything else changed, or the plan cannot launch that way yet."""
    plan = _PLANS.get(id(h))
    return plan is not None and plan.launch_bound(loss, _step_tensors(h, c, weights, gamma, rate, lr_list, counters),
                                                  (len(weights), len(lr_list)), scales, ok)


def launch_step_if_supported(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters=None) -> str | None:
    """:func:`launch_step` if the kernel takes these arguments (returns ``None``), else
    nothing is launched and the reason is returned. One argument check for both."""
    plan, reason = _plan_for(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters)
    if plan is not None:
        plan.launch(loss, ok)
    return reason


def launch_step(
    loss: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    weights: Sequence[torch.Tensor],
    gamma: torch.Tensor,
    rate: torch.Tensor,
    lr_list: Sequence[torch.Tensor],
    scales: Sequence[float],
    ok: torch.Tensor,
    counters: torch.Tensor | None = None,
) -> None:
    """Run the guarded step kernel: one launch for up to ``LR_SLOTS`` param groups.

    In place: ``h``, ``c`` (the state), ``rate`` (1-element float32), every ``lr_list[k]``
    (1-element, any float dtype) gets ``rate * scales[k]``, and ``ok`` (1-element bool) whether
    the step was taken; ``counters`` (optional, int64 ``[2]``) gets ``+1`` in slot 0 for a step
    not taken and in slot 1 for a finite negative loss (what ``reference.count_step_`` does).
    ``loss`` may have any float dtype (read as float32, as the reference does). Raises
    ``ValueError`` for inputs the kernel does not take (see :func:`step_unsupported_reason`;
    the check is cached, so there is no unchecked variant).
    """
    reason = launch_step_if_supported(loss, h, c, weights, gamma, rate, lr_list, scales, ok, counters)
    if reason is not None:
        raise ValueError(f"mlrsnet step kernel: {reason}")


def launch_param_grads(
    loss: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    weights: Sequence[torch.Tensor],
    grad_p: torch.Tensor,
    out: Sequence[torch.Tensor] | None = None,
    *,
    check: bool = True,
    num_warps: int | None = None,
) -> list[torch.Tensor]:
    """``grad_p * dp/dtheta`` for every weight tensor (state held constant), one launch.

    ``out``: contiguous float32 tensors shaped like ``weights`` to write into (allocated when
    ``None``); every element is written. Returns the gradient tensors.
    """
    if check:
        reason = param_grads_unsupported_reason(loss, h, c, weights, grad_p)
        if reason is None and out is not None:
            reason = unsupported_reason(h, c, out)
            if reason is None and any(o.shape != w.shape for o, w in zip(out, weights)):
                reason = "shapes differ from the weights' (the kernel writes with the weights' sizes)"
            reason = None if reason is None else f"out: {reason}"
        if reason is not None:
            raise ValueError(f"mlrsnet param-grads kernel: {reason}")
    out = [torch.empty_like(w) for w in weights] if out is None else list(out)
    num_layers, hidden = h.shape
    middle = weights[0].shape[0]
    block_h, block_m, auto_warps = _blocks(hidden, middle)
    with _device_guard(h):
        _mlrsnet_param_grads_kernel[(1,)](
            loss, h, c, grad_p,
            *_weight_args(weights, num_layers),
            *_weight_args(out, num_layers),
            H=hidden, M=middle, NUM_LAYERS=num_layers,
            BLOCK_H=block_h, BLOCK_M=block_m, num_warps=num_warps or auto_warps,
        )
    return out
