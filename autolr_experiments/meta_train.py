"""``python -m autolr_fast meta-train``: meta-train MLR-SNet online on MNIST-1D (CNN, CPU).

Runs, for each seed, the same model, data order and optimizer (SGD, momentum 0.9, weight
decay 5e-4, batch 100, 500 training samples held out for validation) with

* ``meta``: AutoLR with online meta-training from a fresh controller (``gamma="auto"``);
* ``cosine``: cosine annealing from 0.1;  ``constant``: 0.1 throughout;
* ``pretrained``: the controller learned by seed 0's meta run, frozen, plug-and-play.

Writes ``record.json`` (per-epoch train/test loss and accuracy, per-step rates), ``summary.md``
and ``meta_train.png`` under ``--out``, and every seed's learned controller
(``controller_seed<N>.pt``). ``--ship [PATH]`` also writes seed 0's controller in the format of
the package's ``load_pretrained("mnist1d-cnn")`` to PATH (default ``OUT/mnist1d-cnn.pt``); copy
it into ``autolr_fast/controllers/weights/`` of a source checkout to ship it.

``--family`` meta-trains the shipped ``load_pretrained("default")`` across tasks, optimizers
and run lengths (see ``FAMILY_DOC``); ``--ablation`` compares it on held-out tasks with the
controller shipped before it, an untrained MLR-SNet and cosine annealing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import Tensor
from tqdm import tqdm

from autolr_fast import MetaConfig, MLRSNet, load_controller, load_pretrained, save_controller
from autolr_fast.ops import dispatch
from autolr_fast.rate_scale import SETTLE_STEPS, envelope

from .baselines import SGD_DEFAULT_LR, get_method
from .progress_input import (
    ProgressMLRSNet,
    is_progress_file,
    load_progress_controller,
    progress_response,
    save_progress_controller,
)
from .report import mean_std, plot_runs, save_figure, summarize, summary_table
from .tasks import available_tasks, dataset_of, get_task, shares_data, task_optimizer
from .training import Method, RunSpec, Schedule, autolr_schedule, envelope_schedule, sgd, torch_schedule, train

DEFAULTS = {"epochs": 100, "seeds": 3, "interval": 10, "lr": 0.1, "batch_size": 100, "val_size": 500}
QUICK = {"epochs": 3, "seeds": 1, "interval": 5}
#: Where a source checkout keeps the shipped controllers (``--ship`` says to copy the file there).
WEIGHTS_IN_CHECKOUT = Path("autolr_fast") / "controllers" / "weights" / "mnist1d-cnn.pt"
CONTROLLER_SEED = 1234  # the meta run's initial controller weights: the same for every seed


def meta_method(interval: int) -> Method:
    """AutoLR with online meta-training of a fresh MLR-SNet (``gamma="auto"``) on held-out batches."""

    def build(spec: RunSpec) -> Schedule:
        torch.manual_seed(CONTROLLER_SEED)
        cfg = MetaConfig(spec.model, spec.val_data, spec.task.loss_fn, interval=interval)
        return autolr_schedule(sgd(spec.model, spec.lr), MLRSNet(), gamma="auto", num_classes=spec.task.num_classes,
                               meta=cfg)

    return Method("meta", build, "learned")


def pretrained_method(path: str) -> Method:
    """The controller saved at ``path``, frozen, with the gamma it carries."""
    return Method("pretrained", lambda spec: autolr_schedule(sgd(spec.model, spec.lr), load_controller(path)),
                  "learned")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m autolr_fast meta-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Two other modes have options of their own: meta-train --family --help "
                                        "(the shipped default controller: --family, --warmup, --exclude-task, ...) "
                                        "and meta-train --ablation --help.")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--interval", type=int, help="a meta-step every N steps")
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="rate of the cosine/constant baselines")
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--val-size", type=int, default=DEFAULTS["val_size"])
    ap.add_argument("--out", default="results/meta_train")
    ap.add_argument("--quick", action="store_true", help=f"a short run: {QUICK}")
    ap.add_argument("--ship", nargs="?", const="", default=None, metavar="PATH",
                    help="write seed 0's controller as a shippable mnist1d-cnn.pt to PATH (default OUT/mnist1d-cnn.pt)")
    args = ap.parse_args(argv)
    base = {**DEFAULTS, **(QUICK if args.quick else {})}
    for k in ("epochs", "seeds", "interval"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
        elif getattr(args, k) < 1:
            ap.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    if args.ship == "":
        args.ship = os.path.join(args.out, "mnist1d-cnn.pt")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--family" in argv:
        return family_main(argv)
    if "--ablation" in argv:
        return ablation_main(argv)
    args = _parse(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    task = get_task("mnist1d-cnn")
    learned = os.path.join(args.out, "controller_seed0.pt")
    methods = [meta_method(args.interval), get_method("cosine"), get_method("constant")]
    settings = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "val_size": args.val_size}
    runs = []
    with tqdm(total=args.seeds * (len(methods) + 1) * args.epochs, desc="meta-train", unit="epoch") as bar:
        for seed in range(args.seeds):
            for method in methods:
                run = train(task, method, seed=seed, progress=bar.update, **settings)
                if method.name == "meta":
                    autolr = run.schedule.autolr
                    run.extra["meta_steps"] = autolr.meta.meta_steps
                    save_controller(autolr.controller, os.path.join(args.out, f"controller_seed{seed}.pt"),
                                    gamma=float(autolr.gamma),
                                    info={"task": "mnist1d-cnn", "seed": seed, "epochs": args.epochs,
                                          "interval": args.interval,
                                          "command": "python -m autolr_fast meta-train --ship"})
                run.extra["wall_s"] = run.wall_time_s
                runs.append(run)
            # plug-and-play: seed 0's learned controller, frozen, on this seed
            runs.append(train(task, pretrained_method(learned), seed=seed, progress=bar.update, **settings))
    names = list(dict.fromkeys(run.name for run in runs))
    summary = {name: summarize([run.record() for run in runs if run.name == name]) for name in names}
    records = [run.to_json() for run in runs]
    with open(os.path.join(args.out, "record.json"), "w") as f:
        json.dump({"settings": vars(args), "summary": summary, "runs": records}, f)
    md = summary_table(summary, f"MNIST-1D CNN, {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, "
                                f"wd 5e-4, {args.seeds} seed(s); command: `python -m autolr_fast meta-train`")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md)
    plot_runs(records, os.path.join(args.out, "meta_train.png"),
              "MNIST-1D CNN: online meta-trained MLR-SNet vs cosine vs constant")
    print(md)
    if args.ship is not None:
        ship(learned, args.ship)
    return 0


def ship(learned: str, path: str) -> None:
    """Write the controller at ``learned`` as a shippable file at ``path`` and say where it goes."""
    ctrl = load_controller(learned)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_controller(ctrl, path, gamma=ctrl.default_gamma, info=ctrl.info)
    print(f"wrote {path}; to ship it as load_pretrained('mnist1d-cnn'), copy it into a source checkout and "
          f"reinstall: cp {path} {WEIGHTS_IN_CHECKOUT}")


# ================================================================================================
# Family mode: one controller meta-trained across tasks, optimizers and run lengths
# ================================================================================================
@dataclass(frozen=True)
class FamilyRun:
    """One run of the family: a task trained with one optimizer at its usual rate for some epochs."""

    task: str
    optimizer: str  # "sgdm" (momentum 0.9, wd 5e-4), "adam", "adamw" (wd 0.01)
    lr: float
    epochs: int
    batch_size: int
    weight_decay: float | None = None  # None: the optimizer's usual value above

    @property
    def label(self) -> str:
        return f"{self.task} {self.optimizer} {self.lr:g} x{self.epochs}ep"


#: The training family. It holds no task that ``compare`` keeps as held out (see
#: ``held_out_tasks``): regression is learned on regress-exp/-log, never on regress-sin.
FAMILY = (
    FamilyRun("mnist1d-mlp", "sgdm", 0.1, 20, 100),
    FamilyRun("regress-exp", "adam", 1e-3, 30, 32),
    FamilyRun("mnist1d-cnn", "adamw", 3e-3, 15, 100),
    FamilyRun("regress-log", "sgdm", 0.05, 20, 32),
    FamilyRun("mnist1d-cnn", "sgdm", 0.1, 40, 100),
    FamilyRun("mnist1d-mlp", "adam", 1e-3, 40, 100),
    FamilyRun("regress-exp", "sgdm", 0.1, 10, 32),
    FamilyRun("mnist1d-cnn", "adam", 1e-3, 10, 100),
)
FAMILY_DOC = """Meta-train ONE MLR-SNet online across a family of tasks, optimizers and run lengths.

