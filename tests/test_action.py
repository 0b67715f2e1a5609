"""The action controller: features, models, the controller in AutoLR, saving, the shipped one."""

import json
import math

import pytest
import torch
from envelope_reference import written_out_envelope
from torch import nn

from autolr_fast import ActionController, AutoLR
from autolr_fast.controllers.action import ActionMLP, block_means, history_features, make_action_model
from autolr_fast.controllers.pretrained import PRETRAINED_DIR


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------
def test_features_are_scale_invariant():
    g = torch.Generator().manual_seed(0)
    curve = torch.exp(-torch.linspace(0, 3, 100)) * (1 + 0.2 * torch.rand(100, generator=g)) + 0.05
    for scale in (1000.0, 1e-3, 7.3):
        a = history_features(block_means(curve, 5), curve[:5].mean(), curve.min())
        b = history_features(block_means(curve * scale, 5), (curve * scale)[:5].mean(), (curve * scale).min())
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_feature_values():
    w = torch.tensor([2.0, 1.0, 1.0, 4.0])
    f = history_features(w, torch.tensor(4.0), torch.tensor(0.5))
    assert f.shape == (3, 4)
    torch.testing.assert_close(f[2], torch.full((4,), math.log(0.5 / 4.0)))
    torch.testing.assert_close(history_features(w, torch.tensor(4.0))[2], torch.full((4,), math.log(1.0 / 4.0)))
    torch.testing.assert_close(f[0], torch.log(w / 4.0))
    torch.testing.assert_close(f[1], torch.tensor([0.0, math.log(0.5), 0.0, math.log(4.0)]))
    z = history_features(torch.tensor([1.0, 0.0]), torch.tensor(1.0))  # a zero loss stays finite
    assert torch.isfinite(z).all() and z.abs().max() <= 20.0


@pytest.mark.parametrize("kind", ["mlp", "cnn", "gru"])
def test_models_map_window_to_action_logits(kind):
    m = make_action_model(kind, window=20)
    assert m(torch.randn(5, 3, 20)).shape == (5, 3)
    assert sum(p.numel() for p in m.parameters()) < 5000


# ------------------------------------------------------------------------------------------------
# controller
# ------------------------------------------------------------------------------------------------
def _fixed(action: int, window: int = 4, channels: int = 3) -> ActionMLP:
    """An MLP that always picks ``action`` (zero weights, one bias)."""
    m = ActionMLP(channels, window)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.net[-1].bias[action] = 1.0
    return m


def _setup(ctrl, gamma=1.0, lr=0.01):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return model, opt, AutoLR(opt, ctrl, gamma=gamma)


def _steps(model, opt, sched, n, losses=None):
    for i in range(n):
        opt.zero_grad()
        loss = model(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        sched.step(loss if losses is None else losses[i])
        opt.step()


def test_controller_acts_every_interval_and_clamps():
    ctrl = ActionController(_fixed(2), window=4, block=2, interval=8)
    model, opt, sched = _setup(ctrl)
    assert float(sched.rate) == pytest.approx(0.01)  # initial_rate keeps the optimizer's lr
    _steps(model, opt, sched, 7)
    assert float(sched.rate) == pytest.approx(0.01)  # window not full yet
    _steps(model, opt, sched, 1)
    assert float(sched.rate) == pytest.approx(0.011)
    _steps(model, opt, sched, 16)
    assert float(sched.rate) == pytest.approx(0.01 * 1.1 ** 3)
    assert ctrl.actions_taken.tolist() == [0, 0, 3] and int(ctrl.last_action) == 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 1.1 ** 3)
    # the rate never exceeds gamma
    ctrl2 = ActionController(_fixed(2), window=4, block=2, interval=2, multipliers=(0.5, 1.0, 4.0))
    model, opt, sched = _setup(ctrl2, gamma=0.05)
    _steps(model, opt, sched, 20)
    assert float(sched.rate) == pytest.approx(0.05)
    ctrl3 = ActionController(_fixed(0), window=4, block=2, interval=2, multipliers=(0.1, 1.0, 4.0), min_rate=1e-3)
    model, opt, sched = _setup(ctrl3)
    _steps(model, opt, sched, 20)
    assert float(sched.rate) == pytest.approx(1e-3)


