"""How much of the best action can a loss-history controller know? Measured on collected data.

``python -m autolr_fast action-signal --data a.pt b.pt ... --out DIR``

The action controller chooses x0.9 / x1.0 / x1.1 from the training-loss history. Whether lowering
beats raising (the row's ``val_label`` of x0.9 below that of x1.1: the validation loss at the
label horizon, with ``--label-horizon -1`` at the end of the run) is the decision that matters;
this command asks which signals predict it, as an area under the ROC curve (AUC: 0.5 is no
information, 1 or 0 a perfect predictor of either sign) over the rows where at least one of the
two labels is finite (a diverged branch's label is infinite: the other action wins).

Signals a loss-history controller can read (computed from each row's columns):

* ``level``: ``log(rate / start_rate)``, how far its actions moved the rate (a relative
  controller's fourth channel);
* ``progress``: the step over the run's ``--steps`` (AutoLR knows it from ``total_steps``);
* ``slope``: the least-squares slope of the log block means over the window;
* ``noise``: the standard deviation of ``log(loss / its block's mean)`` over the window;
* ``from_start``: ``log(last block mean / the run's first block mean)`` (the controller's channel 0);
* ``from_lowest``: ``log(last block mean / the run's lowest block mean)``.

Block means are plain means of the losses, as the controller's features take them.

Signals it cannot read, for reference:

* ``start_rate``: ``log`` of the run's starting rate. Within one file (one task and optimizer) it is
  the start's distance from the task's good rate, up to a constant: what a range test measures;
* ``probe_train`` / ``probe_val``: a perfect probe, ``log`` of the x1.1 branch's training (or
  validation) loss after its segment over the x0.9 branch's: both futures tried for one segment.

Transfer: a class-balanced logistic regression on the readable signals, fitted on every task
but one and scored (AUC) on the one left out (the files of a task with several optimizers are
left out together). That is the question a controller used on tasks it was not trained on faces.
Every AUC comes with a 90 % interval from resampling whole runs (the rows of a run share its
start rate, so they are not independent). Writes ``action_signal.md`` and ``action_signal.json``
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys

import torch
from torch import Tensor
from torch.nn import functional as F

from autolr_fast.controllers.action import block_means

from .collect import load_data
from .report import markdown_table, strict_json

READABLE = ("level", "progress", "slope", "noise", "from_start", "from_lowest")
ORACLES = ("start_rate", "probe_train", "probe_val")


def auc(score: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``score`` for the boolean ``positive`` (ties count half;
    NaN when either class is empty): the probability that a positive scores above a negative."""
    score, positive = score.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(score, return_inverse=True, return_counts=True)
    counts = counts.double()
    below = torch.cumsum(counts, 0) - counts  # entries below each distinct value
    ranks = (below + (counts + 1) / 2.0)[inverse]  # 1-based average ranks
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _extreme_actions(multipliers: list[float]) -> tuple[int, int]:
    """Indices of the lowest and the highest multiplier (the two actions compared)."""
    order = sorted(range(len(multipliers)), key=lambda i: multipliers[i])
    return order[0], order[-1]


def _start_rates(data: dict, name: str) -> Tensor:
    """The ``start_rate`` column; for files without it, each run's rate at its first decision
    (where nothing has moved it yet)."""
    if "start_rate" in data:
        return data["start_rate"]
    first = {int(r): float(x) for r, k, x in zip(data["run"], data["decision"], data["rate"], strict=True) if k == 0}
    missing = sorted({int(r) for r in data["run"]} - set(first))
    if missing:
        raise ValueError(f"{name} has no start_rate column and runs {missing[:5]} have no first decision to take it "
                         "from: collect those runs again with `python -m autolr_fast collect`")
    return torch.tensor([first[int(r)] for r in data["run"]], dtype=data["rate"].dtype)


