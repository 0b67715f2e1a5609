import copy
import json
import math

import pytest
import torch
from conftest import same_nested
from torch import nn

from autolr_fast.lr_finder import find_lr, smooth_curve
from autolr_fast.training_snapshot import TrainingSnapshot


def _net():
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def _batches(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _state(model, opt):
    return ([t.detach().clone() for t in list(model.parameters()) + list(model.buffers())],
            copy.deepcopy(opt.state_dict()), torch.get_rng_state())


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_restores_state_bit_for_bit_mid_training(opt_name):
    torch.manual_seed(0)
    model = _net()
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-3))
    data = _batches()
    for x, y in data[:5]:  # mid-training: momentum / Adam moments and BN statistics exist
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    twin, twin_opt = copy.deepcopy(model), None
    before = _state(model, opt)
    res = find_lr(model, opt, nn.functional.cross_entropy, data, start_lr=1e-4, end_lr=10, num=8,
                  horizons=(1, 3), progress=False)
    assert len(res.rates[1]) >= 1
    after = _state(model, opt)
    assert same_nested(before, after)
    assert opt.param_groups[0]["lr"] == (0.05 if opt_name == "sgd" else 1e-3)
    assert all(p.grad is None for p in model.parameters())
    # Training on afterwards is exactly what it would have been without the finder.
    twin_opt = type(opt)(twin.parameters(), **{k: v for k, v in opt.defaults.items() if k in ("lr", "momentum")})
    twin_opt.load_state_dict(copy.deepcopy(before[1]))
    torch.set_rng_state(before[2])
    outs = []
    for m, o in ((model, opt), (twin, twin_opt)):
        torch.set_rng_state(before[2])
        for x, y in data[5:8]:
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        outs.append([p.detach().clone() for p in m.parameters()])
    assert same_nested(outs[0], outs[1])


def test_every_trial_starts_from_the_same_weights():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = _batches()
    res = find_lr(model, opt, nn.functional.cross_entropy, data, start_lr=1e-3, end_lr=1.0, num=5,
                  horizons=(2,), diverge_factor=None, num_eval_batches=3, progress=False)
    # Re-do the third trial by hand from a copy of the initial state.
    rate = res.rates[2][2]
    m = copy.deepcopy(model)
    o = torch.optim.SGD(m.parameters(), lr=rate, momentum=0.9)
    for x, y in data[3:5]:
        o.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        o.step()
    with torch.no_grad():
        ev = sum(float(nn.functional.cross_entropy(m(x), y)) for x, y in data[:3]) / 3
    assert res.losses[2][2] == pytest.approx(ev, rel=1e-5)
    again = find_lr(model, opt, nn.functional.cross_entropy, data, start_lr=1e-3, end_lr=1.0, num=5,
                    horizons=(2,), diverge_factor=None, num_eval_batches=3, progress=False)
    assert again.losses == res.losses


def test_quadratic_suggestion_and_divergence_stop():
    # loss = |w|^2 / 2, one SGD step at rate r scales w by (1 - r): best r = 1, diverges past r ~ 2.
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = lambda out, _y: 0.5 * (model.weight ** 2).sum() + 0 * out.sum()  # noqa: E731
    data = [(torch.zeros(1, 4), torch.zeros(1))] * 8
    res = find_lr(model, opt, loss_fn, data, start_lr=1e-2, end_lr=100, num=61, horizons=(1,),
                  smoothing=1, progress=False)
    assert res.suggestion == pytest.approx(1.0, rel=0.1)
    assert res.steepest[1] == pytest.approx(0.5, rel=0.15)  # max of 2r(1-r): steepest per decade
    assert len(res.rates[1]) < 61 and 2.0 <= res.diverged_at[1] <= 2.5
    assert model.weight.eq(1.0).all()


def test_dict_batches_unpack_hook_epochs_and_plot(tmp_path):
    torch.manual_seed(2)
    model = nn.Linear(6, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = [{"feat": x, "lab": y} for x, y in _batches(6)]
    with pytest.raises(ValueError, match="unpack"):
        find_lr(model, opt, nn.functional.cross_entropy, data, num=3, progress=False)
    png = tmp_path / "f.png"
    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend of the caller's that is not Agg
    try:
        res = find_lr(model, opt, nn.functional.cross_entropy, data, start_lr=1e-4, end_lr=1.0, num=6,
                      horizons=(1, 2), unit="epochs", unpack=lambda b: (b["feat"], b["lab"]), plot=str(png),
                      progress=False)
        assert matplotlib.get_backend() == "svg", "plotting must leave the caller's matplotlib backend alone"
    finally:
        matplotlib.use(backend)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert set(res.rates) == {1, 2} and math.isfinite(res.suggestion)
    json.dumps(res.to_dict())
    assert "| 2 |" in res.table()


def test_tensor_lr_is_restored_in_place():
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lr = torch.tensor(0.1)
    opt.param_groups[0]["lr"] = lr
    find_lr(model, opt, nn.functional.cross_entropy, _batches(8), num=4, start_lr=1e-3, end_lr=1.0,
            progress=False)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.1)


