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

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import optim_support
from .batches import default_unpack, fresh_iter, to_device
from .checks import is_positive_number
from .distributed import is_distributed, mean_across_ranks
from .training_snapshot import BufferSlots, TrainingSnapshot

Unpack = Callable[[Any], tuple[Any, Any]]

# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
def _take(batches: Iterable, n: int) -> list:
    """The first ``n`` batches; a re-iterable (list, DataLoader) is cycled if it is shorter."""
    out: list = []
    it = fresh_iter(batches)
    reiterable = it is not batches
    fresh = True  # nothing drawn from `it` yet
    while len(out) < n:
        try:
            out.append(next(it))
            fresh = False
        except StopIteration:
            if not reiterable or fresh:
                raise ValueError(
                    f"find_lr needs {n} batches but the batches ran out after {len(out)}"
                    + (" and a new pass over them gave none (a loader over a one-pass stream)" if out else "")
                    + "; pass a re-iterable (a list or a DataLoader) or a longer iterator, or use smaller horizons"
                ) from None
            it, fresh = fresh_iter(batches), True
    return out


def _set_rate(optimizer: torch.optim.Optimizer, rate: float, scales: Sequence[float]) -> None:
    for g, s in zip(optimizer.param_groups, scales, strict=True):
        if isinstance(g["lr"], Tensor):
            g["lr"].fill_(rate * s)
        else:
            g["lr"] = rate * s


