"""Extension build logic for setup.py (kept apart so setup.py stays declarative).

Filled in by the C++/CUDA extension work (csrc/): ``extension_modules()`` returns the
``autolr_fast._C`` extension when a compiler and torch are available.
"""

from __future__ import annotations

import os


def extension_modules() -> list:
    if os.environ.get("AUTOLR_FAST_BUILD_EXT", "1") == "0":
        return []
    return []


def cmdclass() -> dict:
    return {}
