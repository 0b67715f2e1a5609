"""``python -m autolr_fast compare``: schedule-quality comparison of learned and hand-designed
learning-rate schedules and optimizers on the tasks of :mod:`autolr_experiments.tasks`.

Every method of :mod:`autolr_experiments.baselines` trains every task for the same epochs, on the same
mini-batches (``Task.batches`` with the seed) and from the same initial weights (seeded) for
each seed. Hand-designed methods run on a log-spaced rate grid; learned and untuned ones run
once. Results: one JSON file (schema in ``docs/compare.md``), a Markdown table and one PNG per
task. See ``docs/compare.md`` for the columns and the fairness rules.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from autolr_fast import load_controller, load_pretrained
from autolr_fast.controllers.pretrained import PRETRAINED_DIR, available_pretrained

from . import baselines
from .json_files import read_json
from .report import (
    color_cycle,
    fmt,
    fmt_mean_std,
    is_number,
    markdown_table,
    mean_std,
    plt,
    save_figure,
    strict_json,
    summarize,
)
from .tasks import Task, available_tasks, dataset_of, get_task, shares_data, task_optimizer
from .training import Method, MethodUnavailable, RunSpec, Schedule, train

SCHEMA = "autolr_fast.compare/1"

#: Leave-one-task-out: the controllers compare meta-trains (under --out) for the tasks the shipped
#: controller was trained on, the variant of those autolr jobs, and the epochs of every family run
#: (None: each run's own; a test shortens it).
LOTO_DIR = "leave_one_out"
LOTO_VARIANT = "leave-one-dataset-out"
LOTO_EPOCHS: int | None = None
#: the methods that run the shipped controller (leave-one-task-out and controller variants apply to each)
AUTOLR_METHODS = ("autolr", "autolr-find", "autolr-find-wsd")

#: Per task: (epochs, batch size) of a full comparison.
TASK_SETTINGS: dict[str, tuple[int, int]] = {
    "mnist1d-cnn": (40, 100),
    "mnist1d-mlp": (40, 100),
    "digits-mlp": (30, 32),
    "markov-gru": (20, 50),
    "digits-bncnn": (20, 32),
    "diabetes-mlp": (60, 32),
    "friedman-mlp": (30, 32),
    "cancer-mlp": (40, 32),
    "wine-mlp": (60, 16),
    "digits-dropout-mlp": (20, 32),
    "mnist1d-cnn-adam": (20, 100),
    "markov-gru-sgd": (20, 50),
    "markov-attn": (20, 50),
    "friedman3-mlp": (30, 32),
    "moons-mlp": (40, 32),
    "noisy-classes-mlp": (30, 32),
    "markov-lstm": (20, 50),
    "mnist1d-mlp-adamw": (40, 100),
    "circles-mlp": (40, 32),
    "friedman2-mlp": (30, 32),
    "digits-bncnn-adamw": (20, 32),
    "cancer-mlp-sgd": (40, 32),
    "moons-mlp-adam": (40, 32),
    "grammar-lm": (10, 64),
    "shapes-gncnn": (15, 64),
    "clusters-resmlp": (20, 64),
    "manifold-ae": (40, 64),
    "adding-lstm": (20, 64),
    "logreg-convex": (20, 64),
    "spirals-deep-mlp": (30, 64),
    "waves-cnn1d": (15, 64),
    "gratings-vit": (15, 64),
    "poisson-counts": (30, 32),
    "reverse-bigru": (20, 64),
    "categorical-embed": (20, 64),
}
REGRESSION_SETTINGS = (40, 32)
#: Tasks meant for held-out evaluation (whether a controller was trained on one is read from its info, per run).
NEW_TASKS = ["markov-gru", "digits-bncnn", "diabetes-mlp", "friedman-mlp"]
#: The second, third and fourth held-out sets: for evaluation only, no controller or rule is trained
#: or chosen on them (meta-train --family refuses them)
HELD_OUT_TASKS = ["grammar-lm", "shapes-gncnn", "clusters-resmlp", "manifold-ae",
                  "adding-lstm", "logreg-convex", "spirals-deep-mlp", "waves-cnn1d",
                  "gratings-vit", "poisson-counts", "reverse-bigru", "categorical-embed"]
DEFAULT_TASKS = ["mnist1d-cnn", "mnist1d-mlp", "digits-mlp", "regress-sin", *NEW_TASKS]
QUICK_TASKS = ["digits-mlp", "regress-sin", "diabetes-mlp"]
QUICK_EPOCHS = 10
#: Target for "time to target": accuracy >= TARGET_ACC_FRACTION x the best mean final accuracy
#: of any method on the task; regression: test loss <= TARGET_LOSS_FACTOR x the best mean final loss.
TARGET_ACC_FRACTION = 0.95
TARGET_LOSS_FACTOR = 2.0
#: The tuned reference of the equal-budget summary is tuned as a user would: each grid rate is
#: trained on the training data minus a validation split (VALIDATION_FRACTION of it, at most
#: VALIDATION_MAX samples) and scored on that split; the rate with the best mean score over seeds
#: is reported from its run on all the training data ("tune on a split, train again on all").
TUNED_REFERENCE = "cosine"
VALIDATION_FRACTION = 0.2
VALIDATION_MAX = 500


def task_settings(name: str) -> tuple[int, int]:
    return TASK_SETTINGS.get(name, REGRESSION_SETTINGS)


@dataclass
class Job:
    task: str
    method: str
    lr: float | None
    grid_index: int | None
    is_default: bool
    seed: int
    epochs: int
    batch_size: int
    threads: int = 1
    split: str = "test"  # "validation": trained without the validation split, scored on it
    variant: str = ""  # "leave-one-dataset-out@<sha12>": autolr with the controller trained without this task's data


# ------------------------------------------------------------------------------------------------
# One training run
# ------------------------------------------------------------------------------------------------
def run_one(job: Job, task_cache: dict | None = None) -> dict:
    """Train one (task, method, rate, seed) on the CPU with ``job.threads`` torch threads and
    return its record (schema: docs/compare.md). The caller's thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        return _run_one(job, task_cache if task_cache is not None else {})
    finally:
        torch.set_num_threads(threads)


def _quietly(build: Callable[[RunSpec], Schedule]) -> Callable[[RunSpec], Schedule]:
    """``build`` with its warnings (e.g. AutoLR's notes on the optimizer) silenced."""

    def quiet(spec: RunSpec) -> Schedule:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build(spec)

    return quiet


def validation_task(task: Task, seed: int) -> Task:
    """``task`` without its validation split (a fifth of the training data, at most
    ``VALIDATION_MAX`` samples, drawn with ``seed``), whose "test" data is that split."""
    n_val = max(1, min(VALIDATION_MAX, int(len(task.x_train) * VALIDATION_FRACTION)))
    rest, x_val, y_val = task.split_validation(n_val, seed=seed)
    return replace(rest, x_test=x_val, y_test=y_val)


def _run_one(job: Job, cache: dict) -> dict:
    if job.task not in cache:
        cache[job.task] = get_task(job.task)
    task = cache[job.task]
    if job.split == "validation":
        task = validation_task(task, job.seed)
    method = baselines.get_method(job.method)
    record: dict[str, Any] = {
        "task": job.task, "method": job.method, "family": method.family, "lr": job.lr,
        "grid_index": job.grid_index, "is_default": job.is_default, "seed": job.seed,
        "epochs": job.epochs, "batch_size": job.batch_size, "status": "ok", "message": "",
        "classification": task.is_classification, "split": job.split,
    }
    if job.variant:
        record["variant"] = job.variant
    if method.revision != 1:
        record["revision"] = method.revision
    record["optimizer"] = task_optimizer(job.task).describe()
    if job.split == "validation":
        record["validation_split"] = _validation_settings()
    try:
        run = train(task, replace(method, build=_quietly(method.build)), epochs=job.epochs, batch_size=job.batch_size,
                    seed=job.seed, lr=job.lr)
    except MethodUnavailable as exc:
        record.update(status="skipped", message=str(exc))
        return record
    run.rates = [float(f"{v:.6g}") for v in run.rates]  # 6 significant digits
    record["info"] = run.schedule.info
    record.update(run.record())
    return record


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------
def _time_to_target(rec: dict, target: float) -> tuple[int | None, float | None]:
    """``(steps, CPU seconds)`` until the run first reached ``target`` (checked at epoch ends).
    The seconds are the run's CPU seconds per step times those steps: CPU time does not depend on
    what else the machine was running, where wall time does. Steps taken before the run
    (``find_anchor_lr``'s trials, ``info["anchor"]["cost_steps"]``) come first: they count in the
    seconds (and in the per-step cost), not in the returned steps."""
    c = rec["curves"]
    series = c["test_acc"] if rec["classification"] else c["test_loss"]
    before = int(((rec.get("info") or {}).get("anchor") or {}).get("cost_steps") or 0)
    total = (rec.get("steps") or 0) + before
    per_step = rec["cpu_time_s"] / total if rec.get("cpu_time_s") and total else None
    for v, steps in zip(series, c["steps"], strict=True):
        if is_number(v) and ((v >= target) if rec["classification"] else (v <= target)):
            return steps, (None if per_step is None else (before + steps) * per_step)
    return None, None