def test_nan_loss_keeps_window_and_rate():
    ctrl = ActionController(_fixed(0), window=4, block=2, interval=2)
    before = None
    rate = torch.tensor(0.1)
    for i in range(9):
        ctrl.scheduler_step_(torch.tensor(1.0 + i), torch.tensor(1.0), rate)
    before = {k: v.clone() for k, v in ctrl.state_dict().items()}
    r0 = rate.clone()
    ctrl.scheduler_step_(torch.tensor(float("nan")), torch.tensor(1.0), rate)
    ctrl.scheduler_step_(torch.tensor(float("inf")), torch.tensor(1.0), rate)
    assert torch.equal(rate, r0)
    after = ctrl.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ctrl.scheduler_step_(torch.tensor(2.0), torch.tensor(1.0), rate)  # the block completes: acts
    assert float(rate) == pytest.approx(float(r0) * 0.9)


def test_autolr_state_dict_round_trip():
    ctrl = ActionController(make_action_model("gru", 4), window=4, block=2, interval=4)
    model, opt, sched = _setup(ctrl)
    losses = [torch.tensor(v) for v in torch.rand(40).add(0.1).tolist()]
    _steps(model, opt, sched, 13, losses)
    state = sched.state_dict()
    assert "losses" in state["controller"] and "blocks" in state["controller"]
    ctrl_b = ActionController(make_action_model("gru", 4), window=4, block=2, interval=4)
    ctrl_b.model.load_state_dict(ctrl.model.state_dict())
    model_b = nn.Linear(3, 1)
    model_b.load_state_dict(model.state_dict())
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.01)
    sched_b = AutoLR(opt_b, ctrl_b, gamma=1.0)
    sched_b.load_state_dict(state)
    assert torch.equal(sched_b.rate, sched.rate)
    rates = []
    for m, o, s in ((model, opt, sched), (model_b, opt_b, sched_b)):
        torch.manual_seed(5)
        _steps(m, o, s, 27, losses[13:])
        rates.append(float(s.rate))
    assert rates[0] == rates[1]
    assert all(torch.equal(a, b) for a, b in zip(ctrl.state_dict().values(), ctrl_b.state_dict().values(), strict=True))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["mlp", "cnn", "gru"])
def test_torchscript_matches_eager(kind):
    torch.manual_seed(1)
    eager = ActionController(make_action_model(kind, 4), window=4, block=1, interval=1)
    scripted = torch.jit.script(ActionController(make_action_model(kind, 4), window=4, block=1, interval=1))
    scripted.model.load_state_dict(eager.model.state_dict())
    r1, r2 = torch.tensor(0.05), torch.tensor(0.05)
    for v in torch.rand(30).add(0.5).tolist():
        eager.scheduler_step_(torch.tensor(v), torch.tensor(1.0), r1)
        scripted.scheduler_step_(torch.tensor(v), torch.tensor(1.0), r2)
    assert torch.equal(r1, r2) and float(r1) != 0.05


