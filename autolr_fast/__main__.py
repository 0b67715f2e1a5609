"""Command line: ``python -m autolr_fast <command> [options]``.

Each command lives in its own module and exposes ``main(argv)``; this file only routes.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("autolr_fast.demo", "train a small CNN on MNIST-1D with AutoLR and with cosine annealing"),
    "meta-train": ("autolr_fast.meta_train", "meta-train a controller online on MNIST-1D and compare it"),
    "compare": ("autolr_fast.compare", "schedule-quality comparison against common schedules and optimizers"),
    "bench": ("autolr_fast.bench_report", "run the overhead benchmarks and render tables and a chart"),
    "find-lr": ("autolr_fast.lr_finder", "learning-rate range test"),
    "collect": ("autolr_fast.collect", "branching data collection for the action controller"),
    "train-action": ("autolr_fast.action_training", "train action-controller models on collected data"),
    "export": ("autolr_fast.exporting", "export a controller to TorchScript for the C++ runtime"),
    "info": ("autolr_fast.dispatch", "which backends are built and in use"),
}


def _usage() -> str:
    lines = ["usage: python -m autolr_fast <command> [options]", "", "commands:"]
    lines += [f"  {name:<13} {desc}" for name, (_, desc) in COMMANDS.items()]
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
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
