"""Training tasks used by the demo, the comparison harness, meta-training and data collection.

A task is a plug-in: a function that returns a :class:`Task` (data tensors, a model factory,
a loss and whether accuracy is meaningful). Adding one is one function decorated with
``@register_task("name")``. All data is generated offline (MNIST-1D from the ``mnist1d``
package's generator, scikit-learn's bundled digits, synthetic 1-D regression).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

_TASKS: dict[str, Callable[..., "Task"]] = {}


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

    @property
    def is_classification(self) -> bool:
        return self.num_classes is not None

    def split_validation(self, n_val: int, seed: int = 0) -> tuple["Task", Tensor, Tensor]:
        """A copy of the task without ``n_val`` training samples, and those samples."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self.x_train), generator=g)
        val, train = perm[:n_val], perm[n_val:]
        task = Task(self.name, self.x_train[train], self.y_train[train], self.x_test, self.y_test,
                    self.make_model, self.loss_fn, self.num_classes, dict(self.meta))
        return task, self.x_train[val], self.y_train[val]

    def batches(self, batch_size: int, seed: int, epochs: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled training mini-batches (drop_last), reproducible from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        n = len(self.x_train)
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
    def evaluate(self, model: nn.Module, x: Tensor | None = None, y: Tensor | None = None, batch_size: int = 1000) -> dict:
        """``{"loss": float, "acc": float | None}`` on the test split (or on ``x, y``)."""
        x = self.x_test if x is None else x
        y = self.y_test if y is None else y
        was_training = model.training
        model.eval()
        total, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            out = model(x[i : i + batch_size])
            total += float(self.loss_fn(out, y[i : i + batch_size])) * len(out)
            if self.is_classification:
                correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
        model.train(was_training)
        return {"loss": total / len(x), "acc": correct / len(x) if self.is_classification else None}


def register_task(name: str) -> Callable:
    def wrap(fn: Callable[..., Task]) -> Callable[..., Task]:
        _TASKS[name] = fn
        return fn

    return wrap


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str, seed: int = 0, **kwargs) -> Task:
    """Build a registered task (data generated offline, reproducible from ``seed``)."""
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    return _TASKS[name](seed=seed, **kwargs)


# ------------------------------------------------------------------------------------------------
# MNIST-1D
# ------------------------------------------------------------------------------------------------
_MNIST1D_CACHE: dict[int, dict] = {}


def mnist1d_data(seed: int = 42) -> dict:
    """MNIST-1D (4,000 train / 1,000 test, 40 features) from the package's offline generator."""
    if seed not in _MNIST1D_CACHE:
        from mnist1d.data import get_dataset_args, make_dataset

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
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _mnist1d_task(name: str, make_model: Callable[[], nn.Module], seed: int, data_seed: int = 42) -> Task:
    d = mnist1d_data(data_seed)
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    l = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return Task(name, f(d["x"]), l(d["y"]), f(d["x_test"]), l(d["y_test"]), make_model,
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
    from sklearn.datasets import load_digits

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
