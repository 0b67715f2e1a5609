"""find_anchor_lr: short trials around the optimizer's lr, scored on held-out batches."""

import copy
import json
import math
import os
import random

import pytest
import torch
from conftest import same_nested
from envelope_reference import written_out_envelope
from torch import nn

from autolr_fast import AutoLR, MLRSNet, find_anchor_lr
from autolr_fast.anchor_lr import MAX_CONFIDENCE, AnchorResult, _decide, _paired_t, _t_cdf, _t_quantile

SEED = int(os.environ.get("AUTOLR_FAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


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
    assert result.given_lr == lr and result.trial_steps == 30 and result.cost_steps == 30 * result.trials_run
    assert result.rates[:5] == pytest.approx([lr * 10 ** e for e in (-1, -0.5, 0, 0.5, 1)])
    assert len(result.rates) == 5 + result.extended and result.trials_run == len(result.batch_losses)
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
    assert result.losses[result.rates.index(result.lowest_lr)] == min(finite)
    assert result.lr == result.lowest_lr, "a rate 10x off loses clearly"
    if case == "too small (adam)":
        assert result.lr > 1e-4
    else:
        assert result.lr < 0.3 and not math.isfinite(result.losses[-1]), "the largest rates diverge"


def test_autolr_built_afterwards_starts_at_the_chosen_lr():
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    chosen = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=20, progress=False).lr
    sched = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=100)  # warm-up: 5 steps
    x, y = train[0]
    nn.functional.mse_loss(model(x), y).backward()
    sched.step(nn.functional.mse_loss(model(x), y).detach())
    assert float(sched.last_rate) == pytest.approx(chosen / 5, rel=1e-5)



def test_apply_false_only_reports():
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    result = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=5, apply=False, extend=0,
                            progress=False)
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
    with pytest.raises(ValueError, match="trial_schedule"):
        find_anchor_lr(model, opt, loss, train, val, trial_steps=3, trial_schedule="linear", progress=False)
    for confidence in (1.0, -0.1, float("nan"), 0.3, 0.99999, True):
        with pytest.raises(ValueError, match="confidence"):
            find_anchor_lr(model, opt, loss, train, val, trial_steps=3, confidence=confidence, progress=False)
    with pytest.raises(ValueError, match="num"):
        find_anchor_lr(model, opt, loss, train, val, trial_steps=3, num=2.5, progress=False)
    for extend in (-1, 1.5, True):
        with pytest.raises(ValueError, match="extend"):
            find_anchor_lr(model, opt, loss, train, val, trial_steps=3, extend=extend, progress=False)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="lr 0"):
        find_anchor_lr(model, frozen, loss, train, val, trial_steps=3, progress=False)
    AutoLR(opt, MLRSNet(hidden_size=16))
    with pytest.raises(RuntimeError, match="already drives"):
        find_anchor_lr(model, opt, loss, train, val, trial_steps=3, progress=False)


def test_t_distribution_matches_scipy_on_random_points():
    """The closed-form t distribution function and its bisection quantile (the library needs no
    scipy) against scipy's, at random points and degrees of freedom."""
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(SEED)
    for _ in range(200):
        dof = rng.choice([1, 2, 3, 4]) if rng.random() < 0.3 else rng.randint(1, 300)
        x = rng.uniform(-8, 8)
        p = rng.uniform(0.5, MAX_CONFIDENCE)
        where = f"dof {dof}, x {x}, p {p} (rerun with AUTOLR_FAST_TEST_SEED={SEED})"
        assert _t_cdf(x, dof) == pytest.approx(stats.t.cdf(x, dof), abs=1e-10), where
        assert _t_quantile(p, dof) == pytest.approx(stats.t.ppf(p, dof), rel=1e-8, abs=1e-10), where


def test_paired_t_known_values_and_weights():
    """Equal weights: the paired t-test. Weights (batch sizes) make a short batch count less; their
    scale does not matter."""
    assert _paired_t([1.0, 2.0, 3.0], [1, 1, 1]) == pytest.approx(2.0 / (1.0 / math.sqrt(3)))
    assert _paired_t([1.0, 2.0, 3.0], [7, 7, 7]) == pytest.approx(2.0 / (1.0 / math.sqrt(3)))
    assert _paired_t([0.5, 0.5], [1, 1]) == math.inf and _paired_t([-0.5, -0.5], [1, 1]) == -math.inf
    assert _paired_t([0.0, 0.0, 0.0], [1, 1, 1]) == 0.0
    consistent = [0.10, 0.12, 0.11, -0.30]  # three full batches agree, a 4-sample batch disagrees
    assert _paired_t(consistent, [32, 32, 32, 4]) > 2 * _paired_t(consistent, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="at least 2"):
        _paired_t([0.1], [1])
    assert _t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    assert _t_quantile(0.95, 1) == pytest.approx(6.313751514675, rel=1e-9)  # the one-sided 95 % table value
    with pytest.raises(ValueError, match="dof"):
        _t_cdf(1.0, 2.5)


