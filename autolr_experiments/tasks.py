"""Training tasks used by the demo, the comparison harness, meta-training and data collection.

A task is a plug-in: a function that returns a :class:`Task` (data tensors, a model factory,
a loss, whether accuracy is meaningful, and the optimizer a user would train it with). Adding one
is one function decorated with ``@register_task("name", optimizer=OptimSpec(...))``. All data is
generated offline (MNIST-1D from the ``mnist1d`` package's generator, scikit-learn's bundled
tables and its generators, synthetic 1-D regression, token sequences from random Markov chains,
text from a small stochastic grammar, images of noisy shapes, points of a curved manifold).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from mnist1d.data import get_dataset_args, make_dataset
from sklearn.datasets import (
    load_breast_cancer,
    load_diabetes,
    load_digits,
    load_wine,
    make_circles,
    make_classification,
    make_friedman1,
    make_friedman2,
    make_friedman3,
    make_moons,
)
from torch import Tensor, nn

_TASKS: dict[str, Callable[..., Task]] = {}
_OPTIMIZERS: dict[str, OptimSpec] = {}


@dataclass(frozen=True)
class OptimSpec:
    """The optimizer a user would train a task with, at the rate they would pick without tuning.

    ``kind``: ``"sgd"`` (momentum 0.9, the harness's SGD setting), ``"adam"`` or ``"adamw"``.
    """

    kind: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer kind must be 'sgd', 'adam' or 'adamw', got {self.kind!r}")

    @property
    def adam_like(self) -> bool:
        return self.kind in ("adam", "adamw")

    def describe(self) -> str:
        extra = ", momentum 0.9" if self.kind == "sgd" else ""
        return f"{self.kind} lr {self.lr:g}{extra}, weight decay {self.weight_decay:g}"


#: SGD with momentum 0.9 at 0.1: the optimizer of the original harness tasks.
SGD_MOMENTUM_DEFAULT = OptimSpec("sgd", 0.1, 5e-4)


@dataclass
class Task:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    make_model: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    num_classes: int | None  # None: regression
    meta: dict = field(default_factory=dict)
    optim: OptimSpec = SGD_MOMENTUM_DEFAULT

    @property
    def is_classification(self) -> bool:
        return self.num_classes is not None

    def split_validation(self, n_val: int, seed: int = 0) -> tuple[Task, Tensor, Tensor]:
        """A copy of the task without ``n_val`` training samples, and those samples."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self.x_train), generator=g)
        val, train = perm[:n_val], perm[n_val:]
        task = Task(self.name, self.x_train[train], self.y_train[train], self.x_test, self.y_test,
                    self.make_model, self.loss_fn, self.num_classes, dict(self.meta), self.optim)
        return task, self.x_train[val], self.y_train[val]

    def batches(self, batch_size: int, seed: int, epochs: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled training mini-batches (drop_last), reproducible from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        n = len(self.x_train)
        if not 1 <= batch_size <= n:  # else no batch at all, and an endless loop without epochs
            raise ValueError(f"{self.name}: batch size {batch_size} for {n} training samples; it must be 1 to {n}")
        epoch = 0
        while epochs is None or epoch < epochs:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - batch_size + 1, batch_size):
                idx = perm[i : i + batch_size]
                yield self.x_train[idx], self.y_train[idx]
            epoch += 1

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.x_train) // batch_size

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Tensor | None = None, y: Tensor | None = None,
                 batch_size: int = 1000) -> dict:
        """``{"loss": float, "acc": float | None}`` on the test split (or on ``x, y``)."""
        x = self.x_test if x is None else x
        y = self.y_test if y is None else y
        was_training = model.training
        model.eval()
        total, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            out = model(x[i : i + batch_size])
            total += float(self.loss_fn(out, y[i : i + batch_size])) * len(out)
            if self.is_classification:  # class scores on dim 1: (N, C) or (N, C, positions)
                correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
        model.train(was_training)
        return {"loss": total / len(x), "acc": correct / y.numel() if self.is_classification else None}


def register_task(name: str, optimizer: OptimSpec = SGD_MOMENTUM_DEFAULT) -> Callable:
    """Register a task builder under ``name``, trained by default with ``optimizer``."""
    def wrap(fn: Callable[..., Task]) -> Callable[..., Task]:
        _TASKS[name] = fn
        _OPTIMIZERS[name] = optimizer
        return fn

    return wrap


#: Tasks that train on the same data (inputs and labels; another model): whatever was trained on
#: one of them has seen the others' training data, so holding out one holds out all of them.
SHARED_DATA = {"mnist1d-cnn": "mnist1d", "mnist1d-mlp": "mnist1d", "mnist1d-cnn-adam": "mnist1d",
               "digits-mlp": "digits", "digits-bncnn": "digits", "digits-dropout-mlp": "digits",
               "markov-gru-sgd": "markov-gru", "markov-attn": "markov-gru", "markov-lstm": "markov-gru",
               "mnist1d-mlp-adamw": "mnist1d", "digits-bncnn-adamw": "digits", "cancer-mlp-sgd": "cancer-mlp",
               "moons-mlp-adam": "moons-mlp", "regress-exp-adam": "regress-exp"}


def dataset_of(name: str) -> str:
    """The name of the data ``name`` trains on (the task's own name unless it shares its data)."""
    return SHARED_DATA.get(name, name)


