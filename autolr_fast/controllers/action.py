"""The history-based action controller: every ``interval`` steps, look at the recent training-loss
history and multiply the rate by one of a few factors (default x0.9, x1.0, x1.1).

Three parts, one job each:

* :func:`history_features` turns a window of loss values into scale-free features (below).
* :func:`make_action_model` builds a small classifier over those features (MLP, 1-D CNN, GRU)
  that predicts which action was best (trained by ``autolr_experiments.action_training`` on
  data from ``autolr_experiments.collect``).
* :class:`ActionController` runs such a model inside :class:`autolr_fast.AutoLR`.

Features
--------
The controller does not look at raw per-step losses (too noisy) but at *block means*: the mean of
``block`` consecutive finite training losses. The window holds the last ``window`` block means
``m_1 .. m_W`` (oldest first), so it covers ``window * block`` steps (default 20 x 5 = 100, one
collection segment). ``m_0`` is the first block mean of the run and ``m_low`` the lowest block
mean of the run so far. Three channels, each of length W::

    channel 0 (relative to the start):    log(m_i / m_0)
    channel 1 (relative to the previous): log(m_i / m_{i-1})   (0 for i = 1)
    channel 2 (best so far, constant):    log(m_low / m_0)

Channel 2 tells "stuck at the starting level because nothing happened yet" (rate too small)
from "back at the starting level after progress" (the rate blew training up), which the window
alone cannot. All are ratios of losses, so multiplying every loss by a constant (another loss scale, another
task) leaves the features unchanged; the log makes "halved" and "doubled" symmetric. Values are
clamped to ``[-CLAMP, CLAMP]`` and a loss of 0 is treated as ``1e-12 * m_0``.
A *relative* controller (``ActionController(..., relative=True)``) keeps a level ``l`` (the
product of its actions, 1 at the start) and sets the rate to ``gamma * l``, where ``gamma`` is the
scale AutoLR passes: the optimizer's ``lr`` times, when ``total_steps`` is given, the envelope its
labels were made under (its ``trained_envelope``: a warm-up, then cosine; not AutoLR's
warm-up-stable-decay default). Its features have a fourth channel, ``log(l)`` at every position: how
far it has already moved the rate from the user's.

Optional validation history (offline models only: AutoLR sees training losses only): the last
``K`` validation losses ``v_1 .. v_K`` taken at decision points give the same three channels
relative to ``v_0`` (the first one), to the previous value and the lowest of the window
(:func:`history_features` again).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .files import read_file, write_file

FORMAT = "autolr_fast.action_controller"  # the "format" entry of a saved controller file
CLAMP = 20.0
FEATURE_CHANNELS = 3
DEFAULT_MULTIPLIERS = (0.9, 1.0, 1.1)
_UNSET = object()  # default_gamma: 1.0, or None for a relative controller


def history_features(window: Tensor, initial: Tensor, lowest: Tensor | None = None, clamp: float = CLAMP) -> Tensor:
    """Scale-free features ``(..., 3, W)`` from loss block means ``window (..., W)`` (oldest
    first), the run's first block mean ``initial (...)`` and the lowest block mean of the run so
    far ``lowest (...)`` (default: the window's own minimum); see the module docstring."""
    initial = initial.unsqueeze(-1)
    floor = initial.abs() * 1e-12
    w = torch.maximum(window, floor)
    if lowest is None:
        low = w.min(dim=-1, keepdim=True).values
    else:
        low = torch.maximum(torch.minimum(lowest.unsqueeze(-1), w.min(dim=-1, keepdim=True).values), floor)
    rel_start = torch.log(w / initial)
    rel_prev = torch.log(w[..., 1:] / w[..., :-1])
    rel_prev = torch.cat([torch.zeros_like(rel_prev[..., :1]), rel_prev], dim=-1)
    rel_low = torch.log(low / initial).expand_as(rel_start)
    out = torch.stack([rel_start, rel_prev, rel_low], dim=-2)
    return torch.nan_to_num(out, nan=0.0, posinf=clamp, neginf=-clamp).clamp(-clamp, clamp)


def with_level(features: Tensor, level: Tensor, clamp: float = CLAMP) -> Tensor:
    """``features (..., C, W)`` with the relative controller's channel ``log(level)`` (``level
    (...)``, the rate over the starting rate) appended at every position: ``(..., C + 1, W)``."""
    lvl = torch.log(level).clamp(-clamp, clamp).unsqueeze(-1).unsqueeze(-1)
    return torch.cat([features, torch.ones_like(features[..., :1, :]) * lvl], dim=-2)


def feature_channels(relative: bool) -> int:
    """Feature channels an action model reads: 3, and ``log(level)`` for a relative controller."""
    return FEATURE_CHANNELS + int(relative)


def block_means(losses: Tensor, block: int) -> Tensor:
    """Means of consecutive ``block``-sized chunks of ``losses (..., N)`` (N a multiple of block)."""
    n = losses.shape[-1]
    if n % block:
        raise ValueError(f"{n} losses do not split into blocks of {block}")
    return losses.reshape(*losses.shape[:-1], n // block, block).mean(-1)


# ------------------------------------------------------------------------------------------------
# Models: (B, C, W) features -> (B, A) action logits
# ------------------------------------------------------------------------------------------------
class ActionMLP(nn.Module):
    def __init__(self, channels: int, window: int, actions: int = 3, hidden: int = 32, extra: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels * window + extra, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, actions))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class ActionCNN(nn.Module):
    def __init__(self, channels: int, window: int, actions: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(channels, hidden, 3, padding=1), nn.ReLU(),
                                  nn.Conv1d(hidden, hidden, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Linear(hidden * 2, actions)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        pooled = torch.cat([h.mean(-1), h[..., -1]], dim=1)  # average and most recent position
        return self.head(pooled)


class ActionGRU(nn.Module):
    def __init__(self, channels: int, window: int, actions: int = 3, hidden: int = 16) -> None:
        super().__init__()
        self.gru = nn.GRU(channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, actions)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x.transpose(1, 2))
        return self.head(out[:, -1])


MODEL_TYPES = {"mlp": ActionMLP, "cnn": ActionCNN, "gru": ActionGRU}


def make_action_model(kind: str, window: int, channels: int = FEATURE_CHANNELS, actions: int = 3,
                      hidden: int | None = None, extra: int = 0) -> nn.Module:
    """``extra`` inputs beside the features (the MLP only: offline models that also read validation
    history)."""
    if kind not in MODEL_TYPES:
        raise ValueError(f"unknown action model {kind!r}; choose one of {sorted(MODEL_TYPES)}")
    if extra and kind != "mlp":
        raise ValueError(f"extra inputs are supported by the 'mlp' action model only, not {kind!r}")
    kwargs = {} if hidden is None else {"hidden": hidden}
    if extra:
        kwargs["extra"] = extra
    return MODEL_TYPES[kind](channels, window, actions, **kwargs)


# ------------------------------------------------------------------------------------------------
# The controller
# ------------------------------------------------------------------------------------------------
class ActionController(nn.Module):
    """A rate controller for :class:`autolr_fast.AutoLR` that multiplies the rate by the action a
    classifier picks from the recent loss history, every ``interval`` steps.

    AutoLR calls :meth:`scheduler_step_` once per step (under ``no_grad``) with the loss (0-dim
    float32 device tensor), ``gamma`` (the largest rate) and ``rate`` (a 0-dim tensor updated in
    place), and :meth:`initial_rate` once for the starting rate (the optimizer's ``lr`` unless
    ``start_rate`` is given). Everything happens on the device, without host syncs:

    * a finite loss is added to the running block; when ``block`` losses are in, their mean is
      pushed into the window (a buffer). A NaN/Inf loss is skipped: window, counters and rate are
      kept as they were.
    * every ``interval`` finite steps (once the window is full), the model's action multiplies the
      rate (a relative controller: the level, kept in ``[min_level, max_level]``); the rate is
      clamped to ``[min_rate, gamma]`` (relative: it is ``gamma * level``, at least ``min_rate``).

    The window, the running block, the first block mean and the counters are buffers, so
    ``state_dict()`` (and ``AutoLR.state_dict()``) carries them. The module can be compiled
    with ``torch.jit.script`` (the C++ runtime of this project only runs MLR-SNet).

    Args:
        model: ``(B, channels, window) -> (B, len(multipliers))`` logits (see :func:`make_action_model`;
            3 channels, 4 for a relative controller).
        window, block: the feature window (block means) and the steps per block.
        interval: steps between actions; a multiple of ``block``. Default ``window * block``.
        multipliers: the rate factor of each action.
        min_rate: lower clamp of the rate.
        start_rate: the starting rate; ``None`` keeps the optimizer's ``lr``.
        default_gamma: the largest rate when AutoLR is given no ``gamma``.
        relative: the rate is ``gamma * level`` (AutoLR's ``gamma``: the optimizer's ``lr``, times
            the envelope with ``total_steps``); the actions multiply the level, which is
            kept in ``[min_level, max_level]``. The model reads a fourth feature channel,
            ``log(level)``. ``start_rate`` must then be ``None`` and ``default_gamma`` unset or ``None``.
    """

    # the envelope its decisions were learned under (collect --envelope runs the cosine one): the
    # level corrects that schedule, so AutoLR keeps it unless told otherwise; a constant, so that a
    # TorchScript copy keeps it too
    __constants__ = ["trained_envelope"]
    trained_envelope = "cosine"

    def __init__(
        self,
        model: nn.Module,
        *,
        window: int = 20,
        block: int = 5,
        interval: int | None = None,
        multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
        min_rate: float = 0.0,
        start_rate: float | None = None,
        default_gamma: float | None | object = _UNSET,
        relative: bool = False,
        min_level: float = 0.01,
        max_level: float = 10.0,
    ) -> None:
        super().__init__()
        if default_gamma is _UNSET:
            default_gamma = None if relative else 1.0
        if relative and (start_rate is not None or default_gamma is not None):
            raise ValueError("a relative action controller starts at the optimizer's lr and takes its scale from it: "
                             f"leave start_rate and default_gamma unset (got {start_rate!r}, {default_gamma!r})")
        if not 0 < min_level <= 1 <= max_level:
            raise ValueError(f"need 0 < min_level <= 1 <= max_level, got {min_level!r}, {max_level!r}")
        if window < 2 or block < 1:
            raise ValueError(f"need window >= 2 and block >= 1, got window={window}, block={block}")
        interval = window * block if interval is None else int(interval)
        if interval < block or interval % block:
            raise ValueError(f"interval ({interval}) must be a positive multiple of block ({block})")
        if len(multipliers) < 2 or any(not m > 0 for m in multipliers):
            raise ValueError(f"multipliers must be >= 2 positive factors, got {list(multipliers)}")
        if min_rate < 0:
            raise ValueError(f"min_rate must be >= 0, got {min_rate}")
        self.model = model
        self.window = int(window)
        self.block = int(block)
        self.interval = interval
        self.blocks_per_action = interval // block
        self.multiplier_values = [float(m) for m in multipliers]
        self.min_rate = float(min_rate)
        self.start_rate = start_rate
        self.default_gamma = default_gamma
        self.relative = bool(relative)
        self.channels = feature_channels(self.relative)  # what the model reads
        self.min_level = float(min_level)
        self.max_level = float(max_level)
        self.register_buffer("multipliers", torch.tensor([float(m) for m in multipliers]))
        self.register_buffer("losses", torch.zeros(window))  # block means, oldest first
        self.register_buffer("initial", torch.zeros(()))  # first block mean (0 until known)
        self.register_buffer("lowest", torch.full((), float("inf")))  # lowest block mean so far
        self.register_buffer("block_sum", torch.zeros(()))
        self.register_buffer("block_count", torch.zeros(()))
        self.register_buffer("blocks", torch.zeros((), dtype=torch.int64))  # block means pushed
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # finite losses seen
        self.register_buffer("actions_taken", torch.zeros(len(multipliers), dtype=torch.int64))
        self.register_buffer("last_action", torch.full((), -1, dtype=torch.int64))
        self.register_buffer("level", torch.ones(()))  # the rate over gamma (relative controllers)
        with torch.no_grad():
            try:
                probe = model(torch.zeros(1, self.channels, self.window))
            except RuntimeError as exc:
                raise ValueError(
                    f"the model must map features (B, {self.channels}, {self.window}) to action logits "
                    f"({'a relative controller reads a 4th channel, log(level): ' if self.relative else ''}build it "
                    f"with make_action_model(kind, {self.window}, channels={self.channels})): {exc}") from exc
        if tuple(probe.shape) != (1, len(self.multiplier_values)):
            raise ValueError(f"the model gives logits of shape {tuple(probe.shape)} for one feature window; "
                             f"expected (1, {len(self.multiplier_values)}), one per multiplier")

    def config(self) -> dict:
        return {"window": self.window, "block": self.block, "interval": self.interval,
                "multipliers": list(self.multiplier_values), "min_rate": self.min_rate,
                "start_rate": self.start_rate, "default_gamma": self.default_gamma, "relative": self.relative,
                "min_level": self.min_level, "max_level": self.max_level}

    @torch.jit.ignore
    def upgrade_state(self, state: dict, prefix: str = "") -> dict:
        """``state`` (a ``state_dict``) with what states saved before the level buffer existed lack:
        a non-relative controller's level, 1 (AutoLR.load_state_dict calls this)."""
        key = prefix + "level"
        if key not in state and not self.relative and any(k.startswith(prefix) for k in state):
            state = {**state, key: torch.ones(())}
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "level" not in state_dict:
            state_dict.update(self.upgrade_state(dict(state_dict), prefix))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.jit.ignore
    def initial_rate(self, base_lr: float) -> float:
        return float(base_lr if self.start_rate is None else self.start_rate)

    @torch.jit.export
    def reset(self) -> None:
        """Forget the history (a new run)."""
        self.losses.zero_()
        self.initial.zero_()
        self.lowest.fill_(float("inf"))
        self.block_sum.zero_()
        self.block_count.zero_()
        self.blocks.zero_()
        self.steps.zero_()
        self.actions_taken.zero_()
        self.last_action.fill_(-1)
        self.level.fill_(1.0)

    def features(self) -> Tensor:
        """The current features ``(1, channels, window)``."""
        f = history_features(self.losses.unsqueeze(0), self.initial.reshape(1), self.lowest.reshape(1))
        if self.relative:
            f = with_level(f, self.level.reshape(1))
        return f

    def forward(self, features: Tensor) -> Tensor:
        """Action logits for features ``(B, channels, window)``."""
        return self.model(features)

    @torch.jit.export
    def scheduler_step_(self, loss: Tensor, gamma: Tensor, rate: Tensor) -> None:
        """One step: update the history with ``loss``; every ``interval`` steps act on ``rate``."""
        x = loss.reshape(()).to(self.losses.dtype)
        finite = torch.isfinite(x)
        x0 = torch.where(finite, x, torch.zeros_like(x))
        block_sum = self.block_sum + x0
        block_count = self.block_count + finite.to(self.block_count.dtype)
        push = finite & (block_count >= self.block)
        mean = block_sum / block_count.clamp_min(1.0)
        shifted = torch.cat([self.losses[1:], mean.reshape(1)])
        self.losses.copy_(torch.where(push, shifted, self.losses))
        self.initial.copy_(torch.where(push & (self.blocks == 0), mean, self.initial))
        self.lowest.copy_(torch.where(push, torch.minimum(self.lowest, mean), self.lowest))
        self.block_sum.copy_(torch.where(push, torch.zeros_like(block_sum), block_sum))
        self.block_count.copy_(torch.where(push, torch.zeros_like(block_count), block_count))
        blocks = self.blocks + push.to(self.blocks.dtype)
        self.blocks.copy_(blocks)
        self.steps.add_(finite.to(self.steps.dtype))
        act = push & (blocks >= self.window) & (torch.remainder(blocks, self.blocks_per_action) == 0)
        logits = self.model(self.features())
        choice = torch.argmax(logits[0], dim=0)
        # a mask, not multipliers[choice] (indexing with a tensor reads it on the host) nor
        # one_hot (which checks its input range on the host)
        picked = torch.arange(self.multipliers.numel(), device=choice.device) == choice
        chosen = torch.where(picked, self.multipliers, torch.zeros_like(self.multipliers)).sum()
        factor = torch.where(act, chosen, torch.ones_like(chosen))
        if self.relative:
            level = (self.level * factor).clamp(self.min_level, self.max_level)
            self.level.copy_(torch.where(finite, level, self.level))
            new_rate = torch.clamp_min(gamma.to(rate.dtype) * self.level.to(rate.dtype), self.min_rate)
        else:
            new_rate = rate * factor.to(rate.dtype)
            upper = torch.where(torch.isfinite(gamma), gamma.to(rate.dtype), new_rate)
            new_rate = torch.minimum(torch.clamp_min(new_rate, self.min_rate), upper)
        rate.copy_(torch.where(finite, new_rate, rate))
        self.actions_taken.add_((picked & act).to(torch.int64))
        self.last_action.copy_(torch.where(act, choice, self.last_action))

    # -- saving ----------------------------------------------------------------------------------
    @torch.jit.ignore
    def save(self, path: str, model_kind: str, extra: dict | None = None) -> None:
        """Weights and everything needed to rebuild this controller, in one file."""
        payload = {"format": FORMAT, "version": 1, "model_kind": model_kind,
                   "config": self.config(),
                   "model_state": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                   "extra": extra or {}}
        write_file(payload, path)

    @classmethod
    def load(cls, path: str, map_location: str = "cpu") -> ActionController:
        return cls.from_payload(read_file(path, "an action controller", map_location), path)

    @classmethod
    def from_payload(cls, payload, path: str) -> ActionController:
        """The controller in ``payload``, a file's contents already read (``path`` is for errors)."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path!r} is not an action-controller file (saved by ActionController.save)")
        if payload.get("version") != 1:
            raise ValueError(f"{path!r} has action-controller format version {payload.get('version')!r}, this "
                             "autolr_fast reads 1")
        missing = [k for k, kind in (("model_kind", str), ("config", dict), ("model_state", dict))
                   if not isinstance(payload.get(k), kind)]
        if missing:
            raise ValueError(f"{path!r} is an incomplete action-controller file: no valid {missing}")
        if payload["model_kind"] not in MODEL_TYPES:
            raise ValueError(f"{path!r} holds an unknown action model {payload['model_kind']!r}; this autolr_fast "
                             f"builds {sorted(MODEL_TYPES)}")
        cfg = payload["config"]
        state = payload["model_state"]
        needed = ("window", "block", "interval", "multipliers", "min_rate", "start_rate", "default_gamma")
        missing = [k for k in needed if k not in cfg]
        if missing:
            raise ValueError(f"{path!r}: the action controller's config lacks {missing}")
        relative = bool(cfg.get("relative", False))
        try:
            model = make_action_model(payload["model_kind"], cfg["window"], channels=feature_channels(relative),
                                      actions=len(cfg["multipliers"]),
                                      hidden=_hidden_from_state(payload["model_kind"], state))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"{path!r} is a damaged action-controller file: its config or model state does not "
                             f"build a {payload['model_kind']} model ({type(exc).__name__}: {exc})") from exc
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(
                f"{path!r} holds a {payload['model_kind']} model of another shape than this version builds "
                f"({feature_channels(relative)} feature channels x window {cfg['window']}); retrain it with "
                f"`python -m autolr_fast train-action`: {exc}"
            ) from exc
        return cls(model, window=cfg["window"], block=cfg["block"], interval=cfg["interval"],
                   multipliers=cfg["multipliers"], min_rate=cfg["min_rate"], start_rate=cfg["start_rate"],
                   default_gamma=cfg["default_gamma"], relative=relative,
                   min_level=cfg.get("min_level", 0.01), max_level=cfg.get("max_level", 10.0))

    @classmethod
    def pretrained(cls, name: str = "action-mlp") -> ActionController:
        """:func:`~autolr_fast.load_pretrained` for a shipped action controller (its settings,
        training data and scores are in ``controllers/weights/<name>.json``)."""
        from .pretrained import load_pretrained  # that module imports this one

        try:
            ctrl = load_pretrained(name)
        except KeyError as exc:
            raise ValueError(f"no shipped action controller {name!r}: {exc.args[0]}") from exc
        if not isinstance(ctrl, cls):
            raise ValueError(f"the shipped controller {name!r} is a {type(ctrl).__name__}, not an action controller; "
                             "use autolr_fast.load_pretrained for it")
        return ctrl


def _hidden_from_state(kind: str, state: dict) -> int:
    key, dim = {"mlp": ("net.0.weight", 0), "cnn": ("conv.0.weight", 0)}.get(kind, ("head.weight", 1))
    weight = state.get(key)
    if not isinstance(weight, torch.Tensor) or weight.dim() <= dim:
        raise ValueError(f"the {kind} action model's weights have no {key!r} tensor to read its size from")
    return weight.shape[dim]