RATES = [0.1, 0.3, 1.0, 3.0, 10.0]


def _losses(batches):
    return [sum(b) / len(b) for b in batches]


def test_the_given_rate_stays_unless_another_is_clearly_better():
    """Rates within the noise of the lowest (paired t-test over the batches) are candidates; the
    one nearest the given rate wins, so the given rate stays when it is one of them."""
    given_b = [1.00, 0.80, 1.20, 0.90]
    clear = [[1.5] * 4, [1.5] * 4, given_b, [v - 0.10 for v in given_b], [1.6] * 4]  # 3.0 lower on every batch
    d = _decide(RATES, _losses(clear), clear, None, 1.0, 0.95, start_loss=2.0)
    assert d.lr == 3.0 and d.lowest == 3.0 and d.stepped_down_from is None
    assert d.t_statistics[2] > d.t_threshold and d.t_statistics[3] is None, "the lowest is not tested against itself"
    noisy = [[1.5] * 4, [1.5] * 4, given_b, [0.70, 1.00, 1.00, 1.15], [1.6] * 4]  # lower on average, not clearly
    d = _decide(RATES, _losses(noisy), noisy, None, 1.0, 0.95, start_loss=2.0)
    assert d.lowest == 3.0 and d.lr == 1.0 and d.t_statistics[2] <= d.t_threshold
    assert _decide(RATES, _losses(noisy), noisy, None, 1.0, 0.0, 2.0).lr == 3.0, "confidence 0: the lowest, untested"


def test_a_move_goes_only_as_far_as_the_noise_lets_it_tell_rates_apart():
    """The lowest is 10x, 3x is within its noise and the given rate is clearly worse: 3x, the
    candidate nearest the given rate. Given a rate between the trials, the nearest on a log scale."""
    base = [1.0, 0.8, 1.2, 0.9]
    trials = [[2 * v for v in base], [1.8 * v for v in base], [1.5 * v for v in base], base,
              [0.70, 1.00, 1.00, 1.15]]  # 10.0 lowest, 3.0 within its noise
    d = _decide(RATES, _losses(trials), trials, None, 1.0, 0.95, start_loss=3.0)
    assert d.lowest == 10.0 and d.lr == 3.0 and d.t_statistics[3] <= d.t_threshold < d.t_statistics[2]
    assert _decide(RATES, _losses(trials), trials, None, 5.0, 0.95, 3.0).lr == 3.0, "|log 3/5| < |log 10/5|"
    assert _decide(RATES, _losses(trials), trials, None, 30.0, 0.95, 3.0).lr == 10.0


def test_the_paired_test_compares_batches_relatively_when_losses_are_positive():
    """Batches of very different difficulty: 10 % lower on each is clear as a log ratio, though the
    absolute differences spread over two orders of magnitude; with a negative loss the plain
    differences are used, and the same numbers are then within noise."""
    given_b = [0.01, 0.1, 1.0, 3.0]
    far = [10 * v for v in given_b]
    better = [far, far, given_b, [0.9 * v for v in given_b], far]
    d = _decide(RATES, _losses(better), better, None, 1.0, 0.95, start_loss=50.0)
    assert d.lr == 3.0 and d.t_statistics[2] > 1e6
    shifted = [[v - 1.0 for v in b] for b in better]  # the same losses minus 1: some negative
    d = _decide(RATES, _losses(shifted), shifted, None, 1.0, 0.95, start_loss=49.0)
    assert d.lr == 1.0 and d.lowest == 3.0 and 0 < d.t_statistics[2] <= d.t_threshold


