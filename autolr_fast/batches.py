"""Batches as the meta-step's validation batches and the learning-rate range finders read them:
split into ``(inputs, targets)``, moved to a device (tensors nested in tuples, lists and
mappings), iterated afresh."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import optim_support

_INPUT_KEYS = ("inputs", "input", "x", "data", "features")
_TARGET_KEYS = ("targets", "target", "labels", "label", "y")


def default_unpack(batch: Any, how: str = "unpack=fn") -> tuple[Any, Any]:
    """``(inputs, targets)`` from a ``(x, y)`` tuple/list or a dict with common key names.
    ``how`` names, in the errors, where the caller takes its own unpack function."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        xi = next((k for k in _INPUT_KEYS if k in batch), None)
        yi = next((k for k in _TARGET_KEYS if k in batch), None)
        if xi is not None and yi is not None:
            others = sorted(set(batch) - {xi, yi})
            if others:
                warnings.warn(f"the batch dict's keys {others} are not passed to the model or the loss (only "
                              f"{xi!r} and {yi!r} are); pass {how} returning (inputs, targets) to use them",
                              RuntimeWarning, stacklevel=optim_support.user_stacklevel())
            return batch[xi], batch[yi]
        raise ValueError(
            f"cannot tell inputs from targets in a batch dict with keys {sorted(batch)}; "
            f"name them one of {_INPUT_KEYS} / {_TARGET_KEYS}, or pass {how} returning (inputs, targets)"
        )
    # a longer tuple is not cut to its first two: its third item (sample weights, a mask) matters
    raise ValueError(
        f"batches must be (inputs, targets) tuples or dicts, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + f"; pass {how} where fn(batch) returns (inputs, targets)"
    )


def to_device(x: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``x`` with every tensor in it moved to ``device``, in containers of the same types: tuples
    (named ones too), lists, mappings (a dict subclass or a ``UserDict`` such as Hugging Face's
    ``BatchEncoding`` is copied and refilled), ``PackedSequence``; anything else as it is.
    ``non_blocking`` copies from pageable CPU memory to a GPU are pinned first, so the copy cannot
    stall the host."""
    if isinstance(x, (Tensor, PackedSequence)):
        source = x.data if isinstance(x, PackedSequence) else x
        if non_blocking and source.device.type == "cpu" and torch.device(device).type == "cuda" and not x.is_pinned():
            # from pageable memory the driver may wait for the stream to stage the copy: pin first
            # (PyTorch's caching host allocator keeps the pinned block until the copy is done)
            x = x.pin_memory()
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, Mapping):
        moved = {k: to_device(v, device, non_blocking) for k, v in x.items()}
        if type(x) is dict:
            return moved
        try:
            out = copy.copy(x)
            for k, v in moved.items():
                out[k] = v
            return out
        except TypeError:  # a read-only mapping
            return moved
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple: positional fields
        return type(x)(*(to_device(v, device, non_blocking) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device, non_blocking) for v in x)
    return x


def fresh_iter(batches: Any) -> Any:
    """``iter(batches)``, but a new iterator for a ``DataLoader`` with persistent workers: its
    ``iter()`` hands back (and resets) the one iterator the training loop may be reading, and
    draws its workers' seed only the first time, so trials would shift the loop's batches."""
    loader = torch.utils.data.DataLoader
    # a subclass with an __iter__ of its own (accelerate's DataLoaderShard: device placement, RNG
    # sync) is iterated as it is
    if (isinstance(batches, loader) and type(batches).__iter__ is loader.__iter__ and batches.persistent_workers
            and batches.num_workers > 0):
        return batches._get_iterator()  # workers of its own (started per pass), shut down when collected
    return iter(batches)