def _chosen_groups(groups: dict[tuple, list[dict]], score: Callable[[list[dict]], float]) -> list[tuple]:
    """``(method, setting, runs)`` of the reported rows: ``best`` (and ``default``, unless it is
    the best) for hand-designed methods, ``as shipped`` (or ``leave-one-dataset-out``) for the others."""
    chosen: list[tuple[str, str, list[dict]]] = []
    for method in baselines.available_methods():
        cands = {lr: rs for (name, lr), rs in groups.items() if name == method}
        if not cands:
            continue
        if cands[next(iter(cands))][0]["family"] != "hand":
            chosen += [(method, _learned_setting(rs), rs) for rs in cands.values()]
            continue
        best_lr = max(cands, key=lambda lr, c=cands: score(c[lr]))
        default = [rs for rs in cands.values() if rs[0]["is_default"]]
        if default and default[0] is cands[best_lr]:
            chosen.append((method, "best = default", cands[best_lr]))
        else:
            chosen.append((method, "best", cands[best_lr]))
            if default:
                chosen.append((method, "default", default[0]))
    return chosen


def _learned_setting(runs: list[dict]) -> str:
    """``leave-one-dataset-out`` for runs of a controller meta-trained again without their task's data,
    ``as shipped`` otherwise."""
    loto = any(r.get("variant", "").startswith(LOTO_VARIANT) for r in runs)
    return LOTO_VARIANT if loto else "as shipped"


def _target(cls: bool, best: float) -> dict:
    if cls:
        return {"metric": "test_acc", "target": TARGET_ACC_FRACTION * best,
                "rule": f">= {TARGET_ACC_FRACTION} x best mean final accuracy"}
    return {"metric": "test_loss", "target": TARGET_LOSS_FACTOR * (-best),
            "rule": f"<= {TARGET_LOSS_FACTOR} x best mean final loss"}


def summary_rows(runs: list[dict]) -> tuple[list[dict], dict]:
    """Rows of the result table: per task and method, ``best`` and ``default`` for hand-designed
    methods (best = grid rate with the best mean final metric over seeds), ``as shipped`` (or
    ``leave-one-dataset-out``) for the others, each with ``report.summarize`` of its runs.
    Returns ``(rows, targets)``."""
    ok = [r for r in runs if r["status"] in ("ok", "diverged")]
    rows: list[dict] = []
    targets: dict[str, dict] = {}
    for task in dict.fromkeys(r["task"] for r in ok):
        trs = [r for r in ok if r["task"] == task]
        cls = trs[0]["classification"]
        groups: dict[tuple, list[dict]] = {}
        for r in trs:
            groups.setdefault((r["method"], r["lr"]), []).append(r)

        def score(rs: list[dict], cls: bool = cls) -> float:
            return _mean_score(rs, cls)

        chosen = _chosen_groups(groups, score)
        targets[task] = _target(cls, max((score(rs) for _, _, rs in chosen), default=-math.inf))
        target = targets[task]["target"]
        for method, setting, rs in chosen:
            row: dict[str, Any] = {"task": task, "method": method, "family": rs[0]["family"], "setting": setting,
                                   "lr": rs[0]["lr"], "classification": cls, **summarize(rs),
                                   "trained_on": any((r.get("info") or {}).get("trained_on_task") for r in rs)}
            reached = [h for h in (_time_to_target(r, target) for r in rs) if h[0] is not None]
            row["target_reached"] = f"{len(reached)}/{len(rs)}"
            row["steps_to_target"], _ = mean_std([h[0] for h in reached])
            row["seconds_to_target"], _ = mean_std([h[1] for h in reached if h[1] is not None])  # CPU s
            rows.append(row)
    return rows, targets


#: The references every learned controller is held against in the verdict table.
REFERENCES = (("cosine", "best"), ("sf-sgd", "best"), ("sf-adamw", "best"), ("prodigy", "as shipped"))


def _row_for(rows: list[dict], task: str, method: str, setting: str) -> dict | None:
    for r in rows:
        same_setting = r["setting"] == setting or (setting == "best" and r["setting"] == "best = default")
        if r["task"] == task and r["method"] == method and same_setting:
            return r
    return None


def verdicts(rows: list[dict]) -> list[dict]:
    """Each learned controller against each reference (tuned cosine, tuned schedule-free SGD and
    AdamW, Prodigy), per task: ``delta`` = learned minus reference mean final metric (accuracy
    points or MSE), ``verdict`` win / tie / lose; tie when ``|delta|`` is within
    ``sqrt(std_a**2 + std_b**2)`` (one combined standard deviation over seeds)."""
    out = []
    for r in rows:
        if r["family"] != "learned":
            continue
        for method, setting in REFERENCES:
            ref = _row_for(rows, r["task"], method, setting)
            if ref is None or r["final_metric"] is None or ref["final_metric"] is None:
                continue
            delta = r["final_metric"] - ref["final_metric"]
            stds = [x for x in (r["final_metric_std"], ref["final_metric_std"]) if x is not None]
            noise = math.hypot(*stds) if stds else None  # None: one seed, no spread known
            better = delta > 0 if r["classification"] else delta < 0
            tie = not math.isinf(delta) and (delta == 0 or (noise is not None and abs(delta) <= noise))
            verdict = "tie" if tie else ("win" if better else "lose")
            ratio = r["final_metric"] / ref["final_metric"] if ref["final_metric"] else None
            out.append({"task": r["task"], "learned": r["method"], "trained_on": bool(r.get("trained_on")),
                        "reference": f"{method} ({ref['setting']})",
                        "delta": delta, "ratio": ratio, "noise": noise, "verdict": verdict,
                        "classification": r["classification"]})
    return out


# ------------------------------------------------------------------------------------------------
# The equal-budget view: AutoLR with defaults against what a user would otherwise run
# ------------------------------------------------------------------------------------------------
#: The tuning-free competitors: (method, setting, label). Schedule-free needs a rate, so it
#: stands here at its default rate, one run, as a user who does not tune would run it.
TUNING_FREE = (
    ("prodigy", "as shipped", "Prodigy (lr 1, cosine)"),
    ("dog", "as shipped", "DoG (averaged)"),
    ("dadapt", "as shipped", "D-Adaptation (lr 1, cosine)"),
    ("mechanic", "as shipped", "Mechanic (task optimizer, cosine)"),
    ("sf-sgd", "default", "schedule-free SGD @ default"),
    ("sf-adamw", "default", "schedule-free AdamW @ default"),
)
#: "Close to tuned cosine": within this many accuracy points, or this relative loss (MSE).
CLOSE_ACC = 0.005
CLOSE_LOSS_RATIO = 1.10


def _default_row(rows: list[dict], task: str, method: str) -> dict | None:
    return _row_for(rows, task, method, "default") or next(
        (r for r in rows if r["task"] == task and r["method"] == method and r["setting"] == "best = default"), None)