def test_bad_input_is_refused():
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="start_lr"):
        find_lr(model, opt, nn.functional.cross_entropy, _batches(8), start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="ran out after 3"):
        find_lr(model, opt, nn.functional.cross_entropy, iter(_batches(3)), horizons=(8,), progress=False)
    with pytest.raises(ValueError, match="re-iterable"):
        find_lr(model, opt, nn.functional.cross_entropy, iter(_batches(3)), unit="epochs", progress=False)


def test_smoothing_is_centred():
    assert smooth_curve([3.0, 1.0, 3.0], 1) == [3.0, 1.0, 3.0]
    assert smooth_curve([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]


def test_snapshot_keeps_fresh_optimizer_fresh():
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    snap = TrainingSnapshot(model, opt)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert len(opt.state) == 2
    snap.restore()
    assert len(opt.state) == 0


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same weights everywhere, different data per rank
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        res = find_lr(model, opt, nn.functional.cross_entropy, _batches(12, seed=10 + rank), start_lr=1e-3,
                      end_lr=100, num=30, horizons=(1, 3), progress=False)
        torch.save(res.to_dict(), f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_agree(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in (0, 1))
    assert a["losses"] == b["losses"] and a["suggestion"] == b["suggestion"] and a["rates"] == b["rates"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    alone = find_lr(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.cross_entropy,
                    _batches(12, seed=10), start_lr=1e-3, end_lr=100, num=30, horizons=(1, 3), progress=False)
    assert alone.start_loss != a["start_loss"]  # rank 0 alone differs: the ranks really averaged


def test_the_rng_is_put_back_as_it_was_before_a_shuffling_loader_was_read():
    data = _batches(8)
    loader = torch.utils.data.DataLoader([(x[i], y[i]) for x, y in data for i in range(16)], batch_size=16,
                                         shuffle=True)
    torch.manual_seed(3)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rng = torch.get_rng_state()
    for unit, horizons in (("steps", (1, 2)), ("epochs", (1,))):
        find_lr(model, opt, nn.functional.cross_entropy, loader, start_lr=1e-3, end_lr=1, num=3, horizons=horizons,
                unit=unit, progress=False)
        assert torch.equal(torch.get_rng_state(), rng), unit


def test_a_parameter_the_optimizer_trains_outside_the_model_is_restored():
    """A learned loss weight (in the loss function, not the model) is trained by every trial."""
    torch.manual_seed(0)
    model = _net()
    log_sigma = nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([*model.parameters(), log_sigma], lr=0.05, momentum=0.9)

    def loss_fn(out, y):
        return nn.functional.cross_entropy(out, y) * torch.exp(-log_sigma) + log_sigma

    find_lr(model, opt, loss_fn, _batches(), start_lr=1e-3, end_lr=1, num=4, horizons=(2,), progress=False)
    assert float(log_sigma.detach()) == 0.0 and log_sigma.grad is None and log_sigma not in opt.state


def test_a_group_frozen_with_lr_zero_stays_frozen_in_every_trial():
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                           {"params": list(model[1].parameters()) + list(model[4].parameters()), "lr": 0.1}])
    seen = []
    step = opt.step

    def spy(*args, **kwargs):
        seen.append([float(g["lr"]) for g in opt.param_groups])
        return step(*args, **kwargs)

    opt.step = spy
    find_lr(model, opt, nn.functional.cross_entropy, _batches(), start_lr=1e-3, end_lr=1, num=3, progress=False)
    assert seen and all(lrs[0] == 0.0 and lrs[1] > 0 for lrs in seen)


def test_a_negative_starting_loss_still_gives_a_curve():
    """A loss below zero (a Gaussian negative log-likelihood): the divergence limit is a margin on
    |loss| above it, not 1.1 x a negative number, which every rate would exceed."""
    torch.manual_seed(0)
    model = nn.Linear(6, 1)
    x = torch.randn(64, 6)
    y = x[:, :1] * 0.5
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 0] = 0.5
        model.bias.zero_()
    var = 0.01

    def nll(out, target):
        return ((out - target) ** 2 / (2 * var)).mean() + 0.5 * math.log(2 * math.pi * var)

    res = find_lr(model, torch.optim.SGD(model.parameters(), lr=0.1), nll, [(x[i:i + 16], y[i:i + 16])
                  for i in range(0, 64, 16)], start_lr=1e-6, end_lr=1, num=8, num_eval_batches=2, progress=False)
    assert res.start_loss < 0 and len(res.rates[1]) >= 3 and math.isfinite(res.suggestion)


