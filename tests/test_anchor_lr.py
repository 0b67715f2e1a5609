"""find_anchor_lr: short trials around the optimizer's lr, scored on held-out batches."""

import copy
import math

import pytest
import torch
from conftest import same_nested
from torch import nn

from autolr_fast import AutoLR, MLRSNet, find_anchor_lr


def _regression(seed=0):
    """A noisy linear target, 384 training and 128 held-out samples, batches of 32 / 64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 10, generator=g)
    y = x @ torch.randn(10, 1, generator=g) + 0.1 * torch.randn(512, 1, generator=g)
    train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 384, 32)]
    val = [(x[i:i + 64], y[i:i + 64]) for i in range(384, 512, 64)]
    return train, val


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))


def _state(model, opt):
    return ([t.detach().clone() for t in list(model.parameters()) + list(model.buffers())],
            copy.deepcopy(opt.state_dict()["state"]), torch.get_rng_state())


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_restores_everything_but_the_lr_and_keeps_group_ratios(opt_name):
    """Mid-training (optimizer state, BatchNorm statistics, dropout RNG): everything but the
    param groups' rates is as it was, bit for bit; the groups keep their ratio."""
    train, val = _regression()
    model = _net()
    head, rest = list(model[-1].parameters()), [p for m in list(model)[:-1] for p in m.parameters()]
    make = torch.optim.SGD if opt_name == "sgd" else torch.optim.Adam
    kw = {"momentum": 0.9} if opt_name == "sgd" else {}
    lr = 1e-3 if opt_name == "sgd" else 1e-4
    opt = make([{"params": rest}, {"params": head, "lr": lr / 4}], lr=lr, **kw)
    for x, y in train[:3]:  # some optimizer state first
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    before = _state(model, opt)
    result = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, total_steps=200, progress=False)
    assert same_nested(_state(model, opt), before)
    assert opt.param_groups[0]["lr"] == result.lr and opt.param_groups[1]["lr"] == pytest.approx(result.lr / 4)
    assert result.given_lr == lr and result.trial_steps == 30 and result.cost_steps == 150
    assert result.rates == pytest.approx([lr * 10 ** e for e in (-1, -0.5, 0, 0.5, 1)])
    assert result.lr in result.rates and result.seconds > 0
    assert "| yes |" in result.table()


@pytest.mark.parametrize("case", ["too small (adam)", "too large (sgd)"])
def test_moves_the_lr_towards_one_that_trains(case):
    """A rate 10x too small is raised, one that diverges is lowered: the held-out loss decides."""
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    if case == "too small (adam)":
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    result = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, total_steps=600, progress=False)
    finite = [loss for loss in result.losses if math.isfinite(loss)]
    assert result.losses[result.rates.index(result.lr)] == min(finite)
    if case == "too small (adam)":
        assert result.lr > 1e-4
    else:
        assert result.lr < 0.3 and not math.isfinite(result.losses[-1]), "the largest rates diverge"


def test_autolr_built_afterwards_starts_at_the_chosen_lr():
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    chosen = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=20, progress=False).lr
    sched = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=100)
    x, y = train[0]
    nn.functional.mse_loss(model(x), y).backward()
    sched.step(nn.functional.mse_loss(model(x), y).detach())
    assert float(sched.last_rate) == pytest.approx(chosen, rel=1e-5)


def test_apply_false_only_reports():
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    result = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=5, apply=False, progress=False)
    assert opt.param_groups[0]["lr"] == 1e-4 and result.to_dict()["cost_steps"] == 25


def test_every_trial_diverging_leaves_the_lrs_exactly_and_warns():
    """Nothing usable: every group keeps its lr to the bit (no rewrite through the ratios), and
    only the trial that ran is counted in the cost."""
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters(), "lr": 210.0}],
                          lr=3000.0)
    with pytest.warns(UserWarning, match="diverged"):
        result = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=10, progress=False)
    assert [g["lr"] for g in opt.param_groups] == [3000.0, 210.0]
    assert result.lr == 3000.0 and all(math.isnan(loss) for loss in result.losses)
    assert result.trials_run == 1 and result.cost_steps == 10
    assert result.table().count("not tried") == 4


def test_a_divergence_stops_the_larger_rates_and_the_cost_counts_the_trials_run():
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    result = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=50, progress=False)
    assert 1 < result.trials_run < 5 and result.cost_steps == 50 * result.trials_run
    assert all(math.isfinite(v) for v in result.losses[:result.trials_run - 1])
    assert all(math.isnan(v) for v in result.losses[result.trials_run - 1:])


def test_a_shuffling_dataloader_leaves_the_rng_as_it_was():
    """The trials iterate a shuffling DataLoader (which draws from the global RNG); the RNG is
    restored to its state at the call, so the training loop then shuffles as it would have."""
    train, val = _regression()
    x = torch.cat([b[0] for b in train])
    y = torch.cat([b[1] for b in train])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(10, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    find_anchor_lr(model, opt, nn.functional.mse_loss, loader, val, trial_steps=20, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_refuses_an_optimizer_an_autolr_already_drives():
    """Fresh or stepped: AutoLR fixed (or will fix) its scale from the lr at its first step, so a
    rate chosen afterwards would not be used."""
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = AutoLR(opt, MLRSNet(hidden_size=16))
    x, y = train[0]
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    sched.step(loss.detach())
    opt.step()
    with pytest.raises(RuntimeError, match="already drives"):
        find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=3, progress=False)


def test_bad_arguments_say_what_to_do():
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.mse_loss
    with pytest.raises(ValueError, match="total_steps"):
        find_anchor_lr(model, opt, loss, train, val, progress=False)
    with pytest.raises(ValueError, match="re-iterable"):
        find_anchor_lr(model, opt, loss, iter(train), val, trial_steps=3, progress=False)
    with pytest.raises(ValueError, match="val_batches is empty"):
        find_anchor_lr(model, opt, loss, train, [], trial_steps=3, progress=False)
    with pytest.raises(ValueError, match="fraction"):
        find_anchor_lr(model, opt, loss, train, val, total_steps=100, fraction=0.0, progress=False)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="lr 0"):
        find_anchor_lr(model, frozen, loss, train, val, trial_steps=3, progress=False)
    AutoLR(opt, MLRSNet(hidden_size=16))
    with pytest.raises(RuntimeError, match="already drives"):
        find_anchor_lr(model, opt, loss, train, val, trial_steps=3, progress=False)