Every run of ``FAMILY`` (twice by default, in order) trains a fresh model with
``AutoLR(opt, controller, total_steps=T, warmup_steps=0, envelope="cosine", meta=MetaConfig(...))``: the default scale
(no gamma, anchored on the optimizer's lr) as users run it, under the plain cosine envelope (the
one the shipped ``default.pt`` was trained under), while the library's exact one-step
look-ahead hypergradient moves theta (``--horizon k``: the validation loss k steps later
instead). Theta and the meta-optimizer carry over from run to run; the controller's recurrent
state starts afresh. Then a check on the family's settings with new seeds: the frozen result and
an untrained MLR-SNet, both with AutoLR's defaults but the warm-up, against cosine at the same lr.

Writes ``default.pt`` (the controller, its training tasks in ``info["tasks"]``), ``default.json``,
``record.json``, ``summary.md`` and ``family_p.png`` (the rate relative to lr x envelope, per run)
under ``--out``; ``--ship`` copies ``default.pt`` and ``default.json`` into the package.
"""
#: Tasks kept out of the family (``compare``'s held-out tasks are added at run time); a family
#: that holds one of them is refused.
NEVER_TRAIN_ON = ("digits-mlp", "regress-sin", "markov-gru", "digits-bncnn", "diabetes-mlp", "friedman-mlp")
FAMILY_DEFAULTS = {"interval": 10, "meta_lr": 1e-3, "passes": 2, "horizon": 10, "check_seeds": 2}
FAMILY_QUICK = {"interval": 5, "horizon": 5, "passes": 1, "check_seeds": 1, "epochs": 1}
FAMILY_OUT = "results/meta_train_family"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "autolr_fast" / "controllers" / "weights"


def held_out_tasks() -> set[str]:
    """Tasks the family must not train on: ours plus any ``compare`` declares as held out."""
    from . import compare  # imported here: compare imports much of the harness

    return set(NEVER_TRAIN_ON) | set(getattr(compare, "NEW_TASKS", ())) | set(getattr(compare, "HELD_OUT_TASKS", ()))


def make_optimizer(run: FamilyRun, model: torch.nn.Module) -> torch.optim.Optimizer:
    wd = run.weight_decay
    if run.optimizer in ("sgdm", "sgd"):  # the harness's SGD always has momentum 0.9
        return sgd(model, run.lr) if wd is None else torch.optim.SGD(model.parameters(), lr=run.lr, momentum=0.9,
                                                                     weight_decay=wd)
    if run.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=run.lr, weight_decay=wd or 0.0)
    if run.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.01 if wd is None else wd)
    raise ValueError(f"unknown optimizer {run.optimizer!r}")


def val_size_for(task) -> int:
    """A tenth of the training set is held out as the meta-learner's validation data."""
    return len(task.x_train) // 10


