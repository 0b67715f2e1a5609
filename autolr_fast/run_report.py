"""Summaries, Markdown tables and PNG plots of training runs (``training.RunResult`` JSON)."""

from __future__ import annotations

import statistics


def summarize(records: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["name"], []).append(r)
    out = {}
    for name, runs in by.items():
        final = [r["epochs"][-1]["test_acc"] for r in runs]
        best = [max(e["test_acc"] for e in r["epochs"]) for r in runs]
        loss = [r["epochs"][-1]["test_loss"] for r in runs]
        out[name] = {
            "runs": len(runs),
            "final_acc_mean": statistics.fmean(final),
            "final_acc_std": statistics.pstdev(final) if len(final) > 1 else 0.0,
            "best_acc_mean": statistics.fmean(best),
            "final_test_loss_mean": statistics.fmean(loss),
        }
    return out


def markdown_table(summary: dict, caption: str) -> str:
    lines = [
        caption,
        "",
        "| schedule | final test acc (mean +- std) | best test acc | final test loss |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {100 * s['final_acc_mean']:.2f} +- {100 * s['final_acc_std']:.2f} % | "
            f"{100 * s['best_acc_mean']:.2f} % | {s['final_test_loss_mean']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot_runs(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