def _cpu_per_seed(runs: list[dict], task: str, method: str, lr: Any = "any") -> tuple[float | None, int]:
    """Mean CPU seconds per seed of one method's runs on ``task`` summed over its rates (``lr``:
    only that rate), and how many rates that is."""
    by_lr: dict = {}
    for r in runs:
        if r["task"] == task and r["method"] == method and r["status"] in ("ok", "diverged"):
            if lr == "any" or r["lr"] == lr:
                by_lr.setdefault(r["lr"], []).append(r.get("cpu_time_s"))
    means = [mean_std(v)[0] for v in by_lr.values()]
    if not means or any(m is None for m in means):
        return None, len(by_lr)
    return sum(means), len(by_lr)


def _budget_row(label: str, row: dict | None, runs: list[dict], tuned: bool = False) -> dict | None:
    if row is None:
        return None
    cpu, n_runs = _cpu_per_seed(runs, row["task"], row["method"], "any" if tuned else row["lr"])
    # the longest run of the row (a run that diverged stops early; if every one did, its longest)
    steps = max((r["steps"] for r in runs if r["task"] == row["task"] and r["method"] == row["method"]
                 and r["status"] in ("ok", "diverged") and r.get("steps")), default=None)
    return {"label": label, "method": row["method"], "setting": row["setting"], "lr": row["lr"],
            "runs": n_runs, "steps_per_run": steps, "cpu_s": cpu, "seeds": row["seeds"],
            "final_metric": row["final_metric"], "final_metric_std": row["final_metric_std"],
            "diverged": row["diverged"]}


def _better(a: float | None, b: float | None, cls: bool) -> bool:
    if a is None or b is None:
        return False
    return a > b if cls else a < b


def _at_least(a: float | None, b: float | None, cls: bool) -> bool:
    if a is None or b is None:
        return False
    return a >= b if cls else a <= b


def _close(a: float | None, tuned: float | None, cls: bool) -> bool:
    if a is None or tuned is None:
        return False
    return a >= tuned - CLOSE_ACC if cls else a <= CLOSE_LOSS_RATIO * tuned


def _tuned_on_validation(task: str, cls: bool, runs: list[dict], val_runs: list[dict]) -> dict | None:
    """The tuned reference's row: the grid rate with the best mean validation metric, reported
    from its runs on all the training data (None without validation runs)."""
    by_lr: dict = {}
    for r in val_runs:
        if r["task"] == task and r["method"] == TUNED_REFERENCE and r["status"] in ("ok", "diverged"):
            by_lr.setdefault(r["lr"], []).append(r)
    if not by_lr:
        return None

    lr = max(by_lr, key=lambda k: _mean_score(by_lr[k], cls))
    full = [r for r in runs if r["task"] == task and r["method"] == TUNED_REFERENCE
            and r["status"] in ("ok", "diverged") and r["lr"] is not None and math.isclose(r["lr"], lr)]
    if not full:
        return None
    return {"task": task, "method": TUNED_REFERENCE, "family": "hand", "setting": "picked on validation",
            "lr": full[0]["lr"],
            "classification": cls, **summarize(full),
            "validation_metric": {f"{k:.6g}": mean_std([r["final_metric"] for r in v])[0] for k, v in by_lr.items()}}


def _tuned_budget_row(row: dict | None, runs: list[dict], val_runs: list[dict]) -> dict | None:
    """The tuned reference's compute: every validation run of the grid plus the run reported."""
    if row is None or row["setting"] != "picked on validation":
        return _budget_row("cosine tuned (grid, picked on test)", row, runs, tuned=True)
    out = _budget_row("cosine tuned (grid on a validation split, then 1 run)", row, runs)
    cpu_val, n_val = _cpu_per_seed(val_runs, row["task"], row["method"])
    out["runs"] = n_val + 1
    out["cpu_s"] = None if cpu_val is None or out["cpu_s"] is None else cpu_val + out["cpu_s"]
    return out


def equal_budget(rows: list[dict], runs: list[dict], val_runs: list[dict] | None = None) -> list[dict]:
    """Per task: AutoLR with defaults (one run), cosine at the default rate (one run), cosine
    tuned on the grid (picked on the validation runs when there are any, else on the test
    metric), the tuning-free competitors (one run each), with the compute each used and the
    verdicts of issue 15."""
    val_runs = val_runs or []
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        cls = next(r["classification"] for r in rows if r["task"] == task)
        auto = _row_for(rows, task, "autolr", "as shipped") or _row_for(rows, task, "autolr", LOTO_VARIANT)
        default = _default_row(rows, task, "cosine")
        tuned = _tuned_on_validation(task, cls, runs, val_runs) or _row_for(rows, task, "cosine", "best")
        table = [_budget_row("AutoLR (defaults)", auto, runs),
                 _budget_row("cosine @ default lr", default, runs),
                 _tuned_budget_row(tuned, runs, val_runs)]
        free = [_budget_row(label, _default_row(rows, task, m) if setting == "default"
                            else _row_for(rows, task, m, setting), runs) for m, setting, label in TUNING_FREE]
        free = [f for f in free if f is not None]
        auto_runs = [r for r in runs if r["task"] == task and r["method"] == "autolr" and r.get("info")]
        find_runs = [r for r in runs if r["task"] == task and r["method"] == "autolr-find" and r.get("info")]
        info = (auto_runs or find_runs)[0]["info"] if auto_runs or find_runs else {}
        entry = {"task": task, "classification": cls, "controller": info.get("controller"),
                 "tuned_picked_on": "validation" if tuned and tuned["setting"] == "picked on validation" else "test",
                 "tuned_validation_metric": (tuned or {}).get("validation_metric"),
                 "controller_sha256": sorted({r["info"].get("controller_sha256") or ""
                                              for r in auto_runs or find_runs}),
                 "ops": info.get("ops"),
                 "controller_tasks": info.get("controller_tasks", []),
                 "trained_on": bool(info.get("trained_on_task")), "optimizer": info.get("optimizer"),
                 "leave_one_task_out": bool(info.get("leave_one_task_out")),
                 "rows": [r for r in table if r is not None] + free}
        find = _row_for(rows, task, "autolr-find", "as shipped") or _row_for(rows, task, "autolr-find", LOTO_VARIANT)
        if find is not None:
            row = _budget_row("AutoLR + find_anchor_lr (defaults)", find, runs)
            found = [r["info"]["anchor"] for r in runs if r["task"] == task and r["method"] == "autolr-find"
                     and r.get("info", {}).get("anchor")]
            if found:  # the trials' steps (mean over seeds: a divergence stops a seed's larger rates)
                row["trial_steps"] = round(sum(f["cost_steps"] for f in found) / len(found))
                row["anchor_factors"] = [f["factor"] for f in found]
            entry["rows"].insert(1, row)
            entry["verdicts_find"] = _verdicts(find, default, tuned, free, cls)
            # held out or not, from autolr-find's own runs (it may have run without autolr)
            entry["trained_on_find"] = any(r["info"].get("trained_on_task") for r in find_runs)
        if auto is not None:
            entry["verdicts"] = _verdicts(auto, default, tuned, free, cls)
        out.append(entry)
    return out


def _verdicts(auto: dict, default: dict | None, tuned: dict | None, free: list[dict], cls: bool) -> dict:
    """Issue 15's verdicts for one AutoLR row against the task's references."""
    a = auto["final_metric"]
    # a row whose runs all diverged (loss inf) is no match for anything, also for a reference that diverged too
    finished = a is not None and (cls or math.isfinite(a))
    best_free = max(free, key=lambda f: _score(f["final_metric"], cls), default=None)
    return {
        "delta_vs_cosine_default": _delta(a, default, cls),
        "delta_vs_tuned": _delta(a, tuned, cls),
        "delta_vs_best_tuning_free": _delta(a, best_free, cls),
        "never_diverged": auto["diverged"] == 0,
        "ge_cosine_default": finished and _at_least(a, default and default["final_metric"], cls),
        "close_to_tuned": finished and _close(a, tuned and tuned["final_metric"], cls),
        "beats_best_tuning_free": finished and _better(a, best_free and best_free["final_metric"], cls),
        "best_tuning_free": best_free and best_free["label"],
        # 1 = no tuning-free competitor is better; len(free) + 1 = worse than all of them
        "rank_among_tuning_free": 1 + sum(_better(f["final_metric"], a, cls) for f in free),
        "tied_in_rank": sum(not _better(f["final_metric"], a, cls) and not _better(a, f["final_metric"], cls)
                            for f in free),
        "tuning_free_methods": len(free) + 1,
    }


