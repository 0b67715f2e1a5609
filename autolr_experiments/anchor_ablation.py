"""Which of ``find_anchor_lr``'s rules choose well: replayed on the same trials, scored by full runs.

``python -m autolr_fast anchor-ablation [--compare results/compare_full/compare.json] --out DIR``

``find_anchor_lr`` makes four choices: how a trial's rate moves (``trial_schedule``: annealed
along a cosine, or held constant), how long a trial is (``fraction`` of the run), whether a rate
other than the given one must beat it beyond the held-out noise (``confidence``: a paired t-test,
or the lowest loss whatever the margin), and whether a choice next to a failed rate steps down
(``step_down``). One more rule, the default on other training batches, measures how much the
counts move with the trials' batches alone; another gives the trials AutoLR's warm-up
(``"warmup-cosine"``), as the run has it. For every task and seed this command

1. trains cosine (the task's default optimizer, ``CosineAnnealingLR`` over the whole run) at the
   five rates the trials try, the task's default rate x ``10**(-1, -0.5, 0, 0.5, 1)``: the final
   test metric of the cosine run at the rate a rule chooses is that rule's score (it stands in
   for AutoLR anchored there). With ``--compare``, the runs a ``compare`` output already holds
   (the same runs: its ``cosine`` grid) are reused;
2. runs the trials once per trial schedule and length exactly as ``compare``'s ``autolr-find``
   does (on the training data minus the validation split, scored on that split);
3. replays every rule on those trials (:meth:`~autolr_fast.AnchorResult.choose`). A rule that
   extends past the grid (``extend``) is scored by a cosine run at the rate it chose, trained when
   a rule chose it.

Per rule it reports, per task, the score (mean over seeds) and its gap to the best of the five
rates, and over tasks how often the rule was close to the best rate (within 0.5 points of
accuracy or 10 % of the loss) and how often it did worse than keeping the default rate.

The tasks come in four groups, by what the rules saw: ``design`` (``compare``'s tasks: the rules
were chosen looking at them), ``seen`` (run with earlier drafts of the rules while they were
chosen), ``held-out`` (first run with the rules as shipped) and ``held-out 2`` (kinds of task none
of the others is, first run with the rules and the trial length as shipped); a task in no list
counts as ``other``.
``docs/anchor_lr.md`` tells the order. Writes ``anchor_ablation.md``, ``anchor_ablation.json``
(with every reference run's metric and every trial) and ``anchor_ablation.png`` to ``--out``;
``--resume`` reuses the reference runs of an earlier ``anchor_ablation.json`` there.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from autolr_fast.anchor_lr import DEFAULT_FRACTION, AnchorResult

from . import baselines
from .compare import DEFAULT_TASKS, Job, machine_info, run_one, task_settings
from .json_files import read_json
from .report import markdown_table, plt, save_figure, strict_json
from .tasks import Task, available_tasks, get_task, task_optimizer
from .training import RunSpec, make_optimizer

DESIGN_TASKS = list(DEFAULT_TASKS)
SEEN_TASKS = ["regress-exp", "regress-log", "regress-step", "regress-inv", "cancer-mlp", "wine-mlp",
              "digits-dropout-mlp", "mnist1d-cnn-adam", "markov-gru-sgd",
              "markov-attn", "friedman3-mlp", "moons-mlp", "noisy-classes-mlp",
              "markov-lstm", "mnist1d-mlp-adamw", "circles-mlp", "friedman2-mlp"]
HELD_OUT_TASKS = ["regress-exp-adam", "digits-bncnn-adamw", "cancer-mlp-sgd", "moons-mlp-adam"]
#: kinds of task none of the others is, first run with the rules and the trial length as shipped
HELD_OUT_2_TASKS = ["grammar-lm", "shapes-gncnn", "clusters-resmlp", "manifold-ae"]
GROUPS = ("design", "seen", "held-out", "held-out 2")
QUICK_TASKS = ["digits-mlp", "regress-sin"]
QUICK_EPOCHS = 3
#: the trial rates and the reference grid: the default rate x 10**e
EXPONENTS = (-1.0, -0.5, 0.0, 0.5, 1.0)
CLOSE_POINTS = 0.5  # accuracy points
CLOSE_RATIO = 1.10  # loss ratio


@dataclass(frozen=True)
class Rule:
    name: str
    schedule: str
    confidence: float
    step_down: bool
    extend: int = 0
    fraction: float = DEFAULT_FRACTION  # of the run, per trial
    #: the trials' batches are drawn with the run's seed plus this (0: the run's own first batches)
    batch_seed_offset: int = 0

    @property
    def trials_key(self) -> tuple[str, float, int]:
        """Rules with the same key replay the same trials."""
        return (self.schedule, self.fraction, self.batch_seed_offset)


RULES = [
    Rule("constant trials, lowest loss", "constant", 0.0, False),
    Rule("cosine trials, lowest loss", "cosine", 0.0, False),
    Rule("cosine trials + nearest within noise", "cosine", 0.95, False),
    Rule("cosine trials + step down", "cosine", 0.0, True),
    Rule("constant trials + nearest within noise + step down", "constant", 0.95, True),
    Rule("cosine trials + nearest within noise + step down (default)", "cosine", 0.95, True),
    Rule("cosine trials + nearest within noise + step down + extend 2", "cosine", 0.95, True, 2),
    Rule("the default with trials of 5 % of the run", "cosine", 0.95, True, 0, 0.05),
    Rule("the default with trials of 10 % of the run", "cosine", 0.95, True, 0, 0.10),
    Rule("the default with trials of 25 % of the run", "cosine", 0.95, True, 0, 0.25),
    Rule("the default with trials on other training batches", "cosine", 0.95, True, 0, DEFAULT_FRACTION, 1000),
    Rule("the default with trials that warm up as the run does", "warmup-cosine", 0.95, True),
]
#: find_anchor_lr's defaults
DEFAULT_RULE = RULES[5]


def trial_settings() -> dict[tuple[str, float, int], int]:
    """The trials to run, ``{Rule.trials_key: extend}``: once per schedule, trial length and batch
    order, as far past the grid as the rules that replay them extend (the lowest loss wins: any
    rule's choice is the largest rate tried only when the lowest is), so every rule replays."""
    out: dict[tuple[str, float, int], int] = {}
    for rule in RULES:
        out[rule.trials_key] = max(out.get(rule.trials_key, 0), rule.extend)
    return out


def trials_label(key: tuple[str, float, int]) -> str:
    """How the JSON names a set of trials: ``"cosine 0.15"``, ``"cosine 0.15 batches+1000"``."""
    schedule, fraction, offset = key
    return f"{schedule} {fraction:g}" + (f" batches+{offset}" if offset else "")


def group_of(task: str) -> str:
    if task in DESIGN_TASKS:
        return "design"
    if task in SEEN_TASKS:
        return "seen"
    if task in HELD_OUT_TASKS:
        return "held-out"
    return "held-out 2" if task in HELD_OUT_2_TASKS else "other"


def _exponent(lr: float, default: float) -> float | None:
    """The grid exponent of ``lr`` (a multiple of 0.5), None when ``lr`` is not on that grid."""
    half_decades = 2 * math.log10(lr / default)
    return round(half_decades) / 2 if abs(half_decades - round(half_decades)) < 1e-6 else None


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
def reference_runs(task: str, pairs, epochs: int, batch_size: int, recorded: dict) -> dict:
    """``{(seed, exponent): final test metric}`` of cosine at ``default x 10**exponent`` for every
    ``(seed, exponent)`` in ``pairs`` (NaN: diverged); from ``recorded`` (a compare output's or an
    earlier ablation's) where it has the run, else trained here."""
    default = task_optimizer(task).lr
    out = {}
    for seed, e in pairs:
        key = (task, seed, e, epochs, batch_size)
        if key not in recorded:
            grid_index = EXPONENTS.index(e) if e in EXPONENTS else None
            rec = run_one(Job(task, "cosine", default * 10.0**e, grid_index, e == 0.0, seed, epochs, batch_size))
            recorded[key] = rec["final_metric"] if rec["status"] == "ok" else float("nan")
        out[(seed, e)] = recorded[key]
    return out


def earlier_references(path: Path) -> dict:
    """The reference runs an earlier ``anchor_ablation.json`` recorded, keyed as
    :func:`recorded_references` keys them (nothing when there is no such file)."""
    if not path.is_file():
        return {}
    out = {}
    for t in read_json(path, "an anchor-ablation output", ("tasks",))["tasks"]:
        for r in t.get("reference", []):
            metric = float("nan") if r["metric"] is None else r["metric"]
            out[(t["task"], r["seed"], r["exponent"], t["epochs"], t["batch_size"])] = metric
    return out


def recorded_references(path: Path | None) -> dict:
    """The ``cosine`` runs of a ``compare.json``: ``{(task, seed, exponent, epochs, batch): metric}``."""
    if path is None:
        return {}
    doc = read_json(path, "a compare.json", ("runs",))
    out = {}
    for r in doc["runs"]:
        if r["method"] != "cosine" or r.get("split", "test") != "test" or r["status"] not in ("ok", "diverged"):
            continue
        e = _exponent(r["lr"], task_optimizer(r["task"]).lr)
        if e is not None:
            metric = r["final_metric"] if r["status"] == "ok" and r["final_metric"] is not None else float("nan")
            out[(r["task"], r["seed"], e, r["epochs"], r["batch_size"])] = metric
    return out


def trials(task: Task, seed: int, epochs: int, batch_size: int, schedule: str, fraction: float = DEFAULT_FRACTION,
           extend: int | None = None, batch_seed_offset: int = 0) -> AnchorResult:
    """``find_anchor_lr``'s trials as ``autolr-find`` runs them (``train`` seeds before building
    the model, so the trials start from the weights the run starts from), ``fraction`` of the run
    each, up to ``extend`` rates past the grid (default: as far as any rule goes), on batches drawn
    with ``seed + batch_seed_offset``; nothing applied."""
    torch.manual_seed(seed)
    model = task.make_model()
    spec = RunSpec(task, model, None, epochs, task.steps_per_epoch(batch_size), seed, batch_size)
    opt = make_optimizer(model, task.optim)
    extend = max(trial_settings().values()) if extend is None else extend
    return baselines.anchor_trials(spec, opt, fraction, batch_seed_offset, trial_schedule=schedule, confidence=0.0,
                                   step_down=False, extend=extend, apply=False)


def replay(found: dict[tuple[str, float, int], AnchorResult]) -> dict[str, float]:
    """Every rule's choice (as a grid exponent) from the trials of each :attr:`Rule.trials_key`."""
    out = {}
    for rule in RULES:
        res = found[rule.trials_key]
        chosen = res.choose(confidence=rule.confidence, step_down=rule.step_down, extend=rule.extend)
        out[rule.name] = _exponent(chosen, res.given_lr)
    return out


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------
def judge(value: float, best: float, default: float, classification: bool) -> tuple[float, bool, bool]:
    """``(gap, close, worse)`` of a score against the best grid rate's and the default rate's:
    the gap in points of accuracy or as the loss ratio; close within ``CLOSE_POINTS`` /
    ``CLOSE_RATIO``; worse below the default rate (a diverged score is never close and always
    worse, unless the default diverged too)."""
    if classification:
        gap = 100 * (value - best)
        close = math.isfinite(value) and gap >= -CLOSE_POINTS
        worse = not (math.isfinite(value) and value >= default - 1e-12) if math.isfinite(default) else False
    else:
        gap = value / best if math.isfinite(value) else float("inf")
        close = gap <= CLOSE_RATIO
        worse = not (math.isfinite(value) and value <= default + 1e-12) if math.isfinite(default) else False
    return gap, close, worse


def score_task(task: str, classification: bool, reference: dict, choices: dict[int, dict[str, float]]) -> dict:
    """Per rule: the mean over seeds of the reference metric at the chosen rate (``reference``
    holds the five grid rates and any rate past them a rule chose), the gap to the best of the
    five grid rates (points of accuracy, or the loss ratio), close / worse than the default."""
    seeds = sorted(choices)
    grid = {e: statistics.fmean(reference[(s, e)] for s in seeds) for e in EXPONENTS}
    finite = {e: v for e, v in grid.items() if math.isfinite(v)}
    if not finite:
        raise ValueError(f"{task}: cosine diverged at every grid rate on every seed; there is no best rate to score "
                         "the rules against")
    best_e = (max if classification else min)(finite, key=finite.get)
    best, default = grid[best_e], grid[0.0]
    rules = {}
    for rule in RULES:
        picks = [choices[s][rule.name] for s in seeds]
        value = statistics.fmean(reference[(s, e)] for s, e in zip(seeds, picks, strict=True))
        gap, close, worse = judge(value, best, default, classification)
        rules[rule.name] = {"choices": picks, "value": value, "gap": gap, "close": close, "worse_than_default": worse}
    return {"task": task, "group": group_of(task), "classification": classification, "grid": grid,
            "best_exponent": best_e, "best": best, "default": default, "rules": rules}


def _groups(scored: list[dict]) -> tuple[str, ...]:
    """The named groups, and ``other`` when a task is in none of them."""
    return GROUPS + (("other",) if any(t["group"] == "other" for t in scored) else ())


def summarize(scored: list[dict]) -> dict:
    """Per rule and group: tasks close to the best rate, and tasks worse than the default rate."""
    out = {}
    for rule in RULES:
        per = {}
        for group in (*_groups(scored), "all"):
            rows = [t for t in scored if group in ("all", t["group"])]
            per[group] = {"tasks": len(rows), "close": sum(t["rules"][rule.name]["close"] for t in rows),
                          "worse_than_default": sum(t["rules"][rule.name]["worse_than_default"] for t in rows)}
        out[rule.name] = per
    return out


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def _value(v: float, classification: bool) -> str:
    if not math.isfinite(v):
        return "diverged"
    return f"{100 * v:.2f}" if classification else f"{v:.3g}"


def _gap(g: float, classification: bool) -> str:
    if not math.isfinite(g):
        return "diverged"
    return f"{g:+.2f} pts" if classification else f"x{g:.2f}"


def render(scored: list[dict], summary: dict, config: dict) -> str:
    short = {rule.name: f"R{i + 1}" for i, rule in enumerate(RULES)}
    lines = ["# find_anchor_lr: which rules choose well", "",
             f"Command: `{config['command']}`  ",
             f"Machine: {config['machine']['cpu']}, torch {config['machine']['torch']}; "
             f"{config['seeds']} seed(s); {config['wall_s']:.0f} s.", "",
             "Score: the final test metric of cosine (the task's default optimizer) at the rate the rule chose, "
             "mean over seeds (accuracy in %, or the test loss). Gap: to the best of the five grid rates "
             f"(close: within {CLOSE_POINTS} points or x{CLOSE_RATIO:.2f} of the loss). Choices: the exponent e of "
             "default x 10^e, per seed.", "",
             "Rules:", ""]
    lines += [f"- {short[r.name]}: {r.name}" for r in RULES]
    lines += ["", "## Summary: tasks close to the best rate / tasks worse than the default rate", ""]
    groups = (*_groups(scored), "all")
    rows = []
    for rule in RULES:
        per = summary[rule.name]
        rows.append([f"{short[rule.name]}: {rule.name}"]
                    + [f"{per[g]['close']}/{per[g]['tasks']} · {per[g]['worse_than_default']}" for g in groups])
    lines += [markdown_table(["rule", *(f"{g} (close · worse)" for g in groups)], rows), ""]
    lines += ["## Per task", ""]
    rows = []
    for t in scored:
        cls = t["classification"]
        best = f"{_value(t['best'], cls)} (e {t['best_exponent']:+g})"
        row = [t["task"], t["group"], _value(t["default"], cls), best]
        for rule in RULES:
            r = t["rules"][rule.name]
            picks = ",".join(f"{e:+g}" for e in r["choices"])
            row.append(f"{_value(r['value'], cls)} ({_gap(r['gap'], cls)}; {picks})")
        rows.append(row)
    lines += [markdown_table(["task", "group", "default rate", "best rate", *(short[r.name] for r in RULES)], rows,
                             "ll" + "r" * (2 + len(RULES))), ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    groups = tuple(g for g in (*GROUPS, "other") if g in summary[RULES[0].name])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    y = range(len(RULES))
    for ax, key, title in ((axes[0], "close", "close to the best grid rate"),
                           (axes[1], "worse_than_default", "worse than the default rate")):
        left = [0] * len(RULES)
        for group, color in zip(groups, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8c8c8c")[:len(groups)],
                                strict=True):
            counts = [summary[r.name][group][key] for r in RULES]
            ax.barh(list(y), counts, left=left, color=color, label=group)
            left = [a + b for a, b in zip(left, counts, strict=True)]
        ax.set_title(title)
        ax.set_xlabel("tasks")
    axes[0].set_yticks(list(y), [r.name for r in RULES], fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autolr_fast anchor-ablation", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=None,
                   help="default: compare's tasks, the seen ones and both held-out sets (--quick: two small tasks)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--compare", type=Path, nargs="+", default=[],
                   help="compare.json files whose cosine grid runs are reused (same tasks, seeds, epochs and batch "
                        "size)")
    p.add_argument("--out", type=Path, default=Path("results/anchor_ablation"))
    p.add_argument("--quick", action="store_true", help=f"{QUICK_TASKS}, 1 seed, {QUICK_EPOCHS} epochs: a smoke test")
    p.add_argument("--resume", action="store_true",
                   help="reuse the reference runs of the anchor_ablation.json already in --out")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = args.tasks or (QUICK_TASKS if args.quick else DESIGN_TASKS + SEEN_TASKS + HELD_OUT_TASKS + HELD_OUT_2_TASKS)
    unknown = [t for t in tasks if t not in available_tasks()]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; available: {', '.join(available_tasks())}")
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {args.seeds}")
    seeds = 1 if args.quick else args.seeds
    recorded = {}
    for path in args.compare:
        recorded.update(recorded_references(path))
    if args.resume:
        recorded.update(earlier_references(args.out / "anchor_ablation.json"))
    torch.set_num_threads(1)
    start = time.perf_counter()
    scored, raw = [], []
    with tqdm(total=len(tasks) * seeds, desc="anchor-ablation", disable=args.no_progress) as bar:
        for task in tasks:
            epochs, batch_size = task_settings(task)
            epochs = QUICK_EPOCHS if args.quick else epochs
            data = get_task(task)  # built once: every trial and seed copies what it changes
            choices = {}
            for seed in range(seeds):
                found = {key: trials(data, seed, epochs, batch_size, key[0], key[1], extend, key[2])
                         for key, extend in sorted(trial_settings().items())}
                choices[seed] = replay(found)
                raw.append({"task": task, "seed": seed,
                            "trials": {trials_label(k): v.to_dict() for k, v in found.items()}})
                bar.update(1)
            pairs = [(s, e) for s in range(seeds) for e in EXPONENTS]  # the grid, then rates past it
            pairs += sorted({(s, e) for s, picks in choices.items() for e in picks.values()} - set(pairs))
            reference = reference_runs(task, pairs, epochs, batch_size, recorded)
            scored.append(score_task(task, data.is_classification, reference, choices))
            scored[-1].update(epochs=epochs, batch_size=batch_size,
                              reference=[{"seed": s, "exponent": e, "metric": v} for (s, e), v in reference.items()])
    summary = summarize(scored)
    command = "python -m autolr_fast anchor-ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    config = {"command": command,
              "machine": machine_info(), "seeds": seeds, "tasks": tasks, "quick": args.quick,
              "wall_s": time.perf_counter() - start, "rules": [vars(r) for r in RULES]}
    args.out.mkdir(parents=True, exist_ok=True)
    md = render(scored, summary, config)
    (args.out / "anchor_ablation.md").write_text(md)
    (args.out / "anchor_ablation.json").write_text(json.dumps(strict_json(
        {"config": config, "summary": summary, "tasks": scored, "trials": raw}), allow_nan=False))
    plot(summary, args.out / "anchor_ablation.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