def shares_data(name: str, others) -> bool:
    """Whether task ``name`` trains on the data of any of the tasks ``others``."""
    return any(dataset_of(name) == dataset_of(o) for o in others)


def task_optimizer(name: str) -> OptimSpec:
    """The default optimizer of a registered task (known without building its data)."""
    if name not in _OPTIMIZERS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    return _OPTIMIZERS[name]


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, seed: int = 0, **kwargs) -> Task:
    """Build a registered task (data generated offline, reproducible from ``seed``)."""
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    task = _TASKS[name](seed=seed, **kwargs)
    task.optim = _OPTIMIZERS[name]
    return task


# ------------------------------------------------------------------------------------------------
# MNIST-1D
# ------------------------------------------------------------------------------------------------
_MNIST1D_CACHE: dict[int, dict] = {}


def mnist1d_data(seed: int = 42) -> dict:
    """MNIST-1D (4,000 train / 1,000 test, 40 features) from the package's offline generator."""
    if seed not in _MNIST1D_CACHE:
        args = get_dataset_args()
        args.seed = seed
        _MNIST1D_CACHE[seed] = make_dataset(args)
    return _MNIST1D_CACHE[seed]


class MNIST1DCNN(nn.Module):
    """The small 1-D CNN of the MNIST-1D paper (about 94% test accuracy when trained well)."""

    def __init__(self, channels: int = 25, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * 5, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.unsqueeze(1)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.linear(x.flatten(1))


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _mnist1d_task(name: str, make_model: Callable[[], nn.Module], seed: int, data_seed: int = 42) -> Task:
    d = mnist1d_data(data_seed)
    def floats(a) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float32)

    def labels(a) -> Tensor:
        return torch.as_tensor(a, dtype=torch.long)

    return Task(name, floats(d["x"]), labels(d["y"]), floats(d["x_test"]), labels(d["y_test"]), make_model,
                nn.functional.cross_entropy, 10, {"data_seed": data_seed})


@register_task("mnist1d-cnn")
def mnist1d_cnn(seed: int = 0, data_seed: int = 42) -> Task:
    return _mnist1d_task("mnist1d-cnn", lambda: MNIST1DCNN(), seed, data_seed)


@register_task("mnist1d-mlp")
def mnist1d_mlp(seed: int = 0, data_seed: int = 42) -> Task:
    return _mnist1d_task("mnist1d-mlp", lambda: _mlp([40, 100, 100, 10]), seed, data_seed)


# ------------------------------------------------------------------------------------------------
# scikit-learn digits
# ------------------------------------------------------------------------------------------------
@register_task("digits-mlp")
def digits_mlp(seed: int = 0) -> Task:
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32) / 16.0
    y = torch.as_tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(1234)  # fixed split, independent of the training seed
    perm = torch.randperm(len(x), generator=g)
    test, train = perm[:297], perm[297:]
    return Task("digits-mlp", x[train], y[train], x[test], y[test], lambda: _mlp([64, 64, 10]),
                nn.functional.cross_entropy, 10)


# ------------------------------------------------------------------------------------------------
# 1-D function regression
# ------------------------------------------------------------------------------------------------
REGRESSION_FUNCTIONS: dict[str, tuple[Callable[[Tensor], Tensor], tuple[float, float]]] = {
    "log": (torch.log, (0.1, 5.0)),
    "exp": (torch.exp, (-2.0, 2.0)),
    "sin": (torch.sin, (-math.pi, math.pi)),
    "inv": (lambda x: 1.0 / x, (0.2, 5.0)),
    "step": (lambda x: (x > 0).float(), (-1.0, 1.0)),
}


def _regression_task(fn_name: str, seed: int, n_train: int = 1024, n_test: int = 256) -> Task:
    fn, (lo, hi) = REGRESSION_FUNCTIONS[fn_name]
    g = torch.Generator().manual_seed(777)
    x_train = lo + (hi - lo) * torch.rand(n_train, 1, generator=g)
    x_test = lo + (hi - lo) * torch.rand(n_test, 1, generator=g)
    return Task(f"regress-{fn_name}", x_train, fn(x_train), x_test, fn(x_test), lambda: _mlp([1, 64, 64, 1]),
                nn.functional.mse_loss, None, {"function": fn_name, "domain": (lo, hi)})


for _fn in REGRESSION_FUNCTIONS:
    register_task(f"regress-{_fn}")(lambda seed=0, _fn=_fn: _regression_task(_fn, seed))


# ------------------------------------------------------------------------------------------------
# Tasks meant for held-out evaluation: other architectures, optimizers and loss scales (whether a
# controller was trained on one is read from the controller's info, per run)
# ------------------------------------------------------------------------------------------------
def _fixed_split(n: int, n_test: int, seed: int) -> tuple[Tensor, Tensor]:
    """Train and test indices of a split fixed by ``seed`` (independent of the training seed)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test:], perm[:n_test]


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Every tensor standardised with the training tensor's column mean and std."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    return [(t - mean) / std for t in (train, *others)]


class MarkovGRU(nn.Module):
    """Token embedding, one GRU layer, a linear head on the last hidden state."""

    def __init__(self, vocab: int, num_classes: int, embed: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


def markov_sequences(n: int, length: int, transitions: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` token sequences, each drawn from one of the chains in ``transitions`` (classes x V x V)
    from a uniform start token; the label is the chain."""
    classes, vocab, _ = transitions.shape
    y = torch.randint(classes, (n,), generator=g)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(1, length):
        probs = transitions[y, x[:, t - 1]]
        x[:, t] = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return x, y


