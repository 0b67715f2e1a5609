"""Whether a ``GradScaler`` will skip the coming optimizer step, as a device tensor (no sync).

A framework that trains with ``torch.amp.GradScaler`` unscales the gradients before it calls its
pre-step hooks, where the integrations call ``AutoLR.step``. The scaler then already knows, on
the device, whether it found Inf/NaN gradients, in which case ``scaler.step`` will not call
``optimizer.step()``. ``AutoLR.step(loss, skip=...)`` takes that flag so that the controller
does not advance on a step that does not happen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def scaler_skips(scaler: Any, optimizer: torch.optim.Optimizer, device: torch.device) -> Tensor | None:
    """A 0-dim bool tensor on ``device``, True when ``scaler`` found Inf/NaN gradients while
    unscaling ``optimizer``'s; None when there is no enabled scaler or it has not unscaled this
    optimizer's gradients yet (an optimizer that unscales inside its own step, e.g. a fused
    one: nothing is known before the step then)."""
    if scaler is None or not scaler.is_enabled():
        return None
    # torch keeps the result of unscale_ here until scaler.update() (no public accessor)
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer)) or {}
    found = state.get("found_inf_per_device") or {}
    if not found:
        return None
    flags = [f.to(device, non_blocking=True).reshape(()) for f in found.values()]
    return (torch.stack(flags).sum() if len(flags) > 1 else flags[0]) > 0
