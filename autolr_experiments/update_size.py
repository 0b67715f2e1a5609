"""Do the relative update size or the gradient's alignment with the last update locate the good
rate? Both measured at the rates anchor-ablation scored.

``python -m autolr_fast update-size --ablation results/anchor_ablation/anchor_ablation.json``

Two signals that need no held-out data, read from the training steps themselves:

* the size of an update relative to the weights, ``||w_{t+1} - w_t|| / ||w_t||`` over the whole
  model (LARS and LAMB set such a ratio per layer): a target for the rate's scale;
* the cosine between the descent direction ``-g_t`` and the last update ``w_t - w_{t-1}``: the
  signal of hypergradient descent (positive while steps keep going the same way, a rate that
  could be larger; negative when they turn back, one that overshoots), which an online scale
  controller would follow.

For every task of an ``anchor-ablation`` output and each of its five grid rates (the task's
default rate x ``10**e``), this command trains the task's default optimizer at that rate, held
constant, from seed 0's weights for ``--steps`` steps and records the median ratio and the mean
cosine after the first ``--skip``. It then asks whether the best grid rate (from the ablation's
cosine runs) has about the same value on every task: the spread at the best rates against the
spread at the default rates, and how a rule that picks the grid rate whose value is nearest the
median best value of the other tasks (leave-one-task-out) scores, in the ablation's terms (close
to the best rate, worse than the default rate). For the cosine it also asks whether its value at
the default rate tells the direction to the best rate (above or below the other tasks' median),
as an online controller would need. Writes ``update_size.md`` and ``update_size.json`` to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .anchor_ablation import EXPONENTS, judge
from .compare import machine_info, task_settings
from .json_files import read_json
from .report import markdown_table, strict_json
from .tasks import Task, get_task
from .training import make_optimizer


def trial_signals(task: Task, batch_size: int, exponent: float, steps: int, skip: int) -> tuple[float, float]:
    """``(ratio, alignment)`` over steps ``skip..steps`` of the task's default optimizer at
    ``default x 10**exponent``, held constant, from seed 0: the median ``||w_{t+1} - w_t|| /
    ||w_t||`` and the mean cosine between ``-g_t`` and ``w_t - w_{t-1}`` (NaN if it diverged)."""
    torch.manual_seed(0)
    model = task.make_model()
    opt = make_optimizer(model, replace(task.optim, lr=task.optim.lr * 10.0**exponent))
    params = [p for p in model.parameters() if p.requires_grad]
    ratios, cosines = [], []
    last_update = None
    for step, (x, y) in enumerate(islice(task.batches(batch_size, seed=0), steps)):
        before = [p.detach().clone() for p in params]
        opt.zero_grad(set_to_none=True)
        task.loss_fn(model(x), y).backward()
        if step >= skip and last_update is not None:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            dot = -sum((g * u).sum() for g, u in zip(grads, last_update, strict=True))
            norms = torch.sqrt(sum(g.pow(2).sum() for g in grads) * sum(u.pow(2).sum() for u in last_update))
            cosines.append(float(dot / norms) if float(norms) > 0 else float("nan"))
        opt.step()
        last_update = [p.detach() - b for p, b in zip(params, before, strict=True)]
        if step >= skip:
            moved = torch.sqrt(sum(u.pow(2).sum() for u in last_update))
            size = torch.sqrt(sum(b.pow(2).sum() for b in before))
            ratios.append(float(moved / size))
    finite = [r for r in ratios if math.isfinite(r)]
    ratio = statistics.median(finite) if finite and len(finite) == len(ratios) else float("nan")
    finite_cos = [c for c in cosines if math.isfinite(c)]
    alignment = statistics.fmean(finite_cos) if finite_cos and len(finite_cos) == len(cosines) else float("nan")
    if not math.isfinite(ratio):
        alignment = float("nan")  # a diverged run's early cosines say nothing about the rate
    return ratio, alignment


def _close(task: dict, e: float) -> bool:
    return judge(task["grid"][e], task["best"], task["grid"][0.0], task["classification"])[1]


def _worse(task: dict, e: float) -> bool:
    return judge(task["grid"][e], task["best"], task["grid"][0.0], task["classification"])[2]


def _spread(values: list[float]) -> float | None:
    """The standard deviation of the finite values (None with fewer than two)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else None