@register_task("markov-gru", optimizer=OptimSpec("adamw", 1e-3, 1e-2))
def markov_gru(seed: int = 0, vocab: int = 12, classes: int = 4, length: int = 20) -> Task:
    """Which of 4 random Markov chains generated a token sequence (text-like data, order matters:
    the chains share most of their transitions, so single-token counts do not decide the class).
    A GRU trained with AdamW at 1e-3, the usual default for recurrent and attention models."""
    g = torch.Generator().manual_seed(2024)

    def dirichlet_half(*shape: int) -> Tensor:
        # Dirichlet(0.5) rows from the seeded generator: Gamma(1/2) is z**2 / 2 for a normal z
        w = torch.randn(*shape, generator=g) ** 2
        return w / w.sum(-1, keepdim=True)

    transitions = 0.6 * dirichlet_half(vocab, vocab) + 0.4 * dirichlet_half(classes, vocab, vocab)
    x_train, y_train = markov_sequences(2000, length, transitions, g)
    x_test, y_test = markov_sequences(1000, length, transitions, g)
    return Task("markov-gru", x_train, y_train, x_test, y_test, lambda: MarkovGRU(vocab, classes),
                nn.functional.cross_entropy, classes, {"vocab": vocab, "length": length})


class DigitsBNCNN(nn.Module):
    """A 2-D CNN with BatchNorm for the 8x8 digits: two conv-BN-ReLU blocks, pooling, a linear head."""

    def __init__(self, channels: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.view(-1, 1, 8, 8))


@register_task("digits-bncnn")
def digits_bncnn(seed: int = 0) -> Task:
    """scikit-learn's digits as 8x8 images, a CNN with BatchNorm, SGD with momentum at 0.1."""
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32) / 16.0
    y = torch.as_tensor(y, dtype=torch.long)
    train, test = _fixed_split(len(x), 297, 4321)
    return Task("digits-bncnn", x[train], y[train], x[test], y[test], lambda: DigitsBNCNN(),
                nn.functional.cross_entropy, 10)


@register_task("diabetes-mlp", optimizer=OptimSpec("adam", 1e-3, 0.0))
def diabetes_mlp(seed: int = 0) -> Task:
    """scikit-learn's diabetes progression (442 patients, 10 features), standardised inputs and
    targets: a small, noisy regression (test MSE about 0.5 in target variances), Adam at 1e-3."""
    x, y = load_diabetes(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.float32).unsqueeze(1)
    train, test = _fixed_split(len(x), 100, 99)
    x_train, x_test = _standardise(x[train], x[test])
    y_train, y_test = _standardise(y[train], y[test])
    return Task("diabetes-mlp", x_train, y_train, x_test, y_test, lambda: _mlp([10, 64, 64, 1]),
                nn.functional.mse_loss, None)


@register_task("friedman-mlp", optimizer=OptimSpec("sgd", 0.01, 5e-4))
def friedman_mlp(seed: int = 0) -> Task:
    """scikit-learn's Friedman #1 generator (10 inputs, 5 of them used, noise 1) with the targets
    left in their own units: the loss starts near 200 and ends near 1, another loss scale than
    the other tasks. SGD with momentum at 0.01 (0.1 diverges on this scale)."""
    x, y = make_friedman1(n_samples=2500, n_features=10, noise=1.0, random_state=7)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.float32).unsqueeze(1)
    train, test = _fixed_split(len(x), 500, 77)
    return Task("friedman-mlp", x[train], y[train], x[test], y[test], lambda: _mlp([10, 64, 64, 1]),
                nn.functional.mse_loss, None, {"noise_variance": 1.0})


# ------------------------------------------------------------------------------------------------
# More tasks, outside compare's default set (``anchor-ablation`` checks find_anchor_lr's rules on
# them): other data, other optimizers on known data, a user's lr that is far off
# ------------------------------------------------------------------------------------------------
def _classification_table(name: str, x, y, hidden: list[int], *, split_seed: int, test_share: int = 5,
                          standardise: bool = True, dropout: float = 0.0) -> Task:
    """Samples ``x`` and classes ``y``: ``1 / test_share`` of them held out as the test set (fixed
    split), the inputs standardised (optionally), an MLP (ReLU, optional dropout after each hidden
    layer)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.long)
    train, test = _fixed_split(len(x), len(x) // test_share, split_seed)
    x_train, x_test = _standardise(x[train], x[test]) if standardise else (x[train], x[test])
    classes = int(y.max()) + 1

    def model() -> nn.Module:
        layers: list[nn.Module] = []
        width = x.shape[1]
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        return nn.Sequential(*layers, nn.Linear(width, classes))

    return Task(name, x_train, y[train], x_test, y[test], model, nn.functional.cross_entropy, classes)


def _sklearn_table(name: str, load: Callable, hidden: list[int], dropout: float = 0.0) -> Task:
    """A scikit-learn table as :func:`_classification_table` builds it (a fifth held out)."""
    return _classification_table(name, *load(return_X_y=True), hidden, split_seed=11, dropout=dropout)


@register_task("cancer-mlp", optimizer=OptimSpec("adam", 1e-3, 0.0))
def cancer_mlp(seed: int = 0) -> Task:
    """scikit-learn's breast cancer table (569 samples, 30 features, 2 classes), Adam at 1e-3."""
    return _sklearn_table("cancer-mlp", load_breast_cancer, [64, 64])