def _delta(a: float | None, ref: dict | None, cls: bool) -> str | None:
    """AutoLR against a reference row: accuracy points, or the loss ratio."""
    if a is None or ref is None or ref["final_metric"] is None:
        return None
    if cls:
        return f"{100 * (a - ref['final_metric']):+.2f} pts"
    if not math.isfinite(a) or not math.isfinite(ref["final_metric"]) or ref["final_metric"] == 0:
        return f"{a:.3g} vs {ref['final_metric']:.3g}"
    return f"x{a / ref['final_metric']:.3f} loss"


def _score(metric: float | None, cls: bool) -> float:
    if metric is None:
        return -math.inf
    return metric if cls else -metric


def _mean_score(runs: list[dict], cls: bool) -> float:
    """:func:`_score` of the runs' mean final metric (higher is better; -inf without a number)."""
    return _score(mean_std([r["final_metric"] for r in runs])[0], cls)


def action_vs_constant(rows: list[dict]) -> list[dict]:
    """Per task: the shipped action controller (``action``, which runs only on tasks it was not
    trained on) against ``constant`` at its default rate, the same optimizer and the same starting
    rate: the action controller's criterion in issue 15. Beside it, ``cosine`` at that rate: the
    envelope a relative action controller follows, without any action (what the actions add)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        act = _row_for(rows, task, "action", "as shipped")
        const = _default_row(rows, task, "constant")
        if act is None or const is None:
            continue
        cls = act["classification"]
        cos = _default_row(rows, task, "cosine")
        out.append({"task": task, "classification": cls, "lr": const["lr"], "seeds": act["seeds"],
                    **_metric_fields("action", act), **_metric_fields("constant", const),
                    "delta": _delta(act["final_metric"], const, cls),
                    "beats": _better(act["final_metric"], const["final_metric"], cls),
                    **_metric_fields("cosine", cos), "delta_cosine": _delta(act["final_metric"], cos, cls),
                    "beats_cosine": cos is not None and _better(act["final_metric"], cos["final_metric"], cls)})
    return out


def _metric_fields(name: str, row: dict | None) -> dict:
    """``name``, ``name_std`` and ``name_diverged`` of a report row (None, None, 0 without one)."""
    if row is None:
        return {name: None, f"{name}_std": None, f"{name}_diverged": 0}
    return {name: row["final_metric"], f"{name}_std": row["final_metric_std"], f"{name}_diverged": row["diverged"]}


def done_when(budget: list[dict], action: list[dict] | None = None, verdicts: str = "verdicts") -> dict:
    """The issue's "Done when" lines over all tasks (closeness over the tasks the controller was
    not trained on; the action controller over the tasks it ran on, all held out). ``verdicts``:
    which AutoLR row is judged (``"verdicts"``: defaults; ``"verdicts_find"``: after
    find_anchor_lr)."""
    action = action or []
    judged = [b for b in budget if verdicts in b]
    trained = "trained_on_find" if verdicts == "verdicts_find" else "trained_on"
    held_out = [b for b in judged if not b.get(trained, b["trained_on"])]
    count = lambda bs, key: sum(b[verdicts][key] for b in bs)  # noqa: E731
    n, n_out = len(judged), len(held_out)
    return {
        "tasks": n, "held_out_tasks": n_out,
        "never_diverged": count(judged, "never_diverged"),
        "ge_cosine_default": count(judged, "ge_cosine_default"),
        "close_to_tuned_held_out": count(held_out, "close_to_tuned"),
        "beats_best_tuning_free": count(judged, "beats_best_tuning_free"),
        "action_tasks": len(action), "action_beats_constant": sum(a["beats"] for a in action),
        "met": {
            "never diverges": n > 0 and count(judged, "never_diverged") == n,
            ">= cosine at the default rate on every task": n > 0 and count(judged, "ge_cosine_default") == n,
            "close to tuned cosine on >= 3/4 of the held-out tasks":
                n_out > 0 and count(held_out, "close_to_tuned") >= 0.75 * n_out,
            "beats the best other tuning-free method on >= half of the tasks":
                n > 0 and count(judged, "beats_best_tuning_free") >= 0.5 * n,
            **({"the action controller beats a constant rate at the same start on the tasks it was not trained on":
                all(a["beats"] for a in action)} if action else {}),
        },
    }


def _tuned_rule(budget: list[dict], grid: int) -> str:
    """How the tuned rows of ``budget`` picked their rate, in words."""
    on = {b.get("tuned_picked_on", "test") for b in budget}
    text = []
    if "validation" in on:
        text.append(f"Tuned cosine (picked on validation): each of the {grid} grid rates trained on the training "
                    f"data minus a validation split ({100 * VALIDATION_FRACTION:g} %, at most {VALIDATION_MAX} "
                    "samples) and scored on that split; the rate with the best mean score is reported from its run "
                    "on all the training data (one run per grid rate, plus that run; the validation runs are shorter).")
    if "test" in on:
        text.append(f"Tuned cosine (picked on test): the best of the {grid} grid runs by the same test metric it is "
                    "reported on (an optimistic reference).")
    return " ".join(text)


def _verdict_lines(v: dict | None, who: str) -> list[str]:
    if not v:
        return []
    yes = lambda x: "yes" if x else "**no**"  # noqa: E731
    return [f"- {who} never diverged: {yes(v['never_diverged'])}",
            f"- {who} >= cosine at the default rate: {yes(v['ge_cosine_default'])} ({v['delta_vs_cosine_default']})",
            f"- {who} close to tuned cosine: {yes(v['close_to_tuned'])} ({v['delta_vs_tuned']})",
            f"- {who} beats the best other tuning-free method ({v['best_tuning_free']}): "
            f"{yes(v['beats_best_tuning_free'])} ({v['delta_vs_best_tuning_free']}); it ranks "
            f"{v['rank_among_tuning_free']}{' (tied)' if v.get('tied_in_rank') else ''} of "
            f"{v['tuning_free_methods']} tuning-free rows", ""]


def _done_when_lines(d: dict, title: str, action: bool) -> list[str]:
    if not d["tasks"]:  # e.g. --only-recorded before any AutoLR run: nothing to judge
        return [title, "", "- no task has runs to judge these lines on (nothing recorded yet)", ""]
    return [title, "",
            f"- never diverges: {d['never_diverged']}/{d['tasks']} tasks",
            f"- >= cosine at the default rate: {d['ge_cosine_default']}/{d['tasks']} tasks",
            f"- close to tuned cosine: {d['close_to_tuned_held_out']}/{d['held_out_tasks']} tasks it was not "
            "trained on (needs >= 3/4)",
            f"- beats the best other tuning-free method: {d['beats_best_tuning_free']}/{d['tasks']} tasks "
            "(needs >= half)",
            *([f"- the action controller beats a constant rate at the same start: {d['action_beats_constant']}/"
               f"{d['action_tasks']} tasks it was not trained on"] if action else []), "",
            *(f"- {k}: {'met' if v else '**not met**'}" for k, v in d["met"].items()), ""]


def _budget_section(budget: list[dict], grid: int, action: list[dict] | None = None, plots: bool = True) -> list[str]:
    if not budget:
        return []
    out = ["## Equal-budget summary: AutoLR with defaults against what a user would otherwise run", "",
           "Compute = runs x steps per run (one seed) and CPU seconds summed over those runs (mean over seeds). "
           "Final test metric mean ± std over seeds. " + _tuned_rule(budget, grid) + " "
           f"Close: within {100 * CLOSE_ACC:g} points of accuracy or {100 * (CLOSE_LOSS_RATIO - 1):.0f} % of "
           "the loss of tuned cosine.", ""]
    for b in budget:
        cls = b["classification"]
        metric, scale, digits = ("test acc (%)", 100.0, 4) if cls else ("test MSE", 1.0, 3)
        shas = ", ".join(h[:12] for h in b.get("controller_sha256", []) if h) or "-"
        ctrl = f"controller `{b['controller']}`, sha256 {shas}, {b.get('ops') or 'ops not recorded'}"
        if b["controller"] is None:
            trained = "has no runs recorded on this task"
        elif b.get("leave_one_task_out"):
            trained = (f"**leave-one-task-out**: the shipped recipe meta-trained again without any run on this "
                       f"task's data ({ctrl})")
        elif b["trained_on"]:
            trained = f"**trained on this task** ({ctrl})"
        else:
            trained = f"not trained on this task ({ctrl})"
        out += [f"### {b['task']}", "", f"Default optimizer: {b['optimizer'] or '-'}; AutoLR {trained}.", ""]
        body = [[r["label"], fmt(r["lr"]) if r["lr"] is not None else "-",
                 f"{r['runs']} x {r['steps_per_run'] if r['steps_per_run'] is not None else '-'}"
                 + (f" + {r['trial_steps']} in trials" if r.get("trial_steps") else ""),
                 fmt(r["cpu_s"], 3),
                 fmt_mean_std(r["final_metric"], r["final_metric_std"], digits, scale),
                 f"{r['diverged']}/{r['seeds']}" if r["diverged"] else "no"] for r in b["rows"]]
        out += [markdown_table(["method", "lr", "runs x steps", "CPU s", f"final {metric}", "diverged"], body,
                               "lrrrrl"), ""]
        for key, who in (("verdicts", "AutoLR"), ("verdicts_find", "AutoLR + find_anchor_lr")):
            out += _verdict_lines(b.get(key), who)
        factors = next((r.get("anchor_factors") for r in b["rows"] if r.get("anchor_factors")), None)
        if factors:
            chosen = ", x ".join(fmt(f, 3) for f in factors)
            out += [f"find_anchor_lr chose the default rate x {chosen} (per seed).", ""]
        if plots:
            out += [f"![{b['task']} summary]({b['task']}-summary.png)", ""]
    action = action or []
    if action:
        out += ["### The action controller against a constant rate at the same start", "",
                "`action` (the shipped action controller, run only on tasks it was not trained on: the task's "
                "default optimizer from its default rate, x0.9 / x1.0 / x1.1 every 100 steps; a relative "
                "controller's rate is that rate x AutoLR's envelope (5 % warm-up, cosine) x its level) against "
                "`constant` (the same optimizer at the same rate, never changed). `cosine` at the same rate is a "
                "schedule with no action (the envelope without its warm-up): the gap between it and `action` is "
                "about what the actions and the warm-up add.", ""]
        body = []
        for a in action:
            digits, scale = (4, 100.0) if a["classification"] else (3, 1.0)
            cells = [fmt_mean_std(a[k], a[f"{k}_std"], digits, scale)
                     + (f" ({a[f'{k}_diverged']} diverged)" if a[f"{k}_diverged"] else "")
                     for k in ("action", "constant", "cosine")]
            body.append([a["task"], fmt(a["lr"], 3), *cells, a["delta"] or "-", "yes" if a["beats"] else "**no**",
                         a.get("delta_cosine") or "-"])
        out += [markdown_table(["task", "start rate", "action", "constant", "cosine", "action - constant",
                                "action better", "action - cosine"], body, "lrrrrrcr"), ""]
    out += _done_when_lines(done_when(budget, action), "### Done when (issue 15)", bool(action))
    if any("verdicts_find" in b for b in budget):
        out += _done_when_lines(done_when(budget, None, "verdicts_find"),
                                "### The same lines for AutoLR + find_anchor_lr (not AutoLR's defaults: it needs data)",
                                False)
    return out


def plot_budget(entry: dict, runs: list[dict], path: Path) -> Path:
    """Rate per step (first seed) and test metric per epoch (mean over seeds) of the equal-budget rows."""
    task, cls = entry["task"], entry["classification"]
    fig, (ax_rate, ax_metric) = plt.subplots(1, 2, figsize=(13, 4.8))
    for color, row in zip(color_cycle(len(entry["rows"])), entry["rows"], strict=True):
        rs = [r for r in runs if r["task"] == task and r["method"] == row["method"] and r["lr"] == row["lr"]
              and r["status"] in ("ok", "diverged")]
        if not rs:
            continue
        label = row["label"] + (f" (lr {fmt(row['lr'])})" if row["lr"] is not None else "")
        learned = row["method"] in AUTOLR_METHODS
        style, width = ("-", 2.0) if learned else ("--" if row["method"] == "cosine" else ":", 1.2)
        rate = rs[0]["curves"]["rate"]
        ax_rate.plot(range(1, len(rate) + 1), _plottable(rate), style, color=color, lw=width, label=label)
        key = "test_acc" if cls else "test_loss"
        n = min(len(r["curves"][key]) for r in rs)
        mean = _mean_curve(rs, key, n)
        ax_metric.plot(range(1, n + 1), [100 * v for v in mean] if cls else mean, style, color=color, lw=width,
                       label=label)
    ax_rate.set(yscale="log", xlabel="step", ylabel="effective learning rate", title=f"{task}: rate per step (seed 0)")
    ax_metric.set(xlabel="epoch", ylabel="test accuracy (%)" if cls else "test MSE",
                  title=f"{task}: test {'accuracy' if cls else 'MSE'} (mean over seeds)")
    if not cls:
        ax_metric.set_yscale("log")
        _clip_loss_axis(ax_metric)
    ax_metric.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def render_markdown(rows: list[dict], targets: dict, skipped: dict[str, str], config: dict,
                    budget: list[dict] | None = None, plots: bool = True) -> str:
    """The report; ``plots``: link the figures (only when they are drawn)."""
    m = config["machine"]
    out = ["# Schedule-quality comparison", "", f"Command: `{config['command']}`  ",
           f"Machine: {m['cpu']} ({m['cores']} cores, {config['threads']} thread(s) per run, {config['jobs']} "
           f"parallel run(s)), torch {m['torch']}, Python {m['python']}  ",
           f"Seeds: {config['seeds']}; rate grid: {config['grid']} values per hand-designed method; "
           "mean ± std over seeds.", ""]
    if config.get("autolr_controller"):
        out += [f"`autolr` used the shipped controller `{config['autolr_controller']}`.", ""]
    if config.get("force_reference"):
        out += ["AutoLR ran on its pure-PyTorch reference ops (`AUTOLR_FAST_FORCE_REFERENCE` was set): the CPU "
                "seconds of `autolr` and the learned controllers include the reference's extra cost per step.", ""]
    out += _budget_section(budget or [], config["grid"], action_vs_constant(rows), plots)
    for task in dict.fromkeys(r["task"] for r in rows):
        out += _task_section(task, [r for r in rows if r["task"] == task], targets[task], config["task_settings"][task],
                             plots)
    out += _verdict_section(verdicts(rows))
    if skipped:
        out += ["## Skipped methods", "", *(f"- `{k}`: {v}" for k, v in skipped.items()), ""]
    if config.get("not_run"):
        out += ["## Not run", "", "Runs of the requested comparison that were not recorded (left out for time); "
                "their rows are missing or cover fewer tasks:", "",
                *(f"- `{k}`: {', '.join(v)}" for k, v in config["not_run"].items()), ""]
    return "\n".join(out)


def _task_section(task: str, rows: list[dict], target: dict, settings: tuple[int, int],
                  plots: bool = True) -> list[str]:
    cls = rows[0]["classification"]
    metric, scale, digits = ("acc (%)", 100.0, 4) if cls else ("MSE", 1.0, 3)
    headers = ["method", "setting", "lr", f"final test {metric}", f"best test {metric}", "test loss",
               "CPU s", "steps→target", "CPU s→target", "rate epoch-CV", "rate jitter"]

    def order(r: dict) -> float:
        if cls:
            return -(r["final_metric"] or 0)
        return r["final_metric"] if r["final_metric"] is not None else math.inf

    body = []
    for r in sorted(rows, key=order):
        note = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        body.append([
            r["method"], r["setting"], fmt(r["lr"]) if r["lr"] is not None else "-",
            fmt_mean_std(r["final_metric"], r["final_metric_std"], digits, scale) + note,
            fmt_mean_std(r["best_metric"], r["best_metric_std"], digits, scale),
            fmt_mean_std(r["final_test_loss"], r["final_test_loss_std"]),
            fmt(r["cpu_time_s"], 3),
            f"{fmt(r['steps_to_target'], 4)} ({r['target_reached']})",
            fmt(r["seconds_to_target"], 3), fmt(r["rate_epoch_cv"], 3), fmt(r["rate_jitter"], 3),
        ])
    epochs, batch_size = settings
    return [f"## {task}", "",
            f"{epochs} epochs, batch {batch_size}. Target: test {target['metric'].split('_')[1]} "
            f"{target['rule']} = {fmt(target['target'] * scale, 4)}.", "",
            markdown_table(headers, body, "lllrrrrrrrr"), ""] + ([f"![{task}]({task}.png)", ""] if plots else [])


def _verdict_section(vs: list[dict]) -> list[str]:
    if not vs:
        return []

    def delta(v: dict) -> str:
        if v["classification"]:
            return f"{100 * v['delta']:+.2f} pts"
        ratio = v["ratio"]
        return f"{v['delta']:+.3g}" + (f" (x{ratio:.2f})" if ratio is not None and math.isfinite(ratio) else "")

    def noise(v: dict) -> str:
        if v["noise"] is None:
            return "- (1 seed)"
        return f"{100 * v['noise']:.2f} pts" if v["classification"] else f"{v['noise']:.3g}"

    body = [[v["task"], v["learned"] + (" (trained on this data)" if v.get("trained_on") else ""), v["reference"],
             delta(v), noise(v), v["verdict"]] for v in vs]
    return ["## Learned controllers vs tuned references", "",
            "Δ = learned minus reference, mean final test accuracy (points) or test MSE (x: the MSE ratio); "
            "tie when |Δ| is within one combined std over seeds.", "",
            markdown_table(["task", "learned", "reference", "Δ", "combined std", "verdict"], body, "lllrrl"), ""]


def _mean_curve(runs: list[dict], key: str, n: int) -> list[float]:
    """Per-epoch mean of a curve over runs; an epoch with no finite value (a diverged run's
    null) is a gap."""
    out = []
    for i in range(n):
        values = [r["curves"][key][i] for r in runs if is_number(r["curves"][key][i])]
        out.append(sum(values) / len(values) if values else math.nan)
    return out


def _clip_loss_axis(ax, decades: float = 4.0) -> None:
    """Cap a log loss axis ``decades`` above the lowest curve value, so that one run that blew up
    to a huge finite loss does not flatten every other curve."""
    values = [v for line in ax.get_lines() for v in line.get_ydata() if is_number(v) and v > 0]
    if values:
        ax.set_ylim(top=min(max(values), min(values) * 10**decades) * 1.5)


def _plottable(rates: list) -> list[float]:
    """Rates for a log axis: at least 1e-8; a missing rate (NaN in a diverged run, null in JSON) as a gap."""
    return [math.nan if v is None else max(v, 1e-8) for v in rates]


def plot_task(task: str, rows: list[dict], runs: list[dict], path: Path) -> Path:
    """Rate vs step (seed of the first run) and test metric vs epoch (mean over seeds) of every
    reported row except the hand-designed defaults (to keep the figure readable)."""
    shown = [r for r in rows if r["task"] == task and r["setting"] != "default"]
    fig, (ax_rate, ax_metric) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = color_cycle(len(shown))
    cls = shown[0]["classification"] if shown else True
    for color, row in zip(colors, shown, strict=True):
        rs = [r for r in runs if r["task"] == task and r["method"] == row["method"] and r["lr"] == row["lr"]
              and r["status"] in ("ok", "diverged")]
        if not rs:
            continue
        label = row["method"] + (f" (lr {fmt(row['lr'])})" if row["lr"] is not None else "")
        rate = rs[0]["curves"]["rate"]
        style = "-" if row["family"] != "learned" else "--"
        ax_rate.plot(range(1, len(rate) + 1), _plottable(rate), style, color=color, lw=1, label=label)
        key = "test_acc" if cls else "test_loss"
        n = min(len(r["curves"][key]) for r in rs)
        mean = _mean_curve(rs, key, n)
        if cls:
            mean = [100 * v for v in mean]
        ax_metric.plot(range(1, n + 1), mean, style, color=color, lw=1.3, label=label)
    ax_rate.set_yscale("log")
    ax_rate.set_xlabel("step")
    ax_rate.set_ylabel("learning rate (effective)")
    ax_rate.set_title(f"{task}: rate per step (first seed)")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel("test accuracy (%)" if cls else "test MSE")
    if not cls:
        ax_metric.set_yscale("log")
        _clip_loss_axis(ax_metric)
    ax_metric.set_title(f"{task}: test {'accuracy' if cls else 'loss'} (mean over seeds)")
    ax_metric.legend(fontsize=7, loc="best", ncol=2)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": gpu, "platform": platform.platform()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autolr_fast compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"small run: tasks {QUICK_TASKS}, {QUICK_EPOCHS} epochs, 1 seed, "
                        "grid of 3; every method still runs")
    p.add_argument("--tasks", nargs="+", default=None, help=f"tasks (default {DEFAULT_TASKS})")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"methods (default all): {', '.join(baselines.available_methods())}")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; quick 1)")
    p.add_argument("--grid", type=int, default=None, help="rates per hand-designed method, log-spaced over "
                   "default/10 .. default*10 (default 5; quick 3; 1 = default only)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every task (default: per task)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size for every task (default: per task)")
    p.add_argument("--jobs", type=int, default=1, help="parallel runs (processes; default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--out", default="results/compare", help="output folder (default results/compare)")
    p.add_argument("--resume", action="store_true", help="reuse the runs already recorded in OUT/runs.jsonl "
                   "(written as runs complete) by an interrupted comparison with the same settings")
    p.add_argument("--only-recorded", action="store_true", help="with --resume: run nothing new, report the runs "
                   "already recorded in OUT/runs.jsonl (the jobs left out are listed in the report)")
    p.add_argument("--render", metavar="JSON", default=None, help="only re-render the table and figures of an "
                   "existing compare.json into --out")
    p.add_argument("--no-leave-one-task-out", action="store_true",
                   help="run autolr with the shipped controller also on the tasks it was trained on (default: "
                        "there, a controller meta-trained by the same recipe without that task, built once into "
                        "OUT/leave_one_out/)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def default_lr(method: Method, task: str) -> float | None:
    """The rate a hand-designed method's grid is centred on for ``task`` (None: not tuned)."""
    if method.family != "hand":
        return None
    return task_optimizer(task).lr if method.task_lr else method.default_lr


