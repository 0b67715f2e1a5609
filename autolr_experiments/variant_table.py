"""``python -m autolr_fast variant-table``: variants of an AutoLR method against it, per task.

A variant is a learned method's runs in a ``compare`` output (``autolr-progress``, ``autolr-file``
with one controller file per output folder, ``autolr-find-wsd``). Each is set beside the method
``--against`` names (default ``autolr``) and ``cosine`` at the default rate (from ``--base``, one
``compare`` output that ran both) and
beside the tuned cosine and the best other tuning-free method of the committed reports
(``--reference``, their equal-budget rows), with the issue's lines counted for each: never
diverges, at least cosine at the default rate, close to tuned cosine, beats the best other
tuning-free method; and how often it beats the ``--against`` method itself.

Writes ``variant_table.md``, ``variant_table.json`` and ``variant_table.png`` (each variant's
difference to that method per task) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

import matplotlib.pyplot as plt

from autolr_fast.rate_scale import envelope, resolve_decay, resolve_warmup

from .compare import TUNING_FREE, _at_least, _better, _close, _score
from .json_files import read_json
from .report import save_figure
from .tasks import task_optimizer


@dataclass
class Variant:
    label: str
    path: str
    method: str


def parse_variant(text: str) -> Variant:
    """``LABEL=PATH:METHOD`` (PATH a ``compare.json``)."""
    label, sep, rest = text.partition("=")
    path, sep2, method = rest.rpartition(":")
    if not (sep and sep2 and label and path and method):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected LABEL=PATH/compare.json:METHOD")
    return Variant(label, path, method)


def summary_rows(report: dict) -> dict[tuple[str, str], dict]:
    """``(task, method) -> summary row`` of the default-rate or as-shipped setting."""
    rows = {}
    for s in report["summary"]:
        if s["setting"] in ("as shipped", "best = default", "default") or s["setting"].startswith("leave-one"):
            rows.setdefault((s["task"], s["method"]), s)
    return rows


def references(reports: list[dict]) -> dict[str, dict]:
    """Per task: tuned cosine's final metric and the best other tuning-free method's (name, metric).
    A task in two reports is refused: which one is meant would be a guess."""
    out: dict[str, dict] = {}
    for report in reports:
        for b in report.get("equal_budget", []):
            if b["task"] in out:
                raise SystemExit(f"--reference: task {b['task']!r} is in more than one report; pass each task once")
            cls = b["classification"]
            tuned = next((r for r in b["rows"] if r["label"].startswith("cosine tuned")), None)
            free = {(method, setting) for method, setting, _ in TUNING_FREE}  # compare's own competitors
            others = [r for r in b["rows"] if (r["method"], r["setting"]) in free]
            best = max(others, key=lambda r: _score(r["final_metric"], cls), default=None)
            out[b["task"]] = {"classification": cls, "tuned": tuned and tuned["final_metric"],
                              "best_tuning_free": best and best["final_metric"],
                              "best_tuning_free_label": best and best["label"]}
    return out


def check_comparable(base: dict, variants: list[tuple[Variant, dict]]) -> None:
    """The variants' runs must have the seeds and, per task, the epochs and batch size of the base's."""
    def settings(report: dict) -> tuple:
        config = report.get("config", {})
        tasks = config.get("task_settings", {})
        return config.get("seeds"), {t: tuple(v) for t, v in (tasks.items() if isinstance(tasks, dict) else [])}

    seeds, tasks = settings(base)
    for v, report in variants:
        v_seeds, v_tasks = settings(report)
        clash = sorted(t for t in set(tasks) & set(v_tasks) if tasks[t] != v_tasks[t])
        if v_seeds != seeds or clash:
            raise SystemExit(f"--variant {v.label}: {v.path} ran {v_seeds} seeds and other epochs/batch sizes on "
                             f"{clash} than --base ({seeds} seeds): its runs do not compare")


def factor_range(report: dict, method: str, tasks: list[str]) -> list[float] | None:
    """The lowest and highest learned factor ``rate / (lr x envelope)`` of ``method``'s runs on
    ``tasks``, over the steps where AutoLR's default envelope is above 5 % of the peak. ``lr`` is the
    task's default rate, or the one ``find_anchor_lr`` chose (the run's ``info.anchor``). None
    without full-length rate curves."""
    lo, hi = math.inf, -math.inf
    for r in report.get("runs", []):
        rate = (r.get("curves") or {}).get("rate")
        if r["method"] != method or r["task"] not in tasks or r["status"] != "ok" or not rate:
            continue
        steps = r.get("steps") or len(rate)
        if len(rate) != steps:
            continue  # a thinned curve (a committed report)
        lr = ((r.get("info") or {}).get("anchor") or {}).get("lr") or task_optimizer(r["task"]).lr
        warmup = resolve_warmup(None, steps)
        decay = resolve_decay(None, steps, warmup, "wsd")
        for t, value in enumerate(rate):
            e = envelope(t, steps, warmup, "wsd", decay)
            if e > 0.05 and value is not None and math.isfinite(value):
                lo, hi = min(lo, value / (lr * e)), max(hi, value / (lr * e))
    return None if lo > hi else [lo, hi]


def build(base: dict, variants: list[tuple[Variant, dict]], refs: dict[str, dict], against: str = "autolr") -> dict:
    """Per task and variant: the means, and the counts of each line; ``against``: the base method
    every variant is set against."""
    base_rows = summary_rows(base)
    variant_rows = [(v, summary_rows(r)) for v, r in variants]
    # the tasks every variant ran on (a variant is refused on its training data), so counts compare
    tasks = [t for t in refs if (t, against) in base_rows and (t, "cosine") in base_rows
             and all((t, v.method) in rows for v, rows in variant_rows)]
    table, counts = [], {}
    for label in [against] + [v.label for v, _ in variants]:
        counts[label] = {"tasks": 0, "diverged_runs": 0, "ge_cosine_default": 0, "close_to_tuned": 0,
                         "beats_best_tuning_free": 0, "better_than_reference": 0, "worse_than_reference": 0}
    for task in tasks:
        ref, cls = refs[task], refs[task]["classification"]
        cosine, reference = base_rows[(task, "cosine")]["final_metric"], base_rows[(task, against)]
        entry = {"task": task, "classification": cls, "cosine_default": cosine, "tuned": ref["tuned"],
                 "best_tuning_free": ref["best_tuning_free"],
                 "best_tuning_free_label": ref["best_tuning_free_label"], "metrics": {}}
        for label, row in [(against, reference)] + [(v.label, rows[(task, v.method)]) for v, rows in variant_rows]:
            m, c = row["final_metric"], counts[label]
            entry["metrics"][label] = m
            c["tasks"] += 1
            c["diverged_runs"] += row["diverged"]
            c["ge_cosine_default"] += _at_least(m, cosine, cls)
            c["close_to_tuned"] += _close(m, ref["tuned"], cls)
            c["beats_best_tuning_free"] += _better(m, ref["best_tuning_free"], cls)
            if label != against:
                c["better_than_reference"] += _better(m, reference["final_metric"], cls)
                c["worse_than_reference"] += _better(reference["final_metric"], m, cls)
        table.append(entry)
    counts[against]["factor"] = factor_range(base, against, tasks)
    for v, report in variants:
        counts[v.label]["factor"] = factor_range(report, v.method, tasks)
    return {"against": against, "tasks": table, "counts": counts}


def _fmt(v: float | None, cls: bool) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}" if cls else f"{v:.4g}"


def _delta(v: float | None, ref: float | None, cls: bool) -> float | None:
    """Points of accuracy (classification) or the log10 ratio of the loss, against ``ref``."""
    if v is None or ref is None:
        return None
    if cls:
        return 100 * (v - ref)
    return None if v <= 0 or ref <= 0 else math.log10(v / ref)


def render(result: dict, command: str) -> str:
    labels, against = list(result["counts"]), result["against"]
    lines = [f"# Variants against `{against}` (`{command}`)", "",
             "The tasks every variant ran on (each is refused on its training data). Final test metric, mean "
             f"over seeds: accuracy % or test loss/MSE. `{against}` and cosine at the "
             "default rate from the base report; tuned cosine (5-rate grid picked on a validation split) and the "
             "best other tuning-free method from the committed reports. Close: within 0.5 points or 10 % of the "
             "loss of tuned cosine.", "",
             "| line | " + " | ".join(labels) + " |", "| :--- |" + " ---: |" * len(labels)]
    names = {"tasks": "tasks", "diverged_runs": "diverged runs", "ge_cosine_default": ">= cosine at the default rate",
             "close_to_tuned": "close to tuned cosine", "beats_best_tuning_free": "beats the best other tuning-free",
             "better_than_reference": f"better than `{against}`", "worse_than_reference": f"worse than `{against}`"}
    for key, name in names.items():
        cells = ["-" if key.endswith("_reference") and label == against else str(result["counts"][label][key])
                 for label in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    factors = [result["counts"][label].get("factor") for label in labels]
    lines.append("| learned factor, lowest-highest (rate / (lr x envelope) where the envelope > 5 %) | "
                 + " | ".join("-" if f is None else f"{f[0]:.2f}-{f[1]:.2f}x" for f in factors) + " |")
    lines += ["", "| task | cosine @ default | " + " | ".join(labels) + " | tuned cosine | best other tuning-free |",
              "| :--- |" + " ---: |" * (len(labels) + 3)]
    for e in result["tasks"]:
        cls = e["classification"]
        cells = [_fmt(e["metrics"].get(label), cls) for label in labels]
        lines.append(f"| {e['task']} | {_fmt(e['cosine_default'], cls)} | " + " | ".join(cells)
                     + f" | {_fmt(e['tuned'], cls)} | {_fmt(e['best_tuning_free'], cls)} "
                       f"({e['best_tuning_free_label']}) |")
    lines += ["", f"![each variant against {against}](variant_table.png)", ""]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    against = result["against"]
    labels = [label for label in result["counts"] if label != against]
    tasks = result["tasks"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(tasks) + 1.5), sharey=True)
    for ax, cls, unit in ((axes[0], True, f"points of accuracy vs {against}"),
                          (axes[1], False, f"log10(loss / {against}'s loss)")):
        for i, label in enumerate(labels):
            ys, xs = [], []
            for j, e in enumerate(tasks):
                d = _delta(e["metrics"].get(label), e["metrics"].get(against), e["classification"])
                if e["classification"] == cls and d is not None:
                    ys.append(j + 0.12 * (i - (len(labels) - 1) / 2))
                    xs.append(d)
            ax.scatter(xs, ys, s=18, label=label)
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_xlabel(unit + (" (right: better)" if cls else " (left: better)"))
    axes[0].set_yticks(range(len(tasks)), [e["task"] for e in tasks])
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"each variant against {against}, per task")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autolr_fast variant-table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="a compare.json with `cosine` (default rate) and --against runs")
    ap.add_argument("--against", default="autolr", help="the base method each variant is set against (default autolr)")
    ap.add_argument("--variant", action="append", type=parse_variant, required=True, metavar="LABEL=JSON:METHOD",
                    help="a variant's runs: LABEL=path/compare.json:method (repeatable)")
    ap.add_argument("--reference", nargs="+", required=True,
                    help="committed compare.json reports whose equal-budget rows give tuned cosine and the best "
                         "other tuning-free method per task")
    ap.add_argument("--out", default="results/variant_table")
    args = ap.parse_args(argv)
    what = "a compare output (compare.json)"
    base = read_json(args.base, what, ("summary",))
    variants = [(v, read_json(v.path, what, ("summary",))) for v in args.variant]
    for v, report in variants:
        if not any(s["method"] == v.method for s in report["summary"]):
            raise SystemExit(f"--variant {v.label}: {v.path} has no runs of method {v.method!r}")
    refs = references([read_json(p, what, ("equal_budget",)) for p in args.reference])
    check_comparable(base, variants)
    result = build(base, variants, refs, args.against)
    if not result["tasks"]:
        raise SystemExit(f"no task has {args.against} and cosine runs in --base, a run of every variant and a "
                         "reference row: nothing to compare")
    os.makedirs(args.out, exist_ok=True)
    command = "python -m autolr_fast variant-table " + " ".join(argv if argv is not None else [])
    with open(os.path.join(args.out, "variant_table.json"), "w") as f:
        json.dump({"command": command, **result}, f, indent=1)
    md = render(result, command)
    with open(os.path.join(args.out, "variant_table.md"), "w") as f:
        f.write(md)
    plot(result, os.path.join(args.out, "variant_table.png"))
    print(md)
    return 0
