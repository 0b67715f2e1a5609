"""A digest of the C++/CUDA sources of ``autolr_fast._C``, to tell a stale build from a current one.

The build writes the digest of ``csrc/ops`` beside the extension (``<extension file>.sources``);
:mod:`autolr_fast.ops.library` compares it with the checkout's sources before it loads the
extension. An extension built from other sources (a checkout updated without a rebuild) would
register kernels that disagree with the schemas, or compute something else, so it is not loaded.
Plain Python, no torch: ``build_support.py`` loads this file by path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SUFFIXES = (".cpp", ".cu", ".h", ".cuh")
SIDECAR_SUFFIX = ".sources"


def sources_digest(ops_dir: str | Path) -> str:
    """sha256 over the relative path and the bytes of every source file directly in ``ops_dir``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(ops_dir).iterdir() if p.is_file() and p.suffix in SUFFIXES):
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def sidecar_of(extension_file: str | Path) -> Path:
    return Path(str(extension_file) + SIDECAR_SUFFIX)


def stale_reason(extension_file: str | Path, ops_dir: str | Path) -> str | None:
    """Why the extension at ``extension_file`` does not match the sources in ``ops_dir``, or None
    (it matches, or there are no sources to compare with, as in an installed wheel)."""
    if not Path(ops_dir).is_dir():
        return None
    sidecar = sidecar_of(extension_file)
    if not sidecar.is_file():
        return f"{extension_file} has no record of the sources it was built from ({sidecar.name})"
    if sidecar.read_text().strip() != sources_digest(ops_dir):
        return f"{extension_file} was built from other sources than {ops_dir}"
    return None