@register_task("wine-mlp", optimizer=OptimSpec("adamw", 1e-3, 1e-2))
def wine_mlp(seed: int = 0) -> Task:
    """scikit-learn's wine table (178 samples, 13 features, 3 classes: a tiny, easily overfitted
    set), AdamW at 1e-3."""
    return _sklearn_table("wine-mlp", load_wine, [64, 64])


@register_task("digits-dropout-mlp", optimizer=OptimSpec("adamw", 3e-4, 1e-2))
def digits_dropout_mlp(seed: int = 0) -> Task:
    """scikit-learn's digits, standardised, a wider MLP with dropout 0.2, AdamW at 3e-4 (a common
    transformer default, too small here)."""
    return _sklearn_table("digits-dropout-mlp", load_digits, [128, 128], dropout=0.2)


@register_task("mnist1d-cnn-adam", optimizer=OptimSpec("adam", 1e-3, 0.0))
def mnist1d_cnn_adam(seed: int = 0, data_seed: int = 42) -> Task:
    """The MNIST-1D CNN trained with Adam at its library default 1e-3 (about 10x too small here)."""
    return _mnist1d_task("mnist1d-cnn-adam", lambda: MNIST1DCNN(), seed, data_seed)


@register_task("markov-gru-sgd", optimizer=SGD_MOMENTUM_DEFAULT)
def markov_gru_sgd(seed: int = 0) -> Task:
    """The Markov-chain GRU trained with SGD with momentum at 0.1 instead of AdamW."""
    return replace(markov_gru(seed), name="markov-gru-sgd")


