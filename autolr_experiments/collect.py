"""Branching data collection for the action controller.

One run of a task (``python -m autolr_fast collect --task NAME --seed S --segment 100 --out F``):

1. draw the starting rate log-uniformly in ``[--lr-min, --lr-max]`` (default ``[1e-4, 1e-1]``);
2. train one segment of ``N`` steps at that rate, recording every step's training loss;
3. checkpoint (model and optimizer state);
4. from the checkpoint, run every action (rate x0.9, x1.0, x1.1) for ``N`` steps on the *same*
   batches, and evaluate each branch on a validation split held out of the training data;
5. record a row: the features of the history before the checkpoint, which action was best
   (lowest validation loss) and by how much (the margins);
6. continue from one branch (``--follow random`` or ``best``): its end state is the next
   checkpoint and its losses the next history; repeat 4-6 until the run has trained ``--steps``.

Labels. By default (``--label-horizon 0``) the label is greedy: the lowest validation loss right
after the ``N``-step branch. With ``--label-horizon H`` each branch is continued for ``H`` more
steps on the same batches for every action, and the label is the lowest validation loss after
those ``N + H`` steps (``-1``: to the end of the run, a value target). ``--label-continue
action`` (default) keeps the action's rate for the ``H`` steps, which is what the controller's
choice means (a multiplier persists until the next one); ``--label-continue base`` goes back to
the rate before the action, as the unbranched run would. The followed path is unchanged (it
continues from the end of the ``N``-step branch), so the continuation only costs ``A * H`` extra
steps per decision; the greedy columns stay in the file (``val_after``, ``best_greedy``) so the
old labels remain available. (Measured on mnist1d-mlp and regress-exp/log: a longer horizon gives
*more* x1.1 labels than the greedy one, not fewer; see docs/action_controller.md.)

Everything is on the CPU and reproducible from the seed (the batches of decision ``k`` and the
random branch choice are seeded by ``(seed, k)``), so ``--resume`` after an interruption (the
progress file ``OUT.partial`` is written after every decision) gives the same file as an
uninterrupted run. The output is one ``torch.save`` file; :data:`COLUMNS` documents its columns
(also stored in the file), and ``settings`` holds the task, seeds and all options.
"""

from __future__ import annotations

import argparse
import math
import os
from itertools import islice

import torch
from torch import Tensor
from tqdm.auto import tqdm

from autolr_fast.controllers.action import DEFAULT_MULTIPLIERS, block_means, history_features
from autolr_fast.rate_scale import cosine_envelope

from .out_paths import file_problem
from .tasks import available_tasks, get_task
from .training import Schedule, load_state, run_steps, save_state

FORMAT = "autolr_fast.action_data"

COLUMNS = {
    "run": "(n,) int: run index within the file (run r uses seed + r)",
    "decision": "(n,) int: decision index within the run (0 = first checkpoint)",
    "step": "(n,) int: training steps done on the followed path at the checkpoint",
    "rate": "(n,) float: the rate before the action (the action multiplies it)",
    "history": "(n, segment) float: the raw training losses of the last segment before the checkpoint",
    "initial": "(n,) float: the run's first block mean of training losses (features divide by it)",
    "lowest": "(n,) float: the lowest block mean of training losses of the run up to the checkpoint",
    "features": "(n, 3, window) float: action.history_features(block means of `history`, initial, lowest)",
    "val_history": "(n, val_window) float: validation losses at the last val_window checkpoints "
                   "(oldest first, the first value repeated while fewer exist); last = at this checkpoint",
    "val_initial": "(n,) float: validation loss at the run's first checkpoint",
    "val_after": "(n, A) float: validation loss after each action's segment (inf if it diverged)",
    "train_after": "(n, A) float: mean training loss over each action's last block",
    "val_label": "(n, A) float: validation loss the label is taken from: after the branch and --label-horizon "
                 "more steps (= val_after when the horizon is 0; inf if it diverged)",
    "best": "(n,) int: index of the action with the lowest val_label (the label)",
    "best_greedy": "(n,) int: index of the action with the lowest val_after (the greedy label)",
    "margins": "(n, A) float: val_label - val_label[best] (0 for the best action)",
    "followed": "(n,) int: the action whose branch the run continued from",
    "start_rate": "(n,) float: the run's starting rate (rate / start_rate is the controller's level)",
}