def test_save_load_round_trip(tmp_path):
    ctrl = ActionController(make_action_model("cnn", 6, hidden=8), window=6, block=3, multipliers=(0.8, 1.0, 1.25))
    ctrl.save(str(tmp_path / "c.pt"), "cnn")
    back = ActionController.load(str(tmp_path / "c.pt"))
    assert back.config() == ctrl.config()
    x = torch.randn(3, 3, 6)
    assert torch.equal(back(x), ctrl(x))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="could not read"):
        ActionController.load(str(tmp_path / "bad.pt"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="multiple of block"):
        ActionController(make_action_model("mlp", 4), window=4, block=3, interval=4)
    with pytest.raises(ValueError, match="unknown action model"):
        make_action_model("lstm", 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda():
    dev = torch.device("cuda")
    ctrl = ActionController(make_action_model("mlp", 4), window=4, block=2, interval=4)
    model = nn.Linear(3, 1).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, fused=True)
    sched = AutoLR(opt, ctrl, gamma=1.0)
    x = torch.randn(8, 3, device=dev)
    rate = torch.tensor(0.01, device=dev)
    one = torch.ones((), device=dev)  # torch.tensor(1.0, device=...) copies from pageable memory: a sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(12):
            ctrl.scheduler_step_(model(x).pow(2).mean().detach(), one, rate)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ctrl.blocks.item() == 6 and sched is not None


def test_controller_features_match_the_collector():
    # The controller, fed a run's losses step by step, sees at a decision point exactly the
    # features the collector stores for that checkpoint.
    g = torch.Generator().manual_seed(3)
    losses = (torch.exp(-torch.linspace(0, 2, 60)) + 0.1 * torch.rand(60, generator=g)).tolist()
    ctrl = ActionController(_fixed(1), window=4, block=5, interval=20)
    rate = torch.tensor(0.1)
    for v in losses:
        ctrl.scheduler_step_(torch.tensor(v), torch.tensor(1.0), rate)
    t = torch.tensor(losses)
    means = block_means(t, 5)
    expected = history_features(means[-4:], means[0], means.min())
    torch.testing.assert_close(ctrl.features()[0], expected)
    assert int(ctrl.actions_taken.sum()) == 3


def test_shipped_controller_runs_in_autolr():
    ctrl = ActionController.pretrained("action-mlp")
    info = json.loads((PRETRAINED_DIR / "action-mlp.json").read_text())
    assert info["window"] == ctrl.window and info["interval"] == ctrl.interval
    assert (PRETRAINED_DIR / "action-mlp.pt").stat().st_size < 200_000
    assert ctrl.relative and ctrl.default_gamma is None  # it starts at the optimizer's lr, and scales with it
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = AutoLR(opt, ctrl, total_steps=400)
    _steps(model, opt, sched, 205)
    assert int(ctrl.actions_taken.sum()) == 2
    level = float(ctrl.level)
    assert level == pytest.approx(1.0) or 0.8 < level < 1.25
    # the envelope: 20 steps of warm-up (5 %), then cosine over the other 380
    assert float(sched.rate) == pytest.approx(0.01 * level * (1 + math.cos(math.pi * 184 / 380)) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="no shipped"):
        ActionController.pretrained("nope")
    with pytest.raises(ValueError, match="not an action controller"):
        ActionController.pretrained("default")


# ------------------------------------------------------------------------------------------------
# the relative controller: rate = gamma (lr x envelope) x level
# ------------------------------------------------------------------------------------------------
def _relative(action: int, **kw):
    return ActionController(_fixed(action, channels=4), window=4, block=2, interval=8, relative=True,
                            default_gamma=None, **kw)


@pytest.mark.parametrize("envelope, shape", [(None, "cosine"), ("wsd", "wsd")])
@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                      lambda p: torch.optim.AdamW(p, lr=3e-4)])
def test_relative_rate_is_lr_times_envelope_times_level(make_opt, envelope, shape):
    """By default under the envelope its data were collected under (cosine), not AutoLR's wsd."""
    ctrl = _relative(2)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = make_opt(model.parameters())
    lr = opt.param_groups[0]["lr"]
    sched = AutoLR(opt, ctrl, total_steps=40, envelope=envelope)  # no gamma: the optimizer's lr is the scale
    assert sched.scale.shape == shape
    rates = []
    for _ in range(40):
        _steps(model, opt, sched, 1)
        rates.append(opt.param_groups[0]["lr"])
    for t, r in enumerate(rates):  # acts (x1.1) after steps 8, 16, 24, 32, 40
        expected = lr * written_out_envelope(t, 40, 2, shape) * 1.1 ** ((t + 1) // 8)
        assert r == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert float(ctrl.level) == pytest.approx(1.1 ** 5) and ctrl.actions_taken.tolist() == [0, 0, 5]


def test_relative_level_is_clamped_and_features_carry_it():
    ctrl = _relative(2, max_level=1.2)
    rate = torch.tensor(0.0)
    for v in torch.rand(40).add(0.5).tolist():
        ctrl.scheduler_step_(torch.tensor(v), torch.tensor(0.5), rate)
    assert float(ctrl.level) == pytest.approx(1.2) and float(rate) == pytest.approx(0.6)
    f = ctrl.features()
    assert f.shape == (1, 4, 4)
    torch.testing.assert_close(f[0, 3], torch.full((4,), math.log(1.2)))
    ctrl.scheduler_step_(torch.tensor(float("nan")), torch.tensor(0.1), rate)  # skipped: nothing moves
    assert float(rate) == pytest.approx(0.6)
    ctrl.reset()
    assert float(ctrl.level) == 1.0
    low = _relative(0, min_level=0.5)
    for v in torch.rand(80).add(0.5).tolist():
        low.scheduler_step_(torch.tensor(v), torch.tensor(1.0), rate)
    assert float(low.level) == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_relative_round_trips_and_scripts(tmp_path):
    torch.manual_seed(2)
    ctrl = ActionController(make_action_model("mlp", 4, channels=4), window=4, block=1, interval=2, relative=True,
                            default_gamma=None)
    ctrl.save(str(tmp_path / "r.pt"), "mlp")
    back = ActionController.load(str(tmp_path / "r.pt"))
    assert back.config() == ctrl.config() and back.relative and back.channels == 4
    scripted = torch.jit.script(back)
    r1, r2 = torch.tensor(0.0), torch.tensor(0.0)
    for v in torch.rand(30).add(0.5).tolist():
        ctrl.scheduler_step_(torch.tensor(v), torch.tensor(0.3), r1)
        scripted.scheduler_step_(torch.tensor(v), torch.tensor(0.3), r2)
    assert torch.equal(r1, r2) and torch.equal(ctrl.level, scripted.level)
    # the scripted copy keeps the envelope it was trained under
    assert scripted.trained_envelope == "cosine"
    opt = torch.optim.SGD(nn.Linear(3, 1).parameters(), lr=0.1)
    assert AutoLR(opt, scripted, total_steps=50).scale.shape == "cosine"
    # a state saved before the level buffer existed still loads (level 1), directly and through AutoLR
    old = {k: v for k, v in ActionController(_fixed(1), window=4, block=2).state_dict().items() if k != "level"}
    fresh = ActionController(_fixed(1), window=4, block=2)
    fresh.load_state_dict(old)
    assert float(fresh.level) == 1.0
    model, opt, sched = _setup(ActionController(_fixed(2), window=4, block=2, interval=4), gamma=1.0)
    _steps(model, opt, sched, 9)
    state = sched.state_dict()
    state["controller"] = {k: v for k, v in state["controller"].items() if k != "level"}
    _, _, again = _setup(ActionController(_fixed(2), window=4, block=2, interval=4), gamma=1.0)
    again.load_state_dict(state)
    assert torch.equal(again.rate, sched.rate) and float(again.controller.level) == 1.0


def test_relative_with_a_fixed_gamma_starts_at_gamma():
    # rate = gamma x level from the first step on, not the optimizer's lr
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = AutoLR(opt, _relative(1), gamma=0.2)
    assert float(sched.rate) == pytest.approx(0.2)
    model(torch.ones(1, 3)).sum().backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        sched.step(torch.tensor(float("nan")))  # skipped: still gamma x 1
    assert float(sched.rate) == pytest.approx(0.2) and opt.param_groups[0]["lr"] == pytest.approx(0.2)


def test_relative_settings_are_checked():
    assert ActionController(_fixed(1, channels=4), window=4, block=2, relative=True).default_gamma is None
    with pytest.raises(ValueError, match="leave start_rate and default_gamma unset"):
        ActionController(_fixed(1, channels=4), window=4, block=2, relative=True, default_gamma=1.0)
    with pytest.raises(ValueError, match=r"channels=4\)"):  # a 3-channel model in a relative controller
        ActionController(make_action_model("mlp", 4), window=4, block=2, relative=True)
    with pytest.raises(ValueError, match="one per multiplier"):
        ActionController(make_action_model("mlp", 4, actions=2), window=4, block=2)
    with pytest.raises(ValueError, match="min_level"):
        ActionController(_fixed(1, channels=4), window=4, block=2, relative=True, default_gamma=None, max_level=0.5)
    with pytest.raises(ValueError, match="needs gamma"):  # a non-relative one without a gamma of its own
        AutoLR(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1),
               ActionController(_fixed(1), window=4, block=2, default_gamma=None))


def test_a_damaged_action_controller_file_is_refused_with_what_is_wrong(tmp_path):
    ctrl = ActionController(make_action_model("mlp", 20))
    ctrl.save(str(tmp_path / "c.pt"), "mlp")
    good = torch.load(tmp_path / "c.pt", weights_only=False)
    for change, says in (({"version": 2}, "version 2"), ({"model_kind": "transformer"}, "unknown action model"),
                         ({"model_state": None}, "model_state"), ({"config": {"window": 20}}, "config lacks"),
                         ({"model_kind": {"kind": "mlp"}}, "model_kind"), ({"config": "mlp"}, "'config'")):
        torch.save({k: v for k, v in {**good, **change}.items() if v is not None}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=says):
            ActionController.load(str(tmp_path / "bad.pt"))