def _generated_regression(name: str, x, y, split_seed: int) -> Task:
    """Generated inputs (standardised) and a target left in its own units, a fifth held out as the
    test set (fixed split), an MLP with two hidden layers of 64."""
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.float32).unsqueeze(1)
    train, test = _fixed_split(len(x), len(x) // 5, split_seed)
    x_train, x_test = _standardise(x[train], x[test])
    return Task(name, x_train, y[train], x_test, y[test], lambda: _mlp([x.shape[1], 64, 64, 1]),
                nn.functional.mse_loss, None)


class MarkovAttention(nn.Module):
    """Token and position embeddings, one transformer encoder layer, mean pooling, a linear head."""

    def __init__(self, vocab: int, num_classes: int, length: int, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(length, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.embed(x) + self.position[: x.shape[1]])  # (batch, length, dim)
        return self.head(h.mean(1))


@register_task("markov-attn", optimizer=OptimSpec("adamw", 1e-3, 1e-2))
def markov_attn(seed: int = 0) -> Task:
    """The Markov-chain sequences of ``markov-gru`` with a one-layer transformer instead of the GRU,
    AdamW at 1e-3."""
    task = markov_gru(seed)
    vocab, classes, length = task.meta["vocab"], task.num_classes, task.meta["length"]
    return replace(task, name="markov-attn", make_model=lambda: MarkovAttention(vocab, classes, length))


@register_task("friedman3-mlp", optimizer=OptimSpec("adam", 1e-3, 0.0))
def friedman3_mlp(seed: int = 0) -> Task:
    """scikit-learn's Friedman #3 generator (4 inputs on very different scales, standardised; an
    arctangent target in its own units, noise 0.1), Adam at 1e-3."""
    return _generated_regression("friedman3-mlp", *make_friedman3(n_samples=2000, noise=0.1, random_state=3),
                                 split_seed=33)


@register_task("moons-mlp")
def moons_mlp(seed: int = 0) -> Task:
    """scikit-learn's two moons with noise 0.3 (overlapping classes), SGD with momentum at 0.1."""
    x, y = make_moons(n_samples=1200, noise=0.3, random_state=8)
    return _classification_table("moons-mlp", x, y, [64, 64], split_seed=88, test_share=4, standardise=False)


@register_task("noisy-classes-mlp", optimizer=OptimSpec("sgd", 0.01, 5e-4))
def noisy_classes_mlp(seed: int = 0) -> Task:
    """scikit-learn's ``make_classification``: 4 classes, 8 informative of 20 features, 10 % of
    the labels flipped; SGD with momentum at 0.01 (a cautious guess)."""
    x, y = make_classification(n_samples=3000, n_features=20, n_informative=8, n_classes=4, flip_y=0.1,
                               random_state=5)
    return _classification_table("noisy-classes-mlp", x, y, [128, 128], split_seed=55)


class MarkovLSTM(nn.Module):
    """Token embedding, a two-layer LSTM, a linear head on the last hidden state."""

    def __init__(self, vocab: int, num_classes: int, embed: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


@register_task("markov-lstm", optimizer=OptimSpec("adam", 1e-3, 0.0))
def markov_lstm(seed: int = 0) -> Task:
    """The Markov-chain sequences of ``markov-gru`` with a two-layer LSTM, Adam at 1e-3."""
    task = markov_gru(seed)
    vocab, classes = task.meta["vocab"], task.num_classes
    return replace(task, name="markov-lstm", make_model=lambda: MarkovLSTM(vocab, classes))


@register_task("mnist1d-mlp-adamw", optimizer=OptimSpec("adamw", 1e-3, 1e-2))
def mnist1d_mlp_adamw(seed: int = 0, data_seed: int = 42) -> Task:
    """The MNIST-1D MLP trained with AdamW at 1e-3."""
    return _mnist1d_task("mnist1d-mlp-adamw", lambda: _mlp([40, 100, 100, 10]), seed, data_seed)


@register_task("circles-mlp", optimizer=OptimSpec("adamw", 1e-3, 1e-2))
def circles_mlp(seed: int = 0) -> Task:
    """scikit-learn's two circles (noise 0.15, inner radius 0.5), AdamW at 1e-3."""
    x, y = make_circles(n_samples=1200, noise=0.15, factor=0.5, random_state=12)
    return _classification_table("circles-mlp", x, y, [64, 64], split_seed=121, test_share=4, standardise=False)


@register_task("friedman2-mlp", optimizer=OptimSpec("adam", 1e-3, 0.0))
def friedman2_mlp(seed: int = 0) -> Task:
    """scikit-learn's Friedman #2 generator (4 inputs, standardised) with its target in its own
    units (hundreds: the loss starts near 2e5), Adam at 1e-3, far too small a step for that scale."""
    return _generated_regression("friedman2-mlp", *make_friedman2(n_samples=2000, noise=10.0, random_state=21),
                                 split_seed=212)


# Known data with another optimizer or rate (held out from choosing find_anchor_lr's extension)
@register_task("regress-exp-adam", optimizer=OptimSpec("adam", 1e-3, 0.0))
def regress_exp_adam(seed: int = 0) -> Task:
    """``regress-exp`` trained with Adam at 1e-3."""
    return replace(_regression_task("exp", seed), name="regress-exp-adam")


@register_task("digits-bncnn-adamw", optimizer=OptimSpec("adamw", 1e-3, 1e-2))
def digits_bncnn_adamw(seed: int = 0) -> Task:
    """``digits-bncnn`` trained with AdamW at 1e-3."""
    return replace(digits_bncnn(seed), name="digits-bncnn-adamw")


@register_task("cancer-mlp-sgd", optimizer=OptimSpec("sgd", 0.01, 5e-4))
def cancer_mlp_sgd(seed: int = 0) -> Task:
    """``cancer-mlp`` trained with SGD with momentum at 0.01."""
    return replace(cancer_mlp(seed), name="cancer-mlp-sgd")


@register_task("moons-mlp-adam", optimizer=OptimSpec("adam", 1e-4, 0.0))
def moons_mlp_adam(seed: int = 0) -> Task:
    """``moons-mlp`` trained with Adam at 1e-4 (a cautious guess)."""
    return replace(moons_mlp(seed), name="moons-mlp-adam")


# ------------------------------------------------------------------------------------------------
# The second held-out set: kinds of task held out from every choice of rule and controller (a
# language model, images with GroupNorm, a deep normalised MLP, an autoencoder)
# ------------------------------------------------------------------------------------------------
_WORDS = {
    "det": ["the", "a", "one", "every", "some"],
    "adj": ["small", "red", "quiet", "old", "bright", "heavy", "green"],
    "noun": ["cat", "dog", "river", "stone", "bird", "garden", "robot", "lamp"],
    "verb": ["sees", "likes", "moves", "finds", "paints", "follows", "lifts"],
    "prep": ["near", "under", "behind", "over"],
}


def _sentence(g: torch.Generator) -> str:
    """One sentence of a small stochastic grammar: det [adj] noun verb det [adj] noun [prep det noun]."""
    def pick(kind: str) -> str:
        words = _WORDS[kind]
        return words[int(torch.randint(len(words), (1,), generator=g))]

    def phrase() -> list[str]:
        adj = [pick("adj")] if float(torch.rand(1, generator=g)) < 0.5 else []
        return [pick("det"), *adj, pick("noun")]

    words = phrase() + [pick("verb")] + phrase()
    if float(torch.rand(1, generator=g)) < 0.4:
        words += [pick("prep"), pick("det"), pick("noun")]
    return " ".join(words) + ". "


def grammar_text(chars: int, g: torch.Generator) -> str:
    """At least ``chars`` characters of sentences from :func:`_sentence`."""
    parts, n = [], 0
    while n < chars:
        parts.append(_sentence(g))
        n += len(parts[-1])
    return "".join(parts)


class CharTransformer(nn.Module):
    """A causal two-layer transformer over characters; logits as (batch, vocab, length), the
    layout ``cross_entropy`` takes for a score per position."""

    def __init__(self, vocab: int, length: int, dim: int = 48, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.blocks(self.embed(x) + self.position[:t], mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.norm(h)).transpose(1, 2)  # (batch, vocab, length)


@register_task("grammar-lm", optimizer=OptimSpec("adamw", 3e-4, 0.1))
def grammar_lm(seed: int = 0, length: int = 32) -> Task:
    """Next-character prediction on text from a small stochastic grammar (4,000 training and 1,000
    test windows of 32 characters), a causal transformer, AdamW at 3e-4 with weight decay 0.1 (the
    usual language-model defaults). Accuracy is per character."""
    g = torch.Generator().manual_seed(606)
    text = grammar_text(5000 * (length + 1), g)
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    windows = ids[: 5000 * (length + 1)].view(5000, length + 1)
    x, y = windows[:, :-1], windows[:, 1:]
    return Task("grammar-lm", x[:4000], y[:4000], x[4000:], y[4000:], lambda: CharTransformer(len(vocab), length),
                nn.functional.cross_entropy, len(vocab), {"vocab": len(vocab), "length": length})


def shape_images(n: int, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` noisy ``size`` x ``size`` images of one of four shapes (a square outline, a disc, a
    triangle, a cross) at a random centre and radius; the label is the shape."""
    y = torch.randint(4, (n,), generator=g)
    centre = (0.3 + 0.4 * torch.rand(n, 2, generator=g)) * size
    radius = (0.15 + 0.15 * torch.rand(n, generator=g)) * size
    grid = torch.arange(size, dtype=torch.float32)
    rows, cols = grid.view(1, size, 1), grid.view(1, 1, size)
    dy = (rows - centre[:, 0].view(n, 1, 1)) / radius.view(n, 1, 1)
    dx = (cols - centre[:, 1].view(n, 1, 1)) / radius.view(n, 1, 1)
    square = ((dx.abs().maximum(dy.abs()) - 1).abs() < 0.25).float()
    disc = (dx**2 + dy**2 <= 1).float()
    triangle = ((dy <= 1) & (dy >= 2 * dx.abs() - 1)).float()
    cross = (((dx.abs() < 0.25) & (dy.abs() <= 1)) | ((dy.abs() < 0.25) & (dx.abs() <= 1))).float()
    images = torch.stack([square, disc, triangle, cross], 1)[torch.arange(n), y]  # (n, size, size)
    images = images + 0.35 * torch.randn(n, size, size, generator=g)
    return images.unsqueeze(1), y


class ShapesGNCNN(nn.Module):
    """Three conv-GroupNorm-ReLU blocks (the last two strided), global average pooling, a linear head."""

    def __init__(self, channels: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(4, c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * c), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(4, 2 * c), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_task("shapes-gncnn")
def shapes_gncnn(seed: int = 0) -> Task:
    """Generated 16x16 images of four noisy shapes (2,000 training, 1,000 test), a CNN with
    GroupNorm, SGD with momentum at 0.1."""
    g = torch.Generator().manual_seed(707)
    x, y = shape_images(3000, 16, g)
    return Task("shapes-gncnn", x[:2000], y[:2000], x[2000:], y[2000:], lambda: ShapesGNCNN(),
                nn.functional.cross_entropy, 4)


class ResidualMLP(nn.Module):
    """An input layer, ``depth`` pre-LayerNorm residual blocks (Linear-GELU-Linear), a LayerNorm and a head."""

    def __init__(self, inputs: int, outputs: int, width: int = 128, depth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
            for _ in range(depth))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, outputs))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


@register_task("clusters-resmlp", optimizer=OptimSpec("adam", 1e-3, 0.0))
def clusters_resmlp(seed: int = 0) -> Task:
    """scikit-learn's ``make_classification``: 7 classes of 2 clusters each, 12 informative of 30
    features, 5 % of the labels flipped (6,000 samples, a fifth held out); a residual MLP with
    LayerNorm, Adam at 1e-3."""
    x, y = make_classification(n_samples=6000, n_features=30, n_informative=12, n_classes=7,
                               n_clusters_per_class=2, flip_y=0.05, random_state=808)
    task = _classification_table("clusters-resmlp", x, y, [], split_seed=88)
    return replace(task, make_model=lambda: ResidualMLP(30, 7))


@register_task("manifold-ae", optimizer=OptimSpec("sgd", 0.01, 0.0))
def manifold_ae(seed: int = 0, inputs: int = 32, latent: int = 4) -> Task:
    """An autoencoder (32 -> 64 -> 4 -> 64 -> 32, MSE) on points of a curved 4-dimensional manifold
    in 32 dimensions plus noise 0.05 (3,000 training, 1,000 test); the target is the input. SGD with
    momentum at 0.01."""
    g = torch.Generator().manual_seed(909)
    w1 = torch.randn(latent, 16, generator=g)
    w2 = torch.randn(16, inputs, generator=g) / 4.0
    z = torch.randn(4000, latent, generator=g)
    x = torch.tanh(z @ w1) @ w2 + 0.05 * torch.randn(4000, inputs, generator=g)
    x = (x - x[:3000].mean(0)) / x[:3000].std(0)
    return Task("manifold-ae", x[:3000], x[:3000], x[3000:], x[3000:],
                lambda: _mlp([inputs, 64, latent, 64, inputs]), nn.functional.mse_loss, None)


# ------------------------------------------------------------------------------------------------
# The third held-out set: four more kinds of task, for evaluation only (compare.HELD_OUT_TASKS)
# ------------------------------------------------------------------------------------------------
class LastStateLSTM(nn.Module):
    """An LSTM over the sequence and a linear head on its last hidden state."""

    def __init__(self, inputs: int, outputs: int, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.lstm(x)  # (batch, length, hidden)
        return self.head(h[:, -1])


@register_task("adding-lstm", optimizer=OptimSpec("adam", 1e-3, 0.0))
def adding_lstm(seed: int = 0, length: int = 30) -> Task:
    """The adding problem: sequences of ``length`` (value in [0, 1], marker) pairs with two marked
    positions, the target the sum of the two marked values (3,000 training, 1,000 test); an LSTM of
    32, MSE, Adam at 1e-3."""
    g = torch.Generator().manual_seed(1111)
    n = 4000
    values = torch.rand(n, length, generator=g)
    first = torch.randint(length // 2, (n,), generator=g)
    second = length // 2 + torch.randint(length - length // 2, (n,), generator=g)
    markers = torch.zeros(n, length)
    markers[torch.arange(n), first] = 1.0
    markers[torch.arange(n), second] = 1.0
    x = torch.stack([values, markers], 2)  # (n, length, 2)
    y = (values * markers).sum(1, keepdim=True)
    return Task("adding-lstm", x[:3000], y[:3000], x[3000:], y[3000:], lambda: LastStateLSTM(2, 1),
                nn.functional.mse_loss, None)


@register_task("logreg-convex")
def logreg_convex(seed: int = 0) -> Task:
    """A convex problem: logistic regression (a linear layer) on scikit-learn's
    ``make_classification`` (100 features, 2 classes, 10 % of the labels reassigned at random;
    5,000 samples, a fifth held out), SGD with momentum at 0.1."""
    x, y = make_classification(n_samples=5000, n_features=100, n_informative=20, n_redundant=20, n_classes=2,
                               flip_y=0.1, class_sep=0.8, random_state=1212)
    return _classification_table("logreg-convex", x, y, [], split_seed=1213)


def spirals(n: int, arms: int, noise: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points on ``arms`` interleaved spirals in the plane (two turns each) plus Gaussian noise;
    the label is the arm."""
    y = torch.randint(arms, (n,), generator=g)
    r = torch.rand(n, generator=g)
    angle = 4 * math.pi * r + 2 * math.pi * y / arms
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], 1) + noise * torch.randn(n, 2, generator=g)
    return x, y


@register_task("spirals-deep-mlp", optimizer=OptimSpec("adamw", 1e-3, 1e-2))
def spirals_deep_mlp(seed: int = 0) -> Task:
    """Three interleaved spirals with noise 0.04 (3,000 training, 1,000 test points), a deep plain
    MLP (six hidden ReLU layers of 64, no normalisation), AdamW at 1e-3."""
    g = torch.Generator().manual_seed(1313)
    x, y = spirals(4000, 3, 0.04, g)
    return Task("spirals-deep-mlp", x[:3000], y[:3000], x[3000:], y[3000:], lambda: _mlp([2] + [64] * 6 + [3]),
                nn.functional.cross_entropy, 3)


def waveforms(n: int, length: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` noisy 1-D signals of ``length`` samples, each a sine, square, triangle or sawtooth wave
    of 1-4 cycles at a random phase and amplitude, plus noise 0.5; the label is the wave's shape."""
    y = torch.randint(4, (n,), generator=g)
    cycles = 1 + 3 * torch.rand(n, 1, generator=g)
    phase = torch.rand(n, 1, generator=g)
    amplitude = 0.5 + torch.rand(n, 1, generator=g)
    t = torch.linspace(0, 1, length).view(1, length)
    u = (cycles * t + phase) % 1.0  # position within the cycle, in [0, 1)
    shapes = torch.stack([torch.sin(2 * math.pi * u), torch.where(u < 0.5, 1.0, -1.0), 4 * (u - 0.5).abs() - 1,
                          2 * u - 1], 1)  # (n, 4, length)
    x = amplitude * shapes[torch.arange(n), y] + 0.5 * torch.randn(n, length, generator=g)
    return x.unsqueeze(1), y


class WaveCNN(nn.Module):
    """Two conv-BatchNorm-ReLU-pool blocks over the signal, global average pooling, dropout 0.2, a head."""

    def __init__(self, num_classes: int = 4, channels: int = 16) -> None:
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv1d(1, c, 5, padding=2), nn.BatchNorm1d(c), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(c, 2 * c, 5, padding=2), nn.BatchNorm1d(2 * c), nn.ReLU(), nn.MaxPool1d(2),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * c, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_task("waves-cnn1d")
def waves_cnn1d(seed: int = 0) -> Task:
    """Noisy sine, square, triangle and sawtooth waves of 64 samples (3,000 training, 1,000 test), a
    1-D CNN with BatchNorm and dropout, SGD with momentum at 0.1."""
    g = torch.Generator().manual_seed(1414)
    x, y = waveforms(4000, 64, g)
    return Task("waves-cnn1d", x[:3000], y[:3000], x[3000:], y[3000:], lambda: WaveCNN(),
                nn.functional.cross_entropy, 4)


# ------------------------------------------------------------------------------------------------
# The fourth held-out set: four more kinds of task, registered before any run on them, after
# AutoLR's wsd envelope was measured on the 37 tasks above (compare.HELD_OUT_TASKS)
# ------------------------------------------------------------------------------------------------
def gratings(n: int, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` noisy ``size`` x ``size`` sine gratings at one of four orientations (0, 45, 90, 135
    degrees), 1.5-4 cycles across the image, a random phase and contrast, plus noise 0.8; the label
    is the orientation."""
    y = torch.randint(4, (n,), generator=g)
    angle = y.float() * math.pi / 4
    cycles = 1.5 + 2.5 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    contrast = 0.5 + 0.5 * torch.rand(n, generator=g)
    grid = torch.arange(size, dtype=torch.float32) / size
    rows, cols = grid.view(1, size, 1), grid.view(1, 1, size)
    along = cols * torch.cos(angle).view(n, 1, 1) + rows * torch.sin(angle).view(n, 1, 1)
    images = contrast.view(n, 1, 1) * torch.sin(2 * math.pi * cycles.view(n, 1, 1) * along + phase.view(n, 1, 1))
    images = images + 0.8 * torch.randn(n, size, size, generator=g)
    return images.unsqueeze(1), y


class TinyViT(nn.Module):
    """A vision transformer: 4x4 patches, a learned position embedding, ``depth`` pre-LayerNorm
    encoder blocks of width ``width``, mean pooling, a linear head."""

    def __init__(self, size: int = 16, patch: int = 4, width: int = 32, depth: int = 2, heads: int = 4,
                 num_classes: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, width, patch, stride=patch)  # (B, width, size/patch, size/patch)
        self.position = nn.Parameter(0.02 * torch.randn(1, (size // patch) ** 2, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position  # (B, patches, width)
        return self.head(self.encoder(tokens).mean(1))


@register_task("gratings-vit", optimizer=OptimSpec("adamw", 1e-3, 0.05))
def gratings_vit(seed: int = 0) -> Task:
    """Noisy 16x16 sine gratings at four orientations (3,000 training, 1,000 test), a two-block
    vision transformer on 4x4 patches, AdamW at 1e-3 with weight decay 0.05."""
    g = torch.Generator().manual_seed(1515)
    x, y = gratings(4000, 16, g)
    return Task("gratings-vit", x[:3000], y[:3000], x[3000:], y[3000:], lambda: TinyViT(),
                nn.functional.cross_entropy, 4)


def poisson_nll(log_rate: Tensor, counts: Tensor) -> Tensor:
    """The Poisson negative log-likelihood of ``counts`` under the rates ``exp(log_rate)`` (with
    Stirling's term for ``log(y!)``, so it is about ``-log P(y)`` and not negative)."""
    return nn.functional.poisson_nll_loss(log_rate, counts, log_input=True, full=True)


@register_task("poisson-counts", optimizer=OptimSpec("sgd", 0.01, 5e-4))
def poisson_counts(seed: int = 0) -> Task:
    """Count regression: 8 standardised features, counts drawn from a Poisson distribution whose log
    rate is a fixed random two-layer tanh network of them (mean count about 3, some in the tens;
    2,000 training, 1,000 test); an MLP 8-64-64-1 predicts the log rate, the loss is the Poisson
    negative log-likelihood; SGD with momentum at 0.01."""
    g = torch.Generator().manual_seed(1616)
    x = torch.randn(3000, 8, generator=g)
    w1, w2 = torch.randn(8, 16, generator=g) / 8 ** 0.5, torch.randn(16, 1, generator=g) / 16 ** 0.5
    log_rate = 1.0 + 1.2 * torch.tanh(x @ w1) @ w2
    y = torch.poisson(log_rate.exp(), generator=g)
    return Task("poisson-counts", x[:2000], y[:2000], x[2000:], y[2000:], lambda: _mlp([8, 64, 64, 1]),
                poisson_nll, None)


class ReverseBiGRU(nn.Module):
    """An embedding, a two-layer bidirectional GRU and a per-position linear head: class scores
    ``(batch, vocab, length)``."""

    def __init__(self, vocab: int, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.gru = nn.GRU(width, width, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * width, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.gru(self.embed(x))  # (batch, length, 2 * width)
        return self.head(h).transpose(1, 2)


@register_task("reverse-bigru", optimizer=OptimSpec("adam", 1e-3, 0.0))
def reverse_bigru(seed: int = 0, vocab: int = 10, length: int = 12) -> Task:
    """Sequence to sequence: output the input sequence of ``length`` tokens (vocabulary 10) reversed,
    position by position (4,000 training, 1,000 test); a bidirectional GRU tagger; accuracy per
    token; Adam at 1e-3."""
    g = torch.Generator().manual_seed(1717)
    x = torch.randint(vocab, (5000, length), generator=g)
    y = x.flip(1)
    return Task("reverse-bigru", x[:4000], y[:4000], x[4000:], y[4000:], lambda: ReverseBiGRU(vocab),
                nn.functional.cross_entropy, vocab)


class EmbeddingMLP(nn.Module):
    """One embedding table per categorical column, concatenated, then an MLP."""

    def __init__(self, columns: int, levels: int, classes: int, dim: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(levels, dim) for _ in range(columns))
        self.mlp = _mlp([columns * dim, hidden, hidden, classes])

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(torch.cat([table(x[:, i]) for i, table in enumerate(self.tables)], 1))


@register_task("categorical-embed")
def categorical_embed(seed: int = 0, columns: int = 6, levels: int = 20) -> Task:
    """Tabular data with only categorical columns (6 of 20 levels each), the binary label decided by
    pairwise interactions of the columns (a fixed random score per pair of levels of three column
    pairs) with 10 % of the labels flipped (4,000 training, 1,000 test); one embedding table per
    column and an MLP; SGD with momentum at 0.1."""
    g = torch.Generator().manual_seed(1818)
    x = torch.randint(levels, (5000, columns), generator=g)
    score = torch.zeros(5000)
    for a, b in ((0, 1), (2, 3), (4, 5)):
        table = torch.randn(levels, levels, generator=g)
        score += table[x[:, a], x[:, b]]
    y = (score > score.median()).long()
    flip = torch.rand(5000, generator=g) < 0.1
    y = torch.where(flip, 1 - y, y)
    return Task("categorical-embed", x[:4000], y[:4000], x[4000:], y[4000:],
                lambda: EmbeddingMLP(columns, levels, 2), nn.functional.cross_entropy, 2)
