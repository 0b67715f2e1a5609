"""Choose the rate ``AutoLR`` anchors on, by short trials scored on held-out data.

``AutoLR``'s default scale takes the optimizer's ``lr`` as the peak rate the user means. When
that ``lr`` is a guess (a library default such as Adam's ``1e-3``), :func:`find_anchor_lr` tries
it and the rates around it (``lr * 10**(-1, -0.5, 0, 0.5, 1)`` by default), each for a fraction of
the run from the same weights, scores each trial by the loss on held-out batches, and sets the
best as the optimizer's ``lr`` (the param groups keep their ratios). Everything else (weights,
buffers, optimizer state, RNG) is restored bit for bit, so training then starts from the
weights it would have started from.

A trial is a run in miniature: its rate anneals from the trial rate to 0 along a cosine (the
trials have no warm-up; AutoLR's own default envelope holds the rate until its last 20 %, and
trials that hold, then anneal, chose worse), so a large rate is judged after its noise has been
annealed away (a constant-rate trial judges it at its noisiest and favours small rates). The
trials are long (15 % of the run by default: five of them cost 75 % of one run, and each trial
``extend`` adds 15 % more) and scored on
data they did not train on. The given ``lr`` is the prior: of the rates the held-out batches cannot
tell from the lowest (a one-sided paired t-test over the batches, ``confidence``), the one nearest
the given ``lr`` is chosen, so a small held-out split does not move the rate on chance, and a move
goes no further than the evidence. A choice whose next larger rate failed steps down one rate,
away from the edge of stability.
``docs/anchor_lr.md`` has the measured effect on the comparison's tasks.

    lr = find_anchor_lr(model, opt, loss_fn, train_loader, val_loader, total_steps=T).lr
    sched = AutoLR(opt, total_steps=T)      # anchored on the chosen lr
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import optim_support
from .batches import fresh_iter, to_device
from .checks import is_whole_number
from .distributed import is_distributed, min_max_across_ranks
from .lr_finder import (
    Unpack,
    _model_device,
    _set_rate,
    _Trial,
    check_trial_setup,
    default_unpack,
)
from .rate_scale import envelope, resolve_warmup
from .training_snapshot import TrainingSnapshot

#: the trial's length as a fraction of the run (``total_steps``)
DEFAULT_FRACTION = 0.15
#: the rates tried: ``lr * 10**e`` for ``e`` in ``linspace(-DECADES, DECADES, NUM_RATES)``
DEFAULT_DECADES = 1.0
DEFAULT_NUM_RATES = 5
#: evaluation batches taken from ``val_batches`` at most
DEFAULT_MAX_EVAL_BATCHES = 16
#: rates whose held-out loss a one-sided paired t-test over the evaluation batches cannot tell
#: from the lowest at this confidence are within noise of it (the one nearest the given lr wins)
DEFAULT_CONFIDENCE = 0.95
#: extra trials above the largest rate at most, while the largest rate wins (off by default: on
#: sequence models the trials favour too large a rate past the grid; docs/anchor_lr.md)
DEFAULT_EXTEND = 0
#: the largest confidence accepted (the t quantile's bisection is accurate to about 1e-9 there)
MAX_CONFIDENCE = 0.9999
#: a trial failed if it made less than this fraction of the best trial's progress from the
#: held-out loss at call time (a network stuck at chance, a loss that went nowhere)
FAILED_PROGRESS = 0.1
#: how a trial's rate moves over its steps
TRIAL_SCHEDULES = ("cosine", "warmup-cosine", "wsd", "constant")


@dataclass
class AnchorResult:
    """What :func:`find_anchor_lr` tried and chose (rates of the first param group with a
    positive ``lr``)."""

    lr: float  # the rate chosen (the given one when no trial was usable)
    given_lr: float
    rates: list[float]
    losses: list[float]  # held-out loss after each trial; NaN where it diverged or was not tried
    start_loss: float  # held-out loss before any trial
    trial_steps: int
    seconds: float  # wall time of all trials
    trials_run: int  # the first trials_run rates were tried (after a divergence the larger are not)
    lowest_lr: float | None = None  # the rate with the lowest held-out loss (None: no usable trial)
    #: per rate, the paired t statistic of its per-batch held-out losses minus the lowest rate's
    #: (None: the lowest itself, a trial that diverged or did not run, or no test made)
    t_statistics: list[float | None] | None = None
    #: a rate whose t statistic is at most this is within the noise of the lowest (None: no test)
    t_threshold: float | None = None
    confidence: float = DEFAULT_CONFIDENCE
    trial_schedule: str = "cosine"
    batch_losses: list[list[float]] | None = None  # per trial, the loss of each held-out batch
    #: set when the next larger rate than the one the losses picked failed: the choice stepped
    #: down from this rate, away from the edge of stability
    stepped_down_from: float | None = None  # an absolute rate, as ``lr`` and ``rates``
    step_down: bool = True
    #: per held-out batch, its weight in the means and the test: its number of samples
    batch_weights: list[float] | None = None
    note: str = ""  # why the test was not made (also warned), when it was not
    extend: int = DEFAULT_EXTEND
    extended: int = 0  # trials run above the num rates (the last ``extended`` entries of ``rates``)

    @property
    def cost_steps(self) -> int:
        """Training steps the trials took (what the choice cost, in steps of the run)."""
        return self.trial_steps * self.trials_run

    @property
    def factor(self) -> float:
        return self.lr / self.given_lr

    def choose(self, confidence: float | None = None, step_down: bool | None = None,
               extend: int | None = None) -> float:
        """The rate another decision rule chooses from these same trials (``confidence``,
        ``step_down`` and ``extend``: default the ones this result was decided with); no trial
        runs again. It is what a live run with that rule chooses as long as these trials went at
        least as far past the grid as that rule asks: where it asks for an extension that was not
        run, it warns and stops there (trials recorded with ``confidence=0``, ``step_down=False``
        and the largest ``extend`` go as far as any rule asks)."""
        confidence = self.confidence if confidence is None else confidence
        step_down = self.step_down if step_down is None else step_down
        extend = self.extend if extend is None else extend
        _check_confidence(confidence)
        if self.batch_losses is None:
            raise ValueError("choose() needs the per-batch held-out losses (batch_losses) of the trials")
        num = len(self.rates) - self.extended
        k = num  # the num rates first, then the extensions one by one
        while True:
            decision = _decide(self.rates[:k], self.losses[:k], self.batch_losses[:k], self.batch_weights,
                               self.given_lr, confidence, self.start_loss, step_down)
            wants_more = _wants_extension(decision, self.rates[:k], self.losses[:k], k - num, extend)
            if wants_more and k == len(self.rates):
                warnings.warn(f"AnchorResult.choose: this rule would try {self.rates[-1] * self._step():.3g} next, "
                              "which these trials did not run; its choice is the one before that trial", stacklevel=2)
            if not (wants_more and k < len(self.rates)):
                return self.given_lr if decision.lr is None else decision.lr
            k += 1

    def _step(self) -> float:
        """The ratio between neighbouring rates."""
        return self.rates[1] / self.rates[0]

    @classmethod
    def from_dict(cls, d: dict) -> AnchorResult:
        """The result :meth:`to_dict` wrote, also after strict JSON (``None`` for NaN): ``choose()``
        works on it."""
        def nan(v):
            return float("nan") if v is None else v

        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        fields["losses"] = [nan(v) for v in d["losses"]]
        fields["start_loss"] = nan(d["start_loss"])
        result = cls(**fields)
        if d.get("batch_losses") is not None:
            result.batch_losses = [[nan(v) for v in b] for b in d["batch_losses"]]
            if result.t_threshold is not None:  # infinite t statistics were stored as None: recompute them
                result.t_statistics = _decide(result.rates, result.losses, result.batch_losses, result.batch_weights,
                                              result.given_lr, result.confidence, result.start_loss,
                                              result.step_down).t_statistics
        return result

    def to_dict(self) -> dict:
        return {"lr": self.lr, "given_lr": self.given_lr, "factor": self.factor, "rates": self.rates,
                "losses": self.losses, "start_loss": self.start_loss, "trial_steps": self.trial_steps,
                "trials_run": self.trials_run, "cost_steps": self.cost_steps, "seconds": self.seconds,
                "lowest_lr": self.lowest_lr, "t_statistics": self.t_statistics, "t_threshold": self.t_threshold,
                "confidence": self.confidence, "trial_schedule": self.trial_schedule,
                "batch_losses": self.batch_losses, "stepped_down_from": self.stepped_down_from,
                "step_down": self.step_down, "batch_weights": self.batch_weights, "note": self.note,
                "extend": self.extend, "extended": self.extended}

    def table(self) -> str:
        """Markdown: one row per rate tried (its held-out loss, its t statistic against the lowest,
        whether it is within the noise of the lowest), the chosen rate marked, and the step-down."""
        tested = self.t_threshold is not None
        lines = [f"| rate | x given | held-out loss after {self.trial_steps} steps ({self.trial_schedule}) "
                 "| t vs lowest | within noise of lowest | chosen |", "|---:|---:|---:|---:|:---:|:---:|"]
        for i, (rate, loss) in enumerate(zip(self.rates, self.losses, strict=True)):
            shown = f"{loss:.4g}" if math.isfinite(loss) else "diverged" if i < self.trials_run else "not tried"
            t = self.t_statistics[i] if self.t_statistics else None
            if rate == self.lowest_lr:
                t_cell, within = "lowest", "yes"
            elif t is None:
                t_cell, within = "", ""
            else:
                t_cell, within = f"{t:.3g}", "yes" if t <= self.t_threshold else ""
            lines.append(f"| {rate:.3g} | {rate / self.given_lr:.3g} | {shown} | {t_cell} | {within} "
                         f"| {'yes' if rate == self.lr else ''} |")
        if self.lowest_lr is None:
            lines += ["", f"No trial was usable: the lr is left at {self.given_lr:.3g}."]
        if tested:
            n = len(self.batch_losses[0])
            lines += ["", f"Within noise: paired t over {n} held-out batches at most {self.t_threshold:.3g} "
                          f"(one-sided, confidence {self.confidence:g}); the chosen rate is the one of those "
                          "nearest the given rate."]
        if self.note:
            lines += ["", f"Not tested: {self.note}."]
        if self.stepped_down_from is not None:
            i = self.rates.index(self.lr)
            beyond = (tested and self.t_statistics[i] is not None and self.t_statistics[i] > self.t_threshold)
            lines += ["", f"The next larger rate than {self.stepped_down_from:.3g} failed, so the choice steps down to "
                          f"{self.lr:.3g}, away from the edge of stability"
                          + (" (though its held-out loss is clearly above the lowest)." if beyond else ".")]
        return "\n".join(lines)


def _cycled(batches: Iterable):
    """The batches again and again (a re-iterable: list, DataLoader)."""
    while True:
        empty = True
        for b in fresh_iter(batches):
            empty = False
            yield b
        if empty:
            raise ValueError("find_anchor_lr: train_batches gave no batches (on a new pass: a loader over a one-pass "
                             "stream cannot be cycled; pass a list or a re-iterable DataLoader)")


def _trial_steps(total_steps: int | None, trial_steps: int | None, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if trial_steps is not None:
        if not is_whole_number(trial_steps, 1):
            raise ValueError(f"trial_steps must be a positive whole number, got {trial_steps!r}")
        return int(trial_steps)
    if total_steps is None:
        raise ValueError("find_anchor_lr needs total_steps (the run's optimizer steps; each trial is "
                         f"fraction={fraction:g} of them) or trial_steps")
    if not is_whole_number(total_steps, 1):
        raise ValueError(f"total_steps must be a positive whole number, got {total_steps!r}")
    return max(1, round(fraction * total_steps))


def find_anchor_lr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any, Any], Tensor],
    train_batches: Iterable,
    val_batches: Iterable,
    *,
    total_steps: int | None = None,
    trial_steps: int | None = None,
    fraction: float = DEFAULT_FRACTION,
    decades: float = DEFAULT_DECADES,
    num: int = DEFAULT_NUM_RATES,
    trial_schedule: str = "cosine",
    confidence: float = DEFAULT_CONFIDENCE,
    step_down: bool = True,
    extend: int = DEFAULT_EXTEND,
    max_eval_batches: int = DEFAULT_MAX_EVAL_BATCHES,
    apply: bool = True,
    unpack: Unpack | None = None,
    progress: bool = True,
    distributed: bool | str = "auto",
    max_grad_norm: float | None = None,
) -> AnchorResult:
    """Train from the current state at ``num`` rates around the optimizer's ``lr`` (from
    ``lr / 10**decades`` to ``lr * 10**decades``, log-spaced), ``trial_steps`` each (default:
    ``fraction`` of ``total_steps``), score each by the mean loss on ``val_batches``, and (with
    ``apply``) set the chosen rate as the optimizer's ``lr``, every param group keeping its ratio.

    Args:
        model, optimizer, loss_fn: as in your training loop; ``loss_fn(model(inputs), targets)``.
            Build ``AutoLR`` after this call (it reads the ``lr`` when it is built).
        train_batches: a re-iterable (a list or a DataLoader), cycled; every trial starts from the
            RNG at call time, so a shuffling DataLoader gives every trial the same batches. A
            loader that reshuffles by a pass counter of its own (accelerate's prepared DataLoader,
            the Trainer's) gives trials longer than one pass other batches after the first pass:
            pass a list of batches there.
        val_batches: held-out batches (not in ``train_batches``): a trial is scored on them, so a
            rate that only fits the training batches faster does not win. At most
            ``max_eval_batches`` are used; the test below needs at least 2.
        trial_schedule: ``"cosine"``: a trial's rate anneals from its rate to 0 over the trial, as
            ``AutoLR(total_steps=T, envelope="cosine")`` anneals a run after its warm-up;
            ``"warmup-cosine"``: that whole envelope over the trial (a warm-up over its first 5 %,
            then the cosine); ``"wsd"``: AutoLR's default envelope without its warm-up, the rate
            held, then a linear decay over the last 20 % of the trial;
            ``"constant"``: the rate is held (for a run whose rate does not decay).
        confidence: the rates whose held-out loss a one-sided paired t-test over the evaluation
            batches cannot tell from the lowest at this confidence are within noise of it; the
            one nearest the given ``lr`` is chosen (the given ``lr`` itself when it is one of
            them). ``0``: the lowest, whatever the margin; else at least 0.5 and at most
            ``MAX_CONFIDENCE``. The test needs at least 2 evaluation batches; with one, the
            lowest is taken (warned). Batches count by their number of samples (a short last
            batch counts less). With an even ``num`` the given ``lr`` is not among the trials;
            the candidate nearest it is chosen, a tie going to the smaller rate.
        step_down: when the next larger rate than the choice diverged or made less than a tenth
            of the best trial's progress, the choice is at the edge of stability, where a run
            several times longer than a trial can tip over: it steps down to the next smaller
            rate (``stepped_down_from`` says from which).
        extend: while the chosen rate is the largest tried, try the next larger one on the same
            spacing, at most ``extend`` times, so that an ``lr`` more than ``10**decades`` too small
            is followed up (each extra trial costs ``trial_steps`` more; ``extended`` counts them).
            Off by default: it helps where the ``lr`` is far too small, and costs where short
            trials favour too large a rate (sequence models; docs/anchor_lr.md). A failed extra
            trial can make the step-down move the choice below the largest of the ``num`` rates.
        unpack: ``fn(batch) -> (inputs, targets)``; default as :func:`find_lr`'s.
        distributed: under an initialised process group the held-out losses are averaged across
            ranks, so every rank chooses the same rate.
        max_grad_norm: clip the trials' gradients to this total norm, as a run that clips does
            (the trials do plain ``backward(); optimizer.step()`` otherwise: no clipping, AMP
            scaling or accumulation).

    Cost: ``num`` trials of ``trial_steps`` (75 % of a run with the defaults, fewer when a rate
    diverges; a trial takes at least one step, so a run shorter than ``num / fraction`` steps costs
    more). The model trains in the mode it is in (warned in eval mode); attributes an optimizer
    keeps outside its ``state`` and ``param_groups`` are not restored.

    A trial whose held-out loss is not finite, or above the loss at call time by more than half its
    size, counts as diverged; the larger rates are then not tried. When no trial is usable, the
    ``lr`` is left as it was (with a warning). Returns an :class:`AnchorResult` (``cost_steps``:
    what it cost; ``table()``: every trial and the decision; ``choose()``: what other rules would
    have chosen from the same trials).
    """
    steps = _trial_steps(total_steps, trial_steps, fraction)
    if not (math.isfinite(decades) and decades > 0) or not is_whole_number(num, 2):
        raise ValueError(f"need decades > 0 and a whole num >= 2, got decades={decades!r}, num={num!r}")
    if trial_schedule not in TRIAL_SCHEDULES:
        raise ValueError(f"trial_schedule must be one of {TRIAL_SCHEDULES}, got {trial_schedule!r}")
    _check_confidence(confidence)
    if not is_whole_number(extend, 0):
        raise ValueError(f"extend must be a whole number >= 0 (0: only the num rates), got {extend!r}")
    extend, num = int(extend), int(num)  # NumPy integers too: the result is written as JSON
    if isinstance(train_batches, Iterator):  # asked without iterating: a DataLoader would draw from the RNG
        raise ValueError("find_anchor_lr: train_batches must be re-iterable (a list or a DataLoader): every trial "
                         "trains on the same batches")
    check_trial_setup("find_anchor_lr", model, optimizer, max_grad_norm)
    _refuse_autolr(optimizer)
    given, scales = optim_support.group_lr_scales([float(g["lr"]) for g in optimizer.param_groups])
    if not given > 0:
        raise ValueError("find_anchor_lr: every param group has lr 0; set the lr you would use")
    unpack = unpack or default_unpack
    device = _model_device(model, "find_anchor_lr")
    exponents = torch.linspace(-decades, decades, num, dtype=torch.float64).tolist()
    if num % 2:
        exponents[num // 2] = 0.0  # the given rate itself, exactly
    rates = [given * 10.0**e for e in exponents]
    start = time.perf_counter()
    # before a shuffling DataLoader draws from the RNG
    snap = TrainingSnapshot(model, optimizer, loaders=(train_batches, val_batches))
    losses: list[float] = []
    batch_losses: list[list[float]] = []
    dist_on = is_distributed(distributed)
    try:
        eval_batches = [to_device(unpack(b), device) for b in islice(fresh_iter(val_batches), max_eval_batches)]
        _check_eval_batch_counts(len(eval_batches), dist_on, device)
        snap.restore_rng()
        trial = _Trial(model, optimizer, loss_fn, "steps", train_batches, None, eval_batches, unpack, device, dist_on,
                       max_grad_norm)
        local_weights = [float(_batch_size(xy)) for xy in eval_batches]
        per_batch, weights = trial.eval_batch_losses(local_weights)  # weights: summed over the ranks
        start_loss = _weighted_mean(per_batch, weights)
        if not math.isfinite(start_loss):
            raise ValueError(f"the held-out loss at call time is {start_loss}; find_anchor_lr needs a finite one")
        limit = start_loss + 0.5 * abs(start_loss)
        with tqdm(total=steps * num, desc="find_anchor_lr", leave=False, disable=not progress) as bar:

            def run_trial(rate: float) -> None:
                batches = _cycled(train_batches)
                for i in range(steps):
                    _set_rate(optimizer, rate * _trial_factor(trial_schedule, i, steps), scales)
                    trial._train_step(to_device(unpack(next(batches)), device))
                    bar.update(1)
                per_batch, _ = trial.eval_batch_losses(local_weights)
                value = _weighted_mean(per_batch, weights)
                losses.append(value if math.isfinite(value) and value <= limit else float("nan"))
                batch_losses.append(per_batch)
                snap.restore()

            for rate in rates:
                if losses and not math.isfinite(losses[-1]):
                    break  # a smaller rate diverged: the larger ones are not tried
                run_trial(rate)
            losses += [float("nan")] * (num - len(losses))
            decision = _decide(rates, losses, batch_losses, weights, given, confidence, start_loss, step_down)
            step = 10.0 ** (2 * decades / (num - 1))
            while _wants_extension(decision, rates, losses, len(rates) - num, extend):
                rates.append(rates[-1] * step)
                bar.total += steps
                run_trial(rates[-1])
                decision = _decide(rates, losses, batch_losses, weights, given, confidence, start_loss, step_down)
    finally:
        snap.restore()
    trials_run = len(batch_losses)
    chosen = decision.lr if decision.lr is not None else given
    if decision.lr is None:
        warnings.warn(f"find_anchor_lr: the smallest rate tried, {rates[0]:.3g}, diverged, so no trial was usable; the "
                      f"lr is left at {given:.3g}. Pass a smaller lr, or a larger decades", stacklevel=2)
    if decision.note:
        warnings.warn(f"find_anchor_lr: {decision.note}", stacklevel=2)
    if apply and chosen != given:  # else the groups keep their lrs exactly
        _set_rate(optimizer, chosen, scales)
    return AnchorResult(chosen, given, rates, losses, start_loss, steps, time.perf_counter() - start, trials_run,
                        decision.lowest, decision.t_statistics, decision.t_threshold, confidence, trial_schedule,
                        batch_losses, decision.stepped_down_from, step_down, weights, decision.note, extend,
                        len(rates) - num)


def _check_eval_batch_counts(count: int, dist_on: bool, device: torch.device) -> None:
    """Every rank needs held-out batches, as many as the others: their losses are combined batch
    by batch (checked on every rank, so that all raise together instead of one hanging)."""
    fewest, most = min_max_across_ranks(count, device) if dist_on else (count, count)
    if fewest == 0:
        raise ValueError("find_anchor_lr: val_batches is empty" + (" on at least one rank" if dist_on else "")
                         + "; pass held-out batches the trials do not train on")
    if fewest != most:
        raise ValueError(f"find_anchor_lr: every rank needs the same number of held-out batches (between {fewest} and "
                         f"{most} across ranks); pass max_eval_batches={fewest} or split the held-out data evenly")


def _batch_size(xy) -> int:
    """Samples in an (inputs, targets) batch: the first dimension of the targets (else of the
    inputs, or of the first tensor in a mapping of inputs); 1 when none has one."""
    x, y = xy
    for part in (y, x, *(x.values() if isinstance(x, Mapping) else ())):
        if isinstance(part, Tensor) and part.dim() > 0:
            return max(1, part.shape[0])
    return 1


def _weighted_mean(values: list[float], weights: list[float]) -> float:
    return sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)


def _trial_factor(schedule: str, step: int, steps: int) -> float:
    """The trial rate's multiplier at ``step`` of ``steps``."""
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":  # held, then the last 20 % of the trial decays (AutoLR's default, no warm-up)
        return envelope(step, steps, 0, "wsd")
    # "cosine": CosineAnnealingLR(T_max=steps) from 1 towards 0; "warmup-cosine": a 5 % warm-up, then
    # that cosine (AutoLR's cosine envelope in miniature)
    return envelope(step, steps, resolve_warmup(None, steps) if schedule == "warmup-cosine" else 0)


@dataclass
class _Decision:
    lr: float | None  # None: no usable trial
    lowest: float | None = None
    t_statistics: list[float | None] | None = None
    t_threshold: float | None = None
    stepped_down_from: float | None = None  # the rate the choice stepped down from (its larger neighbour failed)
    note: str = ""  # why the test could not be made (warned)


def _wants_extension(decision: _Decision, rates: list[float], losses: list[float], extended: int,
                     extend: int) -> bool:
    """Whether one more rate past the largest is tried: the largest rate tried won (the trials have
    not bracketed the best), it did not diverge, and fewer than ``extend`` extensions ran. The live
    trials and :meth:`AnchorResult.choose` ask the same question, so a replay is exact."""
    return extended < extend and decision.lr == rates[-1] and math.isfinite(losses[-1])


def _check_confidence(confidence: float) -> None:
    ok = (not isinstance(confidence, bool) and isinstance(confidence, (int, float))
          and (confidence == 0 or 0.5 <= confidence <= MAX_CONFIDENCE))
    if not ok:
        raise ValueError(f"confidence must be 0 (take the lowest loss, untested) or in [0.5, {MAX_CONFIDENCE}] (e.g. "
                         f"0.95), got {confidence!r}")


def _decide(rates: list[float], losses: list[float], batch_losses: list[list[float]], weights: list[float] | None,
            given: float, confidence: float, start_loss: float, step_down: bool = True) -> _Decision:
    """Which rate to anchor on (``rates`` ascending; trials past a diverged one did not run;
    ``weights``: each held-out batch's weight, None for equal weights).

    1. Within noise: the rate with the lowest held-out loss, and every usable rate whose loss is
       not clearly above it (a one-sided paired t-test over the evaluation batches at
       ``confidence``; with ``confidence`` 0, the lowest alone).
    2. Of those, the one nearest the given rate (on a log scale; a tie goes to the smaller):
       the given rate stays unless another is clearly better, and a move goes no further than
       the trials' noise lets it tell apart.
    3. With ``step_down``: if the next larger rate failed (diverged, or made less than
       ``FAILED_PROGRESS`` of the best trial's progress from ``start_loss``), the choice sits at
       the edge of stability, where a run several times longer than the trial can tip over: it
       steps down to the next smaller rate.
    """
    usable = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    if not usable:
        return _Decision(None)
    best = min(usable, key=lambda i: losses[i])
    decision = _Decision(rates[best], rates[best])
    candidates = [best]
    if confidence > 0 and len(usable) > 1:
        n = len(batch_losses[best])
        if n < 2:
            decision.note = ("one held-out batch gives no noise estimate, so the lowest loss is taken untested; pass "
                             "at least 2 val_batches")
        else:
            weights = weights or [1.0] * n
            relative = all(v > 0 for i in usable for v in batch_losses[i])  # one scale for every comparison
            decision.t_threshold = _t_quantile(confidence, n - 1)
            decision.t_statistics = [None] * len(rates)
            for i in usable:
                if i != best:
                    diffs = _paired_differences(batch_losses[i], batch_losses[best], relative)
                    t = _paired_t(diffs, weights)
                    decision.t_statistics[i] = t
                    if t <= decision.t_threshold:
                        candidates.append(i)
    # distance in decades, rounded: the two trials around an absent given rate tie exactly
    i = min(candidates, key=lambda j: (round(abs(math.log10(rates[j] / given)), 9), rates[j]))
    progress = start_loss - losses[best]
    failed = i + 1 < len(rates) and (not math.isfinite(losses[i + 1])
                                     or start_loss - losses[i + 1] < FAILED_PROGRESS * progress)
    if step_down and progress > 0 and failed and i > 0 and math.isfinite(losses[i - 1]):
        decision.stepped_down_from, i = rates[i], i - 1
    decision.lr = rates[i]
    return decision


def _paired_differences(other: list[float], lowest: list[float], relative: bool) -> list[float]:
    """Per batch, how much higher another rate's loss is than the lowest rate's: as a log ratio
    (``relative``: batches of different difficulty count alike; needs positive losses), else as a
    difference."""
    if relative:
        return [math.log(a) - math.log(b) for a, b in zip(other, lowest, strict=True)]
    return [a - b for a, b in zip(other, lowest, strict=True)]


def _paired_t(diffs: list[float], weights: list[float]) -> float:
    """The t statistic of the weighted mean of ``diffs`` (at least 2) against 0. A batch's mean
    has a variance inversely proportional to its size, so with ``weights`` the sizes: mean
    ``sum(w d) / sum(w)``, standard error ``sqrt(s2 / sum(w))`` with ``s2 = sum(w (d - mean)^2) /
    (n - 1)``; with equal weights, the paired t-test. ``+-inf`` for identical nonzero diffs."""
    n = len(diffs)
    if n < 2 or len(weights) != n:
        raise ValueError(f"the paired t-test needs at least 2 differences and one weight each, got {n} and "
                         f"{len(weights)}")
    total = sum(weights)
    mean = _weighted_mean(diffs, weights)
    s2 = sum(w * (d - mean) ** 2 for w, d in zip(weights, diffs, strict=True)) / (n - 1)
    if s2 == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / math.sqrt(s2 / total)


def _t_cdf(t: float, dof: int) -> float:
    """Student's t distribution function for a whole ``dof`` >= 1 (closed form: Abramowitz and
    Stegun 26.7.3 and 26.7.4), so the library needs no scipy."""
    if not is_whole_number(dof, 1):
        raise ValueError(f"dof must be a whole number >= 1, got {dof!r}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(dof))
    c2, term = math.cos(theta) ** 2, 1.0
    if dof % 2:  # A = 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(dof-3)))
        total = 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    else:  # A = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(dof-2))
        total = 1.0
        for k in range(1, dof // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = math.sin(theta) * total
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def _t_quantile(p: float, dof: int) -> float:
    """The ``p``-quantile (``0.5 <= p <= MAX_CONFIDENCE``) of Student's t with ``dof`` degrees of
    freedom, by bisection."""
    if not 0.5 <= p <= MAX_CONFIDENCE:
        raise ValueError(f"p must be in [0.5, {MAX_CONFIDENCE}], got {p}")
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, dof) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def _refuse_autolr(optimizer: torch.optim.Optimizer) -> None:
    """An ``AutoLR`` on the optimizer read its peak when it was built (and a fresh one would
    refuse the trials' steps): the rate chosen here would not be the one it uses."""
    from .scheduler import autolrs_driving  # the scheduler imports this package's modules

    if autolrs_driving(optimizer):
        raise RuntimeError("find_anchor_lr: an AutoLR already drives this optimizer. Call find_anchor_lr "
                           "first, then build AutoLR: it reads the optimizer's lr as its peak when it is built")
