"""Learning-rate range test: train from the same weights at many rates, see which rate learns.

For every rate of a log-spaced grid, :func:`find_lr` restores the model and the optimizer to the
state they had when it was called, trains for the longest horizon still in play (steps, or
epochs), and measures the loss on a fixed evaluation set after each horizon. The curve of
"loss after ``h`` steps" against the rate shows where training is too slow, where it works, and
where it blows up, for several horizons from one call (the answer moves with the horizon: longer
horizons favour smaller rates). Afterwards everything is restored bit for bit (parameters,
buffers such as BatchNorm statistics, optimizer state, the param groups' rates, the RNG), so the
finder can be called mid-training.

This is not the one-pass exponential sweep of fastai / ``torch-lr-finder`` (one run whose rate
grows every step, each point starting where the last one ended); it costs more (each rate is a
separate trial) but every point answers the same question from the same weights. See
``docs/lr_finder.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .batches import to_device
from .distributed import is_distributed, mean_across_ranks

Unpack = Callable[[Any], tuple[Any, Any]]

_INPUT_KEYS = ("inputs", "input", "x", "data", "features")
_TARGET_KEYS = ("targets", "target", "labels", "label", "y")


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
def default_unpack(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from a ``(x, y)`` tuple/list or a dict with common key names."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        xi = next((k for k in _INPUT_KEYS if k in batch), None)
        yi = next((k for k in _TARGET_KEYS if k in batch), None)
        if xi is not None and yi is not None:
            return batch[xi], batch[yi]
        raise ValueError(
            f"find_lr cannot tell inputs from targets in a batch dict with keys {sorted(batch)}; "
            f"name them one of {_INPUT_KEYS} / {_TARGET_KEYS}, or pass unpack=lambda b: (b['..'], b['..'])"
        )
    raise ValueError(
        f"find_lr expects batches as (inputs, targets) tuples or dicts, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "; pass unpack=fn where fn(batch) returns (inputs, targets)"
    )


def _take(batches: Iterable, n: int) -> list:
    """The first ``n`` batches; a re-iterable (list, DataLoader) is cycled if it is shorter."""
    out: list = []
    it = iter(batches)
    reiterable = it is not batches
    while len(out) < n:
        try:
            out.append(next(it))
        except StopIteration:
            if not reiterable or not out:
                raise ValueError(
                    f"find_lr needs {n} batches but the iterator ran out after {len(out)}; pass a "
                    "re-iterable (a list or a DataLoader) or a longer iterator, or use smaller horizons"
                ) from None
            it = iter(batches)
    return out


# ------------------------------------------------------------------------------------------------
# Exact state snapshot
# ------------------------------------------------------------------------------------------------
def _clone(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_clone(x) for x in v)
    return v


class TrainingSnapshot:
    """A bit-for-bit copy of a model, its optimizer and the RNG, restored in place.

    Parameters and buffers are copied back into the same tensor objects (the optimizer and any
    hook keep pointing at them). The optimizer's per-parameter state is replaced by clones of the
    saved one (parameters without state at snapshot time get none again, so a fresh Adam starts
    fresh in every trial). Param-group hyper-parameters are restored too; a tensor ``lr`` (as
    :class:`AutoLR` installs) is restored in place, so the scheduler keeps its link to it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.tensors = [t.detach().clone() for t in self._model_tensors()]
        self.opt_state = {p: _clone(s) for p, s in optimizer.state.items()}
        self.groups = [{k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in g.items() if k != "params"}
                       for g in optimizer.param_groups]
        self.training = [m.training for m in model.modules()]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def _model_tensors(self) -> list[Tensor]:
        return list(self.model.parameters()) + [b for b in self.model.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for t, saved in zip(self._model_tensors(), self.tensors):
            t.copy_(saved)
        self.optimizer.state.clear()
        for p, s in self.opt_state.items():
            self.optimizer.state[p] = _clone(s)
        for g, saved in zip(self.optimizer.param_groups, self.groups):
            for k, v in saved.items():
                if isinstance(v, Tensor) and isinstance(g.get(k), Tensor) and g[k].shape == v.shape:
                    g[k].copy_(v)
                else:
                    g[k] = _clone(v)
        for m, mode in zip(self.model.modules(), self.training):
            m.training = mode
        for p in self.model.parameters():
            p.grad = None
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _set_rate(optimizer: torch.optim.Optimizer, rate: float, scales: Sequence[float]) -> None:
    for g, s in zip(optimizer.param_groups, scales):
        if isinstance(g["lr"], Tensor):
            g["lr"].fill_(rate * s)
        else:
            g["lr"] = rate * s


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------
def smooth_curve(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (shrinking at the ends; non-finite values
    are left out). A centred window does not shift the minimum the way an EMA does."""
    if window < 1:
        raise ValueError(f"smoothing must be a window of >= 1 points, got {window}")
    half = window // 2
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - half) : i + half + 1] if math.isfinite(v)]
        out.append(sum(part) / len(part) if part else float("nan"))
    return out


def steepest_rate(rates: Sequence[float], losses: Sequence[float]) -> float:
    """The rate where ``losses`` falls fastest against ``log(rate)`` (central differences)."""
    pts = [(math.log(r), v) for r, v in zip(rates, losses) if math.isfinite(v)]
    if len(pts) < 2:
        return float("nan")
    slopes = []
    for i in range(len(pts)):
        a, b = pts[max(i - 1, 0)], pts[min(i + 1, len(pts) - 1)]
        slopes.append((b[1] - a[1]) / (b[0] - a[0]))
    return math.exp(pts[min(range(len(pts)), key=slopes.__getitem__)][0])


@dataclass
class LRFinderResult:
    """Per horizon: the rates tried (up to divergence), raw and smoothed losses, a suggestion.

    ``suggestion`` is the rate at the minimum of the smoothed curve of the longest horizon that
    has any point (the point where a horizon diverged enters the smoothing window at the
    divergence limit, a lower bound of its loss, so the minimum is not taken at the cliff edge) (the constant rate that reached the lowest loss after that many steps/epochs);
    ``suggestions`` holds that rule for every horizon. NaN when no rate was usable.
    ``steepest`` is the other common rule (fastai, ``torch-lr-finder``): the rate where the
    smoothed loss falls fastest per decade of rate; usually lower and more conservative.
    """

    horizons: list[int]
    unit: str
    start_loss: float
    rates: dict[int, list[float]]
    losses: dict[int, list[float]]
    smoothed: dict[int, list[float]]
    suggestions: dict[int, float]
    diverged_at: dict[int, float | None]
    steepest: dict[int, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def suggestion(self) -> float:
        for h in sorted(self.horizons, reverse=True):
            if math.isfinite(self.suggestions[h]):
                return self.suggestions[h]
        return float("nan")

    def to_dict(self) -> dict:
        key = lambda d: {str(k): v for k, v in d.items()}  # noqa: E731  (JSON keys are strings)
        return {"horizons": self.horizons, "unit": self.unit, "start_loss": self.start_loss,
                "suggestion": self.suggestion, "suggestions": key(self.suggestions),
                "diverged_at": key(self.diverged_at), "steepest": key(self.steepest), "rates": key(self.rates), "losses": key(self.losses),
                "smoothed": key(self.smoothed), "settings": self.settings}

    def table(self) -> str:
        """Markdown table: suggestion and curve extent per horizon."""
        lines = [f"| horizon ({self.unit}) | rates tried | best loss | suggested rate | diverged at |",
                 "|---:|---:|---:|---:|---:|"]
        for h in self.horizons:
            best = min((v for v in self.smoothed[h] if math.isfinite(v)), default=float("nan"))
            d = self.diverged_at[h]
            lines.append(f"| {h} | {len(self.rates[h])} | {best:.4g} | {self.suggestions[h]:.3g} | "
                         f"{'-' if d is None else f'{d:.3g}'} |")
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """PNG: loss against rate (log x axis), one panel per horizon, suggestion marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.horizons)
        fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
        for ax, h in zip(axes[0], self.horizons):
            ax.plot(self.rates[h], self.losses[h], ".", alpha=0.4, label="loss")
            ax.plot(self.rates[h], self.smoothed[h], "-", label="smoothed")
            if math.isfinite(self.suggestions[h]):
                ax.axvline(self.suggestions[h], color="r", ls="--", label=f"suggestion {self.suggestions[h]:.2g}")
            ax.axhline(self.start_loss, color="gray", lw=0.8, label="loss at call")
            ax.set_xscale("log")
            ax.set_title(f"after {h} {self.unit}")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("loss")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The range test
# ------------------------------------------------------------------------------------------------
def find_lr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any, Any], Tensor],
    batches: Iterable,
    *,
    start_lr: float = 1e-6,
    end_lr: float = 100.0,
    num: int = 100,
    horizons: Sequence[int] = (1,),
    unit: str = "steps",
    diverge_factor: float | None = 1.1,
    smoothing: int = 5,
    eval_batches: Sequence | None = None,
    num_eval_batches: int = 4,
    unpack: Unpack | None = None,
    plot: str | None = None,
    progress: bool = True,
    distributed: bool | str = "auto",
) -> LRFinderResult:
    """Range test: for each of ``num`` log-spaced rates in ``[start_lr, end_lr]``, train from the
    state at call time for each horizon and record the evaluation loss.

    Args:
        model, optimizer, loss_fn: as in your training loop; ``loss_fn(model(inputs), targets)``.
            Other param groups keep their ratio of ``lr`` to the first group's.
        batches: training batches, ``(inputs, targets)`` tuples or dicts (see ``unpack``). With
            ``unit="steps"`` the first ``num_eval_batches + max(horizons)`` batches are taken once
            and every trial trains on the same ones. With ``unit="epochs"`` an epoch is one pass
            over ``batches``, which must then be re-iterable (a list or a DataLoader).
        horizons: training lengths to measure after, e.g. ``(1, 4, 16)`` steps; all in one call
            (a trial trains to the longest horizon still in play and measures on the way).
        unit: ``"steps"`` or ``"epochs"``.
        diverge_factor: a horizon stops once its loss exceeds ``factor * start_loss`` (or is not
            finite); that point is left out of its curve. The test stops when all horizons have.
            ``None``: run every rate.
        smoothing: window (points) of the centred moving average for ``smoothed``; 1 = none.
        eval_batches: the fixed batches the loss is measured on (mean over them, no gradients,
            model in its mode at call time). Default: the first ``num_eval_batches`` batches.
        unpack: ``fn(batch) -> (inputs, targets)``; default handles tuples and dicts with keys
            like ``inputs/x`` and ``targets/labels/y``. A dict ``inputs`` is passed as ``**kwargs``.
        plot: write the PNG (one panel per horizon) to this path.
        progress: show a tqdm bar.
        distributed: ``"auto"``: under an initialised process group with several ranks the
            evaluation losses are averaged across ranks, so every rank takes the same decisions.

    Returns an :class:`LRFinderResult`; model, buffers, optimizer state and RNG are restored.
    """
    horizons = sorted({int(h) for h in horizons})
    if not horizons or horizons[0] < 1:
        raise ValueError(f"horizons must be positive integers, got {horizons}")
    if unit not in ("steps", "epochs"):
        raise ValueError(f"unit must be 'steps' or 'epochs', got {unit!r}")
    if not (0 < start_lr < end_lr) or not math.isfinite(end_lr):
        raise ValueError(f"need 0 < start_lr < end_lr (finite), got start_lr={start_lr}, end_lr={end_lr}")
    if num < 2:
        raise ValueError(f"num must be >= 2 rates, got {num}")
    if diverge_factor is not None and not diverge_factor > 0:
        raise ValueError(f"diverge_factor must be > 0 or None, got {diverge_factor}")
    if smoothing < 1:
        raise ValueError(f"smoothing must be a window of >= 1 points, got {smoothing}")
    unpack = unpack or default_unpack
    try:
        device = next(model.parameters()).device
    except StopIteration:
        raise ValueError("find_lr needs a model with parameters") from None
    dist_on = is_distributed(distributed)

    # -- data ----------------------------------------------------------------------------------
    if unit == "steps":
        need = max(horizons) + (0 if eval_batches is not None else num_eval_batches)
        taken = _take(batches, need)
        if eval_batches is None:
            eval_batches, train_batches = taken[:num_eval_batches], taken[num_eval_batches:]
        else:
            train_batches = taken
    else:
        if iter(batches) is batches:
            raise ValueError("unit='epochs' needs re-iterable batches (a list or a DataLoader), not an iterator")
        if eval_batches is None:
            eval_batches = _take(batches, num_eval_batches)
        train_batches = None
    eval_batches = [to_device(unpack(b), device) for b in eval_batches]
    if not eval_batches:
        raise ValueError("find_lr needs at least one evaluation batch (num_eval_batches >= 1)")
    if train_batches is not None:
        train_batches = [to_device(unpack(b), device) for b in train_batches]

    def forward_loss(xy) -> Tensor:
        x, y = xy
        out = model(**x) if isinstance(x, dict) else model(x)
        return loss_fn(out, y)

    def eval_loss() -> float:
        # Measuring must not change the trial: buffers (BatchNorm running stats move in train
        # mode) and the RNG (dropout) are put back afterwards.
        buffers = [b.detach().clone() for b in model.buffers()]
        rng = torch.get_rng_state()
        with torch.no_grad():
            total = torch.zeros((), device=device, dtype=torch.float32)
            for xy in eval_batches:
                total = total + forward_loss(xy).detach().float()
            total = total / len(eval_batches)
            if dist_on:
                total = mean_across_ranks(total)
            value = float(total)
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
        torch.set_rng_state(rng)
        return value

    def epoch_iter():
        while True:
            for b in batches:
                yield to_device(unpack(b), device)
            yield None  # end of an epoch

    def train_step(xy) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = forward_loss(xy)
        loss.backward()
        optimizer.step()

    snap = TrainingSnapshot(model, optimizer)
    lr0 = optimizer.param_groups[0]["lr"]
    lr0 = float(lr0)
    scales = [float(g["lr"]) / lr0 if lr0 > 0 else 1.0 for g in optimizer.param_groups]
    rates_grid = torch.logspace(math.log10(start_lr), math.log10(end_lr), num, dtype=torch.float64).tolist()
    rates = {h: [] for h in horizons}
    losses = {h: [] for h in horizons}
    diverged: dict[int, float | None] = {h: None for h in horizons}
    try:
        start_loss = eval_loss()
        if not math.isfinite(start_loss):
            raise ValueError(f"the loss at call time is {start_loss}; find_lr needs a finite starting loss")
        limit = None if diverge_factor is None else diverge_factor * start_loss
        bar = _progress(rates_grid, progress)
        for rate in bar:
            active = [h for h in horizons if diverged[h] is None]
            if not active:
                break
            _set_rate(optimizer, rate, scales)
            done = 0
            it = epoch_iter() if unit == "epochs" else None
            for h in active:
                while done < h:
                    if unit == "steps":
                        train_step(train_batches[done])
                    else:
                        for xy in it:
                            if xy is None:
                                break
                            train_step(xy)
                    done += 1
                value = eval_loss()
                if not math.isfinite(value) or (limit is not None and value > limit):
                    diverged[h] = rate
                else:
                    rates[h].append(rate)
                    losses[h].append(value)
            snap.restore()
            bar.set_postfix(rate=f"{rate:.2e}", active=len([h for h in horizons if diverged[h] is None]))
    finally:
        snap.restore()
    # A horizon that diverged gets one more point at the limit (a lower bound of the loss at the
    # rate that diverged) for the smoothing only, so a minimum right at the cliff is pulled up.
    smoothed = {}
    for h in horizons:
        pad = [limit] if diverged[h] is not None and limit is not None else []
        smoothed[h] = smooth_curve(losses[h] + pad, smoothing)[: len(losses[h])]
    suggestions = {}
    for h in horizons:
        finite = [(v, r) for v, r in zip(smoothed[h], rates[h]) if math.isfinite(v)]
        suggestions[h] = min(finite)[1] if finite else float("nan")
    steepest = {h: steepest_rate(rates[h], smoothed[h]) for h in horizons}
    if all(not rates[h] for h in horizons):
        warnings.warn(f"find_lr: every rate from start_lr={start_lr:g} diverged; try a smaller start_lr")
    result = LRFinderResult(horizons, unit, start_loss, rates, losses, smoothed, suggestions, diverged, steepest,
                            {"start_lr": start_lr, "end_lr": end_lr, "num": num, "diverge_factor": diverge_factor,
                             "smoothing": smoothing, "num_eval_batches": len(eval_batches)})
    if plot:
        result.plot(plot)
    return result


