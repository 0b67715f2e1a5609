"""``python -m autolr_fast compare``: schedule-quality comparison of learned and hand-designed
learning-rate schedules and optimizers on the tasks of :mod:`autolr_fast.tasks`.

Every method of :mod:`autolr_fast.baselines` trains every task for the same epochs, on the same
mini-batches (``Task.batches`` with the seed) and from the same initial weights (seeded) for
each seed. Hand-designed methods run on a log-spaced rate grid; learned and untuned ones run
once. Results: one JSON file (schema in ``docs/compare.md``), a Markdown table and one PNG per
task. See ``docs/compare.md`` for the columns and the fairness rules.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import baselines
from .plotting import color_cycle, fmt, fmt_mean_std, is_number, markdown_table, pyplot, save_figure

SCHEMA = "autolr_fast.compare/1"

#: Per task: (epochs, batch size) of a full comparison.
TASK_SETTINGS: dict[str, tuple[int, int]] = {
    "mnist1d-cnn": (40, 100),
    "mnist1d-mlp": (40, 100),
    "digits-mlp": (30, 32),
}
REGRESSION_SETTINGS = (40, 32)
DEFAULT_TASKS = ["mnist1d-cnn", "mnist1d-mlp", "digits-mlp", "regress-sin"]
QUICK_TASKS = ["digits-mlp", "regress-sin"]
QUICK_EPOCHS = 10
#: Target for "time to target": accuracy >= TARGET_ACC_FRACTION x the best mean final accuracy
#: of any method on the task; regression: test loss <= TARGET_LOSS_FACTOR x the best mean final loss.
TARGET_ACC_FRACTION = 0.95
TARGET_LOSS_FACTOR = 2.0
VAL_BATCH_SEED_OFFSET = 1_000_003


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


# ------------------------------------------------------------------------------------------------
# One training run
# ------------------------------------------------------------------------------------------------
def _floats(values: list) -> list[float]:
    """Per-step rates to floats: tensors are stacked once (one host read per epoch)."""
    if not values:
        return []
    if isinstance(values[0], torch.Tensor):
        return [float(v) for v in torch.stack(values).float().tolist()]
    return [float(v) for v in values]


def _metric(task, ev: dict) -> float:
    return ev["acc"] if task.is_classification else ev["loss"]


def run_one(job: Job, task_cache: dict | None = None) -> dict:
    """Train one (task, method, rate, seed) on the CPU with ``job.threads`` torch threads and
    return its record (schema: docs/compare.md). The caller's thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        return _run_one(job, task_cache)
    finally:
        torch.set_num_threads(threads)


