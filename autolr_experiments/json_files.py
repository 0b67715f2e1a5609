"""Reading the JSON files the commands write, with one clear error for a missing or foreign file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path, what: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object at ``path``; ``SystemExit`` naming ``what`` the file should be when it
    cannot be read, is not JSON, or lacks one of ``keys``."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{path}: cannot read it as {what} ({exc})") from None
    if not isinstance(doc, dict):
        raise SystemExit(f"{path} is not {what} (not a JSON object)")
    missing = [k for k in keys if k not in doc]
    if missing:
        raise SystemExit(f"{path} is not {what} (it has no {missing})")
    return doc