def _nearest_picks(tasks: list[dict], best: list[float], value_at) -> tuple[list[float], list[float]]:
    """Leave-one-task-out: per task, the median of the other tasks' finite ``best`` values (the
    target; NaN if none) and the grid rate whose ``value_at(task, e)`` is nearest it (0, the
    default rate, if no value or no target is finite)."""
    picks, targets = [], []
    for i, t in enumerate(tasks):
        others = [b for j, b in enumerate(best) if j != i and math.isfinite(b)]
        target = statistics.median(others) if others else float("nan")
        usable = [e for e in EXPONENTS if math.isfinite(value_at(t, e))]
        picks.append(min(usable, key=lambda e: abs(value_at(t, e) - target))
                     if usable and math.isfinite(target) else 0.0)
        targets.append(target)
    return picks, targets


def analyse(tasks: list[dict]) -> dict:
    """Spreads of log10 ratio at the best and the default rates, and the leave-one-task-out rule."""
    def log_at(t: dict, e: float) -> float:
        r = t["ratios"][e]
        return math.log10(r) if r > 0 and math.isfinite(r) else float("nan")

    best = [log_at(t, t["best_exponent"]) for t in tasks]
    default = [log_at(t, 0.0) for t in tasks]
    picks, _ = _nearest_picks(tasks, best, log_at)
    families = {}
    for family in ("sgd", "adam"):
        idx = [i for i, t in enumerate(tasks) if (t["optimizer"] == "sgd") == (family == "sgd")]
        families[family] = {"tasks": len(idx), "spread_best": _spread([best[i] for i in idx]),
                            "spread_default": _spread([default[i] for i in idx])}
    monotone = sum(all(t["ratios"][a] < t["ratios"][b] for a, b in zip(EXPONENTS, EXPONENTS[1:])) for t in tasks)
    finite_best = [10**b for b in best if math.isfinite(b)]
    return {
        "tasks": len(tasks),
        "best_ratio_median": statistics.median(finite_best), "best_ratio_min": min(finite_best),
        "best_ratio_max": max(finite_best),
        "spread_best": _spread(best), "spread_default": _spread(default), "families": families,
        "monotone_in_rate": monotone,
        "rule_picks": picks,
        "rule_close": sum(_close(t, e) for t, e in zip(tasks, picks, strict=True)),
        "rule_worse": sum(_worse(t, e) for t, e in zip(tasks, picks, strict=True)),
        "default_close": sum(_close(t, 0.0) for t in tasks),
    }


def analyse_alignment(tasks: list[dict]) -> dict:
    """The same questions for the gradient's alignment with the last update (a cosine, compared as
    is), and the online question: does its value at the default rate, above or below the other
    tasks' median at their best rates, tell on which side of the default the best rate lies?"""
    def at(t: dict, e: float) -> float:
        v = t["alignments"][e]
        return v if v is not None and math.isfinite(v) else float("nan")

    best = [at(t, t["best_exponent"]) for t in tasks]
    default = [at(t, 0.0) for t in tasks]
    picks, targets = _nearest_picks(tasks, best, at)
    # up while the steps keep their direction more than at the other tasks' best rates
    directions = [0.0 if not (math.isfinite(d) and math.isfinite(target)) else (0.5 if d > target else -0.5)
                  for d, target in zip(default, targets, strict=True)]
    moved = [i for i, t in enumerate(tasks) if t["best_exponent"] != 0.0]
    finite_best = [b for b in best if math.isfinite(b)]

    def decreasing(t: dict) -> bool:
        values = [at(t, e) for e in EXPONENTS]
        return all(math.isfinite(v) for v in values) and all(a > b for a, b in zip(values, values[1:]))

    return {
        "best_median": statistics.median(finite_best) if finite_best else None,
        "best_min": min(finite_best, default=None), "best_max": max(finite_best, default=None),
        "spread_best": _spread(best), "spread_default": _spread(default),
        "decreasing_in_rate": sum(decreasing(t) for t in tasks),
        "rule_picks": picks,
        "rule_close": sum(_close(t, e) for t, e in zip(tasks, picks, strict=True)),
        "rule_worse": sum(_worse(t, e) for t, e in zip(tasks, picks, strict=True)),
        "directions": directions,
        "direction_tasks": len(moved),
        "direction_right": sum(directions[i] != 0 and (directions[i] > 0) == (tasks[i]["best_exponent"] > 0)
                               for i in moved),
        "best_above_default": sum(tasks[i]["best_exponent"] > 0 for i in moved),
        "step_close": sum(_close(t, e) for t, e in zip(tasks, directions, strict=True)),
        "step_worse": sum(_worse(t, e) for t, e in zip(tasks, directions, strict=True)),
    }


