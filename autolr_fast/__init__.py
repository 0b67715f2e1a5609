"""autolr_fast: a learned learning-rate controller (MLR-SNet) for PyTorch training loops.

Public API (nothing else is exported)::

    from autolr_fast import MLRSNet, AutoLR, backend_info
"""

from .controller import MLRSNet
from .dispatch import backend_info
from .reference import auto_gamma
from .scheduler import AutoLR

__version__ = "0.1.0"

__all__ = ["MLRSNet", "AutoLR", "auto_gamma", "backend_info", "__version__"]