def cosine_method(run: FamilyRun) -> Method:
    """Cosine annealing to 0 over all steps at the run's rate (what AutoLR's envelope also does)."""
    def build(spec: RunSpec) -> Schedule:
        opt = make_optimizer(run, spec.model)
        return torch_schedule(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.total_steps))

    return Method("cosine", build)


def cosine_warmup_method(run: FamilyRun) -> Method:
    """AutoLR's cosine envelope alone (a 5 % linear warm-up, then cosine to 0) at the run's rate."""
    return Method("cosine-warmup", lambda spec: envelope_schedule(make_optimizer(run, spec.model), spec.total_steps))


def normalised_by_first_loss(step: Callable[[Tensor], None]) -> Callable[[Tensor], None]:
    """``step`` fed ``loss / L0``, with ``L0`` the run's first finite positive loss (losses before
    it are passed unchanged): the controller sees the loss relative to where the run started,
    the same on every loss scale (the action controller's features do the same)."""
    first: list[Tensor] = []

    def call(loss: Tensor) -> None:
        value = loss.detach()
        if not first and bool(torch.isfinite(value)) and float(value) > 0:
            first.append(value.clone())
        step(loss / first[0] if first else loss)

    return call


def autolr_method(name: str, run: FamilyRun, controller: MLRSNet, meta: Callable | None = None,
                  normalise_loss: bool = False, warmup_steps: int | None = 0) -> Method:
    """AutoLR as a user runs it (no gamma: the lr anchor; the envelope over the run), except that
    the envelope is the cosine one (``envelope="cosine"``), by default without a warm-up
    (``warmup_steps=0``): the one the shipped ``default.pt`` was meta-trained under, so that the
    recipe reproduces it (``None``: AutoLR's default warm-up before the cosine);
    ``meta(spec) -> MetaConfig`` meta-trains ``controller`` during the run;
    ``normalise_loss``: the controller reads the loss divided by the run's first loss."""
    def build(spec: RunSpec) -> Schedule:
        # a new run: theta carries over, the recurrent state does not
        if isinstance(controller, ProgressMLRSNet):
            controller.start_run(spec.total_steps)
        else:
            controller.reset()
        opt = make_optimizer(run, spec.model)
        cfg = None if meta is None else meta(spec)
        schedule = autolr_schedule(opt, controller, total_steps=spec.total_steps, warmup_steps=warmup_steps,
                                   envelope="cosine", meta=cfg)
        if normalise_loss:
            schedule.before_step = normalised_by_first_loss(schedule.before_step)
        return schedule

    return Method(name, build, "learned")


class DelayedMeta:
    """The validation loss ``horizon`` steps later instead of one look-ahead step.

    Every ``interval`` steps it keeps the controller's input and state and the direction ``d_t``
    the optimizer actually took (the parameter change divided by the rate); ``horizon`` steps
    later it takes ``dL_val(w_{t+h})/dp_t ~ -gamma_t <grad L_val(w_{t+h}), d_t>`` (first order:
    the curvature between t and t+h is neglected) and moves theta with the shared meta-optimizer.
    A rate that overshoots shows up as a validation gradient turned against ``d_t`` a few steps
    later, which the one-step look-ahead cannot see.
    """

    def __init__(self, sched, spec: RunSpec, interval: int, horizon: int, meta_opt: torch.optim.Optimizer):
        self.sched, self.model, self.loss_fn = sched, spec.model, spec.task.loss_fn
        self.val = list(spec.val_data)
        self.interval, self.horizon, self.meta_opt = interval, horizon, meta_opt
        self.pending: dict | None = None
        self.meta_steps = 0
        self._val_index = 0

    def before_step(self, loss: Tensor) -> None:
        ctrl = self.sched.controller
        record = self.pending is None and self.sched.step_count % self.interval == 0 and self.sched.step_count > 0
        if record:
            x = loss.detach().clamp_min(0.0)
            if isinstance(ctrl, ProgressMLRSNet):
                x = ctrl.input_of(x)  # before the step: the progress it reads at this step
            self.pending = {"x": x, "h": ctrl.h.clone(), "c": ctrl.c.clone(),
                            "w": [q.detach().clone() for q in self.model.parameters()], "age": 0}
        self.sched.step(loss)
        if record:
            self.pending["gamma"] = self.sched.gamma.clone()
            self.pending["alpha"] = self.sched.rate.clone()

    def after_step(self) -> None:
        p = self.pending
        if p is None:
            return
        if "d" not in p:  # the step just taken: keep its direction
            alpha = float(p["alpha"])
            if not (math.isfinite(alpha) and alpha > 0):
                self.pending = None
                return
            p["d"] = [(w0 - q.detach()) / alpha for w0, q in zip(p.pop("w"), self.model.parameters())]
        p["age"] += 1
        if p["age"] >= self.horizon:
            self._meta_step(p)
            self.pending = None

    def _meta_step(self, p: dict) -> None:
        x, y = self.val[self._val_index % len(self.val)]
        self._val_index += 1
        params = dict(self.model.named_parameters())
        tensors = {**{n: q.detach().requires_grad_(True) for n, q in params.items()},
                   **{n: b.clone() for n, b in self.model.named_buffers()}}
        leaves = [tensors[n] for n in params]
        val_loss = self.loss_fn(torch.func.functional_call(self.model, tensors, (x,)), y)
        grads = torch.autograd.grad(val_loss, leaves, allow_unused=True)
        dot = sum((g * d).sum() for g, d in zip(grads, p["d"]) if g is not None)
        grad_p = -p["gamma"] * dot
        if not bool(torch.isfinite(grad_p)):
            return
        ctrl = self.sched.controller
        if isinstance(ctrl, ProgressMLRSNet):
            # rate = gamma * p / p*: d rate / d p = gamma / p*, with the anchor p* held fixed
            per_p = p["gamma"] / ctrl.p_star
            if not (bool(torch.isfinite(p["x"]).all()) and bool(torch.isfinite(per_p)) and float(ctrl.p_star) > 0):
                return
            weights = ctrl.weights()
            with torch.enable_grad():
                out = ctrl.output(p["x"], p["h"], p["c"])[0]
            theta_grads = torch.autograd.grad(out, weights, grad_outputs=-dot.detach() * per_p)
        else:
            weights = ctrl.flat_weights()
            theta_grads = dispatch.mlrsnet_param_grads(p["x"], p["h"], p["c"], [w.detach() for w in weights], grad_p)
        for q, g in zip(weights, theta_grads):
            q.grad = g.to(q.dtype)
        self.meta_opt.step()
        self.meta_opt.zero_grad(set_to_none=True)
        self.meta_steps += 1


