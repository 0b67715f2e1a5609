"""Train action-controller models on collected data and compare them with simple baselines.

``python -m autolr_fast train-action --data a.pt b.pt --model mlp|cnn|gru|all --out-dir DIR``

Rows are split by *run* (all decisions of a run go to the same side, seeded), so the held-out
accuracy is measured on training runs the model has not seen. Reported per model, on the held-out
rows: accuracy, and the mean relative regret (validation loss of the chosen action above the best
action's, divided by the validation loss at the checkpoint). Baselines: the majority class of the
training rows, and always x1.0 (never change the rate). Writes a Markdown table and, per model, an
:class:`~autolr_fast.ActionController` file plus a JSON of its settings and scores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from autolr_fast import ActionController
from autolr_fast.controllers.action import feature_channels, history_features, make_action_model, with_level

from .collect import load_data, merge_data
from .out_paths import folder_problem
from .report import markdown_table
from .training import Schedule, run_steps


def split_by_run(runs: Tensor, test_frac: float, seed: int) -> tuple[Tensor, Tensor]:
    """Boolean masks (train, test) with every run entirely on one side."""
    ids = torch.unique(runs)
    if len(ids) < 2:
        raise ValueError(f"need rows from at least 2 runs to hold some out, got {len(ids)}; "
                         "collect with --runs 2 or more")
    g = torch.Generator().manual_seed(seed)
    perm = ids[torch.randperm(len(ids), generator=g)]
    n_test = min(len(ids) - 1, max(1, round(test_frac * len(ids))))
    test = torch.isin(runs, perm[:n_test])
    return ~test, test


def model_inputs(data: dict, use_val: bool, relative: bool = False) -> Tensor:
    x = data["features"]
    if relative:  # the relative controller's fourth channel: log(rate / start rate)
        if "start_rate" not in data or len(data["start_rate"]) != len(x):
            raise ValueError("--relative needs every file to have the start_rate column (collect it again)")
        x = with_level(x, data["rate"] / data["start_rate"])
    if use_val:
        v = history_features(data["val_history"], data["val_initial"])
        x = torch.cat([x.flatten(1), v.flatten(1)], dim=1)
    return x


def fit(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float = 3e-3, batch: int = 256,
        seed: int = 0, class_weights: Tensor | None = None, x_val: Tensor | None = None,
        y_val: Tensor | None = None, check_every: int = 5) -> int:
    """Adam on cross-entropy. With ``x_val``/``y_val``, keep the weights of the epoch with the best
    validation loss (checked every ``check_every`` epochs); returns that epoch."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights)
    best_loss, best_epoch, best_state = float("inf"), epochs, None
    schedule = Schedule(opt)
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        run_steps(model, schedule, loss_fn, ((x[idx], y[idx]) for idx in perm.split(batch)))
        if x_val is not None and (epoch % check_every == 0 or epoch == epochs):
            model.eval()
            with torch.no_grad():
                v = float(nn.functional.cross_entropy(model(x_val), y_val))
            if v < best_loss:
                best_loss, best_epoch = v, epoch
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return best_epoch


def greedy_labels(data: dict) -> dict:
    """The data with the labels of the greedy horizon (best validation loss right after the
    branch, ``val_after``) in place of the stored ones (which may come from ``--label-horizon``)."""
    vals = data["val_after"]  # a diverged branch is stored as inf, never NaN
    best = vals.argmin(1)
    return {**data, "best": best, "margins": vals - vals.gather(1, best.view(-1, 1)), "val_label": vals}


def keep_unless_clear(data: dict, multipliers: list[float], margin: float) -> dict:
    """Labels that keep the rate (the multiplier nearest 1) unless the best action beats keeping
    it by more than ``margin`` of keeping's validation loss. Many decisions are won by a hair that
    another seed would reverse; a controller trained on those learns a drift (usually upwards) that
    compounds over a run. Only the training target changes: ``margins`` still measure the regret
    against the truly best action."""
    keep = min(range(len(multipliers)), key=lambda a: abs(multipliers[a] - 1.0))
    vals = data["val_label"]
    best = data["best"]
    keep_val = vals[:, keep]
    clear = vals.gather(1, best.view(-1, 1)).squeeze(1) < keep_val * (1.0 - margin)
    # keeping diverged while another action did not: that is always clear
    clear |= ~torch.isfinite(keep_val)
    return {**data, "best": torch.where(clear, best, torch.full_like(best, keep))}


def scores(choice: Tensor, data: dict, mask: Tensor) -> dict:
    best = data["best"][mask]
    margins = data["margins"][mask]
    ref = data["val_history"][mask][:, -1].clamp_min(1e-12)
    regret = margins.gather(1, choice.view(-1, 1)).squeeze(1) / ref
    regret = torch.nan_to_num(regret, posinf=1.0).clamp(max=1.0)  # a diverged choice counts as 100%
    return {"accuracy": float((choice == best).float().mean()), "regret": float(regret.mean())}