# ------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------
def smooth_curve(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (an even ``window`` is widened by one to stay
    centred; shrinking at the ends; non-finite values are left out). A centred window does not
    shift the minimum the way an EMA does."""
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
    pts = [(math.log(r), v) for r, v in zip(rates, losses, strict=True) if math.isfinite(v)]
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
    has any point: the constant rate that reached the lowest loss after that many steps/epochs
    (the point where a horizon diverged enters the smoothing window at the divergence limit, a
    lower bound of its loss, so the minimum is not taken at the cliff edge). ``suggestions`` holds
    that rule for every horizon. NaN when no rate was usable.
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
                "diverged_at": key(self.diverged_at), "steepest": key(self.steepest), "rates": key(self.rates),
                "losses": key(self.losses),
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
        """PNG: loss against rate (log x axis), one panel per horizon, suggestion marked. Drawn on
        a bare ``matplotlib.figure.Figure``: pyplot and the caller's backend are left alone."""
        from matplotlib.figure import Figure  # optional dependency

        n = len(self.horizons)
        fig = Figure(figsize=(4.2 * n, 3.4))
        axes = fig.subplots(1, n, squeeze=False)
        for ax, h in zip(axes[0], self.horizons, strict=True):
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


# ------------------------------------------------------------------------------------------------
# The range test
# ------------------------------------------------------------------------------------------------
def _check_arguments(horizons: Sequence[int], unit: str, start_lr: float, end_lr: float, num: int,
                     diverge_factor: float | None, smoothing: int) -> list[int]:
    """Validate ``find_lr``'s settings; returns the horizons, sorted and without repeats."""
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
    return horizons


def _model_device(model: nn.Module, caller: str = "find_lr") -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError(f"{caller} needs a model with parameters") from None


def _split_batches(batches: Iterable, unit: str, longest: int, eval_batches: Sequence | None,
                   num_eval_batches: int) -> tuple[Sequence, list | None]:
    """``(eval_batches, train_batches)``: with ``unit="steps"`` the first batches are taken once
    (the evaluation ones first, unless given) and every trial trains on the same ``longest``;
    with ``unit="epochs"`` every trial iterates ``batches`` itself (None)."""
    if unit == "steps":
        taken = _take(batches, longest + (0 if eval_batches is not None else num_eval_batches))
        if eval_batches is None:
            return taken[:num_eval_batches], taken[num_eval_batches:]
        return eval_batches, taken
    if isinstance(batches, Iterator):  # asked without iterating: iter() on a DataLoader draws from the RNG
        raise ValueError("unit='epochs' needs re-iterable batches (a list or a DataLoader), not an iterator")
    return (_take(batches, num_eval_batches) if eval_batches is None else eval_batches), None


class _Trial:
    """Trains the model at one rate from the snapshot and measures it after each horizon."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, unit: str,
                 batches: Iterable, train_batches: list | None, eval_batches: list, unpack: Unpack,
                 device: torch.device, dist_on: bool, max_grad_norm: float | None = None) -> None:
        self.model, self.optimizer, self.loss_fn, self.unit = model, optimizer, loss_fn, unit
        self.max_grad_norm = max_grad_norm
        self.clipped = [p for g in optimizer.param_groups for p in g["params"]] if max_grad_norm else []
        self.batches, self.train_batches, self.eval_batches = batches, train_batches, eval_batches
        self.unpack, self.device, self.dist_on = unpack, device, dist_on

    def forward_loss(self, xy) -> Tensor:
        x, y = xy
        out = self.model(**x) if isinstance(x, Mapping) else self.model(x)
        loss = self.loss_fn(out, y)
        if not (isinstance(loss, Tensor) and loss.numel() == 1):
            raise ValueError(f"loss_fn must return a 1-element tensor (the batch's mean loss), got "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}: reduce it "
                             "(e.g. reduction='mean')")
        return loss

    @contextlib.contextmanager
    def _measuring(self):
        """Measuring must not change the trial: buffers (BatchNorm running stats move in train
        mode) and the RNG (dropout) are put back."""
        buffers = BufferSlots(self.model)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            try:
                yield
            finally:
                buffers.restore()

    def eval_loss(self) -> float:
        """Mean loss over the evaluation batches (under a process group: averaged across ranks)."""
        with self._measuring():
            total = torch.zeros((), device=self.device, dtype=torch.float32)
            for xy in self.eval_batches:
                total = total + self.forward_loss(xy).detach().float()
            total = total / len(self.eval_batches)
            if self.dist_on:
                total = mean_across_ranks(total)
            return float(total)

    def eval_batch_losses(self, weights: list[float]) -> tuple[list[float], list[float]]:
        """The loss of each evaluation batch and its weight (``weights``: this rank's, e.g. batch
        sizes). Under a process group, batch ``i``'s loss is the weighted mean of its loss on every
        rank and its weight the sum, so every rank gets the same numbers; every rank must hold
        the same number of evaluation batches (the caller checks)."""
        with self._measuring():
            losses = torch.stack([self.forward_loss(xy).detach().float().reshape(()) for xy in self.eval_batches])
            if not self.dist_on:
                return losses.tolist(), list(weights)
            w = torch.tensor(weights, dtype=torch.float32, device=losses.device)
            sums = torch.stack([losses * w, w])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            return (sums[0] / sums[1]).tolist(), sums[1].tolist()  # one host read each

    def _train_step(self, xy) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_loss(xy)
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.clipped, self.max_grad_norm)
        self.optimizer.step()

    def _epochs(self):
        """Batches on the device, ``None`` after each pass over ``batches``."""
        while True:
            for b in fresh_iter(self.batches):
                yield to_device(self.unpack(b), self.device)
            yield None

    def losses_after(self, horizons: list[int]):
        """Train to each horizon in turn (ascending) and yield ``(horizon, eval loss)`` there."""
        done = 0
        epochs = self._epochs() if self.unit == "epochs" else None
        for h in horizons:
            while done < h:
                if epochs is None:
                    self._train_step(self.train_batches[done])
                else:
                    for xy in epochs:
                        if xy is None:
                            break
                        self._train_step(xy)
                done += 1
            yield h, self.eval_loss()


def check_trial_setup(name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                      max_grad_norm: float | None) -> None:
    """Refuse or warn about what would make the trials differ from the run, before any work."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{name} needs a torch.optim.Optimizer (its state and param groups are what the trials "
                        f"restore), got {type(optimizer).__name__}; pass the optimizer it wraps")
    if max_grad_norm is not None and not is_positive_number(max_grad_norm):
        raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
    if not model.training:
        warnings.warn(f"{name}: the model is in eval mode, so the trials train with dropout off and BatchNorm "
                      "statistics frozen; call model.train() first if your run trains in train mode",
                      RuntimeWarning, stacklevel=optim_support.user_stacklevel())
    if optim_support.torch_scheduler_built(optimizer):
        warnings.warn(f"{name}: a torch.optim.lr_scheduler was built on this optimizer at some point; if it is "
                      f"still stepped, its next step() sets the lr from its own schedule and undoes what {name} "
                      "chose: build the scheduler after this call. If not, ignore this",
                      RuntimeWarning, stacklevel=optim_support.user_stacklevel())


