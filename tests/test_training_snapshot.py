"""TrainingSnapshot (what find_lr and find_anchor_lr restore) on what a trial can change."""

import random

import numpy as np
import torch
from torch import nn

from autolr_fast import find_anchor_lr
from autolr_fast.lr_finder import find_lr
from autolr_fast.training_snapshot import TrainingSnapshot


class LazyCache(nn.Module):
    """Registers a buffer on its first forward (a lazily built cache)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.register_buffer("cache", None)

    def forward(self, x):
        if self.cache is None:
            self.cache = torch.ones(4)
        self.register_buffer("seen", torch.zeros(()), persistent=False) if not hasattr(self, "seen") else None
        return self.lin(x * self.cache)


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def test_buffers_that_appear_or_are_reassigned_during_a_trial_are_put_back():
    model = LazyCache()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    bn = nn.BatchNorm1d(3)
    model.add_module("bn", bn)
    original_mean = bn.running_mean
    snap = TrainingSnapshot(model, opt)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    bn.running_mean = torch.full((3,), 5.0)  # re-assigned, not changed in place
    snap.restore()
    assert model.cache is None and "seen" not in model._buffers
    assert bn.running_mean is original_mean and torch.equal(original_mean, torch.zeros(3))
    # both finders run on such a model and restore it
    for finder in ("find_lr", "find_anchor_lr"):
        model = LazyCache()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = [t.clone() for t in model.parameters()]
        if finder == "find_lr":
            find_lr(model, opt, nn.functional.mse_loss, _data(), num=4, horizons=(3,), progress=False)
        else:
            find_anchor_lr(model, opt, nn.functional.mse_loss, _data(), _data(2, seed=1), trial_steps=3,
                           progress=False)
        assert model.cache is None and "seen" not in model._buffers, finder
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), finder


def test_every_trial_sees_the_same_batches_of_a_loader_with_its_own_generator():
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    state = loader.generator.get_state()
    firsts = []
    model = nn.Linear(4, 1)

    def loss_fn(out, target):
        firsts.append(target[0].item()) if len(firsts) < 100 else None
        return nn.functional.mse_loss(out, target)

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    result = find_anchor_lr(model, opt, loss_fn, loader, _data(2, seed=1), trial_steps=4, progress=False)
    assert torch.equal(loader.generator.get_state(), state)
    # per trial: 4 training steps, then 2 held-out batches (the call-time loss first: 2 batches)
    per_trial = [firsts[2 + k * 6: 2 + k * 6 + 4] for k in range(result.trials_run)]
    assert result.trials_run >= 2 and all(t == per_trial[0] for t in per_trial)


def test_python_and_numpy_random_states_are_restored():
    random.seed(1)
    np.random.seed(1)
    py, npy = random.getstate(), np.random.get_state()
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def loss_fn(out, target):  # an augmentation drawing from both generators
        seen.append((random.random(), float(np.random.rand())))
        return nn.functional.mse_loss(out, target)

    find_lr(model, opt, loss_fn, _data(), num=3, horizons=(2,), progress=False)
    assert random.getstate() == py
    after = np.random.get_state()
    assert after[0] == npy[0] and np.array_equal(after[1], npy[1]) and after[2:] == npy[2:]
    # every trial (3 rates) starts from the same draws
    assert seen.count(seen[0]) == 3 and seen.count(seen[1]) == 3, seen


def _loader(persistent: bool):
    g = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(torch.randn(48, 4, generator=g), torch.randn(48, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, num_workers=2 if persistent else 0,
                                       persistent_workers=persistent)


def test_a_loader_with_persistent_workers_is_left_as_the_loop_reads_it():
    """Its iter() resets the one iterator the loop may be reading: a call in the middle of an
    epoch must not skip the loop's batches, nor shift the next epochs'."""
    seen = {}
    for call in (False, True):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader, firsts = _loader(persistent=True), []
        for epoch in range(2):
            for i, (x, _) in enumerate(loader):
                firsts.append(x[0, 0].item())
                if call and epoch == 0 and i == 1:
                    find_anchor_lr(model, opt, nn.functional.mse_loss, loader, _data(2), trial_steps=3, num=3,
                                   progress=False, apply=False)
        seen[call] = firsts
    assert len(seen[True]) == 12 and seen[True] == seen[False]