def test_a_choice_next_to_a_failed_rate_steps_down_from_the_edge_of_stability():
    """The rate above the one the losses pick diverged or went nowhere (a network stuck at chance):
    the choice steps down one rate; not below the smallest, and not when no trial made progress."""
    def trials(values):
        return [[v, v] for v in values]
    stuck = trials([1.6, 1.2, 0.9, 0.55, 2.3])  # 10.0 ends where it started (start 2.3)
    d = _decide(RATES, _losses(stuck), stuck, None, 1.0, 0.0, start_loss=2.3)
    assert d.lowest == 3.0 and d.lr == 1.0 and d.stepped_down_from == 3.0
    slow = trials([1.6, 1.2, 0.9, 0.55, 1.4])  # 10.0 made half the best trial's progress: not failed
    assert _decide(RATES, _losses(slow), slow, None, 1.0, 0.0, 2.3).lr == 3.0
    diverged = trials([1.0, 0.8, 0.6]) + [[float("nan")] * 2] * 2  # the given rate is lowest, 3.0 diverged
    losses = _losses(diverged[:3]) + [float("nan")] * 2
    d = _decide(RATES, losses, diverged, None, 1.0, 0.95, start_loss=2.3)
    assert d.lr == 0.3 and d.stepped_down_from == 1.0
    smallest = trials([0.5]) + [[float("nan")] * 2] * 4
    assert _decide(RATES, [0.5] + [float("nan")] * 4, smallest, None, 1.0, 0.95, 2.3).lr == 0.1, "nothing smaller"
    none = trials([2.4, 2.5, 2.6, 2.7, 2.8])  # no trial improved on the start
    assert _decide(RATES, _losses(none), none, None, 1.0, 0.0, 2.3).stepped_down_from is None


def test_a_given_rate_that_diverged_or_a_single_batch_takes_the_lowest_untested():
    batches = [[1.0, 1.1], [0.9, 0.95], [float("nan")] * 2]
    losses = _losses(batches)[:2] + [float("nan")] * 3
    d = _decide(RATES, losses, batches, None, 1.0, 0.95, 2.0)
    assert d.lowest == 0.3 and d.t_statistics[2] is None, "the given rate diverged: nothing to test"
    assert d.lr == 0.1 and d.stepped_down_from == 0.3, "and 0.3 sits next to the diverged given rate"
    one = [[1.0], [0.9], [1.2], [1.3], [1.4]]
    d = _decide(RATES, _losses(one), one, None, 1.0, 0.95, 2.0)
    assert d.lr == 0.3 and "2 val_batches" in d.note and d.t_statistics is None
    assert _decide(RATES, [float("nan")] * 5, [[float("nan")]] * 5, None, 1.0, 0.95, 2.0).lr is None


def _recording(opt):
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
    return seen


@pytest.mark.parametrize("schedule", ["cosine", "warmup-cosine", "wsd", "constant"])
def test_each_trial_follows_its_schedule(schedule):
    """A cosine trial anneals each rate from itself towards 0 as CosineAnnealingLR(T_max=steps)
    would; a warm-up-cosine one first warms up over 5 % of the trial, as AutoLR's cosine envelope
    does; a wsd one holds it, then falls linearly over the last 20 % (8 of 40 steps: 8/9 ... 1/9);
    a constant one holds it."""
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen = _recording(opt)
    steps, warm = 40, 2  # round(0.05 * 40)
    result = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=steps, apply=False,
                            trial_schedule=schedule, progress=False)
    expected = []
    for rate in result.rates:
        reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=rate)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=steps)
        for t in range(steps):
            if schedule == "warmup-cosine":
                expected.append(rate * written_out_envelope(t, steps, warm))
            elif schedule == "wsd":
                expected.append(rate * (1.0 if t < steps - 8 else (steps - t) / 9))
            else:
                expected.append(reference.param_groups[0]["lr"] if schedule == "cosine" else rate)
            reference.step()
            cosine.step()
    assert seen == pytest.approx(expected, rel=1e-12)
    assert result.trial_schedule == schedule and f"({schedule})" in result.table()
    assert opt.param_groups[0]["lr"] == 1e-2


