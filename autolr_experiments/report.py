"""What the result renderers share: one Markdown table, strict JSON, number formatting, one
summary of a group of runs over seeds, and PNG figures (matplotlib on the non-interactive Agg backend)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


# ------------------------------------------------------------------------------------------------
# Tables and numbers
# ------------------------------------------------------------------------------------------------
def strict_json(o: Any) -> Any:
    """NaN/Inf -> None, recursively through dicts, lists and tuples (strict JSON; ``null`` means
    diverged or not available)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [strict_json(v) for v in o]
    return o


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

    def cells(values: Sequence[Any]) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in values) + " |"

    return "\n".join([cells(headers), "| " + " | ".join(marks[a] for a in align) + " |", *map(cells, rows)])


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


# ------------------------------------------------------------------------------------------------
# Runs over seeds
# ------------------------------------------------------------------------------------------------
def mean_std(xs: Sequence) -> tuple[float | None, float | None]:
    """Mean and sample std of the numbers in ``xs``; ``(inf, None)`` if one is +inf (a diverged
    regression run), ``(None, None)`` if there are none; the std is None for one number."""
    if any(isinstance(x, float) and x == math.inf for x in xs):
        return math.inf, None
    xs = [x for x in xs if is_number(x)]
    if not xs:
        return None, None
    return sum(xs) / len(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def summarize(runs: Sequence[dict]) -> dict:
    """One group of runs (a method and setting over seeds), each a dict with ``status`` and the
    keys of ``training.Run.metrics()`` (plus ``wall_time_s`` and ``train_time_s``): the number of
    seeds and of diverged runs, mean and sample std of the final and best test metric, of the
    final test loss and of the times, and the mean rate statistics."""
    out: dict[str, Any] = {"seeds": len(runs), "diverged": sum(r["status"] == "diverged" for r in runs)}
    for key in ("final_metric", "best_metric", "final_test_loss", "wall_time_s", "train_time_s", "cpu_time_s"):
        out[key], out[key + "_std"] = mean_std([r.get(key) for r in runs])
    for key in ("epoch_cv", "jitter", "mean"):
        out[f"rate_{key}"], _ = mean_std([r["rate_stats"][key] for r in runs])
    return out


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def color_cycle(n: int) -> list:
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    return [cmap(i % cmap.N) for i in range(n)]


def summary_table(summary: dict[str, dict], caption: str) -> str:
    """``caption`` and a table of :func:`summarize` results by schedule name: final test accuracy
    (mean ± std over seeds), best test accuracy and final test loss (means)."""
    def pct(mean: Any, std: Any = None) -> str:
        if not is_number(mean):
            return fmt(mean)
        return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if is_number(std) else "") + " %"

    def loss(x: Any) -> str:
        return f"{x:.4f}" if is_number(x) else fmt(x)

    rows = [[name, pct(s["final_metric"], s["final_metric_std"]), pct(s["best_metric"]), loss(s["final_test_loss"])]
            for name, s in summary.items()]
    headers = ["schedule", "final test acc (mean ± std)", "best test acc", "final test loss"]
    return f"{caption}\n\n{markdown_table(headers, rows, 'lrrr')}\n"


def plot_runs(records: list[dict], path: str | Path, title: str) -> Path:
    """Rate per step, test accuracy and training loss per epoch of ``training.Run.to_json()`` records."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors: dict[str, str] = {}
    for r in records:
        label = None if r["name"] in colors else r["name"]  # one legend entry per schedule
        c = colors.setdefault(r["name"], f"C{len(colors)}")
        axes[0].plot(r["rates"], color=c, lw=0.8, alpha=0.8, label=label)
        ep = [e["epoch"] for e in r["epochs"]]
        axes[1].plot(ep, [e["test_acc"] for e in r["epochs"]], color=c, alpha=0.8, label=label)
        axes[2].plot(ep, [e["train_loss"] for e in r["epochs"]], color=c, alpha=0.8, label=label)
    axes[0].set(title="learning rate per step", xlabel="step", ylabel="rate", yscale="log")
    top = max((max(r["rates"]) for r in records if r["rates"]), default=1.0)
    axes[0].set_ylim(bottom=top * 1e-3)  # annealing to ~0 would otherwise squash the plot
    axes[1].set(title="test accuracy", xlabel="epoch", ylabel="accuracy")
    axes[2].set(title="training loss", xlabel="epoch", ylabel="loss", yscale="log")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    return save_figure(fig, path)