def delayed_method(run: FamilyRun, controller: MLRSNet, interval: int, horizon: int,
                   meta_opt: torch.optim.Optimizer, normalise_loss: bool = False,
                   warmup_steps: int | None = 0) -> Method:
    """:func:`autolr_method` whose controller learns from the validation loss ``horizon`` steps later."""
    plain = autolr_method("meta", run, controller, warmup_steps=warmup_steps)

    def build(spec: RunSpec) -> Schedule:
        schedule = plain.build(spec)
        delayed = DelayedMeta(schedule.autolr, spec, interval, horizon, meta_opt)
        before = normalised_by_first_loss(delayed.before_step) if normalise_loss else delayed.before_step
        schedule.before_step, schedule.after_step = before, delayed.after_step
        schedule.info["delayed"] = delayed
        return schedule

    return Method("meta", build, "learned")


def family_record(run: FamilyRun, pass_index: int, result) -> dict:
    """What one family run did: its score and ``p_t / p*``, the rate relative to ``lr`` times the
    run's envelope (1 = exactly the envelope at the user's lr; above 1 the controller raises it)."""
    autolr = result.schedule.autolr
    delayed = result.schedule.info.get("delayed")
    meta_steps = delayed.meta_steps if delayed is not None else autolr.meta.meta_steps
    total = autolr.scale.total_steps  # the envelope's length, also for a run that ended early
    warmup = autolr.scale.warmup_steps
    rel = []
    for t, r in enumerate(result.rates):
        env = envelope(t, total, warmup)
        rel.append(r / (run.lr * env) if env > 1e-3 else None)
    return {**asdict(run), "label": run.label, "pass": pass_index, "seed": result.seed, "status": result.status,
            "p_star": (float(autolr.controller.p_star) if isinstance(autolr.controller, ProgressMLRSNet)
                       else run.lr / float(autolr.scale.peak)), "meta_steps": meta_steps,
            "final_metric": result.metrics()["final_metric"], "p_rel": rel}


def meta_train_family(family: Sequence[FamilyRun], *, interval: int, horizon: int, meta_lr: float, passes: int,
                      progress: Callable[[], None] | None = None, normalise_loss: bool = False,
                      warmup_steps: int | None = 0,
                      progress_input: bool = False,
                      controller_seed: int = CONTROLLER_SEED) -> tuple[MLRSNet | ProgressMLRSNet, list[dict]]:
    """One MLR-SNet meta-trained online through ``passes`` passes over ``family``, in order: theta
    and the meta-optimizer's state carry over from run to run, the recurrent state is reset.
    ``progress_input``: a :class:`ProgressMLRSNet` (it also reads the fraction of the run done;
    needs ``horizon > 0``); ``controller_seed``: the initial weights' seed."""
    if progress_input and not horizon:
        raise ValueError("progress_input needs horizon > 0: the library's one-step look-ahead meta-trains an MLRSNet")
    ctrl = fresh_controller(progress_input, controller_seed)
    # one meta-optimizer for all runs: its moment estimates carry the hypergradient's scale along
    meta_opt = torch.optim.Adam(ctrl.parameters(), lr=meta_lr, weight_decay=1e-4)

    def config(spec: RunSpec) -> MetaConfig:
        return MetaConfig(spec.model, spec.val_data, spec.task.loss_fn, interval=interval,
                          optimizer=lambda params: meta_opt)

    records = []
    for k in range(passes):
        for i, run in enumerate(family):
            task = get_task(run.task)
            if horizon:
                method = delayed_method(run, ctrl, interval, horizon, meta_opt, normalise_loss=normalise_loss,
                                        warmup_steps=warmup_steps)
            else:
                method = autolr_method("meta", run, ctrl, meta=config, normalise_loss=normalise_loss,
                                       warmup_steps=warmup_steps)
            result = train(task, method, epochs=run.epochs, batch_size=run.batch_size, seed=100 * k + i,
                           val_size=val_size_for(task), progress=progress)
            records.append(family_record(run, k, result))
    ctrl.reset()
    return ctrl, records