def test_confidence_is_wired_to_the_choice():
    """A rate 10x too small: the test lets a clearly better rate through; a confidence so high
    that 2 held-out batches tell nothing apart keeps the given lr, and the table says why."""
    train, val = _regression()
    results = {}
    for confidence in (0.0, 0.95, MAX_CONFIDENCE):
        torch.manual_seed(0)  # the same weights, so the same trials, for every confidence
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        results[confidence] = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=100,
                                             confidence=confidence, progress=False)
        assert opt.param_groups[0]["lr"] == results[confidence].lr
    assert results[0.0].lr == results[0.0].lowest_lr > 1e-4 and results[0.0].t_statistics is None
    assert results[0.95].lr > 1e-4
    assert repr(results[0.0].batch_losses[:5]) == repr(results[MAX_CONFIDENCE].batch_losses[:5]), "the same trials"
    kept = results[MAX_CONFIDENCE]
    assert kept.lr == 1e-4 and kept.lowest_lr > 1e-4 and kept.t_statistics[kept.rates.index(1e-4)] <= kept.t_threshold
    assert "nearest the given rate" in kept.table() and kept.to_dict()["t_threshold"] == kept.t_threshold


def test_a_single_held_out_batch_warns_that_the_choice_is_untested():
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    with pytest.warns(UserWarning, match="at least 2 val_batches"):
        result = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val[:1], trial_steps=50, progress=False)
    assert result.lr == result.lowest_lr != 1e-4 and result.t_statistics is None