def test_an_autolr_that_has_not_stepped_is_named():
    from autolr_fast import AutoLR

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    AutoLR(opt)
    with pytest.raises(RuntimeError, match="Run find_lr first"):
        find_lr(model, opt, nn.functional.cross_entropy, _batches(), num=3, progress=False)


def test_every_trial_starts_from_the_rng_at_the_call():
    """Dropout draws from the RNG: each trial, the first included, must start from the same
    state (reading a shuffling loader draws from it before the first trial)."""
    import autolr_fast.lr_finder as lr_finder

    data = _batches(8)
    loader = torch.utils.data.DataLoader([(x[i], y[i]) for x, y in data for i in range(16)], batch_size=16,
                                         shuffle=True)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    starts = []
    step = lr_finder._Trial._train_step

    def spy(self, xy):
        starts.append(torch.get_rng_state().clone())
        return step(self, xy)

    lr_finder._Trial._train_step = spy
    try:
        find_lr(model, opt, nn.functional.cross_entropy, loader, start_lr=1e-3, end_lr=1, num=3, horizons=(1,),
                progress=False)
    finally:
        lr_finder._Trial._train_step = step
    assert len(starts) == 3 and all(torch.equal(s, starts[0]) for s in starts)


class _OnePassStream:
    """An iterable over a stream that can be read once: a new iter() gives what is left (nothing)."""

    def __init__(self, batches):
        self.stream, self.passes = iter(batches), 0

    def __iter__(self):
        self.passes += 1
        if self.passes > 20:  # the test's guard against an endless loop
            raise RuntimeError("re-iterated an exhausted stream 20 times")
        return self.stream


def test_a_one_pass_stream_that_runs_out_is_an_error_not_an_endless_loop():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="a new pass over them gave none"):
        find_lr(model, opt, nn.functional.cross_entropy, _OnePassStream(_batches(3)), horizons=(8,), progress=False)


def test_max_grad_norm_clips_every_trial_step_as_the_run_would(monkeypatch):
    from autolr_fast import find_anchor_lr

    clipped = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, norm, *a, **k: clipped.append(norm) or clip(params, norm, *a, **k))
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    find_lr(model, opt, nn.functional.cross_entropy, _batches(8), num=4, horizons=(2,), num_eval_batches=2,
            progress=False, max_grad_norm=0.5)
    assert clipped == [0.5] * 8  # 4 rates x 2 steps
    clipped.clear()
    find_anchor_lr(model, opt, nn.functional.cross_entropy, _batches(8), _batches(2, seed=1), trial_steps=2, num=3,
                   progress=False, apply=False, max_grad_norm=1.0)
    assert clipped == [1.0] * 6
    clipped.clear()
    find_lr(model, opt, nn.functional.cross_entropy, _batches(8), num=4, horizons=(2,), num_eval_batches=2,
            progress=False)
    assert not clipped  # not asked: not clipped
    for bad in (0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="max_grad_norm"):
            find_lr(model, opt, nn.functional.cross_entropy, _batches(8), progress=False, max_grad_norm=bad)


def test_what_would_make_the_trials_differ_from_the_run_is_said_first():
    from autolr_fast import find_anchor_lr

    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = dict(num=4, horizons=(2,), num_eval_batches=2, progress=False)
    model.eval()
    with pytest.warns(RuntimeWarning, match="eval mode"):
        find_lr(model, opt, nn.functional.cross_entropy, _batches(8), **args)
    model.train()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    with pytest.warns(RuntimeWarning, match="lr_scheduler was built on this optimizer"):
        find_anchor_lr(model, opt, nn.functional.cross_entropy, _batches(8), _batches(2, seed=1), trial_steps=2,
                       num=3, progress=False, apply=False)
    assert not getattr(opt, "_opt_called", False), "the trials' steps must not count as the run's"
    del sched

    class Wrapper:
        def __init__(self, inner):
            self.inner, self.param_groups = inner, inner.param_groups

    with pytest.raises(TypeError, match="needs a torch.optim.Optimizer"):
        find_lr(model, Wrapper(opt), nn.functional.cross_entropy, _batches(8), **args)
    with pytest.raises(ValueError, match="loss_fn must return a 1-element tensor"):
        find_lr(model, torch.optim.SGD(model.parameters(), lr=0.1),
                lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"), _batches(8), **args)
    with pytest.raises(ValueError, match="fraction"):
        find_anchor_lr(model, opt, nn.functional.cross_entropy, _batches(8), _batches(2), trial_steps=2, fraction=5.0)


def test_keys_of_a_batch_dict_that_would_be_dropped_are_named():
    from autolr_fast.lr_finder import default_unpack

    with pytest.warns(RuntimeWarning, match=r"keys \['mask'\] are not passed"):
        default_unpack({"x": torch.ones(2), "y": torch.ones(2), "mask": torch.ones(2)})
