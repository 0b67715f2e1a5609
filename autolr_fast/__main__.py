"""Command line: ``python -m autolr_fast <command> [options]``.

Each command lives in its own module and exposes ``main(argv)``; this file only routes. The
library's own commands (``export``, ``info``) need nothing beyond torch; the others are the
experiment harness (:mod:`autolr_experiments`), which needs the ``experiments`` extra.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("autolr_experiments.demo", "train a small CNN on MNIST-1D with AutoLR and with cosine annealing"),
    "meta-train": ("autolr_experiments.meta_train", "meta-train a controller online on MNIST-1D and compare it"),
    "compare": ("autolr_experiments.compare", "schedule-quality comparison against common schedules and optimizers"),
    "bench": ("autolr_experiments.bench_report", "run the overhead benchmarks and render tables and a chart"),
    "find-lr": ("autolr_experiments.find_lr", "learning-rate range test"),
    "anchor-ablation": ("autolr_experiments.anchor_ablation", "which of find_anchor_lr's rules choose well"),
    "update-size": ("autolr_experiments.update_size", "does the relative update size locate the good rate"),
    "variant-table": ("autolr_experiments.variant_table", "variants of an AutoLR method against it, per task"),
    "collect": ("autolr_experiments.collect", "branching data collection for the action controller"),
    "train-action": ("autolr_experiments.action_training", "train action-controller models on collected data"),
    "action-signal": ("autolr_experiments.action_signal", "which loss-history signals predict the best action"),
    "export": ("autolr_fast.exporting", "export a controller to TorchScript for the C++ runtime"),
    "info": ("autolr_fast.ops.dispatch", "which backends are built and in use"),
}


def _usage() -> str:
    lines = ["usage: python -m autolr_fast <command> [options]", "", "commands:"]
    lines += [f"  {name:<15} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as exc:
        if not COMMANDS[name][0].startswith("autolr_experiments"):
            raise
        print(f"`{name}` is part of the experiment harness, which needs {exc.name!r}: install it with "
              "`pip install \"autolr_fast[experiments]\"` (or `pip install -e \".[experiments]\"` in a checkout)",
              file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