def _rates(method: Method, grid: int, task: str) -> list[float | None]:
    """The rates a method runs at: a grid of ``grid`` around its default for hand-designed methods
    (the default itself always included: it is a reported row), else its own (None)."""
    centre = default_lr(method, task)
    if centre is None:
        return [None]
    lrs = baselines.lr_grid(centre, grid)
    if not any(math.isclose(lr, centre) for lr in lrs):
        lrs.append(centre)
    return lrs


def make_jobs(args) -> tuple[list[Job], dict[str, str], dict]:
    # each once, in order: a repeated name would repeat its runs and count them as more seeds
    tasks = list(dict.fromkeys(args.tasks or (QUICK_TASKS if args.quick else DEFAULT_TASKS)))
    unknown = [t for t in tasks if t not in available_tasks()]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; available: {', '.join(available_tasks())}")
    methods = list(dict.fromkeys(args.methods or baselines.available_methods()))
    unknown = [m for m in methods if m not in baselines.available_methods()]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; available: {', '.join(baselines.available_methods())}")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    grid = args.grid if args.grid is not None else (3 if args.quick else 5)
    if seeds < 1 or grid < 1:
        raise SystemExit("--seeds and --grid must be >= 1")
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: must be >= 1 (1 runs the jobs one after the other)")
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                                       ("threads", args.threads)) if v is not None and v < 1]
    if bad:
        raise SystemExit(f"{', '.join(bad)}: must be >= 1 (leave --epochs / --batch-size out for each task's own)")
    skipped: dict[str, str] = {}
    jobs: list[Job] = []
    settings: dict[str, tuple[int, int]] = {}
    for task in tasks:
        epochs, bs = task_settings(task)
        if args.quick:
            epochs = QUICK_EPOCHS
        epochs = epochs if args.epochs is None else args.epochs
        bs = bs if args.batch_size is None else args.batch_size
        settings[task] = (epochs, bs)
        for name in methods:
            method = baselines.get_method(name)
            reason = method.available()
            if reason:
                skipped[name] = reason
                continue
            centre = default_lr(method, task)
            splits = ("test", "validation") if name == TUNED_REFERENCE and grid > 1 else ("test",)
            for split in splits:
                for gi, lr in enumerate(_rates(method, grid, task)):
                    for seed in range(seeds):
                        is_default = lr is not None and math.isclose(lr, centre)
                        jobs.append(Job(task, name, lr, gi if lr is not None else None, is_default, seed, epochs, bs,
                                        args.threads, split))
    return jobs, skipped, {"seeds": seeds, "grid": grid, "task_settings": settings, "tasks": tasks, "methods": methods}


