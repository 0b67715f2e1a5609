"""Moving a batch (tensors nested in tuples, lists and dicts) to a device; shared by the
meta-step's validation batches and the learning-rate range finder."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def to_device(x: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``x`` with every tensor in it moved to ``device`` (the same container types; anything
    else is returned as it is)."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, dict):
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device, non_blocking) for v in x)
    return x
