"""autolr_fast: a learned learning-rate controller (MLR-SNet) for PyTorch training loops.

Public API (nothing else is exported):

* :class:`AutoLR`: the drop-in scheduler (one ``sched.step(loss)`` per step);
* :class:`MetaConfig`: online meta-training of the controller;
* controllers: :class:`MLRSNet`, :class:`ActionController`, :class:`Controller` (the interface
  ``AutoLR`` needs), :func:`load_pretrained`, :func:`load_controller`, :func:`save_controller`;
* :func:`find_lr`: the learning-rate range test; :func:`find_anchor_lr`: the ``lr`` for
  ``AutoLR`` to anchor on, from short trials scored on held-out data (it returns an
  :class:`AnchorResult`);
* :func:`export` / :func:`load`: TorchScript + the C runtime's weights file;
* :func:`auto_gamma` (the published scale rule) and :func:`backend_info` (what is built).
"""

from .anchor_lr import AnchorResult, find_anchor_lr
from .controllers import (
    ActionController,
    Controller,
    MLRSNet,
    available_pretrained,
    load_controller,
    load_pretrained,
    save_controller,
)
from .exporting import export, load
from .lr_finder import find_lr
from .meta import MetaConfig
from .ops.dispatch import backend_info
from .ops.reference import auto_gamma
from .scheduler import AutoLR

__version__ = "0.1.0"

__all__ = [
    "ActionController",
    "AnchorResult",
    "AutoLR",
    "Controller",
    "MLRSNet",
    "MetaConfig",
    "auto_gamma",
    "available_pretrained",
    "backend_info",
    "export",
    "find_anchor_lr",
    "find_lr",
    "load",
    "load_controller",
    "load_pretrained",
    "save_controller",
    "__version__",
]