def signals(payload: dict, name: str = "the file") -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """One collection file's signals, target (the lowest multiplier's label is below the
    highest's) and run ids, over the rows where at least one of the two labels is finite."""
    s, d = payload["settings"], payload["data"]
    lo, hi = _extreme_actions(s["multipliers"])
    label = d.get("val_label", d["val_after"]).double()
    usable = torch.isfinite(label[:, lo]) | torch.isfinite(label[:, hi])
    window = s["window"]
    losses = d["history"].double().clamp_min(1e-12)  # (n, segment)
    block = losses.shape[-1] // window
    means = block_means(losses, block)  # (n, window): the controller's own block means
    blocks = losses.reshape(len(losses), window, block)  # (n, window, block)
    log_means = torch.log(means)
    t = torch.arange(window, dtype=torch.float64)
    t = t - t.mean()
    start = _start_rates(d, name).double()
    out = {
        "level": torch.log(d["rate"].double() / start),
        "progress": d["step"].double() / s["steps"],
        "slope": (log_means * t).sum(-1) / (t * t).sum(),
        "noise": torch.log(blocks / means.unsqueeze(-1)).flatten(1).std(-1),
        "from_start": log_means[:, -1] - torch.log(d["initial"].double().clamp_min(1e-12)),
        "from_lowest": log_means[:, -1] - torch.log(d["lowest"].double().clamp_min(1e-12)),
        "start_rate": torch.log(start),
        "probe_train": torch.log(d["train_after"][:, hi].double() / d["train_after"][:, lo].double()),
        "probe_val": torch.log(d["val_after"][:, hi].double() / d["val_after"][:, lo].double()),
    }
    target = label[:, lo] < label[:, hi]
    sig = {k: torch.nan_to_num(v[usable], nan=0.0, posinf=50.0, neginf=-50.0) for k, v in out.items()}
    return sig, target[usable], d["run"][usable]


def fit_logistic(x: Tensor, y: Tensor, weight_decay: float = 1e-3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class-balanced logistic regression on standardised ``x (n, k)``: ``(w, b, mean, std)``."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-9)
    z, yf = (x - mean) / std, y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    pos = yf.sum().clamp_min(1.0)
    pos_weight = (len(yf) - pos).clamp_min(1.0) / pos
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, yf, pos_weight=pos_weight) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def _run_bootstrap(score: Tensor, target: Tensor, runs: Tensor, resamples: int = 500,
                   seed: int = 0) -> tuple[float, float]:
    """5 % and 95 % quantiles of the AUC over resamples of whole runs (with replacement)."""
    ids = torch.unique(runs)
    rows = [torch.nonzero(runs == i).flatten() for i in ids]
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        pick = torch.cat([rows[i] for i in torch.randint(len(rows), (len(rows),), generator=g).tolist()])
        v = auc(score[pick], target[pick])
        if math.isfinite(v):
            values.append(v)
    if not values:
        return math.nan, math.nan
    q = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0.05, 0.95], dtype=torch.float64))
    return float(q[0]), float(q[1])


