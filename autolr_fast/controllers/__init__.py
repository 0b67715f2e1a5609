"""Rate controllers for :class:`autolr_fast.AutoLR`: the MLR-SNet LSTM, the action controller,
and the loading of saved and shipped controllers."""

from .action import ActionController
from .mlrsnet import MLRSNet
from .pretrained import available_pretrained, load_controller, load_pretrained, save_controller
from .protocol import Controller

__all__ = [
    "ActionController",
    "Controller",
    "MLRSNet",
    "available_pretrained",
    "load_controller",
    "load_pretrained",
    "save_controller",
]
