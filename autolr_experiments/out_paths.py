"""Checks of the output paths a command writes, made before any work: a long run must not
end in a traceback because its last step cannot write."""

from __future__ import annotations

import os


def file_problem(path: str, flag: str, example: str) -> str | None:
    """Why ``path`` cannot be written as a file (its folder is missing, it is a folder), or None.
    ``example``: a file name to suggest inside the folder."""
    if os.path.isdir(path):
        return f"{flag} names a file, and {path} is a folder; e.g. {flag} {os.path.join(path, example)}"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{flag} {path}: the folder {folder} does not exist"
    return None


def folder_problem(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be used (made if needed) as an output folder, or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path} is a file, not a folder"
    return None