def evaluate(settings: Sequence[FamilyRun], methods: dict[str, Callable[[FamilyRun], Method]], seeds: Sequence[int],
             progress: Callable[[], None] | None = None) -> list[dict]:
    """Every method on every setting and seed (same model, data order and optimizer); one row each."""
    rows = []
    for run in settings:
        task = get_task(run.task)
        for seed in seeds:
            for name, factory in methods.items():
                result = train(task, factory(run), epochs=run.epochs, batch_size=run.batch_size, seed=seed,
                               progress=progress)
                rows.append({"setting": run.label, "task": run.task, "optimizer": run.optimizer, "lr": run.lr,
                             "epochs": run.epochs, "method": name, "seed": seed, "status": result.status,
                             "classification": task.is_classification,
                             "final_metric": result.metrics()["final_metric"],
                             "rate_mean_rel": sum(result.rates) / max(len(result.rates), 1) / run.lr})
    return rows


def frozen(name: str, controller: MLRSNet, normalise_loss: bool = False,
           warmup_steps: int | None = 0) -> Callable[[FamilyRun], Method]:
    """A copy of ``controller``, frozen, with AutoLR's defaults (the envelope as ``autolr_method``), for every run."""
    return lambda run: autolr_method(name, run, copy.deepcopy(controller), normalise_loss=normalise_loss,
                                     warmup_steps=warmup_steps)


def reads_normalised_loss(controller: MLRSNet) -> bool:
    """Whether ``controller`` was meta-trained on losses divided by the first (its card says)."""
    return bool(getattr(controller, "info", {}).get("settings", {}).get("normalise_loss", False))


def fresh_controller(progress_input: bool = False, seed: int = CONTROLLER_SEED) -> MLRSNet | ProgressMLRSNet:
    """The untrained controller every recipe starts from (seed ``CONTROLLER_SEED`` unless given)."""
    torch.manual_seed(seed)
    return ProgressMLRSNet() if progress_input else MLRSNet()


def score_table(rows: list[dict], reference: str = "cosine") -> tuple[str, dict]:
    """A markdown table, setting x method, and per method the score against ``reference``.

    Classification: mean ± std accuracy over seeds, compared by the mean (mean gain in points).
    Regression: the median test MSE over seeds (mean in brackets), compared by the median (the
    median over settings of the % lower MSE), because one collapsed or diverged seed would
    otherwise decide the comparison; such runs are counted instead as ``failed``: diverged, or a
    final MSE above 10x the reference's median on that setting.
    """
    if not rows:
        return "(no runs)\n", {}
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cls = {r["setting"]: r["classification"] for r in rows}
    vals = {(s, m): [r["final_metric"] for r in rows if r["setting"] == s and r["method"] == m]
            for s in settings for m in methods}

    def centre(s: str, m: str) -> float:
        v = vals[s, m]
        return mean_std(v)[0] if cls[s] else statistics.median(v)

    scores: dict[str, dict] = {}
    for m in methods:
        acc, mse, wins, failed, runs = [], [], 0, 0, 0
        for s in settings:
            if not vals[s, m] or not vals[s, reference]:
                continue
            mine, ref = centre(s, m), centre(s, reference)
            runs += len(vals[s, m])
            failed += sum(r["status"] != "ok" for r in rows if r["setting"] == s and r["method"] == m)
            if cls[s]:
                acc.append(100 * (mine - ref))
                wins += mine >= ref
            else:
                failed += sum(math.isfinite(v) and v > 10 * ref for v in vals[s, m])
                mse.append(100 * (ref - mine) / ref if math.isfinite(mine) else -math.inf)
                wins += mine <= ref
        scores[m] = {"wins": wins, "settings": len(settings), "failed": failed, "runs": runs,
                     "acc_pp": sum(acc) / len(acc) if acc else None,
                     # the median over settings: one collapsed setting would decide a mean
                     "mse_pct": statistics.median(mse) if mse else None}

    def fmt_cell(s: str, m: str) -> str:
        if not vals[s, m]:
            return "-"
        mean, std = mean_std(vals[s, m])
        if cls[s]:
            return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
        return f"{statistics.median(vals[s, m]):.3g} ({mean:.3g})"

    def gain(v, unit):
        return "-" if v is None else f"{v:+.2f} {unit}"

    head = "| setting (acc % mean ± std; test MSE median (mean)) | " + " | ".join(methods) + " |"
    lines = [head, "| :--- |" + " ---: |" * len(methods)]
    lines += [f"| {s} | " + " | ".join(fmt_cell(s, m) for m in methods) + " |" for s in settings]
    lines.append(f"| vs {reference}: settings >= it; acc gain (mean); MSE gain (median) | " + " | ".join(
        f"{scores[m]['wins']}/{scores[m]['settings']}; {gain(scores[m]['acc_pp'], 'pp')}, "
        f"{gain(scores[m]['mse_pct'], '%')}" for m in methods) + " |")
    lines.append("| failed runs (diverged, or MSE > 10x the reference's median) | " + " | ".join(
        f"{scores[m]['failed']}/{scores[m]['runs']}" for m in methods) + " |")
    return "\n".join(lines) + "\n", scores


def plot_family(records: list[dict], path: str) -> None:
    """One panel per family run: ``p_t / p*`` over the run (every pass overlaid)."""
    labels = list(dict.fromkeys(r["label"] for r in records))
    cols = min(4, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels):
        for r in (r for r in records if r["label"] == label):
            ax.plot([v if v is not None else math.nan for v in r["p_rel"]], lw=0.8, label=f"pass {r['pass'] + 1}")
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        ax.set(title=label, xlabel="step", ylabel="p_t / p*")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle("family meta-training: the controller's rate relative to lr x cosine envelope")
    save_figure(fig, path)


