"""``python -m autolr_fast demo``: a small CNN on MNIST-1D with AutoLR's defaults and with cosine annealing.

Both runs use the same model, data order and optimizer: SGD, lr 0.1, momentum 0.9, weight decay
5e-4. The AutoLR run is what the README recommends, ``AutoLR(opt, load_pretrained("default"),
total_steps=T)``: no gamma, so the scale is anchored on the optimizer's lr (0.1) and the
controller moves the rate relative to it under the envelope over the run (a warm-up over its
first 5 %, the peak held, then a linear decay to 0 over the last 20 %).
Cosine annealing goes from the same 0.1 to 0 over the same steps. Several seeds (3 by default);
prints a table (final test accuracy, mean ± std) and writes ``demo.png`` (rates, test accuracy,
training loss) and ``demo.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from tqdm import tqdm

from autolr_fast import load_pretrained

from .report import plot_runs, summarize, summary_table
from .tasks import get_task
from .training import Method, RunSpec, Schedule, autolr_schedule, sgd, torch_schedule, train

#: The rate both runs start from: the usual rate of SGD with momentum 0.9 on this task.
DEMO_LR = 0.1
CONTROLLER = "default"
AUTOLR_NAME = f'AutoLR(load_pretrained("{CONTROLLER}"), total_steps)'
COSINE_NAME = f"cosine from {DEMO_LR:g}"


def autolr_defaults(spec: RunSpec) -> Schedule:
    return autolr_schedule(sgd(spec.model, DEMO_LR), load_pretrained(CONTROLLER), total_steps=spec.total_steps)


def cosine(spec: RunSpec) -> Schedule:
    opt = sgd(spec.model, DEMO_LR)
    return torch_schedule(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.total_steps))


RUNS = (Method(AUTOLR_NAME, autolr_defaults, "learned"), Method(COSINE_NAME, cosine))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autolr_fast demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 epochs, 1 seed")
    ap.add_argument("--out", default="results/demo")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.seeds < 1:
        ap.error(f"--epochs and --seeds must be >= 1, got {args.epochs} and {args.seeds}")
    epochs, seeds = (3, 1) if args.quick else (args.epochs, args.seeds)
    torch.set_num_threads(1)  # these models are too small to gain from more; extra threads only contend
    try:
        load_pretrained(CONTROLLER)
    except KeyError as exc:
        raise SystemExit(f"{exc}; train it with `python -m autolr_fast meta-train --family --ship`") from None
    task = get_task("mnist1d-cnn")
    os.makedirs(args.out, exist_ok=True)
    runs = []
    with tqdm(total=len(RUNS) * seeds * epochs, desc="demo", unit="epoch") as bar:
        for seed in range(seeds):
            for method in RUNS:
                runs.append(train(task, method, epochs=epochs, seed=seed, lr=DEMO_LR, progress=bar.update))
    summary = {m.name: summarize([r.record() for r in runs if r.name == m.name]) for m in RUNS}
    print(summary_table(summary, f"MNIST-1D CNN, {epochs} epochs, SGD lr {DEMO_LR:g} momentum 0.9, "
                                 f"{seeds} seed(s)"))
    records = [run.to_json() for run in runs]
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump({"summary": summary, "runs": records}, f)
    png = plot_runs(records, os.path.join(args.out, "demo.png"), "MNIST-1D CNN: AutoLR with defaults vs cosine")
    print(f"wrote {png} and demo.json")
    return 0