def test_choose_replays_other_rules_on_the_same_trials():
    """``choose()`` with the result's own rule gives its choice; with no test and no step-down,
    the lowest loss; ``step_down=False`` in the call matches the replay."""
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)  # the larger rates diverge
    result = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=50, apply=False,
                            progress=False)
    assert result.choose() == result.lr
    assert result.choose(confidence=0, step_down=False) == result.lowest_lr
    raw = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=50, apply=False,
                         step_down=False, progress=False)
    assert repr(raw.batch_losses) == repr(result.batch_losses), "the same trials (repr: NaN-safe)"
    assert raw.lr == result.choose(step_down=False) and not raw.step_down
    assert result.stepped_down_from is not None, "0.3 with momentum: the next larger rates diverge"
    assert result.lr < result.stepped_down_from and raw.stepped_down_from is None
    assert "steps down to" in result.table()
    with pytest.raises(ValueError, match="confidence"):
        result.choose(confidence=1.5)


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train, val = _regression(seed=rank)  # different data per rank, the same weights
        if rank:
            val = [val[0], (val[1][0][:8], val[1][1][:8])]  # as many batches, one of them short
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        res = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=20, progress=False)
        torch.save(res.to_dict(), f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_decide_alike_on_the_held_out_losses_of_all_ranks(tmp_path):
    """Each rank holds other held-out batches (rank 1's second one short); batch by batch their
    losses are combined weighted by sample counts, so every rank sees the same losses and
    weights, makes the same decision and writes the same lr."""
    import torch.multiprocessing as mp

    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in (0, 1))
    assert repr(a["batch_losses"]) == repr(b["batch_losses"]) and a["lr"] == b["lr"]
    assert a["t_statistics"] == b["t_statistics"] and a["start_loss"] == b["start_loss"]
    assert a["batch_weights"] == b["batch_weights"] == [128.0, 72.0], "sample counts summed over the ranks"
    train, val = _regression(seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
    alone = find_anchor_lr(model, torch.optim.Adam(model.parameters(), lr=1e-4), nn.functional.mse_loss, train, val,
                           trial_steps=20, apply=False, progress=False)
    assert alone.start_loss != a["start_loss"], "rank 0 alone differs: the ranks really averaged"


def test_an_even_num_leaves_the_given_rate_out_and_a_tie_goes_to_the_smaller():
    """num=4 around 1.0 tries 0.1, 0.46, 2.15, 10: with both middle rates within noise of each
    other, the two are equally far from 1.0 and the smaller wins, whatever the float rounding."""
    for lr in (1.0, 3e-4, 0.07):
        rates = [lr * 10.0**e for e in torch.linspace(-1, 1, 4, dtype=torch.float64).tolist()]
        trials = [[2.0, 2.1, 1.9], [1.0, 0.9, 1.1], [0.98, 0.92, 1.08], [2.5, 2.4, 2.6]]
        d = _decide(rates, _losses(trials), trials, None, lr, 0.95, start_loss=3.0)
        assert d.lowest == rates[2] and d.lr == rates[1], lr


def test_failed_means_less_than_a_tenth_of_the_best_progress():
    """The next larger rate failed below FAILED_PROGRESS (0.1) of the best trial's progress from
    the start, not at it."""
    start, best = 2.0, 1.0  # the best trial made progress 1.0
    for neighbour, steps_down in ((start - 0.1 + 1e-9, True), (start - 0.1 - 1e-9, False)):
        trials = [[1.5, 1.5], [1.2, 1.2], [best, best], [neighbour] * 2, [1.9, 1.9]]
        d = _decide(RATES, _losses(trials), trials, None, 1.0, 0.0, start_loss=start)
        assert (d.stepped_down_from == 1.0) == steps_down, neighbour


def _strict(o):
    """What strict JSON keeps: NaN and infinities become None."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_strict(v) for v in o]
    return o


def test_a_saved_result_replays_after_strict_json():
    """to_dict -> JSON (NaN as null) -> from_dict: choose() gives the same rates for every rule,
    with a diverged trial among them."""
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    result = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=50, apply=False,
                            progress=False)
    assert any(math.isnan(v) for v in result.losses)
    back = AnchorResult.from_dict(json.loads(json.dumps(_strict(result.to_dict()), allow_nan=False)))
    for confidence, step_down in ((None, None), (0.0, False), (0.5, True), (MAX_CONFIDENCE, False)):
        assert back.choose(confidence, step_down) == result.choose(confidence, step_down)
    assert back.lr == result.lr and back.batch_weights == result.batch_weights == [64.0, 64.0]


def test_batches_count_by_their_samples():
    """A 4-sample last batch counts as 4 samples: the held-out loss at call time is the loss over
    all held-out samples, not the mean of the batch means."""
    train, _ = _regression()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(132, 10, generator=g)
    y = 3 * torch.randn(132, 1, generator=g)
    val = [(x[:64], y[:64]), (x[64:128], y[64:128]), (x[128:], y[128:] + 50)]  # the short batch is far off
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(model(x), torch.cat([b[1] for b in val])))
    result = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=5, apply=False,
                            progress=False)
    assert result.batch_weights == [64.0, 64.0, 4.0]
    assert result.start_loss == pytest.approx(expected, rel=1e-5)


def test_the_table_says_when_nothing_was_usable_or_nothing_tested():
    train, val = _regression()
    model = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 1))
    with pytest.warns(UserWarning, match="smaller lr"):
        dead = find_anchor_lr(model, torch.optim.SGD(model.parameters(), lr=3000.0), nn.functional.mse_loss, train,
                              val, trial_steps=10, progress=False)
    assert "No trial was usable" in dead.table()
    with pytest.warns(UserWarning, match="2 val_batches"):
        one = find_anchor_lr(model, torch.optim.Adam(model.parameters(), lr=1e-3), nn.functional.mse_loss, train,
                             val[:1], trial_steps=5, progress=False)
    assert "Not tested" in one.table() and "2 val_batches" in one.note


def _uneven_worker(rank, world, init_file, out_dir, mode):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train, val = _regression(seed=rank)
        val = [(b[0][:32], b[1][:32]) for b in val] + ([(val[0][0][32:], val[0][1][32:])] if rank else [])
        if mode == "empty" and rank:
            val = []
        model = nn.Sequential(nn.Linear(10, 1))
        try:
            find_anchor_lr(model, torch.optim.Adam(model.parameters(), lr=1e-3), nn.functional.mse_loss, train, val,
                           trial_steps=3, progress=False)
            message = "no error"
        except ValueError as exc:
            message = str(exc)
        with open(f"{out_dir}/r{rank}.txt", "w") as f:
            f.write(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["uneven", "empty"])
def test_distributed_ranks_with_different_held_out_batch_counts_all_refuse(tmp_path, mode):
    """Per-batch losses are combined batch by batch across ranks: with 2 batches on one rank and
    3 (or none) on the other every rank raises, before any trial, instead of hanging."""
    import torch.multiprocessing as mp

    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_uneven_worker, args=(2, str(tmp_path / "init"), str(tmp_path), mode), nprocs=2, join=True)
    for rank in (0, 1):
        message = (tmp_path / f"r{rank}.txt").read_text()
        if mode == "uneven":
            assert "same number of held-out batches" in message and "max_eval_batches=2" in message, message
        else:
            assert "val_batches is empty on at least one rank" in message, message


def test_an_lr_far_too_small_is_followed_up_past_the_grid():
    """Adam at 1e-5 on this task: the largest of the five rates (1e-4) wins, so up to `extend`
    larger rates are tried on the same spacing; with extend=0 the choice stops at 1e-4. The
    replay of extend=0 on the extended trials gives the extend=0 run's choice."""
    train, val = _regression()
    runs = {}
    for extend in (0, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        runs[extend] = find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=40, extend=extend,
                                      apply=False, progress=False)
    assert runs[0].lr == pytest.approx(1e-4) and runs[0].extended == 0 and runs[0].trials_run == 5
    far = runs[2]
    assert 1 <= far.extended <= 2 and far.lr > 1e-4 and far.trials_run == 5 + far.extended
    assert far.rates[5:] == pytest.approx([1e-4 * 10 ** (0.5 * k) for k in range(1, far.extended + 1)])
    assert far.cost_steps == 40 * far.trials_run and f"{far.rates[5]:.3g}" in far.table()
    assert far.choose(extend=0) == pytest.approx(runs[0].lr) and far.choose() == far.lr


def test_the_replay_extends_only_while_the_largest_rate_wins():
    """Recorded trials: the first extension wins, the second loses. The replay stops where the
    live run would have: extend=0 -> the largest of the five, 1 or 2 -> the first extension."""
    rates = [0.1, 0.316, 1.0, 3.16, 10.0, 31.6, 100.0]
    batches = [[v, v * 1.01] for v in (2.0, 1.8, 1.6, 1.4, 1.2, 0.6, 1.5)]
    result = AnchorResult(lr=31.6, given_lr=1.0, rates=rates, losses=_losses(batches), start_loss=2.5, trial_steps=10,
                          seconds=0.0, trials_run=7, batch_losses=batches, batch_weights=[1.0, 1.0], extend=2,
                          extended=2)
    assert result.choose(confidence=0.0, extend=0) == 10.0
    assert result.choose(confidence=0.0, extend=1) == 31.6 == result.choose(confidence=0.0, extend=2)
    short = AnchorResult.from_dict({**result.to_dict(), "rates": rates[:6], "losses": result.losses[:6],
                                    "batch_losses": batches[:6], "extended": 1, "trials_run": 6})
    with pytest.warns(UserWarning, match="did not run"):
        assert short.choose(confidence=0.0, extend=2) == 31.6, "an extension that did not run ends the replay"


@pytest.mark.parametrize("setup", ["adam far too small", "sgd diverging"])
def test_replaying_a_record_of_the_widest_rule_matches_live_runs(setup):
    """Trials recorded with confidence 0, no step-down and extend=2 go as far as any rule asks:
    choose() with each rule gives what a live run with that rule chooses."""
    train, val = _regression()
    lr = 1e-5 if setup == "adam far too small" else 0.3

    def run(**rule):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
        opt = (torch.optim.Adam(model.parameters(), lr=lr) if setup == "adam far too small"
               else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
        return find_anchor_lr(model, opt, nn.functional.mse_loss, train, val, trial_steps=15, apply=False,
                              progress=False, **rule)

    record = run(confidence=0.0, step_down=False, extend=2)
    for confidence in (0.0, 0.95):
        for step_down in (False, True):
            for extend in (0, 1, 2):
                live = run(confidence=confidence, step_down=step_down, extend=extend)
                assert record.choose(confidence, step_down, extend) == live.lr, (confidence, step_down, extend)


def test_an_infinite_t_statistic_survives_strict_json():
    """A rate higher by the same ratio on every batch has t = inf; strict JSON stores it as null,
    and from_dict() recomputes it, so table() shows it as clearly above the lowest."""
    rates = [0.1, 0.316, 1.0, 3.16, 10.0]
    batches = [[2.0, 2.0, 2.0], [1.5, 1.2, 1.4], [1.0, 1.0, 1.0], [1.3, 0.95, 1.6], [1.5, 1.2, 1.7]]
    d = _decide(rates, _losses(batches), batches, None, 1.0, 0.95, start_loss=3.0)
    result = AnchorResult(lr=d.lr, given_lr=1.0, rates=rates, losses=_losses(batches), start_loss=3.0, trial_steps=5,
                          seconds=0.0, trials_run=5, lowest_lr=d.lowest, t_statistics=d.t_statistics,
                          t_threshold=d.t_threshold, batch_losses=batches, batch_weights=[1.0] * 3)
    assert math.isinf(result.t_statistics[0])
    back = AnchorResult.from_dict(json.loads(json.dumps(_strict(result.to_dict()), allow_nan=False)))
    assert back.t_statistics == result.t_statistics and back.table() == result.table()