_WORKER_CACHE: dict = {}


def _worker(job: Job) -> dict:
    return run_one(job, _WORKER_CACHE)


def _validation_settings() -> dict:
    """What a validation run's split depends on besides the seed (part of its job key)."""
    return {"fraction": VALIDATION_FRACTION, "max": VALIDATION_MAX}


def _job_key(task: str, method: str, lr: Any, seed: int, epochs: int, batch_size: int, split: str = "test",
             validation: dict | None = None, variant: str = "", revision: int = 1, optimizer: str = "") -> tuple:
    split_key = (split,) if split == "test" else (split, validation["fraction"], validation["max"])
    return (task, method, None if lr is None else round(float(lr), 12), int(seed), int(epochs), int(batch_size),
            split_key, variant, int(revision), optimizer)


def _record_key(r: dict) -> tuple:
    # a record without an optimizer field is taken as made with the task's current one
    return _job_key(r["task"], r["method"], r["lr"], r["seed"], r["epochs"], r["batch_size"], r.get("split", "test"),
                    r.get("validation_split"), r.get("variant", ""), r.get("revision", 1),
                    r.get("optimizer") or task_optimizer(r["task"]).describe())


def _key_of(j: Job) -> tuple:
    return _job_key(j.task, j.method, j.lr, j.seed, j.epochs, j.batch_size, j.split, _validation_settings(), j.variant,
                    baselines.get_method(j.method).revision, task_optimizer(j.task).describe())


