"""How ``AutoLR`` writes a rate into an optimizer's param groups without a host sync.

PyTorch's optimizers accept a 0-dim tensor ``lr``, but only their *fused* paths (and Adam's
``capturable`` path) read it on the device; the for-loop and ``foreach`` paths call
``lr.item()`` every step, which waits for the GPU, and Adam/AdamW with an explicit
``foreach=True`` (not capturable) refuse it. This module installs tensor rates, tells
which setups are sync-free, and falls back to float rates for optimizers that cannot take a
tensor.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from torch import Tensor

# torch.optim classes whose param groups accept a 0-dim tensor ``lr``.
TENSOR_LR_OPTIMIZERS: tuple[type, ...] = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "ASGD", "Rprop")
    if hasattr(torch.optim, name)
)


def params_device(optimizer: torch.optim.Optimizer) -> torch.device:
    """The device of the optimizer's parameters (all must share one)."""
    devices = {p.device for g in optimizer.param_groups for p in g["params"]}
    if not devices:
        raise ValueError("the optimizer has no parameters")
    if len(devices) > 1:
        raise ValueError(
            f"AutoLR needs all parameters on one device, found {sorted(map(str, devices))}; "
            "use one optimizer (and one AutoLR) per device"
        )
    return devices.pop()


try:  # optional: CPU values are read through NumPy views, without a dispatch
    import numpy  # noqa: F401
except ImportError:
    _HAS_NUMPY = False
else:
    _HAS_NUMPY = True


def numpy_available() -> bool:
    return _HAS_NUMPY


def host_scalar(t: Tensor) -> float | bool | int:
    """The value of a 1-element CPU tensor: through a NumPy view when NumPy is installed (no
    dispatch, so the host-read probes see nothing: host memory needs no sync), else ``item()``."""
    return t.numpy().item() if _HAS_NUMPY else t.item()


def tensor_lr_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` cannot take a tensor ``lr`` (None if it can)."""
    name = type(optimizer).__name__
    if not isinstance(optimizer, TENSOR_LR_OPTIMIZERS):
        return f"{name} is not known to accept a tensor lr"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and any(
            g.get("foreach") and not g.get("capturable") and not g.get("fused") for g in optimizer.param_groups):
        # torch raises "lr as a Tensor is not supported for capturable=False and foreach=True"
        return f"{name} with foreach=True and capturable=False refuses a tensor lr"
    return None


def takes_tensor_lr(optimizer: torch.optim.Optimizer) -> bool:
    return tensor_lr_problem(optimizer) is None


def sync_free_problem(optimizer: torch.optim.Optimizer, device: torch.device) -> str | None:
    """Why this optimizer would read a tensor ``lr`` on the host, or None if it does not."""
    if device.type == "cpu":
        return None  # host memory: reading it is not a device sync
    if not takes_tensor_lr(optimizer):
        return f"{type(optimizer).__name__} cannot take a tensor lr"
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        fused = bool(group.get("fused"))
        capturable = bool(group.get("capturable"))
        if isinstance(optimizer, torch.optim.SGD):
            if not fused:
                return f"{name} without fused=True reads the tensor lr with .item() every step"
        elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            if not (fused or capturable):
                return f"{name} without fused=True (or capturable=True) reads the tensor lr on the host"
        elif not capturable:
            return f"{name} without capturable=True may read the tensor lr on the host"
    return None


SYNC_FREE_HINT = (
    "construct the optimizer with fused=True, e.g. torch.optim.SGD(params, lr=0.1, momentum=0.9, "
    "fused=True) or torch.optim.AdamW(params, lr=1e-3, fused=True)"
)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


#: what calls AutoLR for the user (torch: optimizer hooks, optimizer.step(closure)); a warning
#: raised inside them points past them
FRAMEWORKS = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate", "trl",
              "peft")


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first caller outside autolr_fast and
    outside the training frameworks that call it (``FRAMEWORKS``, told by the frame's module)."""

    def inside(frame) -> bool:
        if os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
            return True
        module = frame.f_globals.get("__name__") or ""
        return module.split(".", 1)[0] in FRAMEWORKS

    frame, level = sys._getframe(1), 1
    while frame is not None and inside(frame):
        frame, level = frame.f_back, level + 1
    return level


def group_lr_scales(lrs: list[float]) -> tuple[float, list[float]]:
    """``(reference, scales)`` for param groups at rates ``lrs``: each group's rate over the first
    positive one, so a group frozen with ``lr=0`` keeps a scale of 0 wherever it is (all 1.0
    when no rate is positive; the reference is then the first group's)."""
    reference = next((r for r in lrs if r > 0), lrs[0])
    return reference, ([1.0] * len(lrs) if reference <= 0 else [r / reference for r in lrs])


def torch_scheduler_built(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a ``torch.optim.lr_scheduler`` was ever built on ``optimizer``: torch wraps its
    ``step`` then and leaves the wrapper when the scheduler is gone, so "ever", not "still"."""
    return bool(getattr(optimizer.step, "_wrapped_by_lr_sched", False))


def warn_once(flags: set, key: str, message: str) -> None:
    if key not in flags:
        flags.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())


def is_lr_tensor(lr: Any, device: torch.device) -> bool:
    """Whether a param group's ``lr`` is what AutoLR writes into: a 0-dim float32 tensor on ``device``."""
    return isinstance(lr, Tensor) and lr.dim() == 0 and lr.device == device and lr.dtype == torch.float32


def lr_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> list[Tensor]:
    """The param groups' ``lr`` as 0-dim float32 tensors on ``device``, installed if needed.

    Read anew on every step, so that ``optimizer.load_state_dict`` (which replaces the group
    dictionaries' values) cannot leave ``AutoLR`` writing into stale tensors.
    """
    out = []
    # one tensor per group: groups that share one (a tensor lr given to the constructor is put in
    # every group and in defaults) would all end at the last group's rate x scale
    seen = {id(optimizer.defaults.get("lr"))}
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not is_lr_tensor(lr, device):
            # a fill, not torch.tensor(): no copy from pageable host memory (a sync on a GPU)
            lr = torch.full((), float(lr), dtype=torch.float32, device=device)
            group["lr"] = lr
        elif id(lr) in seen:
            lr = group["lr"] = lr.detach().clone()  # a device copy: no host read
        seen.add(id(lr))
        out.append(lr)
    return out


class LrTensors:
    """:func:`lr_tensors` for a step taken every training step: the list of the last call is
    handed back while every group still holds the same tensor objects (their memory and layout
    are the kernels' concern: the Triton plan checks them on every launch)."""

    __slots__ = ("optimizer", "device", "last")

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.optimizer, self.device, self.last = optimizer, device, []

    def cached(self) -> list[Tensor] | None:
        """The last list if every group still holds its tensor, else None (nothing installed)."""
        groups = self.optimizer.param_groups
        last = self.last
        if len(groups) != len(last):
            return None
        for group, lr in zip(groups, last):  # a loop: cheaper than all() over a generator here
            if group["lr"] is not lr:
                return None
        return last

    def __call__(self) -> list[Tensor]:
        last = self.cached()
        if last is None:
            last = self.last = lr_tensors(self.optimizer, self.device)
        return last
