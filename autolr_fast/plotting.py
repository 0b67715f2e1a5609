"""Small helpers shared by the result renderers: Markdown tables, number formatting, PNG figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table. ``align``: one of ``l``/``r``/``c`` per column (default:
    the first column left, the others right)."""
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells for {len(headers)} columns")
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; ``-`` for None/NaN."""
    if not is_number(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.{max(digits - 1, 0)}e}"
    return f"{x:.{digits}g}"


def fmt_mean_std(mean: Any, std: Any, digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± std`` (``std`` left out when it is not a number, e.g. a single seed)."""
    if not is_number(mean):
        return fmt(mean, digits)
    if not is_number(std):
        return fmt(mean * scale, digits)
    return f"{fmt(mean * scale, digits)} ± {fmt(std * scale, 2)}"


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def color_cycle(n: int) -> list:
    plt = pyplot()
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    return [cmap(i % cmap.N) for i in range(n)]