def _check_no_fresh_autolr(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that an ``AutoLR`` drives and that has not stepped yet: its hook would
    refuse the trials' ``optimizer.step()`` as a loop in the wrong order."""
    from .scheduler import autolrs_driving  # the scheduler imports this package's modules

    if any(owner.step_count == 0 for owner in autolrs_driving(optimizer)):
        raise RuntimeError(
            "find_lr: an AutoLR was built on this optimizer and has not stepped yet. Run find_lr first, "
            "set the optimizer's lr to its suggestion, then build AutoLR: AutoLR(...) reads the lr as the peak "
            "rate when it is built"
        )


def _sweep(trial: _Trial, snap: TrainingSnapshot, rates_grid: list[float], scales: list[float], horizons: list[int],
           limit: float | None, progress: bool) -> tuple[dict, dict, dict]:
    """One trial per rate until every horizon has diverged: ``(rates, losses, diverged_at)`` per
    horizon (a diverged point is left out of its curve and ends that horizon)."""
    rates: dict[int, list[float]] = {h: [] for h in horizons}
    losses: dict[int, list[float]] = {h: [] for h in horizons}
    diverged: dict[int, float | None] = {h: None for h in horizons}
    bar = tqdm(rates_grid, desc="find_lr", leave=False, disable=not progress)
    for rate in bar:
        active = [h for h in horizons if diverged[h] is None]
        if not active:
            break
        _set_rate(trial.optimizer, rate, scales)
        for h, value in trial.losses_after(active):
            if not math.isfinite(value) or (limit is not None and value > limit):
                diverged[h] = rate
            else:
                rates[h].append(rate)
                losses[h].append(value)
        snap.restore()
        bar.set_postfix(rate=f"{rate:.2e}", active=len([h for h in horizons if diverged[h] is None]))
    return rates, losses, diverged


def _suggestions(horizons: list[int], rates: dict, losses: dict, diverged: dict, limit: float | None,
                 smoothing: int) -> tuple[dict, dict, dict]:
    """``(smoothed, suggestions, steepest)`` per horizon. A horizon that diverged gets one more
    point at the limit (a lower bound of the loss at the rate that diverged) for the smoothing
    only, so a minimum right at the cliff is pulled up."""
    smoothed = {}
    for h in horizons:
        pad = [limit] if diverged[h] is not None and limit is not None else []
        smoothed[h] = smooth_curve(losses[h] + pad, smoothing)[: len(losses[h])]
    suggestions = {}
    for h in horizons:
        finite = [(v, r) for v, r in zip(smoothed[h], rates[h], strict=True) if math.isfinite(v)]
        suggestions[h] = min(finite)[1] if finite else float("nan")
    steepest = {h: steepest_rate(rates[h], smoothed[h]) for h in horizons}
    return smoothed, suggestions, steepest


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
    max_grad_norm: float | None = None,
) -> LRFinderResult:
    """Range test: for each of ``num`` log-spaced rates in ``[start_lr, end_lr]``, train from the
    state at call time for each horizon and record the evaluation loss.

    Args:
        model, optimizer, loss_fn: as in your training loop; ``loss_fn(model(inputs), targets)``.
            Other param groups keep their ratio of ``lr`` to the first group's (the first
            positive one: a group frozen with ``lr=0`` stays frozen).
        batches: training batches, ``(inputs, targets)`` tuples or dicts (see ``unpack``). With
            ``unit="steps"`` the first ``num_eval_batches + max(horizons)`` batches are taken once
            and every trial trains on the same ones. With ``unit="epochs"`` an epoch is one pass
            over ``batches``, which must then be re-iterable (a list or a DataLoader).
        horizons: training lengths to measure after, e.g. ``(1, 4, 16)`` steps; all in one call
            (a trial trains to the longest horizon still in play and measures on the way).
        unit: ``"steps"`` or ``"epochs"``.
        diverge_factor: a horizon stops once its loss exceeds
            ``start_loss + (factor - 1) * |start_loss|`` (``factor * start_loss`` for a positive
            loss) or is not finite; that point is left out of its curve. The test stops when all horizons have.
            ``None``: run every rate.
        smoothing: window (points) of the centred moving average for ``smoothed``; 1 = none.
        eval_batches: the fixed batches the loss is measured on (mean over them, no gradients,
            model in its mode at call time). Default: the first ``num_eval_batches`` batches.
        unpack: ``fn(batch) -> (inputs, targets)``; default handles tuples and dicts with keys
            like ``inputs/x`` and ``targets/labels/y``. A dict ``inputs`` is passed as ``**kwargs``.
        plot: write the PNG (one panel per horizon) to this path.
        progress: show a tqdm bar.
        max_grad_norm: clip the trials' gradients to this total norm (``clip_grad_norm_`` over
            the optimizer's parameters), as a run that clips does: clipping changes which rates
            are stable.
        distributed: ``"auto"``: under an initialised process group with several ranks the
            evaluation losses are averaged across ranks, so every rank takes the same decisions.

    Returns an :class:`LRFinderResult`; model, buffers, optimizer state and RNG are restored.
    """
    horizons = _check_arguments(horizons, unit, start_lr, end_lr, num, diverge_factor, smoothing)
    check_trial_setup("find_lr", model, optimizer, max_grad_norm)
    _check_no_fresh_autolr(optimizer)
    unpack = unpack or default_unpack
    device = _model_device(model)
    dist_on = is_distributed(distributed)
    _, scales = optim_support.group_lr_scales([float(g["lr"]) for g in optimizer.param_groups])
    rates_grid = torch.logspace(math.log10(start_lr), math.log10(end_lr), num, dtype=torch.float64).tolist()
    # before the batches are read: iterating a shuffling DataLoader draws from the RNG
    snap = TrainingSnapshot(model, optimizer, loaders=(batches, eval_batches))
    try:
        eval_batches, train_batches = _split_batches(batches, unit, max(horizons), eval_batches, num_eval_batches)
        eval_batches = [to_device(unpack(b), device) for b in eval_batches]
        if not eval_batches:
            raise ValueError("find_lr needs at least one evaluation batch (num_eval_batches >= 1)")
        if train_batches is not None:
            train_batches = [to_device(unpack(b), device) for b in train_batches]
        snap.restore_rng()  # every trial, the first included, starts from the RNG at the call
        trial = _Trial(model, optimizer, loss_fn, unit, batches, train_batches, eval_batches, unpack, device, dist_on,
                       max_grad_norm)
        start_loss = trial.eval_loss()
        if not math.isfinite(start_loss):
            raise ValueError(f"the loss at call time is {start_loss}; find_lr needs a finite starting loss")
        # a margin on |loss|: a negative loss (a likelihood, an ELBO) must not diverge at once
        limit = None if diverge_factor is None else start_loss + (diverge_factor - 1.0) * abs(start_loss)
        rates, losses, diverged = _sweep(trial, snap, rates_grid, scales, horizons, limit, progress)
    finally:
        snap.restore()
    smoothed, suggestions, steepest = _suggestions(horizons, rates, losses, diverged, limit, smoothing)
    if all(not rates[h] for h in horizons):
        warnings.warn(f"find_lr: every rate from start_lr={start_lr:g} diverged; try a smaller start_lr", stacklevel=2)
    result = LRFinderResult(horizons, unit, start_loss, rates, losses, smoothed, suggestions, diverged, steepest,
                            {"start_lr": start_lr, "end_lr": end_lr, "num": num, "diverge_factor": diverge_factor,
                             "smoothing": smoothing, "num_eval_batches": len(eval_batches)})
    if plot:
        result.plot(plot)
    return result
