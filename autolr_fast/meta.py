"""Online meta-training of the controller (MLR-SNet Algorithm 1) with the exact one-step
look-ahead hypergradient. (Work in progress: the trainer lands with the meta-training issue.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import nn


@dataclass
class MetaConfig:
    """How ``AutoLR`` meta-trains its controller online.

    Args:
        model: the model being trained (its parameters are the optimizer's).
        val_data: an iterable of validation batches, cycled (re-iterated when exhausted).
        loss_fn: ``loss_fn(model_output, target) -> scalar tensor``.
        interval: a meta-step every ``interval`` scheduler steps (published: 300).
        lr, weight_decay: of the controller's Adam (published: 1e-3, 1e-4).
        unpack: ``unpack(batch) -> (inputs, targets)``; default takes ``(x, y)`` tuples/lists or
            dicts with keys ``"input"``/``"target"``.
    """

    model: nn.Module
    val_data: Iterable
    loss_fn: Callable[[Any, Any], Any]
    interval: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-4
    unpack: Callable[[Any], tuple[Any, Any]] | None = None