def train_and_compare(data: dict, kinds: list[str], *, window: int, multipliers: list[float], epochs: int,
                      test_frac: float, seed: int, use_val: bool = False, hidden: int | None = None,
                      balanced: bool = False, relative: bool = False, show: bool = True) -> tuple[dict, dict]:
    train, test = split_by_run(data["run"], test_frac, seed)
    # early stopping on a fifth of the training runs (never on the held-out runs)
    train_rows = train.nonzero().squeeze(1)
    if torch.unique(data["run"][train]).numel() >= 5:
        inner_fit, inner_stop = split_by_run(data["run"][train], 0.2, seed + 1)
        fit_rows, stop_rows = train_rows[inner_fit], train_rows[inner_stop]
    else:  # too few runs to spare some for early stopping: train for all epochs
        fit_rows, stop_rows = train_rows, None
    y = data["best"]
    n_actions = len(multipliers)
    majority = int(torch.bincount(y[train], minlength=n_actions).argmax())
    keep = min(range(n_actions), key=lambda a: abs(multipliers[a] - 1.0))
    results = {
        "majority class": scores(torch.full((int(test.sum()),), majority), data, test),
        "always x1.0": scores(torch.full((int(test.sum()),), keep), data, test),
    }
    models = {}
    x = model_inputs(data, use_val, relative)
    channels = feature_channels(relative)
    counts = torch.bincount(y[train], minlength=n_actions).float()
    weights = counts.sum() / (n_actions * counts.clamp_min(1.0))
    for kind in tqdm(kinds, desc="train-action", disable=not show):
        torch.manual_seed(seed)
        if use_val:
            if kind != "mlp":
                raise ValueError("--use-val works with --model mlp only (the CNN/GRU read the training window)")
            model = make_action_model(kind, window, channels=channels, actions=n_actions, hidden=hidden,
                                      extra=x.shape[1] - channels * window)
        else:
            model = make_action_model(kind, window, channels=channels, actions=n_actions, hidden=hidden)
        best_epoch = fit(model, x[fit_rows], y[fit_rows], epochs=epochs, seed=seed,
                         class_weights=weights if balanced else None, x_val=None if stop_rows is None else x[stop_rows],
                         y_val=None if stop_rows is None else y[stop_rows])
        with torch.no_grad():
            choice = model(x[test]).argmax(1)
            train_acc = float((model(x[train]).argmax(1) == y[train]).float().mean())
        results[kind] = dict(scores(choice, data, test), train_accuracy=train_acc, epochs=best_epoch)
        models[kind] = model
    meta = {"rows": len(y), "train_rows": int(train.sum()), "test_rows": int(test.sum()),
            "runs": int(torch.unique(data["run"]).numel()), "majority_action": majority,
            "label_counts": torch.bincount(y, minlength=n_actions).tolist()}
    return {"results": results, "split": meta}, models