def _run_one(job: Job, task_cache: dict | None) -> dict:
    from .tasks import get_task

    cache = task_cache if task_cache is not None else {}
    if job.task not in cache:
        cache[job.task] = get_task(job.task)
    task = cache[job.task]
    method = baselines.get_method(job.method)
    record: dict[str, Any] = {
        "task": job.task, "method": job.method, "family": method.family, "lr": job.lr,
        "grid_index": job.grid_index, "is_default": job.is_default, "seed": job.seed,
        "epochs": job.epochs, "batch_size": job.batch_size, "status": "ok", "message": "",
        "classification": task.is_classification,
    }
    steps_per_epoch = task.steps_per_epoch(job.batch_size)
    torch.manual_seed(job.seed)
    model = task.make_model()
    val_seed = job.seed + VAL_BATCH_SEED_OFFSET
    spec = baselines.RunSpec(
        task=task, model=model, lr=job.lr, epochs=job.epochs, steps_per_epoch=steps_per_epoch, seed=job.seed,
        batch_size=job.batch_size, val_batches=lambda: task.batches(job.batch_size, val_seed),
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setup = method.build(spec)
    except (baselines.MethodUnavailable, ImportError) as exc:
        record.update(status="skipped", message=str(exc))
        return record
    except Exception as exc:
        if method.family != "learned":
            raise
        # learned plug-ins wrap modules still being built: report, do not stop the comparison
        record.update(status="skipped", message=f"could not be set up: {type(exc).__name__}: {exc}")
        return record
    record["info"] = setup.info

    curves: dict[str, list] = {k: [] for k in ("train_loss", "test_loss", "test_acc", "train_time_s", "steps", "rate")}
    train_time = 0.0
    t_start = time.perf_counter()
    batches = task.batches(job.batch_size, job.seed, epochs=job.epochs)
    step = 0
    for epoch in range(job.epochs):
        t0 = time.perf_counter()
        loss_sum = torch.zeros(())
        rates: list = []
        for _ in range(steps_per_epoch):
            x, y = next(batches)
            setup.optimizer.zero_grad(set_to_none=True)
            loss = task.loss_fn(model(x), y)
            loss.backward()
            setup.before_step(loss)
            setup.optimizer.step()
            r = setup.rate()
            rates.append(r.detach().clone() if isinstance(r, torch.Tensor) else r)
            setup.after_step()
            loss_sum += loss.detach()
            step += 1
        setup.after_epoch()
        mean_loss = float(loss_sum) / steps_per_epoch  # one host read per epoch
        train_time += time.perf_counter() - t0
        curves["rate"].extend(float(f"{v:.6g}") for v in _floats(rates))  # 6 significant digits
        setup.eval_mode()
        ev = task.evaluate(model)
        setup.train_mode()
        curves["train_loss"].append(mean_loss)
        curves["test_loss"].append(ev["loss"])
        curves["test_acc"].append(ev["acc"])
        curves["train_time_s"].append(train_time)
        curves["steps"].append(step)
        if not (math.isfinite(mean_loss) and math.isfinite(ev["loss"])):
            record.update(status="diverged", message=f"non-finite loss at epoch {epoch + 1}")
            break
    record["wall_time_s"] = time.perf_counter() - t_start
    record["train_time_s"] = train_time
    record["steps"] = step
    record["curves"] = curves
    record.update(_run_metrics(record))
    return record


def _finite(xs: list) -> list[float]:
    return [x for x in xs if is_number(x)]


def _run_metrics(rec: dict) -> dict:
    c = rec["curves"]
    cls = rec["classification"]
    out: dict[str, Any] = {}
    diverged = rec["status"] == "diverged"
    final_loss = c["test_loss"][-1] if c["test_loss"] and not diverged else float("inf")
    out["final_test_loss"] = final_loss
    out["best_test_loss"] = min(_finite(c["test_loss"]), default=float("inf"))
    if cls:
        out["final_test_acc"] = c["test_acc"][-1] if c["test_acc"] and not diverged else 0.0
        out["best_test_acc"] = max(_finite(c["test_acc"]), default=0.0)
    out["final_metric"] = out["final_test_acc"] if cls else final_loss
    out["best_metric"] = out["best_test_acc"] if cls else out["best_test_loss"]
    rates = _finite(c["rate"])
    spe = rec["steps"] // max(len(c["steps"]), 1) if c["steps"] else 0
    out["rate_stats"] = _rate_stats(rates, max(spe, 1))
    return out


def _rate_stats(rates: list[float], steps_per_epoch: int) -> dict:
    """Schedule statistics: mean/min/max rate, the coefficient of variation of the per-epoch
    mean rate (``epoch_cv``: how much the schedule moves over training) and ``jitter``, the mean
    median of ``|log(r[t+1] / r[t])|`` over steps (how noisy it is step to step; the median
    ignores the few jumps of a step schedule or a warm restart)."""
    if not rates:
        return {"mean": None, "min": None, "max": None, "epoch_cv": None, "jitter": None}
    epochs = [rates[i : i + steps_per_epoch] for i in range(0, len(rates), steps_per_epoch)]
    means = [sum(e) / len(e) for e in epochs if e]
    m = sum(means) / len(means)
    cv = statistics.pstdev(means) / m if m > 0 and len(means) > 1 else 0.0
    jumps = [abs(math.log(b / a)) for a, b in zip(rates[:-1], rates[1:]) if a > 0 and b > 0]
    return {"mean": sum(rates) / len(rates), "min": min(rates), "max": max(rates), "epoch_cv": cv,
            "jitter": statistics.median(jumps) if jumps else 0.0}


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------
def _mean_std(xs: list) -> tuple[float | None, float | None]:
    """Mean and sample std of the numbers in ``xs``; ``(inf, None)`` if one is +inf (a diverged
    regression run), ``(None, None)`` if there are none."""
    if any(isinstance(x, float) and x == math.inf for x in xs):
        return math.inf, None
    xs = _finite(xs)
    if not xs:
        return None, None
    return sum(xs) / len(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _time_to_target(rec: dict, target: float) -> tuple[int | None, float | None]:
    c = rec["curves"]
    series = c["test_acc"] if rec["classification"] else c["test_loss"]
    for v, steps, t in zip(series, c["steps"], c["train_time_s"]):
        if is_number(v) and ((v >= target) if rec["classification"] else (v <= target)):
            return steps, t
    return None, None


def summarize(runs: list[dict]) -> tuple[list[dict], dict]:
    """Rows of the result table: per task and method, ``best`` and ``default`` for hand-designed
    methods (best = grid rate with the best mean final metric over seeds), ``as shipped`` for the
    others. Returns ``(rows, targets)``."""
    ok = [r for r in runs if r["status"] in ("ok", "diverged")]
    tasks = list(dict.fromkeys(r["task"] for r in ok))
    rows: list[dict] = []
    targets: dict[str, dict] = {}
    for task in tasks:
        trs = [r for r in ok if r["task"] == task]
        cls = trs[0]["classification"]
        groups: dict[tuple, list[dict]] = {}
        for r in trs:
            groups.setdefault((r["method"], r["lr"]), []).append(r)

        def score(rs: list[dict]) -> float:
            m, _ = _mean_std([r["final_metric"] for r in rs])
            if m is None:
                return -math.inf
            return m if cls else -m

        chosen: list[tuple[str, str, list[dict]]] = []
        for method in baselines.available_methods():
            cands = {lr: rs for (name, lr), rs in groups.items() if name == method}
            if not cands:
                continue
            fam = cands[next(iter(cands))][0]["family"]
            if fam == "hand":
                best_lr = max(cands, key=lambda lr: score(cands[lr]))
                default = [rs for rs in cands.values() if rs[0]["is_default"]]
                if default and default[0] is cands[best_lr]:
                    chosen.append((method, "best = default", cands[best_lr]))
                else:
                    chosen.append((method, "best", cands[best_lr]))
                    if default:
                        chosen.append((method, "default", default[0]))
            else:
                for rs in cands.values():
                    chosen.append((method, "as shipped", rs))
        finals = [score(rs) for _, _, rs in chosen]
        best = max(finals) if finals else -math.inf
        if cls:
            target = TARGET_ACC_FRACTION * best
            targets[task] = {"metric": "test_acc", "target": target, "rule": f">= {TARGET_ACC_FRACTION} x best mean final accuracy"}
        else:
            target = TARGET_LOSS_FACTOR * (-best)
            targets[task] = {"metric": "test_loss", "target": target, "rule": f"<= {TARGET_LOSS_FACTOR} x best mean final loss"}
        for method, setting, rs in chosen:
            row: dict[str, Any] = {"task": task, "method": method, "family": rs[0]["family"], "setting": setting,
                                   "lr": rs[0]["lr"], "seeds": len(rs), "diverged": sum(r["status"] == "diverged" for r in rs),
                                   "classification": cls}
            for key in ("final_metric", "best_metric", "final_test_loss", "wall_time_s", "train_time_s"):
                row[key], row[key + "_std"] = _mean_std([r.get(key) for r in rs])
            row["rate_epoch_cv"], _ = _mean_std([r["rate_stats"]["epoch_cv"] for r in rs])
            row["rate_jitter"], _ = _mean_std([r["rate_stats"]["jitter"] for r in rs])
            row["rate_mean"], _ = _mean_std([r["rate_stats"]["mean"] for r in rs])
            hits = [_time_to_target(r, target) for r in rs]
            reached = [h for h in hits if h[0] is not None]
            row["target_reached"] = f"{len(reached)}/{len(rs)}"
            row["steps_to_target"], _ = _mean_std([h[0] for h in reached])
            row["seconds_to_target"], _ = _mean_std([h[1] for h in reached])
            rows.append(row)
    return rows, targets


#: The references every learned controller is held against in the verdict table.
REFERENCES = (("cosine", "best"), ("sf-sgd", "best"), ("sf-adamw", "best"), ("prodigy", "as shipped"))


def _row_for(rows: list[dict], task: str, method: str, setting: str) -> dict | None:
    for r in rows:
        if r["task"] == task and r["method"] == method and (r["setting"] == setting or
                                                             (setting == "best" and r["setting"] == "best = default")):
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
            if math.isinf(delta):
                verdict = "win" if better else "lose"
            else:
                verdict = "tie" if (delta == 0 or (noise is not None and abs(delta) <= noise)) else ("win" if better else "lose")
            ratio = r["final_metric"] / ref["final_metric"] if ref["final_metric"] else None
            out.append({"task": r["task"], "learned": r["method"], "reference": f"{method} ({ref['setting']})",
                        "delta": delta, "ratio": ratio, "noise": noise, "verdict": verdict,
                        "classification": r["classification"]})
    return out


def render_markdown(rows: list[dict], targets: dict, skipped: dict[str, str], config: dict) -> str:
    out = ["# Schedule-quality comparison", ""]
    out.append(f"Command: `{config['command']}`  ")
    m = config["machine"]
    out.append(f"Machine: {m['cpu']} ({m['cores']} cores, {config['threads']} thread(s) per run, {config['jobs']} "
               f"parallel run(s)), torch {m['torch']}, Python {m['python']}  ")
    out.append(f"Seeds: {config['seeds']}; rate grid: {config['grid']} values per hand-designed method; "
               "mean ± std over seeds.")
    out.append("")
    for task in dict.fromkeys(r["task"] for r in rows):
        trs = [r for r in rows if r["task"] == task]
        cls = trs[0]["classification"]
        ep, bs = config["task_settings"][task]
        metric = "acc (%)" if cls else "MSE"
        scale = 100.0 if cls else 1.0
        out += [f"## {task}", "",
                f"{ep} epochs, batch {bs}. Target: test {targets[task]['metric'].split('_')[1]} "
                f"{targets[task]['rule']} = {fmt(targets[task]['target'] * scale, 4)}.", ""]
        headers = ["method", "setting", "lr", f"final test {metric}", f"best test {metric}", "test loss",
                   "train s", "steps→target", "s→target", "rate epoch-CV", "rate jitter"]
        body = []
        key = (lambda r: -(r["final_metric"] or 0)) if cls else (lambda r: r["final_metric"] if r["final_metric"] is not None else math.inf)
        for r in sorted(trs, key=key):
            note = f" ({r['diverged']} diverged)" if r["diverged"] else ""
            body.append([
                r["method"], r["setting"], fmt(r["lr"]) if r["lr"] is not None else "-",
                fmt_mean_std(r["final_metric"], r["final_metric_std"], 4 if cls else 3, scale) + note,
                fmt_mean_std(r["best_metric"], r["best_metric_std"], 4 if cls else 3, scale),
                fmt_mean_std(r["final_test_loss"], r["final_test_loss_std"]),
                fmt(r["train_time_s"], 3),
                f"{fmt(r['steps_to_target'], 4)} ({r['target_reached']})",
                fmt(r["seconds_to_target"], 3), fmt(r["rate_epoch_cv"], 3), fmt(r["rate_jitter"], 3),
            ])
        out += [markdown_table(headers, body, "lllrrrrrrrr"), "", f"![{task}]({task}.png)", ""]
    vs = verdicts(rows)
    if vs:
        out += ["## Learned controllers vs tuned references", "",
                "Δ = learned minus reference, mean final test accuracy (points) or test MSE (x: the MSE ratio); "
                "tie when |Δ| is within one combined std over seeds.", ""]
        def delta(v: dict) -> str:
            if v["classification"]:
                return f"{100 * v['delta']:+.2f} pts"
            return f"{v['delta']:+.3g}" + (f" (x{v['ratio']:.2f})" if v["ratio"] is not None and math.isfinite(v["ratio"]) else "")

        def noise(v: dict) -> str:
            if v["noise"] is None:
                return "- (1 seed)"
            return f"{100 * v['noise']:.2f} pts" if v["classification"] else f"{v['noise']:.3g}"

        body = [[v["task"], v["learned"], v["reference"], delta(v), noise(v), v["verdict"]] for v in vs]
        out += [markdown_table(["task", "learned", "reference", "Δ", "combined std", "verdict"], body, "lllrrl"), ""]
    if skipped:
        out += ["## Skipped methods", ""]
        out += [f"- `{k}`: {v}" for k, v in skipped.items()]
        out.append("")
    return "\n".join(out)


def plot_task(task: str, rows: list[dict], runs: list[dict], path: Path) -> Path:
    """Rate vs step (seed of the first run) and test metric vs epoch (mean over seeds) of every
    reported row except the hand-designed defaults (to keep the figure readable)."""
    plt = pyplot()
    shown = [r for r in rows if r["task"] == task and r["setting"] != "default"]
    fig, (ax_rate, ax_metric) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = color_cycle(len(shown))
    cls = shown[0]["classification"] if shown else True
    for color, row in zip(colors, shown):
        rs = [r for r in runs if r["task"] == task and r["method"] == row["method"] and r["lr"] == row["lr"]
              and r["status"] in ("ok", "diverged")]
        if not rs:
            continue
        label = row["method"] + (f" (lr {fmt(row['lr'])})" if row["lr"] is not None else "")
        rate = rs[0]["curves"]["rate"]
        style = "-" if row["family"] != "learned" else "--"
        ax_rate.plot(range(1, len(rate) + 1), [max(v, 1e-8) for v in rate], style, color=color, lw=1, label=label)
        key = "test_acc" if cls else "test_loss"
        n = min(len(r["curves"][key]) for r in rs)
        mean = [sum(r["curves"][key][i] for r in rs) / len(rs) for i in range(n)]
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
                   help=f"small run (< 5 min on 2 CPU cores): tasks {QUICK_TASKS}, {QUICK_EPOCHS} epochs, 1 seed, "
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
    p.add_argument("--render", metavar="JSON", default=None, help="only re-render the table and figures of an "
                   "existing compare.json into --out")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def make_jobs(args) -> tuple[list[Job], dict[str, str], dict]:
    from .tasks import available_tasks

    tasks = args.tasks or (QUICK_TASKS if args.quick else DEFAULT_TASKS)
    unknown = [t for t in tasks if t not in available_tasks()]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; available: {', '.join(available_tasks())}")
    methods = args.methods or baselines.available_methods()
    unknown = [m for m in methods if m not in baselines.available_methods()]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; available: {', '.join(baselines.available_methods())}")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    grid = args.grid if args.grid is not None else (3 if args.quick else 5)
    if seeds < 1 or grid < 1:
        raise SystemExit("--seeds and --grid must be >= 1")
    skipped: dict[str, str] = {}
    jobs: list[Job] = []
    settings: dict[str, tuple[int, int]] = {}
    for task in tasks:
        epochs, bs = task_settings(task)
        if args.quick:
            epochs = QUICK_EPOCHS
        epochs = args.epochs or epochs
        bs = args.batch_size or bs
        settings[task] = (epochs, bs)
        for name in methods:
            method = baselines.get_method(name)
            reason = method.available()
            if reason:
                skipped[name] = reason
                continue
            if method.family == "hand":
                lrs = baselines.lr_grid(method.default_lr, grid)
                # the default is always run (it is a reported row), even for an even grid size
                if not any(math.isclose(lr, method.default_lr) for lr in lrs):
                    lrs.append(method.default_lr)
            else:
                lrs = [None]
            for gi, lr in enumerate(lrs):
                for seed in range(seeds):
                    is_default = lr is not None and math.isclose(lr, method.default_lr)
                    jobs.append(Job(task, name, lr, gi if lr is not None else None, is_default, seed, epochs, bs,
                                    args.threads))
    return jobs, skipped, {"seeds": seeds, "grid": grid, "task_settings": settings, "tasks": tasks, "methods": methods}


_WORKER_CACHE: dict = {}


def _worker(job: Job) -> dict:
    return run_one(job, _WORKER_CACHE)


def _job_key(task: str, method: str, lr: Any, seed: int, epochs: int, batch_size: int) -> tuple:
    return (task, method, None if lr is None else round(float(lr), 12), int(seed), int(epochs), int(batch_size))


def _load_partial(path: Path) -> dict[tuple, dict]:
    """Records of an earlier, interrupted run (``runs.jsonl``), by job key."""
    done: dict[tuple, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by the interruption
            if r.get("status") in ("ok", "diverged"):
                done[_job_key(r["task"], r["method"], r["lr"], r["seed"], r["epochs"], r["batch_size"])] = r
    return done


def _run_all(jobs: list[Job], n_jobs: int, progress: bool, partial: Path | None = None, resume: bool = False) -> list[dict]:
    """Run every job (``n_jobs`` processes), appending each record to ``partial`` (JSON lines) as
    it completes; with ``resume``, jobs already recorded there are not run again."""
    from tqdm import tqdm

    done = _load_partial(partial) if (partial is not None and resume) else {}
    if partial is not None and not resume:
        partial.unlink(missing_ok=True)
    keys = [_job_key(j.task, j.method, j.lr, j.seed, j.epochs, j.batch_size) for j in jobs]
    records: dict[tuple, dict] = {k: done[k] for k in keys if k in done}
    todo = [i for i, k in enumerate(keys) if k not in records]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="compare", unit="run", disable=not progress,
               dynamic_ncols=True)
    # Longest tasks first, so that the parallel pool does not end on one long run.
    todo.sort(key=lambda i: -jobs[i].epochs * (3 if "cnn" in jobs[i].task else 1))
    sink = open(partial, "a") if partial is not None else None

    def collect(rec: dict) -> None:
        key = _job_key(rec["task"], rec["method"], rec["lr"], rec["seed"], rec["epochs"], rec["batch_size"])
        records[key] = rec
        if sink is not None:
            sink.write(json.dumps(_strict_json(rec), default=_json_default) + "\n")
            sink.flush()
        bar.set_postfix_str(f"{rec['task']} {rec['method']}", refresh=False)
        bar.update()

    try:
        if n_jobs <= 1:
            cache: dict = {}
            for i in todo:
                collect(run_one(jobs[i], cache))
        elif todo:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            with ctx.Pool(n_jobs) as pool:
                for rec in pool.imap_unordered(_worker, [jobs[i] for i in todo], chunksize=1):
                    collect(rec)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    return [records[k] for k in keys]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.render:
        return _rerender(Path(args.render), Path(args.out), not args.no_plots)
    jobs, skipped, cfg = make_jobs(args)
    for name, reason in skipped.items():
        print(f"[compare] skipping {name}: {reason}", file=sys.stderr)
    if not jobs:
        print("[compare] nothing to run: every selected method was skipped", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = _run_all(jobs, args.jobs, not args.no_progress, out / "runs.jsonl", args.resume)
    for r in runs:
        if r["status"] == "skipped":
            skipped.setdefault(r["method"], r["message"])
            print(f"[compare] skipped {r['method']} on {r['task']}: {r['message']}", file=sys.stderr)
    rows, targets = summarize(runs)
    config = {
        "command": "python -m autolr_fast compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "jobs": args.jobs, "threads": args.threads, "quick": args.quick,
        "seeds": cfg["seeds"], "grid": cfg["grid"], "task_settings": cfg["task_settings"],
        "methods": {m: {"family": baselines.get_method(m).family, "default_lr": baselines.get_method(m).default_lr,
                        "description": baselines.get_method(m).description} for m in cfg["methods"]},
        "target_rules": {"classification": f"test_acc >= {TARGET_ACC_FRACTION} x best mean final accuracy",
                         "regression": f"test_loss <= {TARGET_LOSS_FACTOR} x best mean final loss"},
        "total_wall_time_s": time.perf_counter() - t0,
    }
    doc = {"schema": SCHEMA, "config": config, "skipped_methods": skipped, "targets": targets,
           "summary": rows, "verdicts": verdicts(rows), "runs": runs}
    (out / "compare.json").write_text(json.dumps(_strict_json(doc), separators=(",", ":"), default=_json_default,
                                                 allow_nan=False))
    md = render_markdown(rows, targets, skipped, config)
    (out / "compare.md").write_text(md)
    if not args.no_plots:
        for task in targets:
            plot_task(task, rows, runs, out / f"{task}.png")
    print(md)
    print(f"\n[compare] {len(runs)} runs in {config['total_wall_time_s']:.0f} s; results in {out}/ "
          "(compare.json, compare.md, <task>.png)", file=sys.stderr)
    return 0


def _rerender(src: Path, out: Path, plots: bool) -> int:
    """Table, verdicts and figures again from a ``compare.json`` (e.g. after a renderer change)."""
    doc = json.loads(src.read_text())
    if doc.get("schema") != SCHEMA:
        raise SystemExit(f"{src} is not a {SCHEMA} file (schema {doc.get('schema')!r})")
    runs = doc["runs"]
    rows, targets = summarize(runs)
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(rows, targets, doc.get("skipped_methods", {}), doc["config"])
    (out / "compare.md").write_text(md)
    if plots:
        for task in targets:
            plot_task(task, rows, runs, out / f"{task}.png")
    print(md)
    return 0


def _strict_json(o: Any) -> Any:
    """NaN/Inf -> None (strict JSON; ``null`` means diverged or not available)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict_json(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())