def _set_lr(opt, rate: float) -> None:
    for g in opt.param_groups:
        g["lr"] = rate


def _make_opt(name: str, params, rate: float, momentum: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=rate, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=rate)
    raise ValueError(f"unknown optimizer {name!r}: use sgd or adam")


class Collector:
    """The branching collection of one file (several runs), with a resumable progress state."""

    def __init__(self, settings: dict) -> None:
        self.s = settings
        if settings["segment"] % settings["window"]:
            raise ValueError(f"--segment ({settings['segment']}) must be a multiple of --window ({settings['window']})")
        self.block = settings["segment"] // settings["window"]
        base = get_task(settings["task"], seed=settings["seed"])
        n_val = settings["val_size"] or max(1, min(500, len(base.x_train) // 5))
        if n_val + settings["batch_size"] > len(base.x_train):
            raise ValueError(f"{settings['task']} has {len(base.x_train)} training samples: {n_val} for validation "
                             f"(--val-size) leave fewer than one batch of {settings['batch_size']} (--batch-size) to "
                             "train on")
        self.task, self.x_val, self.y_val = base.split_validation(n_val, seed=settings["seed"])
        self.rows: list[dict] = []
        self.progress = {"run": 0, "decision": 0, "state": None}

    def _batches(self, run_seed: int, k: int, extra: int = 0) -> list:
        # the label continuation takes the batches that follow the segment's, so the segment's
        # batches (and hence the followed path) are the same whatever the horizon
        it = self.task.batches(self.s["batch_size"], seed=run_seed * 100_003 + k)
        return list(islice(it, self.s["segment"] + extra))

    def _segment(self, model, opt, batches: list, rate: float, first_step: int) -> list[float]:
        """Train on ``batches`` at ``rate`` (times the cosine envelope over ``--steps`` at each
        step's index in the run, from ``first_step``, with ``--envelope``); every step's loss."""
        _set_lr(opt, rate)
        if not self.s.get("envelope"):
            return run_steps(model, Schedule(opt), self.task.loss_fn, batches)[0].tolist()
        step = iter(range(first_step, first_step + len(batches)))

        def set_rate(_loss) -> None:
            _set_lr(opt, rate * cosine_envelope(next(step), self.s["steps"]))

        return run_steps(model, Schedule(opt, before_step=set_rate), self.task.loss_fn, batches)[0].tolist()

    def _val(self, model) -> float:
        v = self.task.evaluate(model, self.x_val, self.y_val)["loss"]
        return v if math.isfinite(v) else float("inf")

    def _start_run(self, run: int) -> dict:
        s = self.s
        run_seed = s["seed"] + run
        torch.manual_seed(run_seed)
        model = self.task.make_model()
        g = torch.Generator().manual_seed(run_seed)
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        rate = math.exp(math.log(s["lr_min"]) + u * (math.log(s["lr_max"]) - math.log(s["lr_min"])))
        opt = _make_opt(s["optimizer"], model.parameters(), rate, s["momentum"])
        history = self._segment(model, opt, self._batches(run_seed, -1), rate, 0)
        initial = sum(history[: self.block]) / self.block
        lowest = float(block_means(torch.tensor(history), self.block).min())
        return {"train": save_state(model, opt), "rate": rate, "start_rate": rate, "history": history,
                "initial": initial, "lowest": lowest, "val": [self._val(model)], "step": s["segment"],
                "alive": all(map(math.isfinite, history))}

    def _branches(self, run_seed: int, k: int, st: dict) -> list[dict]:
        """Every action from the checkpoint ``st`` on the same batches: end state, losses, and the
        validation loss and mean training loss of the last block (inf if the branch diverged);
        ``label``: the validation loss after ``label_horizon`` more steps (see the module doc)."""
        s = self.s
        horizon = s.get("label_horizon", 0)
        if horizon < 0:  # a value target: continue every branch to the end of the run (--steps)
            horizon = max(0, s["steps"] - st["step"] - s["segment"])
        model = self.task.make_model()
        opt = _make_opt(s["optimizer"], model.parameters(), st["rate"], s["momentum"])
        batches = self._batches(run_seed, k, horizon)
        seg, cont = batches[: s["segment"]], batches[s["segment"]:]
        out = []
        for m in s["multipliers"]:
            load_state(model, opt, st["train"])
            losses = self._segment(model, opt, seg, st["rate"] * m, st["step"])
            ok = all(map(math.isfinite, losses))
            b = {"end": save_state(model, opt), "losses": losses, "val": self._val(model) if ok else math.inf,
                 "train": sum(losses[-self.block:]) / self.block if ok else math.inf}
            b["label"] = b["val"]
            if horizon and ok:
                kept = st["rate"] if s.get("label_continue", "action") == "base" else st["rate"] * m
                more = self._segment(model, opt, cont, kept, st["step"] + s["segment"])
                b["label"] = self._val(model) if all(map(math.isfinite, more)) else math.inf
            elif horizon:
                b["label"] = math.inf
            out.append(b)
        return out

    def _follow(self, run_seed: int, k: int, vals: list[float], best: int) -> int:
        if self.s["follow"] == "best":
            return best
        g = torch.Generator().manual_seed(run_seed * 7919 + k)
        follow = int(torch.randint(len(vals), (1,), generator=g))
        return follow if math.isfinite(vals[follow]) else best

    def _decide(self, run: int, k: int, st: dict) -> dict | None:
        """Branch from the checkpoint ``st``; return the row and advance ``st`` (None: run over)."""
        s = self.s
        run_seed = s["seed"] + run
        branches = self._branches(run_seed, k, st)
        vals = [b["val"] for b in branches]
        if not any(map(math.isfinite, vals)):
            return None
        labels = [b["label"] for b in branches]
        greedy = min(range(len(vals)), key=lambda a: vals[a])
        # ties (every continuation diverged) fall back to the greedy order
        best = min(range(len(vals)), key=lambda a: (labels[a], vals[a]))
        follow = self._follow(run_seed, k, vals, best)
        hist = torch.tensor(st["history"], dtype=torch.float32)
        feats = history_features(block_means(hist, self.block), torch.tensor(st["initial"], dtype=torch.float32),
                                 torch.tensor(st["lowest"], dtype=torch.float32))
        vw = s["val_window"]
        row = {"run": run, "decision": k, "step": st["step"], "rate": st["rate"], "history": st["history"],
               "initial": st["initial"], "lowest": st["lowest"], "features": feats,
               "val_history": ([st["val"][0]] * vw + st["val"])[-vw:], "val_initial": st["val"][0],
               "val_after": vals, "train_after": [b["train"] for b in branches], "val_label": labels,
               "best": best, "best_greedy": greedy, "start_rate": st["start_rate"],
               "margins": [0.0 if a == best else (v - labels[best] if math.isfinite(v) else math.inf)
                           for a, v in enumerate(labels)], "followed": follow}
        chosen = branches[follow]
        lowest = min(st["lowest"], float(block_means(torch.tensor(chosen["losses"]), self.block).min()))
        st.update(train=chosen["end"], rate=st["rate"] * s["multipliers"][follow], history=chosen["losses"],
                  lowest=lowest, val=st["val"] + [vals[follow]], step=st["step"] + s["segment"])
        return row

    def decisions_per_run(self) -> int:
        return max(0, self.s["steps"] // self.s["segment"] - 1)

    def run(self, progress_path: str | None = None, stop_after: int | None = None, show: bool = True) -> bool:
        """Collect (from ``self.progress``); True when finished, False when stopped early."""
        per_run = self.decisions_per_run()
        total = self.s["runs"] * per_run
        done_before = self.progress["run"] * per_run + self.progress["decision"]
        bar = tqdm(total=total, initial=done_before, desc=f"collect {self.s['task']}", disable=not show)
        done_now = 0
        while self.progress["run"] < self.s["runs"]:
            run = self.progress["run"]
            st = self.progress["state"]
            if st is None:
                st = self._start_run(run)
            k = self.progress["decision"]
            while k < per_run and st["alive"]:
                if stop_after is not None and done_now >= stop_after:
                    self.progress.update(state=st, decision=k)
                    self._save_progress(progress_path)
                    bar.close()
                    return False
                row = self._decide(run, k, st)
                if row is None:
                    st["alive"] = False
                    break
                self.rows.append(row)
                k += 1
                done_now += 1
                bar.update(1)
                self.progress.update(state=st, decision=k)
                self._save_progress(progress_path)
            bar.update(per_run - k)
            self.progress = {"run": run + 1, "decision": 0, "state": None}
            self._save_progress(progress_path)
        bar.close()
        return True

    def _save_progress(self, path: str | None) -> None:
        if path:
            tmp = path + ".tmp"
            torch.save({"settings": self.s, "rows": self.rows, "progress": self.progress}, tmp)
            os.replace(tmp, path)

    def load_progress(self, path: str) -> None:
        saved = torch.load(path, weights_only=True)
        if not isinstance(saved, dict) or not {"settings", "rows", "progress"} <= set(saved):
            raise KeyError("settings, rows and progress")
        saved["settings"].setdefault("envelope", False)  # progress saved before --envelope existed
        _backfill_start_rate(saved)
        if saved["settings"] != self.s:
            diff = {k: (saved["settings"].get(k), v) for k, v in self.s.items() if saved["settings"].get(k) != v}
            raise ValueError(f"--resume: {path} was written with other settings {diff}; use the same options")
        self.rows, self.progress = saved["rows"], saved["progress"]

    def table(self) -> dict[str, Tensor]:
        if not self.rows:
            raise RuntimeError("no decisions were collected (every run diverged at once?); try a smaller --lr-max")
        out = {}
        for col in COLUMNS:
            vals = [r[col] for r in self.rows]
            if col == "features":
                out[col] = torch.stack(vals)
            elif col in ("run", "decision", "step", "best", "best_greedy", "followed"):
                out[col] = torch.tensor(vals, dtype=torch.int64)
            else:
                out[col] = torch.tensor(vals, dtype=torch.float32)
        return out


def _backfill_start_rate(saved: dict) -> None:
    """Progress saved before the start_rate column existed: a run's start rate is the rate of its
    first decision (or of the run in progress, when it has made none)."""
    first = {r["run"]: r["rate"] for r in reversed(saved["rows"])}
    for r in saved["rows"]:
        r.setdefault("start_rate", first[r["run"]])
    st = saved["progress"].get("state")
    if st is not None:
        st.setdefault("start_rate", first.get(saved["progress"]["run"], st["rate"]))


def load_data(path: str) -> dict:
    """Read a collection file: ``{"settings", "columns", "data": {column: tensor}}``."""
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not read collected data from {path!r} (not a torch.save file, or damaged: "
                         f"{type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a file written by `python -m autolr_fast collect`")
    return payload


def merge_data(payloads: list[dict]) -> dict[str, Tensor]:
    """Concatenate the data of several collection files (runs renumbered to stay distinct)."""
    for key in ("window", "val_window"):
        values = {p["settings"].get(key) for p in payloads}
        if len(values) > 1:
            raise ValueError(f"the files were collected with different --{key.replace('_', '-')} values "
                             f"{sorted(values, key=str)}")
    out: dict[str, list[Tensor]] = {}
    offset = 0
    for p in payloads:
        d = dict(p["data"])
        d["run"] = d["run"] + offset
        # files collected before --label-horizon existed: their labels are the greedy ones
        d.setdefault("val_label", d["val_after"])
        if "start_rate" in d:  # files collected before it existed cannot train relative controllers
            out.setdefault("start_rate", []).append(d["start_rate"])
        offset = int(d["run"].max()) + 1
        for k in ("run", "features", "best", "margins", "val_after", "val_label", "val_history", "val_initial",
                  "rate", "step"):
            out.setdefault(k, []).append(d[k])
    return {k: torch.cat(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autolr_fast collect", description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=available_tasks())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=1, help="runs in this file (seeds seed .. seed+runs-1)")
    p.add_argument("--segment", type=int, default=None, help="steps per segment / branch (N; default 100)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per run on the followed path (default 3000)")
    p.add_argument("--window", type=int, default=None,
                   help="feature window (block means; segment/window steps each); default 20, 4 with --quick")
    p.add_argument("--val-window", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--lr-min", type=float, default=1e-4)
    p.add_argument("--lr-max", type=float, default=1e-1)
    p.add_argument("--multipliers", type=float, nargs="+", default=list(DEFAULT_MULTIPLIERS))
    p.add_argument("--follow", default="random", choices=["random", "best"])
    p.add_argument("--label-horizon", type=int, default=0,
                   help="label by the validation loss after H more steps past each branch (0: greedy labels; "
                        "-1: to the end of the run, --steps)")
    p.add_argument("--label-continue", default="action", choices=["action", "base"],
                   help="rate of the H label steps: the action's (it persists) or the rate before it")
    p.add_argument("--envelope", action="store_true",
                   help="train every step at rate x the cosine envelope over --steps (AutoLR(total_steps=..., "
                        "warmup_steps=0, envelope='cosine') applied to a relative action controller; AutoLR's "
                        "default envelope warms up, holds the peak and decays over the last 20 %%)")
    p.add_argument("--val-size", type=int, default=0, help="validation samples (0: 20%% of train, at most 500)")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUT.partial")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # simulate an interruption
    p.add_argument("--quick", action="store_true",
                   help="segment 20, 100 steps, window 4, each unless given (a smoke run)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    # --quick's smaller values only where none was given
    for key, full, quick in (("segment", 100, 20), ("steps", 3000, 100), ("window", 20, 4)):
        if getattr(a, key) is None:
            setattr(a, key, quick if a.quick else full)
    if a.label_horizon < -1:
        p.error("--label-horizon must be >= -1")
    small = [f"--{k.replace('_', '-')} {getattr(a, k)}" for k in ("runs", "segment", "window", "val_window",
                                                                  "batch_size") if getattr(a, k) < 1]
    if small:
        p.error(f"{', '.join(small)}: must be >= 1")
    if a.segment % a.window or a.steps < 2 * a.segment:
        p.error(f"--segment ({a.segment}) must be a multiple of --window ({a.window}), and --steps ({a.steps}) at "
                "least two segments (the first fills the history a decision reads)")
    if not (0 < a.lr_min < a.lr_max):
        p.error("need 0 < --lr-min < --lr-max")
    if len(a.multipliers) < 2 or min(a.multipliers) <= 0:
        p.error(f"--multipliers {' '.join(f'{m:g}' for m in a.multipliers)}: the actions are factors of the rate, "
                "at least two, each > 0 (default: 0.9 1.0 1.1)")
    if a.val_size < 0:
        p.error(f"--val-size {a.val_size}: must be >= 0")
    problem = file_problem(a.out, "--out", f"{a.task}.pt")
    if problem:
        p.error(problem)
    settings = {"task": a.task, "seed": a.seed, "runs": a.runs, "segment": a.segment, "steps": a.steps,
                "window": a.window, "val_window": a.val_window, "batch_size": a.batch_size,
                "optimizer": a.optimizer, "momentum": a.momentum, "lr_min": a.lr_min, "lr_max": a.lr_max,
                "multipliers": [float(m) for m in a.multipliers], "follow": a.follow, "val_size": a.val_size,
                "label_horizon": a.label_horizon, "label_continue": a.label_continue, "envelope": a.envelope}
    try:
        collector = Collector(settings)
    except ValueError as exc:
        p.error(str(exc))
    partial = a.out + ".partial"
    if a.resume:
        if not os.path.exists(partial):
            p.error(f"--resume: no progress file {partial}")
        try:
            collector.load_progress(partial)
        except ValueError as exc:
            p.error(str(exc))
        except Exception as exc:  # a damaged file: any of torch.load's errors, or a missing entry
            p.error(f"--resume: cannot read the progress file {partial} ({type(exc).__name__}: {exc}); delete it "
                    "to start the collection again")
    finished = collector.run(partial, stop_after=a.stop_after, show=not a.no_progress)
    if not finished:
        print(f"stopped after {len(collector.rows)} decisions; continue with --resume ({partial})")
        return 0
    data = collector.table()
    torch.save({"format": FORMAT, "version": 1, "settings": settings, "columns": COLUMNS, "data": data}, a.out)
    if os.path.exists(partial):
        os.remove(partial)
    counts = torch.bincount(data["best"], minlength=len(settings["multipliers"])).tolist()
    print(f"{len(collector.rows)} decisions from {settings['runs']} run(s) -> {a.out}; best-action counts "
          + ", ".join(f"x{m:g}: {c}" for m, c in zip(settings["multipliers"], counts, strict=True)))
    return 0