#: Loss-like fields of a run record: JSON stores their +inf (a diverged run) as null.
_LOSS_FIELDS = ("final_test_loss", "best_test_loss")


def _as_recorded(r: dict) -> dict:
    """A run record read back from JSON as it was in memory: ``split`` defaults to "test" (older
    records have none), and a null loss is +inf again, so that a diverged regression run counts
    as the worst result instead of dropping out of the means."""
    r.setdefault("split", "test")
    if r["split"] == "validation":  # the first validation runs, recorded before their settings were
        r.setdefault("validation_split", {"fraction": 0.2, "max": 500})
    for key in _LOSS_FIELDS + (() if r.get("classification") else ("final_metric", "best_metric")):
        if key in r and r[key] is None:
            r[key] = math.inf
    return r


def _load_partial(path: Path, statuses: tuple[str, ...] = ("ok", "diverged")) -> dict[tuple, dict]:
    """Records of an earlier, interrupted run (``runs.jsonl``) with one of ``statuses``, by job key."""
    done: dict[tuple, dict] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by the interruption
            if not isinstance(r, dict) or "task" not in r:
                continue  # not a run record
            if r.get("status") in statuses:
                try:
                    done[_record_key(r)] = _as_recorded(r)
                except KeyError:  # a task that is no longer registered: nothing will reuse it
                    continue
    return done


def _recorded_jobs(jobs: list[Job], partial: Path) -> tuple[list[Job], dict[str, list[str]]]:
    """The jobs of every (task, method) whose runs (all rates, all seeds) are recorded in
    ``partial``, and per method the tasks left out: a partial grid or seed set would be reported
    as if complete. A recorded skip (e.g. the action controller on its own training task) counts
    as recorded; running such a job again only records the skip."""
    done = _load_partial(partial, ("ok", "diverged", "skipped"))
    incomplete = {(j.task, j.method, j.split) for j in jobs if _key_of(j) not in done}
    missing: dict[str, list[str]] = {}
    for task, method, split in sorted(incomplete):
        missing.setdefault(method if split == "test" else f"{method} ({split} runs)", []).append(task)
    return [j for j in jobs if (j.task, j.method, j.split) not in incomplete], missing


def _run_all(jobs: list[Job], n_jobs: int, progress: bool, partial: Path | None = None,
             resume: bool = False) -> list[dict]:
    """Run every job (``n_jobs`` processes), appending each record to ``partial`` (JSON lines) as
    it completes; with ``resume``, jobs already recorded there are not run again."""
    done = _load_partial(partial) if (partial is not None and resume) else {}
    # a skipped job (its package missing) is tried again, but not recorded twice
    skipped_before = _load_partial(partial, ("skipped",)) if (partial is not None and resume) else {}
    if partial is not None and not resume:
        partial.unlink(missing_ok=True)
    keys = [_key_of(j) for j in jobs]
    # a reused record gets this comparison's grid position: which rate is the default follows
    # the current grid, not the one it was recorded under
    records: dict[tuple, dict] = {k: {**done[k], "is_default": j.is_default, "grid_index": j.grid_index}
                                  for k, j in zip(keys, jobs) if k in done}
    todo = [i for i, k in enumerate(keys) if k not in records]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="compare", unit="run", disable=not progress,
               dynamic_ncols=True)
    # Longest tasks first, so that the parallel pool does not end on one long run.
    todo.sort(key=lambda i: -jobs[i].epochs * (3 if "cnn" in jobs[i].task else 1))
    sink = open(partial, "a") if partial is not None else None

    def collect(rec: dict) -> None:
        records[_record_key(rec)] = rec
        if sink is not None and not (rec.get("status") == "skipped" and _record_key(rec) in skipped_before):
            sink.write(json.dumps(strict_json(rec), default=_json_default) + "\n")
            sink.flush()
        bar.set_postfix_str(f"{rec['task']} {rec['method']}", refresh=False)
        bar.update()

    try:
        if n_jobs <= 1:
            cache: dict = {}
            for i in todo:
                collect(run_one(jobs[i], cache))
        elif todo:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(n_jobs) as pool:
                for rec in pool.imap_unordered(_worker, [jobs[i] for i in todo], chunksize=1):
                    collect(rec)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    return [records[k] for k in keys]


def _leave_one_task_out(jobs: list[Job], controller: str, out: Path, args) -> tuple[list[Job], dict[str, str]]:
    """``(jobs, files)``: the jobs, where ``autolr`` runs on a task whose data the shipped
    ``default`` controller was trained on marked as the leave-one-dataset-out variant (with the
    shipped file's digest, so that records of another ``default`` are not reused), and per such
    task the controller file those runs use: the same recipe meta-trained again without every run
    on that data (``meta_train.leave_one_task_out``; MNIST-1D's CNN and MLP share one), built into
    ``OUT/leave_one_out/`` when a run still needs it and no file of this recipe, these settings and
    this shipped file is there. Only the family recipe (``default``) can be repeated this way."""
    if args.no_leave_one_task_out or controller != "default" or controller not in available_pretrained():
        return jobs, {}
    shipped = PRETRAINED_DIR / f"{controller}.pt"
    trained = baselines.controller_training_tasks(load_pretrained(controller).info)
    tasks = sorted(t for t in {j.task for j in jobs if j.method in AUTOLR_METHODS} if shares_data(t, trained))
    if not tasks:
        return jobs, {}
    from . import meta_train  # imported here: meta_train imports compare

    digest = hashlib.sha256(shipped.read_bytes()).hexdigest()
    variant = f"{LOTO_VARIANT}@{digest[:12]}"
    jobs = [replace(j, variant=variant) if j.method in AUTOLR_METHODS and j.task in tasks else j for j in jobs]
    done = _load_partial(out / "runs.jsonl") if args.resume else {}
    files: dict[str, str] = {}
    recipe = {k: meta_train.FAMILY_DEFAULTS[k] for k in ("interval", "horizon", "meta_lr", "passes")}
    for data in sorted({dataset_of(t) for t in tasks}):  # one controller per left-out dataset
        on_data = [t for t in tasks if dataset_of(t) == data]
        path = out / LOTO_DIR / f"{controller}-without-{data}.pt"
        info = load_controller(path).info if path.is_file() else {}
        settings = info.get("settings", {})
        current = (info.get("recipe_of") == digest and settings.get("epochs") == LOTO_EPOCHS
                   and all(settings.get(k) == v for k, v in recipe.items())
                   and info.get("family") == [asdict(r) for r in meta_train.family_without(on_data[0], LOTO_EPOCHS)])
        pending = any(_key_of(j) not in done for j in jobs if j.method in AUTOLR_METHODS and j.task in on_data)
        if not current and pending and not args.only_recorded:
            print(f"[compare] leave-one-task-out: meta-training {controller}'s recipe without the {data} data "
                  f"({', '.join(on_data)}) into {path}", file=sys.stderr)
            meta_train.leave_one_task_out(on_data[0], path, epochs=LOTO_EPOCHS, info={"recipe_of": digest})
            current = True
        if current:
            files.update({t: str(path) for t in on_data})
    return jobs, files


