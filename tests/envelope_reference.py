"""AutoLR's envelopes as the docs state them, written out apart from ``autolr_fast.rate_scale``: the
reference the tests compare the library's rates with."""

from __future__ import annotations

import math


def written_out_envelope(t: int, total: int | None, warmup: int, shape: str = "cosine",
                         decay: int | None = None) -> float:
    """Step ``t``'s factor: ``(t + 1) / warmup`` during the warm-up; then (1 without ``total``)
    ``"cosine"``: the cosine from 1 to 0 over the other ``total - warmup`` steps; ``"wsd"``: 1 up to
    the last ``decay`` steps, which fall linearly towards 0 at step ``total`` (``decay / (decay + 1)``
    down to ``1 / (decay + 1)``; ``decay`` default: 20 % of ``total``); 0 from ``total`` on."""
    if t < warmup:
        return (t + 1) / warmup
    if total is None:
        return 1.0
    if t >= total:
        return 0.0
    if shape == "wsd":
        decay = max(1, min(round(0.2 * total), total - warmup)) if decay is None else decay
        first_falling = total - decay
        return 1.0 if t < first_falling else (total - t) / (decay + 1)
    return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