def results_table(report: dict, multipliers: list[float]) -> str:
    s = report["split"]
    counts = ", ".join(f"x{m:g}: {c}" for m, c in zip(multipliers, s["label_counts"], strict=True))
    rows = [[name, f"{r['accuracy']:.3f}", f"{r['regret']:.4f}",
             "-" if r.get("train_accuracy") is None else f"{r['train_accuracy']:.3f}"]
            for name, r in report["results"].items()]
    headers = ["predictor", "held-out accuracy", "mean relative regret", "train accuracy"]
    return (f"Held-out rows: {s['test_rows']} (train {s['train_rows']}, {s['runs']} runs); label counts {counts}\n\n"
            + markdown_table(headers, rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autolr_fast train-action", description=__doc__.split("\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="files written by `collect`")
    p.add_argument("--model", default="all", choices=["mlp", "cnn", "gru", "all"])
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--test-frac", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balanced", action="store_true", help="weight the loss by inverse class frequency")
    p.add_argument("--labels", default="stored", choices=["stored", "greedy"],
                   help="stored: the file's labels (the --label-horizon ones when collected with it); "
                        "greedy: best validation loss right after the branch (the old labels)")
    p.add_argument("--keep-margin", type=float, default=0.0,
                   help="label x1.0 unless the best action beats it by more than this fraction of its loss")
    p.add_argument("--relative", action="store_true",
                   help="a relative controller: rate = AutoLR's gamma (lr x envelope) x level, the level read as a "
                        "fourth feature channel (data collected with --envelope)")
    p.add_argument("--use-val", action="store_true", help="also feed the validation history (MLP only; not for AutoLR)")
    p.add_argument("--out-dir", default="action_models")
    p.add_argument("--quick", action="store_true", help="at most 10 epochs (a smoke run)")
    p.add_argument("--no-progress", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    if a.quick:
        a.epochs = min(a.epochs, 10)
    if a.epochs < 1 or not 0 < a.test_frac < 1:
        p.error(f"--epochs must be >= 1 and --test-frac in (0, 1); got {a.epochs} and {a.test_frac}")
    if a.hidden is not None and a.hidden < 1:
        p.error(f"--hidden {a.hidden}: must be >= 1")
    if a.use_val and a.model != "mlp":
        p.error(f"--use-val works with --model mlp only (the CNN/GRU read the training window), not --model {a.model}")
    problem = folder_problem(a.out_dir, "--out-dir")
    if problem:
        p.error(problem)
    real = [os.path.realpath(f) for f in a.data]
    repeated = sorted({f for f, r in zip(a.data, real) if real.count(r) > 1})
    if repeated:  # its runs would be renumbered as new ones, and test runs would copy training runs
        p.error(f"--data names the same file more than once: {repeated}")
    try:
        payloads = [load_data(f) for f in a.data]
    except (OSError, ValueError) as exc:
        raise SystemExit(f"train-action: {exc}") from None
    settings = [pl["settings"] for pl in payloads]
    window, block = settings[0]["window"], settings[0]["segment"] // settings[0]["window"]
    multipliers = settings[0]["multipliers"]
    if any(s["segment"] // s["window"] != block or s["multipliers"] != multipliers for s in settings):
        raise SystemExit("the data files disagree on --segment/--window or --multipliers; train on matching files")
    if len(multipliers) < 2 or min(multipliers) <= 0:
        raise SystemExit(f"train-action: the data were collected with --multipliers {multipliers}; an action "
                         "controller needs at least two factors, each > 0: collect again")
    enveloped = [f for f, s in zip(a.data, settings, strict=True) if s.get("envelope")]
    if a.relative and len(enveloped) != len(a.data):
        raise SystemExit("--relative trains a controller whose rate follows AutoLR's envelope: every file must "
                         "be collected with `collect --envelope` (these are not: "
                         f"{', '.join(f for f in a.data if f not in enveloped)})")
    if enveloped and not a.relative:
        raise SystemExit(f"{', '.join(enveloped)} were collected with --envelope: train a relative controller on them "
                         "(add --relative)")
    try:
        data = merge_data(payloads)
    except ValueError as exc:  # files collected with other settings
        raise SystemExit(f"train-action: {exc}") from None
    if a.labels == "greedy":
        data = greedy_labels(data)
    if a.keep_margin > 0:
        data = keep_unless_clear(data, multipliers, a.keep_margin)
    kinds = ["mlp", "cnn", "gru"] if a.model == "all" else [a.model]
    runs = torch.unique(data["run"]).numel()
    if runs < 2:  # checked here, not after training: the split holds whole runs out for the test
        raise SystemExit(f"train-action: the data hold {runs} run(s); the comparison holds whole runs out for its "
                         "test, so it needs 2 or more (collect with --runs 2 or more, or pass more --data files)")
    report, models = train_and_compare(data, kinds, window=window, multipliers=multipliers, epochs=a.epochs,
                                       test_frac=a.test_frac, seed=a.seed, use_val=a.use_val, hidden=a.hidden,
                                       balanced=a.balanced, relative=a.relative, show=not a.no_progress)
    os.makedirs(a.out_dir, exist_ok=True)
    table = results_table(report, multipliers)
    info = {"command": "python -m autolr_fast train-action " + shlex.join(argv),
            "data": [os.path.basename(f) for f in a.data], "tasks": sorted({s["task"] for s in settings}),
            "collect_settings": settings, "window": window, "block": block, "interval": settings[0]["segment"],
            "multipliers": multipliers, "epochs": a.epochs, "seed": a.seed, "test_frac": a.test_frac,
            "use_val": a.use_val, "relative": a.relative, "balanced": a.balanced, "labels": a.labels,
            "keep_margin": a.keep_margin,
            "label_horizon": sorted({s.get("label_horizon", 0) for s in settings}), **report}
    for kind, model in models.items():
        base = os.path.join(a.out_dir, f"action-{kind}")
        if not a.use_val:
            ctrl = ActionController(model, window=window, block=block, interval=settings[0]["segment"],
                                    multipliers=multipliers, relative=a.relative)
            ctrl.save(base + ".pt", kind, extra={"accuracy": report["results"][kind]["accuracy"]})
        with open(base + ".json", "w") as f:
            json.dump({**info, "model": kind, "scores": report["results"][kind],
                       "params": sum(p.numel() for p in model.parameters())}, f, indent=1)
    with open(os.path.join(a.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0