def _with_controller_variant(jobs: list[Job], controller: str) -> list[Job]:
    """The other ``autolr`` jobs, and the jobs of the other methods that run a shipped controller
    file (``baselines.SHIPPED_FILES``) or one of the harness's (``autolr-progress``,
    ``autolr-file``), marked with the file's name and digest, so that records made with another
    file are not reused."""
    files = {**{m: controller for m in AUTOLR_METHODS}, **baselines.SHIPPED_FILES}
    paths = {method: PRETRAINED_DIR / f"{name}.pt" for method, name in files.items()}
    # the harness's controller files: the committed progress-input one, and the one autolr-file names
    paths["autolr-progress"] = baselines.PROGRESS_CONTROLLER
    if os.environ.get(baselines.CONTROLLER_FILE_ENV):
        paths["autolr-file"] = Path(os.environ[baselines.CONTROLLER_FILE_ENV])
    variants = {}
    for method, path in paths.items():
        if path.is_file():
            variants[method] = f"{path.stem}@{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    return [replace(j, variant=variants[j.method]) if j.method in variants and not j.variant else j for j in jobs]


@contextlib.contextmanager
def _environment(name: str, value: str):
    """``os.environ[name] = value`` inside the block (spawned workers inherit it), restored after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        return _rerender(Path(args.render), Path(args.out), not args.no_plots)
    # One controller for the whole comparison, fixed before any worker starts (workers inherit it)
    controller = baselines.autolr_controller_name()
    os.environ[baselines.AUTOLR_CONTROLLER_ENV] = controller
    jobs, skipped, cfg = make_jobs(args)
    for name, reason in skipped.items():
        print(f"[compare] skipping {name}: {reason}", file=sys.stderr)
    if not jobs:
        print("[compare] nothing to run: every selected method was skipped", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, loto_files = _leave_one_task_out(jobs, controller, out, args)
    jobs = _with_controller_variant(jobs, controller)
    with _environment(baselines.AUTOLR_LOTO_ENV, json.dumps(loto_files)):
        return _run_and_report(args, argv, controller, jobs, skipped, cfg, out)


def _run_and_report(args, argv, controller: str, jobs: list[Job], skipped: dict[str, str], cfg: dict,
                    out: Path) -> int:
    not_run: dict[str, list[str]] = {}
    if args.only_recorded:
        if not args.resume:
            raise SystemExit("--only-recorded reports the runs recorded by an earlier comparison: add --resume")
        jobs, not_run = _recorded_jobs(jobs, out / "runs.jsonl")
        if not jobs:
            print(f"[compare] no recorded runs in {out / 'runs.jsonl'}", file=sys.stderr)
            return 1
    t0 = time.perf_counter()
    runs = _run_all(jobs, args.jobs, not args.no_progress, out / "runs.jsonl", args.resume)
    val_runs = [r for r in runs if r.get("split") == "validation"]
    runs = [r for r in runs if r.get("split", "test") == "test"]
    for r in runs:
        if r["status"] == "skipped":
            skipped.setdefault(r["method"], r["message"])
            print(f"[compare] skipped {r['method']} on {r['task']}: {r['message']}", file=sys.stderr)
    rows, targets = summary_rows(runs)
    config = {
        "command": "python -m autolr_fast compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "jobs": args.jobs, "threads": args.threads, "quick": args.quick,
        "seeds": cfg["seeds"], "grid": cfg["grid"], "task_settings": cfg["task_settings"],
        "methods": {m: {"family": baselines.get_method(m).family, "default_lr": baselines.get_method(m).default_lr,
                        "task_lr": baselines.get_method(m).task_lr,
                        "description": baselines.get_method(m).description} for m in cfg["methods"]},
        "task_optimizers": {t: task_optimizer(t).describe() for t in cfg["tasks"]},
        "autolr_controller": controller,
        "autolr_controller_sha256": _controller_digest(controller),
        "force_reference": os.environ.get("AUTOLR_FAST_FORCE_REFERENCE", ""),
        "target_rules": {"classification": f"test_acc >= {TARGET_ACC_FRACTION} x best mean final accuracy",
                         "regression": f"test_loss <= {TARGET_LOSS_FACTOR} x best mean final loss"},
        "total_wall_time_s": time.perf_counter() - t0,
        "not_run": not_run,
    }
    budget = equal_budget(rows, runs, val_runs)
    action = action_vs_constant(rows)
    doc = {"schema": SCHEMA, "config": config, "skipped_methods": skipped, "targets": targets,
           "summary": rows, "verdicts": verdicts(rows), "equal_budget": budget,
           "action_vs_constant": action, "done_when": done_when(budget, action),
           "done_when_find": done_when(budget, None, "verdicts_find"),
           "runs": runs, "validation_runs": val_runs}
    (out / "compare.json").write_text(json.dumps(strict_json(doc), separators=(",", ":"), default=_json_default,
                                                 allow_nan=False))
    md = render_markdown(rows, targets, skipped, config, budget, plots=not args.no_plots)
    (out / "compare.md").write_text(md)
    if not args.no_plots:
        _plot_all(rows, targets, budget, runs, out)
    print(md)
    print(f"\n[compare] {len(runs) + len(val_runs)} runs in {config['total_wall_time_s']:.0f} s; results in {out}/ "
          + ("(compare.json, compare.md)" if args.no_plots else "(compare.json, compare.md, <task>.png)"),
          file=sys.stderr)
    return 0


def _rerender(src: Path, out: Path, plots: bool) -> int:
    """Table, verdicts and figures again from a ``compare.json`` (e.g. after a renderer change)."""
    doc = read_json(src, "a compare.json")
    if doc.get("schema") != SCHEMA:
        raise SystemExit(f"{src} is not a {SCHEMA} file (schema {doc.get('schema')!r})")
    runs = [_as_recorded(r) for r in doc["runs"]]
    val_runs = [_as_recorded(r) for r in doc.get("validation_runs", [])]
    rows, targets = summary_rows(runs)
    budget = equal_budget(rows, runs, val_runs)
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(rows, targets, doc.get("skipped_methods", {}), doc["config"], budget, plots=plots)
    (out / "compare.md").write_text(md)
    if plots:
        _plot_all(rows, targets, budget, runs, out)
    print(md)
    return 0


def _controller_digest(name: str) -> str | None:
    """SHA-256 of the shipped controller file (a controller may be re-shipped under the same name)."""
    path = PRETRAINED_DIR / f"{name}.pt"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _plot_all(rows: list[dict], targets: dict, budget: list[dict], runs: list[dict], out: Path) -> None:
    for task in targets:
        plot_task(task, rows, runs, out / f"{task}.png")
    for entry in budget:
        plot_budget(entry, runs, out / f"{entry['task']}-summary.png")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())