def analyse(payloads: dict[str, dict]) -> dict:
    """Per file: rows, runs, how often lowering wins, each signal's AUC. Per task, when the other
    tasks' rows hold both outcomes: the held-out AUC (and its run-bootstrap interval) of the
    logistic model fitted on the other tasks; ``skipped`` says why a task has none."""
    per_file, by_task = {}, {}
    for name, payload in payloads.items():
        sig, target, runs = signals(payload, name)
        task = payload["settings"]["task"]
        earlier = by_task.setdefault(task, [])
        # run numbers restart in every file: keep the runs of a task's files apart
        earlier.append((sig, target, runs + 1_000_000 * len(earlier)))
        per_file[name] = {"task": task, "optimizer": payload["settings"].get("optimizer", "sgd"),
                          "rows": len(target), "runs": len(torch.unique(runs)), "lower_wins": int(target.sum()),
                          "runs_lower_wins": len(torch.unique(runs[target])),
                          "auc": {k: auc(v, target) for k, v in sig.items()},
                          "interval": {k: _run_bootstrap(v, target, runs) for k, v in sig.items()}}

    def stack(parts):
        x = torch.cat([torch.stack([sig[k] for k in READABLE], 1) for sig, _, _ in parts])
        return x, torch.cat([t for _, t, _ in parts]), torch.cat([r for _, _, r in parts])

    transfer, skipped = {}, {}
    for task, parts in by_task.items():
        rest = [p for other, ps in by_task.items() if other != task for p in ps]
        if not rest:
            skipped[task] = "no other task to fit on"
            continue
        x, y, _ = stack(rest)
        if y.all() or not y.any():
            skipped[task] = "the other tasks' rows all have the same outcome"
            continue
        w, b, mean, std = fit_logistic(x, y)
        xt, yt, rt = stack(parts)
        score = (xt - mean) / std @ w + b
        transfer[task] = {"rows": len(yt), "auc": auc(score, yt), "interval": _run_bootstrap(score, yt, rt),
                          "weights": dict(zip(READABLE, (round(float(v), 3) for v in w), strict=True))}
    return {"files": per_file, "transfer": transfer, "skipped": skipped}


def _fmt(v: float) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"


def render(result: dict, command: str) -> str:
    names = READABLE + ORACLES
    rows = [[f"{name} ({f['task']}, {f['optimizer']})", f"{f['rows']} ({f['runs']})",
             f"{f['lower_wins']} ({f['runs_lower_wins']})",
             *(f"{_fmt(f['auc'][k])} [{_fmt(f['interval'][k][0])}, {_fmt(f['interval'][k][1])}]" for k in names)]
            for name, f in result["files"].items()]
    out = [
        "# Which signals predict that lowering the rate beats raising it",
        "",
        f"Command: `{command}`",
        "",
        "AUC of each signal for \"x0.9's label below x1.1's\" (0.5: no information; below 0.5: the opposite "
        "sign). The first six are readable by a loss-history controller; `start_rate`, `probe_train` and "
        "`probe_val` are not (the start's distance from the task's good rate, and a perfect one-segment probe "
        "of both futures). In brackets: a 90 % interval from resampling the file's runs (a run's rows share "
        "its start rate). Rows are decisions (runs in parentheses); \"x0.9 wins\" counts rows (and the runs "
        "they come from).",
        "",
        markdown_table(["file", "rows (runs)", "x0.9 wins (runs)", *names], rows),
        "",
    ]
    if result["transfer"]:
        out += [
            "Transfer: a class-balanced logistic regression on the six readable signals, fitted on the other tasks "
            "and scored on the task left out (90 % interval: its runs resampled).",
            "",
            markdown_table(["task left out", "rows", "held-out AUC", "90 % interval", "weights (standardised)"],
                           [[t, v["rows"], _fmt(v["auc"]), f"{_fmt(v['interval'][0])}-{_fmt(v['interval'][1])}",
                             ", ".join(f"{k} {w:+.2f}" for k, w in v["weights"].items())]
                            for t, v in result["transfer"].items()], align="lrrrl"),
            "",
        ]
    out += [f"No transfer score for {t}: {why}." for t, why in result["skipped"].items()]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autolr_fast action-signal", description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="files written by `python -m autolr_fast collect`")
    p.add_argument("--out", default="results/action_signal", help="folder for action_signal.md and .json")
    a = p.parse_args(argv)
    try:
        if len(set(a.data)) < len(a.data):
            p.error("a file is given twice in --data")
        result = analyse({f: load_data(f) for f in a.data})
    except ValueError as exc:
        p.error(str(exc))
    command = "python -m autolr_fast action-signal " + shlex.join(sys.argv[1:] if argv is None else argv)
    os.makedirs(a.out, exist_ok=True)
    text = render(result, command)
    with open(os.path.join(a.out, "action_signal.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "action_signal.json"), "w") as f:
        json.dump(strict_json(result), f, indent=1, allow_nan=False)
    print(text)
    return 0
