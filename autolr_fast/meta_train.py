"""``python -m autolr_fast meta-train``: meta-train MLR-SNet online on MNIST-1D (CNN, CPU).

Runs, for each seed, the same model, data order and optimizer (SGD, momentum 0.9, weight
decay 5e-4, batch 100, 500 training samples held out for validation) with

* ``meta``: AutoLR with online meta-training from a fresh controller (``gamma="auto"``);
* ``cosine``: cosine annealing from 0.1;  ``constant``: 0.1 throughout;
* ``pretrained``: the controller learned by seed 0's meta run, frozen, plug-and-play.

Writes ``record.json`` (per-epoch train/test loss and accuracy, per-step rates), ``summary.md``
and ``meta_train.png``; ``--ship`` stores seed 0's controller as the package's
``load_pretrained("mnist1d-cnn")``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm import tqdm

from .controller import MLRSNet
from .meta import MetaConfig
from .run_report import markdown_table, plot_runs, summarize
from .pretrained import PRETRAINED_DIR, load_controller, save_controller
from .scheduler import AutoLR
from .tasks import get_task
from .training import Schedule, train

DEFAULTS = {"epochs": 100, "seeds": 3, "interval": 10, "lr": 0.1, "batch_size": 100, "val_size": 500}
QUICK = {"epochs": 3, "seeds": 1, "interval": 5}


def _sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def make_schedules(args, learned_path: str | None) -> list[Schedule]:
    def meta(model, task, steps, val):
        torch.manual_seed(1234)  # the controller's initial weights: the same for every seed
        opt = _sgd(model, args.lr)
        cfg = MetaConfig(model, val, task.loss_fn, interval=args.interval)
        return opt, AutoLR(opt, MLRSNet(), gamma="auto", num_classes=task.num_classes, meta=cfg)

    def cosine(model, task, steps, val):
        opt = _sgd(model, args.lr)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def constant(model, task, steps, val):
        return _sgd(model, args.lr), None

    def pretrained(model, task, steps, val):
        opt = _sgd(model, args.lr)
        return opt, AutoLR(opt, load_controller(learned_path))

    out = [Schedule("meta", meta, needs_validation=True), Schedule("cosine", cosine), Schedule("constant", constant)]
    if learned_path:
        out.append(Schedule("pretrained", pretrained))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autolr_fast meta-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--interval", type=int, help="a meta-step every N steps")
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="rate of the cosine/constant baselines")
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--val-size", type=int, default=DEFAULTS["val_size"])
    ap.add_argument("--out", default="results/meta_train")
    ap.add_argument("--quick", action="store_true", help=f"a short run: {QUICK}")
    ap.add_argument("--ship", action="store_true", help="store seed 0's controller in the package (mnist1d-cnn)")
    args = ap.parse_args(argv)
    base = {**DEFAULTS, **(QUICK if args.quick else {})}
    for k in ("epochs", "seeds", "interval"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    task = get_task("mnist1d-cnn")
    learned = os.path.join(args.out, "controller_seed0.pt")
    records = []
    total = args.seeds * 4 * args.epochs
    with tqdm(total=total, desc="meta-train", unit="epoch") as bar:
        for seed in range(args.seeds):
            for s in make_schedules(args, None):
                start = time.perf_counter()
                result, model, autolr = train(task, s, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                                              val_size=args.val_size, progress=bar.update)
                result.extra["wall_s"] = time.perf_counter() - start
                if s.name == "meta":
                    result.extra["meta_steps"] = autolr.meta.meta_steps
                    path = os.path.join(args.out, f"controller_seed{seed}.pt")
                    save_controller(autolr.controller, path, gamma=float(autolr.gamma),
                                    info={"task": "mnist1d-cnn", "seed": seed, "epochs": args.epochs,
                                          "interval": args.interval, "command": "python -m autolr_fast meta-train --ship"})
                records.append(result.to_json())
            # plug-and-play: seed 0's learned controller, frozen, on this seed
            (pre,) = [s for s in make_schedules(args, learned) if s.name == "pretrained"]
            result, _, _ = train(task, pre, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                                 val_size=args.val_size, progress=bar.update)
            records.append(result.to_json())
    summary = summarize(records)
    with open(os.path.join(args.out, "record.json"), "w") as f:
        json.dump({"settings": vars(args), "summary": summary, "runs": records}, f)
    md = markdown_table(summary, f"MNIST-1D CNN, {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, wd 5e-4, {args.seeds} seed(s); command: `python -m autolr_fast meta-train`")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md)
    plot_runs(records, os.path.join(args.out, "meta_train.png"), "MNIST-1D CNN: online meta-trained MLR-SNet vs cosine vs constant")
    print(md)
    if args.ship:
        os.makedirs(PRETRAINED_DIR, exist_ok=True)
        ctrl = load_controller(learned)
        save_controller(ctrl, PRETRAINED_DIR / "mnist1d-cnn.pt", gamma=ctrl.default_gamma, info=ctrl.info)
        print(f"shipped {PRETRAINED_DIR / 'mnist1d-cnn.pt'}")
    return 0
