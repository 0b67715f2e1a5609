"""``python -m autolr_fast find-lr``: the learning-rate range test (:func:`autolr_fast.find_lr`)
on one of the harness's tasks, optionally mid-training; writes a JSON record and a PNG."""

from __future__ import annotations

import argparse
import json
from itertools import islice

import torch

from autolr_fast import find_lr

from .baselines import make_optimizer as make_task_optimizer
from .compare import task_settings
from .out_paths import file_problem
from .tasks import available_tasks, get_task
from .training import Schedule, run_steps


def make_optimizer(name: str, params, lr: float = 1e-3) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: use sgd or adam")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autolr_fast find-lr", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="mnist1d-cnn", choices=available_tasks())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "task"],
                   help="sgd (momentum 0.9), adam, or task: the task's default optimizer, as compare runs it")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 (task: the compare batch size)")
    p.add_argument("--around-default", action="store_true",
                   help="with --optimizer task: rates from the task's default lr / 10 to x 10 (with --num 5: "
                        "compare's cosine grid)")
    p.add_argument("--horizons", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--unit", default="steps", choices=["steps", "epochs"])
    p.add_argument("--start-lr", type=float, default=1e-6)
    p.add_argument("--end-lr", type=float, default=100.0)
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--diverge-factor", type=float, default=1.1)
    p.add_argument("--smoothing", type=int, default=5)
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="train this many steps at --pretrain-lr first (mid-training test)")
    p.add_argument("--pretrain-lr", type=float, default=0.01)
    p.add_argument("--plot", default="lr_finder.png", help="the PNG file to write (default ./lr_finder.png)")
    p.add_argument("--out", default="lr_finder.json", help="the JSON file to write (a file, not a folder; "
                   "default ./lr_finder.json)")
    p.add_argument("--quick", action="store_true", help="few rates, short horizons (a smoke run)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.num = min(args.num, 12)
        args.horizons = [h for h in args.horizons if h <= 4] or [1]
        args.start_lr, args.end_lr = max(args.start_lr, 1e-4), min(args.end_lr, 10.0)
    bad = [f"--num {args.num} (needs >= 2)"] if args.num < 2 else []
    bad += [f"--horizons {h} (needs >= 1)" for h in args.horizons if h < 1]
    bad += [f"--{k.replace('_', '-')} {v} (needs >= {low})" for k, v, low in
            (("batch_size", args.batch_size, 1), ("pretrain_steps", args.pretrain_steps, 0))
            if v is not None and v < low]
    if not 0 < args.start_lr < args.end_lr:
        bad.append(f"--start-lr {args.start_lr:g} / --end-lr {args.end_lr:g} (needs 0 < start < end)")
    if bad:
        raise SystemExit(f"find-lr: {'; '.join(bad)}")
    problems = [file_problem(f, flag, name) for f, flag, name in
                ((args.out, "--out", "lr_finder.json"), (args.plot, "--plot", "lr_finder.png")) if f]
    if any(problems):
        raise SystemExit("find-lr: " + "; ".join(q for q in problems if q))
    if args.around_default and args.optimizer != "task":
        raise SystemExit("--around-default needs --optimizer task (the default lr is the task's)")
    torch.manual_seed(args.seed)
    task = get_task(args.task, seed=args.seed)
    model = task.make_model()
    if args.optimizer == "task":
        opt = make_task_optimizer(model, task.optim, args.pretrain_lr)
        if args.batch_size is None:
            args.batch_size = task_settings(args.task)[1]
        if args.around_default:
            args.start_lr, args.end_lr = task.optim.lr / 10, task.optim.lr * 10
    else:
        opt = make_optimizer(args.optimizer, model.parameters(), args.pretrain_lr)
    if args.batch_size is None:
        args.batch_size = 64
    pretrain = islice(task.batches(args.batch_size, seed=args.seed + 1000), args.pretrain_steps)
    run_steps(model, Schedule(opt), task.loss_fn, pretrain)
    if args.unit == "steps":
        batches = task.batches(args.batch_size, seed=args.seed)
    else:
        batches = list(task.batches(args.batch_size, seed=args.seed, epochs=1))
    res = find_lr(model, opt, task.loss_fn, batches, start_lr=args.start_lr, end_lr=args.end_lr, num=args.num,
                  horizons=args.horizons, unit=args.unit, diverge_factor=args.diverge_factor,
                  smoothing=args.smoothing, plot=args.plot)
    out = res.to_dict()
    out["settings"].update({"task": args.task, "seed": args.seed, "optimizer": args.optimizer,
                            "batch_size": args.batch_size, "pretrain_steps": args.pretrain_steps})
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(res.table())
    print(f"\nsuggested rate: {res.suggestion:.4g}   (plot: {args.plot}, data: {args.out})")
    if args.optimizer == "task":
        print(f"{args.task} seed {args.seed}: suggestion / default lr {task.optim.lr:g}: "
              + ", ".join(f"horizon {h}: x{res.suggestions[h] / task.optim.lr:.3g}" for h in res.horizons))
    return 0
