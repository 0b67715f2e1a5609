"""Saving and loading controllers (theta and gamma), and the controllers shipped in the package.

File format (``torch.save`` of a dict, loaded with ``weights_only=True``)::

    {"format": "autolr_fast.controller", "version": 1, "type": "MLRSNet",
     "config": {"hidden_size": H, "num_layers": L, "gate_order": "train"},
     "state_dict": {...theta...}, "gamma": float, "info": {...free-form provenance...}}

A loaded controller starts from a zero state (a new run) and carries ``default_gamma``, which
``AutoLR(optimizer, controller)`` uses when no ``gamma`` is given.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..checks import is_positive_number
from .action import FORMAT as ACTION_FORMAT
from .action import ActionController
from .files import PRETRAINED_DIR, read_file, write_file
from .mlrsnet import MLRSNet

FORMAT = "autolr_fast.controller"
VERSION = 1


def save_controller(controller: MLRSNet, path: str | os.PathLike, gamma: float, info: dict | None = None) -> None:
    """Write theta, the architecture and ``gamma`` to ``path`` (atomically)."""
    if not isinstance(controller, MLRSNet):
        raise TypeError(f"save_controller saves an MLRSNet, got {type(controller).__name__}")
    if not math.isfinite(float(gamma)) or float(gamma) <= 0:
        raise ValueError(f"gamma must be a positive finite float, got {gamma!r}")
    theta = {k: v.detach().cpu().clone() for k, v in controller.state_dict().items() if k not in ("h", "c")}
    write_file({
        "format": FORMAT,
        "version": VERSION,
        "type": "MLRSNet",
        "config": controller.config(),
        "state_dict": theta,
        "gamma": float(gamma),
        "info": json.loads(json.dumps(info or {})),
    }, path)


def _mlrsnet_from_blob(blob: dict, path: str) -> MLRSNet:
    """The :class:`MLRSNet` in a controller file's contents (``path`` is for errors)."""
    if blob.get("version") != VERSION:
        raise ValueError(
            f"{path!r} has controller format version {blob.get('version')!r}, this autolr_fast reads {VERSION!r}")
    missing = [k for k, kind in (("config", dict), ("state_dict", dict)) if not isinstance(blob.get(k), kind)]
    gamma = blob.get("gamma")
    if not is_positive_number(gamma):
        missing.append("gamma (a positive finite float)")
    if missing:
        raise ValueError(f"{path!r} is an incomplete or damaged controller file: no valid {missing}")
    cfg = blob["config"]
    try:
        net = MLRSNet(int(cfg["hidden_size"]), int(cfg["num_layers"]), cfg.get("gate_order", "train"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} is a damaged controller file: its config {cfg!r} does not describe an MLRSNet "
                         f"({type(exc).__name__}: {exc})") from exc
    state = dict(blob["state_dict"])
    state["h"] = torch.zeros_like(net.h)
    state["c"] = torch.zeros_like(net.c)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path!r}: weights do not match the stored architecture ({exc})") from exc
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        raise ValueError(f"{path!r} is a damaged controller file: some weights are NaN or infinite")
    net.default_gamma = float(blob["gamma"])
    net.info = blob.get("info", {})
    return net


# a controller file's "format" entry -> what builds the controller from the file's contents
LOADERS: dict[str, Callable[[Any, str], nn.Module]] = {
    FORMAT: _mlrsnet_from_blob,
    ACTION_FORMAT: ActionController.from_payload,
}


def controller_from_blob(blob: Any, path: str) -> nn.Module:
    """The controller a file's loaded contents describe (``path`` names the file in errors): what
    :func:`load_controller` does after reading, for callers that read the file themselves."""
    loader = LOADERS.get(blob.get("format")) if isinstance(blob, dict) else None
    if loader is None:
        raise ValueError(
            f"{path!r} is not an autolr_fast controller file (for a published MLR-SNet checkpoint use "
            "MLRSNet.from_official)"
        )
    return loader(blob, path)


def load_controller(path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Read a controller file (:func:`save_controller` or ``ActionController.save``); clear errors
    for anything else. A loaded controller starts from a zero state (a new run)."""
    return controller_from_blob(read_file(path, "an autolr_fast controller file", map_location), os.fspath(path))


def available_pretrained() -> list[str]:
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt")) if PRETRAINED_DIR.is_dir() else []


def load_pretrained(name: str) -> nn.Module:
    """A controller shipped with the package: ``"default"`` (the MLR-SNet ``AutoLR`` uses when given
    none, meta-trained across tasks and optimizers), ``"mnist1d-cnn"`` (an MLR-SNet meta-trained
    on one task) or ``"action-mlp"`` (an :class:`~autolr_fast.ActionController`); each file's
    ``.json`` beside it says how it was trained."""
    if not isinstance(name, str) or not name or name != os.path.basename(name) or name.startswith("."):
        raise KeyError(f"no pretrained controller {name!r} (a name, not a path; for a file use load_controller(path)); "
                       f"available: {', '.join(available_pretrained()) or 'none'}")
    path = PRETRAINED_DIR / f"{name}.pt"
    if not path.is_file():
        raise KeyError(f"no pretrained controller {name!r}; available: {', '.join(available_pretrained()) or 'none'}")
    return load_controller(path)