def _family_parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m autolr_fast meta-train --family", description=FAMILY_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="store_true")
    ap.add_argument("--interval", type=int, help="a meta-step every N steps")
    ap.add_argument("--horizon", type=int, help="0: the library's one-step look-ahead; k > 0: the validation "
                                                "loss k steps after the step (needs k <= interval)")
    ap.add_argument("--meta-lr", type=float, help="the controller's Adam rate")
    ap.add_argument("--passes", type=int, help="passes over the family")
    ap.add_argument("--check-seeds", type=int, help="seeds of the in-family check (frozen controller vs cosine)")
    ap.add_argument("--epochs", type=int, help="every run this many epochs (default: each run's own)")
    ap.add_argument("--lr-spread", type=float, default=None, metavar="F",
                    help="also run every family setting at lr / F and lr x F (a controller that sees mis-set "
                         "rates could learn to correct them; default: the usual rates only)")
    ap.add_argument("--exclude-task", action="append", default=[], metavar="TASK",
                    help="leave the runs on this task's data out of the family (every task sharing it; "
                         "repeatable): the leave-one-task-out controller compare evaluates on that task")
    ap.add_argument("--normalise-loss", action="store_true",
                    help="the controller reads the loss divided by the run's first loss, in training and in "
                         "the checks (recorded in the controller's card; AutoLR itself feeds the raw loss)")
    ap.add_argument("--warmup", action="store_true",
                    help="train and check under AutoLR's default envelope (a 5 %% warm-up, then cosine) instead "
                         "of the plain cosine the shipped default.pt was trained under")
    ap.add_argument("--progress-input", action="store_true",
                    help="meta-train a ProgressMLRSNet (autolr_experiments.progress_input): the controller also "
                         "reads the fraction of the run done; written as OUT/progress.pt (not shippable)")
    ap.add_argument("--controller-seed", type=int, default=CONTROLLER_SEED,
                    help=f"the seed of the controller's initial weights (default {CONTROLLER_SEED}, the shipped "
                         "one's): other seeds measure how much a variant's result owes to its start")
    ap.add_argument("--out", default=FAMILY_OUT)
    ap.add_argument("--quick", action="store_true", help=f"a short run: {FAMILY_QUICK}")
    ap.add_argument("--ship", nargs="?", const=str(WEIGHTS_DIR), default=None, metavar="DIR",
                    help="copy default.pt and default.json into DIR (default: the package's weights folder)")
    args = ap.parse_args(argv)
    base = {**FAMILY_DEFAULTS, **(FAMILY_QUICK if args.quick else {})}
    for k in ("interval", "horizon", "meta_lr", "passes", "check_seeds", "epochs"):
        if getattr(args, k) is None:
            setattr(args, k, base.get(k))
    if args.horizon and args.horizon > args.interval:
        ap.error("--horizon must be <= --interval (one pending meta-step at a time)")
    if args.progress_input and not args.horizon:
        ap.error("--progress-input meta-trains with the validation loss k steps later: it needs --horizon > 0")
    if args.progress_input and args.ship is not None:
        ap.error("--progress-input trains a harness controller, which cannot be shipped: drop --ship")
    return args


