"""MLR-SNet with training progress as a second input: the experiment of issue 15's "if an extra
input such as training progress helps, add it as an option and show its effect".

:class:`ProgressMLRSNet` is the MLR-SNet cell (the same gates, widths and head) reading
``x_t = [L_t, t / T]`` instead of ``L_t``, with ``T`` the run's length. It serves
:class:`autolr_fast.AutoLR` through the ``Controller`` interface as a *relative* controller:
the rate is ``gamma * p_t / p*``, where ``gamma`` is AutoLR's scale (the optimizer's ``lr`` times
the envelope) and ``p*`` the output it settles at on the first finite loss at progress 0, the
same anchor AutoLR takes for an MLR-SNet (``lr / p*``). It runs on the plain PyTorch path only:
the fused kernels, the C runtime and the export read one input. It lives in the harness until
it is shown to help (``docs/compare.md``, "Training progress as a second controller input").
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

from autolr_fast.controllers.mlrsnet import MLRSNetCell
from autolr_fast.ops import reference
from autolr_fast.rate_scale import MIN_SETTLED_P, SETTLE_STEPS

FILE_FORMAT = "autolr-experiments/progress-mlrsnet/1"
INPUTS = 2  # the loss, the fraction of the run done
UNSET = -1.0  # p_star before the first finite loss (a finite marker: AutoLR refuses non-finite saved state)


class ProgressMLRSNet(nn.Module):
    """One MLR-SNet cell on ``[loss, progress]``; ``start_run(T)`` before each run.

    Buffers: the recurrent state ``h``, ``c`` (``(1, H)``), the step ``t``, the run length
    ``total`` and the anchor ``p_star`` (``UNSET`` until the first finite loss; 0 when the settled
    output was below ``MIN_SETTLED_P``: no usable scale, the rate is then 0, as AutoLR's for an
    MLR-SNet).
    """

    relative = True  # AutoLR: rate = gamma * level, level 1 at the start (here p_t / p*)
    default_gamma: float | None = None

    def __init__(self, hidden_size: int = 50) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cell = MLRSNetCell(INPUTS, hidden_size)
        self.head = nn.Linear(hidden_size, 1)
        self.register_buffer("h", torch.zeros(1, hidden_size))
        self.register_buffer("c", torch.zeros(1, hidden_size))
        self.register_buffer("t", torch.zeros(()))
        self.register_buffer("total", torch.ones(()))
        self.register_buffer("p_star", torch.full((), UNSET))

    def weights(self) -> list[Tensor]:
        """The cell's eight tensors and the head's two (``reference``'s layout, one cell)."""
        return [*self.cell.flat_weights(), self.head.weight, self.head.bias]

    def start_run(self, total_steps: int) -> None:
        """A new run of ``total_steps`` steps: the state, the step and the anchor start again."""
        if total_steps < 1:
            raise ValueError(f"ProgressMLRSNet needs the run's length to read its progress, got {total_steps!r}")
        self.reset()
        self.total.fill_(float(total_steps))

    def reset(self) -> None:
        with torch.no_grad():
            self.h.zero_()
            self.c.zero_()
            self.t.zero_()
            self.p_star.fill_(UNSET)

    def initial_rate(self, base_lr: float) -> float:
        return base_lr  # AutoLR starts a relative controller at gamma (level 1)

    def input_of(self, loss: Tensor) -> Tensor:
        """``[loss, t / T]`` (shape ``(2,)``) for the next step; progress is capped at 1."""
        progress = (self.t / self.total).clamp(0.0, 1.0)
        return torch.stack([loss.reshape(()).to(self.h.dtype), progress])

    def output(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(p, h_new, c_new)`` for input ``x`` (``(2,)``) from state ``(h, c)``; gradients flow
        to the weights."""
        w = self.weights()
        h_new, c_new = reference.mlrsnet_cell(x, h[0], c[0], w[:8])
        p = torch.sigmoid(nn.functional.linear(h_new, w[8], w[9])).reshape(())
        return p, h_new.unsqueeze(0), c_new.unsqueeze(0)

    @torch.no_grad()
    def _settle(self, loss: Tensor) -> None:
        """The anchor: ``SETTLE_STEPS`` steps on ``loss`` at progress 0; the state is kept (as
        AutoLR keeps an MLR-SNet's)."""
        x = torch.stack([loss.reshape(()).to(self.h.dtype), torch.zeros((), dtype=self.h.dtype)])
        p = torch.zeros(())
        for _ in range(SETTLE_STEPS):
            p, h, c = self.output(x, self.h, self.c)
            self.h.copy_(h)
            self.c.copy_(c)
        if float(p) < MIN_SETTLED_P:
            warnings.warn(f"ProgressMLRSNet settles at p = {float(p):.3g} on the first loss ({float(loss):.4g}), below "
                          f"{MIN_SETTLED_P}: no usable anchor, the rate stays 0 for this run", RuntimeWarning,
                          stacklevel=3)
            self.p_star.zero_()
        else:
            self.p_star.copy_(p)

    @torch.no_grad()
    def scheduler_step_(self, loss: Tensor, gamma: Tensor, rate: Tensor) -> None:
        """``rate <- gamma * p_t / p*``; a non-finite loss leaves the rate and the state as they
        were (the step still counts towards the progress)."""
        finite = bool(torch.isfinite(loss))  # a harness controller: host reads are fine
        if finite and float(self.p_star) == UNSET:
            self._settle(loss)
        if finite and float(self.p_star) == 0.0:
            rate.zero_()  # no usable anchor (warned when settling)
        elif finite:
            p, h, c = self.output(self.input_of(loss), self.h, self.c)
            level = p / self.p_star
            if bool(torch.isfinite(level)):
                self.h.copy_(h)
                self.c.copy_(c)
                rate.copy_(gamma * level)
        self.t.add_(1.0)


def save_progress_controller(ctrl: ProgressMLRSNet, path: str | os.PathLike, info: dict) -> None:
    state = {k: v for k, v in ctrl.state_dict().items() if k not in ("h", "c", "t", "total", "p_star")}
    torch.save({"format": FILE_FORMAT, "hidden_size": ctrl.hidden_size, "state_dict": state, "info": info},
               os.fspath(path))


def is_progress_file(path: str | os.PathLike) -> bool:
    blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    return isinstance(blob, dict) and blob.get("format") == FILE_FORMAT


def load_progress_controller(path: str | os.PathLike) -> ProgressMLRSNet:
    blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FILE_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a ProgressMLRSNet file (format {FILE_FORMAT!r}); "
                         "meta-train --family --progress-input writes one")
    ctrl = ProgressMLRSNet(blob["hidden_size"])
    ctrl.load_state_dict(blob["state_dict"], strict=False)
    missing = set(ctrl.state_dict()) - set(blob["state_dict"]) - {"h", "c", "t", "total", "p_star"}
    if missing:
        raise ValueError(f"{os.fspath(path)!r} lacks the weights {sorted(missing)}")
    ctrl.info = blob.get("info", {})
    return ctrl


@torch.no_grad()
def progress_response(ctrl: ProgressMLRSNet, loss: float, steps: int = 200) -> list[float]:
    """What the progress input does alone: the level ``p_t / p*`` over a run of ``steps`` steps on
    a constant ``loss`` (a copy of ``ctrl``; 1 everywhere = progress is ignored). Returns the
    level at steps 0, 1/4, 1/2 and 3/4 of the way and at the last step (step ``k`` reads
    progress ``k / steps``)."""
    probe = ProgressMLRSNet(ctrl.hidden_size)
    probe.load_state_dict(ctrl.state_dict())
    probe.start_run(steps)
    level, rate, x = [], torch.zeros(()), torch.tensor(float(loss))
    for _ in range(steps):
        probe.scheduler_step_(x, torch.ones(()), rate)
        level.append(float(rate))
    return [level[round(f * (steps - 1))] for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