def _progress(items, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc="find_lr", leave=False, disable=not enabled)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def make_optimizer(name: str, params, lr: float = 1e-3) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: use sgd or adam")


def main(argv: list[str] | None = None) -> int:
    from .tasks import available_tasks, get_task

    p = argparse.ArgumentParser(prog="python -m autolr_fast find-lr", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="mnist1d-cnn", help=f"one of {', '.join(available_tasks())}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--horizons", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--unit", default="steps", choices=["steps", "epochs"])
    p.add_argument("--start-lr", type=float, default=1e-6)
    p.add_argument("--end-lr", type=float, default=100.0)
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--diverge-factor", type=float, default=1.1)
    p.add_argument("--smoothing", type=int, default=5)
    p.add_argument("--pretrain-steps", type=int, default=0, help="train this many steps at --pretrain-lr first (mid-training test)")
    p.add_argument("--pretrain-lr", type=float, default=0.01)
    p.add_argument("--plot", default="lr_finder.png")
    p.add_argument("--out", default="lr_finder.json")
    p.add_argument("--quick", action="store_true", help="few rates, short horizons: a smoke run in seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.num = min(args.num, 12)
        args.horizons = [h for h in args.horizons if h <= 4] or [1]
        args.start_lr, args.end_lr = max(args.start_lr, 1e-4), min(args.end_lr, 10.0)

    torch.manual_seed(args.seed)
    task = get_task(args.task, seed=args.seed)
    model = task.make_model()
    opt = make_optimizer(args.optimizer, model.parameters(), args.pretrain_lr)
    if args.pretrain_steps:
        for i, (x, y) in enumerate(task.batches(args.batch_size, seed=args.seed + 1000)):
            if i >= args.pretrain_steps:
                break
            opt.zero_grad()
            task.loss_fn(model(x), y).backward()
            opt.step()
    batches = task.batches(args.batch_size, seed=args.seed) if args.unit == "steps" else \
        list(task.batches(args.batch_size, seed=args.seed, epochs=1))
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
    return 0