def family_main(argv: list[str] | None) -> int:
    args = _family_parse(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    banned = held_out_tasks() & {r.task for r in FAMILY}
    if banned:
        raise SystemExit(f"the family trains on held-out task(s) {sorted(banned)}")
    unknown = sorted(set(args.exclude_task) - {r.task for r in FAMILY})
    if unknown:
        raise SystemExit(f"--exclude-task {unknown}: not in the training family ({sorted({r.task for r in FAMILY})})")
    if args.controller_seed != CONTROLLER_SEED and args.ship is not None:
        raise SystemExit(f"--ship writes the shipped recipe, which starts from seed {CONTROLLER_SEED}: drop "
                         "--controller-seed or --ship")
    if args.exclude_task and args.ship is not None:
        raise SystemExit("--exclude-task trains a leave-one-task-out controller, not the shipped one: drop --ship")
    family = [replace(r, epochs=args.epochs or r.epochs) for r in (FAMILY[:4] if args.quick else FAMILY)
              if not shares_data(r.task, args.exclude_task)]
    if not family:
        raise SystemExit(f"--exclude-task {args.exclude_task} leaves no run in the family")
    if args.lr_spread:
        family = [replace(r, lr=r.lr * f) for r in family for f in (1 / args.lr_spread, 1.0, args.lr_spread)]
    seeds = [1000 + s for s in range(args.check_seeds)]
    epochs = sum(r.epochs for r in family)
    start = time.perf_counter()
    with tqdm(total=epochs * (args.passes + 3 * len(seeds)), desc="meta-train --family", unit="epoch") as bar:
        norm, warmup = args.normalise_loss, (None if args.warmup else 0)
        ctrl, records = meta_train_family(family, interval=args.interval, horizon=args.horizon, meta_lr=args.meta_lr,
                                          passes=args.passes, progress=bar.update, normalise_loss=norm,
                                          warmup_steps=warmup, progress_input=args.progress_input,
                                          controller_seed=args.controller_seed)
        train_s = time.perf_counter() - start
        methods = {"cosine": cosine_method, **({"cosine-warmup": cosine_warmup_method} if args.warmup else {}),
                   "default": frozen("default", ctrl, norm, warmup),
                   "fresh": frozen("fresh", fresh_controller(args.progress_input, args.controller_seed), norm,
                                   warmup)}
        check = evaluate(family, methods, seeds, progress=bar.update)
    table, scores = score_table(check)
    settings = {k: getattr(args, k) for k in ("interval", "horizon", "meta_lr", "passes", "check_seeds", "epochs",
                                               "lr_spread", "normalise_loss", "exclude_task", "warmup",
                                               "progress_input")}
    command = "python -m autolr_fast meta-train " + " ".join(argv)
    stem = "progress" if args.progress_input else "default"
    name = ("default with a progress input" if args.progress_input else "default") + "".join(
        f" without {t}" for t in args.exclude_task)
    info = {"name": name, "command": command, "tasks": sorted({r.task for r in family}),
            "family": [asdict(r) for r in family], "settings": settings, "controller_seed": args.controller_seed,
            "scale": "AutoLR default: lr anchor (no gamma) and total_steps", "train_wall_s": round(train_s, 1),
            "in_family_check": scores}
    if args.progress_input:
        info["progress_response"] = {f"{loss:g}": progress_response(ctrl, loss) for loss in (2.3, 0.5, 0.05)}
    path = os.path.join(args.out, f"{stem}.pt")
    save_family_controller(ctrl, path, info)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(args.out, "record.json"), "w") as f:
        json.dump({"info": info, "family_runs": records, "check": check}, f)
    md = (f"# Family meta-training (`{command}`)\n\n"
          f"Settings: {settings}; training {train_s:.0f} s wall on {torch.get_num_threads()} thread(s).\n\n"
          f"Family runs (in order; p* = the settled output that anchors the scale):\n\n"
          + "\n".join(f"- pass {r['pass'] + 1}: {r['label']}: final {r['final_metric']:.4g}, p* {r['p_star']:.3f}, "
                      f"{r['meta_steps']} meta-steps" for r in records)
          + f"\n\nIn-family check (the family's settings, new seeds {seeds}; frozen controllers with AutoLR's "
            f"defaults vs cosine at the same lr):\n\n{table}")
    if args.progress_input:
        md += ("\nWhat the progress input does alone: the level p_t / p* on a constant loss, at progress "
               "0, 0.25, 0.5, 0.75 and 1 of a 200-step run (1 everywhere: progress is ignored):\n\n"
               + "\n".join(f"- loss {k}: " + ", ".join(f"{v:.3f}" for v in vals)
                            for k, vals in info["progress_response"].items())
               + "\n")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md)
    plot_family(records, os.path.join(args.out, "family_p.png"))
    print(md)
    if args.ship is not None:
        os.makedirs(args.ship, exist_ok=True)
        shutil.copyfile(path, os.path.join(args.ship, "default.pt"))
        shutil.copyfile(os.path.join(args.out, "default.json"), os.path.join(args.ship, "default.json"))
        print(f"shipped default.pt and default.json into {args.ship}")
    return 0


def save_family_controller(ctrl: MLRSNet | ProgressMLRSNet, path: str | os.PathLike, info: dict) -> None:
    if isinstance(ctrl, ProgressMLRSNet):
        save_progress_controller(ctrl, path, info)  # no gamma: it runs on the lr anchor only
        return
    # gamma only serves gamma="controller": the scale that starts SGD-momentum at 0.1 on a loss of ln(10)
    save_controller(ctrl, path, gamma=SGD_DEFAULT_LR / settled_p(ctrl, math.log(10.0)), info=info)


def family_without(task: str, epochs: int | None = None) -> list[FamilyRun]:
    """The training family without the runs on ``task``'s data (every task that shares it, e.g.
    both MNIST-1D models), each ``epochs`` long if given."""
    return [replace(r, epochs=epochs or r.epochs) for r in FAMILY if not shares_data(r.task, [task])]


def leave_one_task_out(task: str, path: str | os.PathLike, *, epochs: int | None = None,
                       progress: Callable[[], None] | None = None, info: dict | None = None) -> str:
    """Meta-train the shipped recipe (``FAMILY`` with ``FAMILY_DEFAULTS``, as ``meta-train
    --family``) without the runs on ``task``'s data and save the controller at ``path``: what
    ``compare`` evaluates on a task whose data the shipped controller was trained on. ``epochs``: every run this long
    (a short check); None: each run's own. ``info``: more entries for the file's card. Same as
    ``meta-train --family --exclude-task TASK``."""
    family = family_without(task, epochs)
    if len(family) == len(FAMILY):
        raise ValueError(f"{task!r} is not in the training family ({sorted({r.task for r in FAMILY})})")
    left_out = sorted({r.task for r in FAMILY} - {r.task for r in family})
    d = FAMILY_DEFAULTS
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as meta-train --family: the same weights on any machine
    try:
        ctrl, _ = meta_train_family(family, interval=d["interval"], horizon=d["horizon"], meta_lr=d["meta_lr"],
                                    passes=d["passes"], progress=progress)
    finally:
        torch.set_num_threads(threads)
    settings = {k: d[k] for k in ("interval", "horizon", "meta_lr", "passes")}
    info = {"name": f"default without {dataset_of(task)} data", "left_out": task, "left_out_tasks": left_out,
            "left_out_data": dataset_of(task), "tasks": sorted({r.task for r in family}),
            "command": "python -m autolr_fast meta-train --family --exclude-task " + task
                       + (f" --epochs {epochs}" if epochs else ""),
            "family": [asdict(r) for r in family], "settings": {**settings, "epochs": epochs},
            "controller_seed": CONTROLLER_SEED, "train_wall_s": round(time.perf_counter() - start, 1),
            **(info or {})}
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    save_family_controller(ctrl, path, info)
    return os.fspath(path)


