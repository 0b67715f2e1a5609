"""Shared test helpers: the published fixtures beside the project, and small models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_DIR = Path(os.environ.get("AUTOLR_FAST_FIXTURES",
                                   PROJECT_ROOT.parent / "shared" / "fixtures" / "mlrsnet_official"))
CHECKPOINTS = ("mlr_snet_1.pth", "mlr_snet_100.pth", "mlr_snet_200.pth")


@pytest.fixture
def official_dir() -> Path:
    if not (OFFICIAL_DIR / "trajectory.json").is_file():
        pytest.skip(f"published MLR-SNet fixtures not found at {OFFICIAL_DIR} "
                    "(the ../shared folder beside the project)")
    return OFFICIAL_DIR


class SmallCNN(torch.nn.Module):
    """A tiny conv net with BatchNorm, to check that buffers are handled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(4)
        self.fc = torch.nn.Linear(4 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x.unsqueeze(1)))).flatten(1))


def make_problem(seed: int = 0, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def train_steps(model, opt, sched, x, y, steps: int) -> None:
    """The canonical loop on one batch: zero_grad, cross-entropy, backward, sched.step(loss),
    optimizer.step()."""
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sched.step(loss)
        opt.step()


def replay_rates(controller: torch.nn.Module, fed: list[torch.Tensor], gammas: list[torch.Tensor]) -> torch.Tensor:
    """The rates AutoLR with its default scale (the lr anchor) sets for the losses ``fed``: a copy of
    ``controller`` (the scheduler's weights) from a fresh state, settled on the first loss as
    the anchor does, then stepped on every loss; rate ``t`` is ``gammas[t] * p_t``."""
    import copy

    from autolr_fast import rate_scale

    twin = copy.deepcopy(controller).cpu()
    twin.reset()
    with torch.no_grad():
        twin.settle_(torch.as_tensor(fed[0], dtype=torch.float32).cpu(), rate_scale.SETTLE_STEPS)
        return torch.stack([torch.as_tensor(g).cpu() * twin(torch.as_tensor(x).cpu()) for g, x in zip(gammas, fed)])


def same_nested(a, b) -> bool:
    """Tensors (dtype, shape and every bit), dicts, lists and tuples of them, equal all through."""
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_nested(x, y) for x, y in zip(a, b, strict=True))
    return a == b
