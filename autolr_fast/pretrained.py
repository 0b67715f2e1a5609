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
from pathlib import Path

import torch

from .controller import MLRSNet

FORMAT = "autolr_fast.controller"
VERSION = 1
PRETRAINED_DIR = Path(__file__).resolve().parent / "weights"


def save_controller(controller: MLRSNet, path: str | os.PathLike, gamma: float, info: dict | None = None) -> None:
    """Write theta, the architecture and ``gamma`` to ``path`` (atomically)."""
    if not isinstance(controller, MLRSNet):
        raise TypeError(f"save_controller saves an MLRSNet, got {type(controller).__name__}")
    if not math.isfinite(float(gamma)) or float(gamma) <= 0:
        raise ValueError(f"gamma must be a positive finite float, got {gamma!r}")
    theta = {k: v.detach().cpu().clone() for k, v in controller.state_dict().items() if k not in ("h", "c")}
    blob = {
        "format": FORMAT,
        "version": VERSION,
        "type": "MLRSNet",
        "config": controller.config(),
        "state_dict": theta,
        "gamma": float(gamma),
        "info": json.loads(json.dumps(info or {})),
    }
    path = os.fspath(path)
    tmp = path + ".tmp"
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_controller(path: str | os.PathLike, map_location: str = "cpu") -> MLRSNet:
    """Read a file written by :func:`save_controller`; clear errors for anything else."""
    return _controller_from_blob(_read(path, map_location), os.fspath(path))


def _read(path: str | os.PathLike, map_location: str = "cpu"):
    """A controller file's contents (``torch.load`` with ``weights_only``); ValueError if unreadable."""
    path = os.fspath(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path!r} is not a readable autolr_fast controller file ({exc})") from exc


def _controller_from_blob(blob, path: str) -> MLRSNet:
    """The :class:`MLRSNet` in ``blob``, a file's contents already read (``path`` is for errors)."""
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(
            f"{path!r} is not an autolr_fast controller file (for a published MLR-SNet checkpoint use "
            "MLRSNet.from_official)"
        )
    if blob.get("version") != VERSION:
        raise ValueError(f"{path!r} has controller format version {blob.get('version')}, this autolr_fast reads {VERSION}")
    cfg = blob["config"]
    net = MLRSNet(int(cfg["hidden_size"]), int(cfg["num_layers"]), cfg.get("gate_order", "train"))
    state = dict(blob["state_dict"])
    state["h"] = torch.zeros_like(net.h)
    state["c"] = torch.zeros_like(net.c)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path!r}: weights do not match the stored architecture ({exc})") from exc
    net.default_gamma = float(blob["gamma"])
    net.info = blob.get("info", {})
    return net


def available_pretrained() -> list[str]:
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt")) if PRETRAINED_DIR.is_dir() else []


def load_pretrained(name: str):
    """A controller shipped with the package: ``"mnist1d-cnn"`` (an :class:`MLRSNet`) or
    ``"action-mlp"`` (an :class:`~autolr_fast.ActionController`); frozen, with its own gamma."""
    path = PRETRAINED_DIR / f"{name}.pt"
    if not path.is_file():
        raise KeyError(f"no pretrained controller {name!r}; available: {', '.join(available_pretrained()) or 'none'}")
    blob = _read(path)  # read once; its "format" entry says which kind of controller it holds
    from .action import FORMAT as ACTION_FORMAT, ActionController

    if isinstance(blob, dict) and blob.get("format") == ACTION_FORMAT:
        return ActionController.from_payload(blob, str(path))
    return _controller_from_blob(blob, str(path))