def settled_p(ctrl: MLRSNet, loss: float) -> float:
    """The output ``p*`` the controller settles at on a constant ``loss`` (as the lr anchor does)."""
    probe = copy.deepcopy(ctrl)
    probe.reset()
    return float(probe.settle_(torch.tensor(loss), SETTLE_STEPS))


# ================================================================================================
# Ablation on held-out tasks
# ================================================================================================
#: Short runs (about half of ``compare``'s epochs, same batch sizes) on tasks outside the family,
#: each with the optimizer and rate its task declares (``tasks.task_optimizer``).
ABLATION_RUNS = (("digits-mlp", 15, 32), ("regress-sin", 20, 32), ("markov-gru", 10, 50), ("digits-bncnn", 10, 32),
                 ("diabetes-mlp", 30, 32), ("friedman-mlp", 15, 32))


def ablation_settings() -> list[FamilyRun]:
    """:data:`ABLATION_RUNS` with each task's own optimizer (tasks not registered here are left out)."""
    runs = []
    for name, epochs, batch_size in ABLATION_RUNS:
        if name in available_tasks():
            spec = task_optimizer(name)
            runs.append(FamilyRun(name, spec.kind, spec.lr, epochs, batch_size, spec.weight_decay))
    return runs


def ablation_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m autolr_fast meta-train --ablation",
                                 description="default vs mnist1d-cnn vs a fresh MLR-SNet vs cosine on held-out tasks")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--controller", default=os.path.join(FAMILY_OUT, "default.pt"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, help="every run this many epochs (default: each run's own)")
    ap.add_argument("--warmup", action="store_true",
                    help="the AutoLR rows under AutoLR's default envelope (a 5 %% warm-up, then cosine; a "
                         "cosine-warmup row joins) instead of the plain cosine")
    ap.add_argument("--out", default=FAMILY_OUT)
    args = ap.parse_args(argv)
    if not os.path.isfile(args.controller):
        ap.error(f"no controller file at {args.controller}: pass --controller PATH (e.g. the shipped "
                 "autolr_fast/controllers/weights/default.pt, or one `meta-train --family` wrote)")
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    settings = [replace(r, epochs=args.epochs or r.epochs) for r in ablation_settings()]
    with_progress = is_progress_file(args.controller)
    controller = load_progress_controller(args.controller) if with_progress else load_controller(args.controller)
    trained_on = set(controller.info.get("tasks", []))
    leaked = trained_on & {r.task for r in settings}
    if leaked:
        raise SystemExit(f"{args.controller} was trained on {sorted(leaked)}: not held out")
    norm = reads_normalised_loss(controller)  # the fresh net reads the loss the same way
    warmup = None if args.warmup else 0
    methods = {"cosine": cosine_method, **({"cosine-warmup": cosine_warmup_method} if args.warmup else {}),
               "default": frozen("default", controller, norm, warmup),
               "mnist1d-cnn": frozen("mnist1d-cnn", load_pretrained("mnist1d-cnn"), warmup_steps=warmup),
               "fresh": frozen("fresh", fresh_controller(with_progress, controller.info.get("controller_seed",
                                                                                           CONTROLLER_SEED)),
                               norm, warmup)}
    seeds = list(range(args.seeds))
    with tqdm(total=sum(r.epochs for r in settings) * len(methods) * len(seeds), desc="ablation", unit="epoch") as bar:
        rows = evaluate(settings, methods, seeds, progress=bar.update)
    table, scores = score_table(rows)
    md = (f"# Ablation on held-out tasks ({len(seeds)} seeds)\n\n"
          f"`python -m autolr_fast meta-train {' '.join(argv or [])}`. Every AutoLR row: "
          + ("`AutoLR(opt, controller, total_steps=T, envelope='cosine')` (lr anchor, a 5 % warm-up then cosine), "
             "frozen; cosine-warmup: that envelope alone; " if args.warmup else
             "`AutoLR(opt, controller, total_steps=T, warmup_steps=0, envelope='cosine')` (lr anchor, cosine "
             "envelope), frozen; ")
          + "cosine: CosineAnnealingLR to 0 at the same optimizer and lr. `default`: the family-trained controller "
          f"({args.controller}); `mnist1d-cnn`: the controller shipped before it; `fresh`: an untrained "
          "MLR-SNet. Final test accuracy % (mean ± std over seeds) or test MSE (median over seeds, mean "
          "in brackets).\n\n" + table)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump({"rows": rows, "scores": scores}, f)
    stem = "progress" if with_progress else "default"
    card = os.path.join(args.out, f"{stem}.json")
    trained_here = os.path.abspath(args.controller) == os.path.abspath(os.path.join(args.out, f"{stem}.pt"))
    if trained_here and os.path.isfile(card):
        # the card of a controller trained into --out carries its held-out scores too (copied along
        # when shipping); a controller elsewhere, e.g. the shipped one, keeps its card untouched
        with open(card) as f:
            info = json.load(f)
        info["held_out_ablation"] = {"command": f"python -m autolr_fast meta-train {' '.join(argv)}",
                                     "settings": [asdict(r) for r in settings], "seeds": seeds, "scores": scores}
        with open(card, "w") as f:
            json.dump(info, f, indent=1)
    print(md)
    return 0
