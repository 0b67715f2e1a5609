"""Reading and writing controller files: one ``torch.load`` wrapper, atomic writes, and where the
controllers shipped with the package live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

PRETRAINED_DIR = Path(__file__).resolve().parent / "weights"


def read_file(path: str | os.PathLike, what: str, map_location: str = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file that is not readable as such raises
    ``ValueError`` naming ``what`` was expected (a missing file stays ``FileNotFoundError``)."""
    path = os.fspath(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # corrupted, truncated, not a torch file
        # the type too: torch.load's KeyError on a text file reads as a bare number
        raise ValueError(f"could not read {what} from {path!r} (not a torch.save file, or damaged: "
                         f"{type(exc).__name__}: {exc})") from exc


def write_file(blob: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then rename: a reader never sees half a file. The
    temporary name is the process's own (ranks writing the same file must not share it)."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, path)
