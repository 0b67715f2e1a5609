"""autolr_fast: a learned learning-rate controller (MLR-SNet) for PyTorch training loops.

Public API (nothing else is exported)::

    from autolr_fast import AutoLR, MLRSNet, MetaConfig, load_pretrained
"""

from .action import ActionController
from .controller import MLRSNet
from .dispatch import backend_info
from .exporting import export, load
from .lr_finder import find_lr
from .meta import MetaConfig
from .pretrained import load_controller, load_pretrained, save_controller
from .reference import auto_gamma
from .scheduler import AutoLR

__version__ = "0.1.0"

__all__ = [
    "ActionController",
    "AutoLR",
    "MLRSNet",
    "MetaConfig",
    "auto_gamma",
    "backend_info",
    "export",
    "find_lr",
    "load",
    "load_controller",
    "load_pretrained",
    "save_controller",
    "__version__",
]