def _decades(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def render(tasks: list[dict], summary: dict, config: dict) -> str:
    s = summary
    fam = {k: {key: _decades(v) if key.startswith("spread") else v for key, v in f.items()}
           for k, f in s["families"].items()}
    lines = ["# The relative update size and the gradient's alignment at the grid rates", "",
             f"Command: `{config['command']}`  ",
             f"Machine: {config['machine']['cpu']}, torch {config['machine']['torch']}; {config['wall_s']:.0f} s.", "",
             f"Median of `||w_(t+1) - w_t|| / ||w_t||` over steps {config['skip']}-{config['steps']} at a constant "
             "rate (the task's default optimizer, seed 0); the best rate is the ablation's best grid rate.", "",
             f"- Best rate's ratio: median {s['best_ratio_median']:.2e}, from {s['best_ratio_min']:.1e} to "
             f"{s['best_ratio_max']:.1e}; std of its log10 {_decades(s['spread_best'])} decades (default rates: "
             f"{_decades(s['spread_default'])}).",
             f"- SGD tasks ({fam['sgd']['tasks']}): {fam['sgd']['spread_best']} at the best rate, "
             f"{fam['sgd']['spread_default']} at the default; Adam/AdamW tasks ({fam['adam']['tasks']}): "
             f"{fam['adam']['spread_best']} and {fam['adam']['spread_default']}.",
             f"- The ratio rises with the rate across all five grid rates on {s['monotone_in_rate']} of "
             f"{s['tasks']} tasks.",
             f"- Leave-one-task-out rule (the grid rate whose ratio is nearest the other tasks' median best "
             f"ratio): close to the best rate on {s['rule_close']} of {s['tasks']}, worse than the default rate on "
             f"{s['rule_worse']}; the default rate is close on {s['default_close']}.", ""]
    rows = [[t["task"], t["optimizer"], *(f"{t['ratios'][e]:.2e}" for e in EXPONENTS), f"{t['best_exponent']:+g}",
             f"{pick:+g}"] for t, pick in zip(tasks, s["rule_picks"], strict=True)]
    lines += [markdown_table(["task", "optimizer", *(f"e {e:+g}" for e in EXPONENTS), "best e", "rule's e"], rows,
                             "ll" + "r" * (len(EXPONENTS) + 2)), ""]
    a = s["alignment"]

    def num(v: float | None, fmt: str = "{:+.3f}") -> str:
        return "-" if v is None or not math.isfinite(v) else fmt.format(v)

    lines += ["## The gradient's alignment with the last update", "",
              f"Mean cosine between `-g_t` and `w_t - w_(t-1)` over steps {config['skip']}-{config['steps']} at the "
              "same constant rates: the signal hypergradient descent follows (raise the rate while it is positive).",
              "",
              f"- Best rate's alignment: median {num(a['best_median'])}, from {num(a['best_min'])} to "
              f"{num(a['best_max'])}; its std {num(a['spread_best'], '{:.3f}')} (default rates: "
              f"{num(a['spread_default'], '{:.3f}')}).",
              f"- The alignment falls with the rate across all five grid rates on {a['decreasing_in_rate']} of "
              f"{s['tasks']} tasks.",
              f"- Leave-one-task-out rule (the grid rate whose alignment is nearest the other tasks' median best "
              f"alignment): close to the best rate on {a['rule_close']} of {s['tasks']}, worse than the default rate "
              f"on {a['rule_worse']}.",
              f"- Direction at the default rate (up if its alignment is above the other tasks' median best): right on "
              f"{a['direction_right']} of the {a['direction_tasks']} tasks whose best rate is not the default "
              f"(always up would be right on {a['best_above_default']}). One grid step that way is close on "
              f"{a['step_close']} of {s['tasks']} and worse than the default rate on {a['step_worse']}; the default "
              f"rate is close on {s['default_close']}.", ""]
    rows = [[t["task"], t["optimizer"], *(num(t["alignments"][e]) for e in EXPONENTS), f"{t['best_exponent']:+g}",
             f"{pick:+g}", {0.5: "up", -0.5: "down"}.get(d, "-")]
            for t, pick, d in zip(tasks, a["rule_picks"], a["directions"], strict=True)]
    lines += [markdown_table(["task", "optimizer", *(f"e {e:+g}" for e in EXPONENTS), "best e", "rule's e",
                              "direction"], rows, "ll" + "r" * (len(EXPONENTS) + 2) + "l"), ""]
    return "\n".join(lines)


def _signals_at_grid(task: Task, batch_size: int, steps: int, skip: int) -> dict:
    signals = {e: trial_signals(task, batch_size, e, steps, skip) for e in EXPONENTS}
    return {"ratios": {e: v[0] for e, v in signals.items()}, "alignments": {e: v[1] for e, v in signals.items()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autolr_fast update-size", description=__doc__.split("\n")[0])
    p.add_argument("--ablation", type=Path, default=Path("results/anchor_ablation/anchor_ablation.json"),
                   help="an anchor-ablation output: its tasks and their best grid rates")
    p.add_argument("--steps", type=int, default=None, help="steps measured (default 60; --quick 12)")
    p.add_argument("--skip", type=int, default=None, help="steps left out at the start (default 10; --quick 2)")
    p.add_argument("--out", type=Path, default=Path("results/update_size"))
    p.add_argument("--quick", action="store_true", help="12 steps, 2 left out, unless given: a smoke test")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.ablation.is_file():
        raise SystemExit(f"no anchor-ablation output at {args.ablation}; run python -m autolr_fast anchor-ablation "
                         "first, or pass --ablation PATH")
    steps = args.steps if args.steps is not None else (12 if args.quick else 60)
    skip = args.skip if args.skip is not None else (2 if args.quick else 10)
    if not 0 <= skip < steps:
        raise SystemExit(f"need 0 <= --skip < --steps, got --skip {skip} --steps {steps}")
    doc = read_json(args.ablation, "an anchor-ablation output", ("tasks",))
    if len(doc["tasks"]) < 2:  # before any training
        raise SystemExit(f"{args.ablation} holds {len(doc['tasks'])} task(s); the leave-one-task-out rule needs 2 "
                         "or more")
    torch.set_num_threads(1)
    start = time.perf_counter()
    tasks = []
    for t in tqdm(doc["tasks"], desc="update-size", disable=args.no_progress):
        grid = {float(e): (float("nan") if v is None else v) for e, v in t["grid"].items()}
        task, (_, batch_size) = get_task(t["task"]), task_settings(t["task"])  # built once for the five rates
        tasks.append({"task": t["task"], "classification": t["classification"], "grid": grid,
                      "best_exponent": t["best_exponent"], "best": t["best"],
                      "optimizer": "sgd" if task.optim.kind == "sgd" else "adam",
                      **_signals_at_grid(task, batch_size, steps, skip)})
    summary = analyse(tasks)
    summary["alignment"] = analyse_alignment(tasks)
    command = "python -m autolr_fast update-size " + " ".join(argv if argv is not None else sys.argv[1:])
    config = {"command": command, "machine": machine_info(), "steps": steps, "skip": skip,
              "ablation": str(args.ablation), "wall_s": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    md = render(tasks, summary, config)
    (args.out / "update_size.md").write_text(md)
    (args.out / "update_size.json").write_text(json.dumps(strict_json(
        {"config": config, "summary": summary, "tasks": tasks}), allow_nan=False))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
