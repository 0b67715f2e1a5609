"""The interface a controller offers :class:`autolr_fast.AutoLR`."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Controller(Protocol):
    """What ``AutoLR`` calls. Controllers are ``nn.Module``\\ s whose state lives in buffers, so
    ``state_dict()`` carries it.

    * ``default_gamma``: the largest rate to use when ``AutoLR`` is given none (``None``: the
      controller has no scale of its own).
    * ``initial_rate(base_lr)``: the rate before the first step (``base_lr`` is the optimizer's
      ``lr``: the first param group's that is positive).
    * ``scheduler_step_(loss, gamma, rate)``: read one loss (0-dim float32 on the controller's
      device) and update the 0-dim ``rate`` in place, without host syncs; a non-finite loss
      must leave ``rate`` and the state unchanged.
    * ``reset()``: forget the run (a new training run starts).
    * optionally ``trained_envelope``: the envelope shape (``"wsd"``, ``"cosine"``) the controller
      learned its response under; ``AutoLR`` uses it when given neither ``envelope=`` nor
      ``decay_steps=`` (which selects ``"wsd"``).
    """

    default_gamma: float | None

    def initial_rate(self, base_lr: float) -> float: ...

    def scheduler_step_(self, loss: Tensor, gamma: Tensor, rate: Tensor) -> None: ...

    def reset(self) -> None: ...
