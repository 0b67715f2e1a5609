"""AutoLR's envelope as the docs state it, written out apart from ``autolr_fast.rate_scale``: the
reference the tests compare the library's rates with."""

from __future__ import annotations

import math


def written_out_envelope(t: int, total: int | None, warmup: int) -> float:
    """Step ``t``'s factor: ``(t + 1) / warmup`` during the warm-up, then the cosine from 1 to 0 over
    the other ``total - warmup`` steps (1 without ``total``), 0 from ``total`` on."""
    if t < warmup:
        return (t + 1) / warmup
    if total is None:
        return 1.0
    if t >= total:
        return 0.0
    return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
