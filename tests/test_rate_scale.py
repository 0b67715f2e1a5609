"""The default scale (the optimizer's lr as the anchor), the cosine envelope and the warnings."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from envelope_reference import written_out_envelope
from torch import nn

from autolr_fast import AutoLR, MLRSNet, load_pretrained
from autolr_fast.rate_scale import cosine_envelope

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
}


def _problem(kind: str, seed: int = 0):
    """A small real task: 3-class classification of Gaussian blobs, or a noisy sine regression."""
    g = torch.Generator().manual_seed(seed)
    if kind == "classification":
        centers = torch.randn(3, 10, generator=g) * 2.0
        y = torch.randint(0, 3, (256,), generator=g)
        x = centers[y] + torch.randn(256, 10, generator=g)
        return x, y, nn.functional.cross_entropy, 3
    x = torch.rand(256, 1, generator=g) * 6 - 3
    y = torch.sin(x) + 0.05 * torch.randn(256, 1, generator=g)
    return x, y, nn.functional.mse_loss, 1


def _model(outputs: int, inputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 32), nn.Tanh(), nn.Linear(32, outputs))


def _short_run(opt_kind: str, task: str, **autolr_kwargs) -> tuple[AutoLR, float, list[float], list[float]]:
    """150 steps of ``_problem(task)`` with ``AutoLR(opt, **autolr_kwargs)``: the scheduler, the
    optimizer's lr, and every step's loss and rate."""
    x, y, loss_fn, out = _problem(task)
    model = _model(out, x.shape[1])
    opt = OPTIMIZERS[opt_kind](model.parameters())
    lr = opt.param_groups[0]["lr"]
    sched = AutoLR(opt, **autolr_kwargs)
    losses, rates = [], []
    for i in range(150):
        xb, yb = x[(i * 32) % 256:(i * 32) % 256 + 32], y[(i * 32) % 256:(i * 32) % 256 + 32]
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        sched.step(loss)
        opt.step()
        losses.append(float(loss.detach()))
        rates.append(float(sched.last_rate))
    return sched, lr, losses, rates


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("opt_kind", sorted(OPTIMIZERS))
def test_default_scale_starts_at_lr_and_never_diverges(opt_kind, task):
    """AutoLR(opt) with no gamma: the first rate is the optimizer's lr, the rate stays near it, and
    a short real run lowers the loss on every optimizer and loss kind."""
    # everything at its default: the shipped "default" controller, the lr anchor
    sched, lr, losses, rates = _short_run(opt_kind, task)
    assert sched.gamma_mode == "lr" and sched.controller.info.get("name") == "default"
    assert rates[0] == pytest.approx(lr, rel=1e-4)
    assert all(math.isfinite(v) for v in losses)
    assert all(0.1 * lr <= r <= 3.0 * lr for r in rates), (min(rates), max(rates))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10, "the short run must learn"


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("opt_kind", sorted(OPTIMIZERS))
def test_the_default_envelope_never_diverges(opt_kind, task):
    """AutoLR(opt, total_steps=T), everything else at its default (warm-up, the lr held, the final
    decay): a short real run lowers the loss on every optimizer and loss kind."""
    sched, lr, losses, rates = _short_run(opt_kind, task, total_steps=150)
    assert sched.scale.shape == "wsd" and (sched.scale.warmup_steps, sched.scale.decay_steps) == (8, 30)
    assert all(math.isfinite(v) for v in losses)
    assert max(rates) <= 3.0 * lr and rates[60] >= 0.1 * lr and rates[-1] < 0.05 * lr
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10, "the short run must learn"


@pytest.mark.filterwarnings("ignore:AutoLR.step was called twice")
def test_anchor_is_set_by_the_first_finite_loss():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    sched = AutoLR(opt, MLRSNet(hidden_size=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(torch.randn(3, 4)).sum().backward()
        sched.step(torch.tensor(float("nan")))
    assert not torch.isfinite(sched.gamma) and float(sched.last_rate) == 0.0
    assert torch.equal(sched.controller.h, torch.zeros_like(sched.controller.h)), "a NaN loss must not settle the state"
    sched.step(torch.tensor(1.7))
    assert float(sched.last_rate) == pytest.approx(0.02, rel=1e-4)
    anchored = sched.gamma.clone()
    opt.step()
    sched.step(torch.tensor(0.4))
    assert torch.equal(sched.gamma, anchored), "the anchor is set once"


@pytest.mark.filterwarnings("ignore:AutoLR.step was called twice")
@pytest.mark.parametrize("as_tensor", [False, True])  # a tensor lr takes the steady path where it may
@pytest.mark.parametrize("shape, decay", [(None, None), ("wsd", 5), ("cosine", None)])
@pytest.mark.parametrize("total, warmup, used", [(20, 0, 0), (40, None, 2), (40, 7, 7), (None, 6, 6), (None, None, 0)])
def test_envelope_over_total_steps(total, warmup, used, as_tensor, shape, decay):
    """Warm-up (5 % of the run by default), then (default) the peak held and a linear decay to 0
    over the last 20 %, or cosine to 0; the controller's rate times it."""
    if decay is not None and total is None:
        pytest.skip("decay_steps needs total_steps (tested below)")
    model, other = nn.Linear(4, 2), nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = MLRSNet(hidden_size=8)
    free = AutoLR(torch.optim.SGD(other.parameters(), lr=0.1), copy.deepcopy(ctrl), lr_as_tensor=as_tensor)
    sched = AutoLR(opt, ctrl, total_steps=total, warmup_steps=warmup, envelope=shape, decay_steps=decay,
                   lr_as_tensor=as_tensor)
    assert sched.scale.warmup_steps == used
    shape = shape or "wsd"
    model(torch.randn(3, 4)).sum().backward()
    other(torch.randn(3, 4)).sum().backward()
    for t in range(44):
        loss = torch.tensor(2.0 / (1 + t))
        free.step(loss)
        sched.step(loss)
        expected = float(free.last_rate) * written_out_envelope(t, total, used, shape, decay)
        assert float(sched.last_rate) == pytest.approx(expected, rel=1e-5, abs=1e-9), t
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(expected, rel=1e-5, abs=1e-9), t
    if total is not None:
        assert float(sched.last_rate) == 0.0
    elif as_tensor:
        assert sched._steady_step is not None, "after the warm-up nothing is computed on the host"
    assert cosine_envelope(3, 20) == written_out_envelope(3, 20, 0)


@pytest.mark.parametrize("warmup, total, match", [(-1, 10, ">= 0"), (2.5, 10, "whole number"), (True, 10, "whole"),
                                                  (10, 10, "smaller than total_steps")])
def test_bad_warmup_steps_raise_before_anything_changes(warmup, total, match):
    opt = torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        AutoLR(opt, MLRSNet(hidden_size=8), total_steps=total, warmup_steps=warmup)
    assert opt.param_groups[0]["lr"] == 0.1 and not isinstance(opt.param_groups[0]["lr"], torch.Tensor)


@pytest.mark.parametrize("kwargs, match", [
    (dict(envelope="linear"), "envelope must be one of"),
    (dict(envelope=1), "envelope must be one of"),
    (dict(decay_steps=0), "from 1 to"),
    (dict(decay_steps=19), r"from 1 to total_steps - warmup_steps \(18\)"),
    (dict(decay_steps=2.5), "whole number"),
    (dict(envelope="cosine", decay_steps=4), "pass envelope='wsd' with decay_steps, or leave decay_steps unset"),
    (dict(envelope=""), "envelope must be one of"),
    (dict(envelope=False), "envelope must be one of"),
    (dict(total_steps=None, decay_steps=4), "needs total_steps"),
])
def test_bad_envelope_arguments_raise_before_anything_changes(kwargs, match):
    opt = torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1)
    kwargs = {"total_steps": 20, "warmup_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        AutoLR(opt, MLRSNet(hidden_size=8), **kwargs)
    assert opt.param_groups[0]["lr"] == 0.1 and not isinstance(opt.param_groups[0]["lr"], torch.Tensor)


def test_the_default_decay_never_reaches_into_the_warmup():
    """On a very short run 20 % of the steps would overlap the warm-up: the decay starts after it."""
    opt = torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), total_steps=10, warmup_steps=9)
    assert (sched.scale.shape, sched.scale.decay_steps) == ("wsd", 1)
    assert [sched.scale.factor(t) for t in (8, 9, 10)] == [1.0, 0.5, 0.0]


@pytest.mark.parametrize("total, decay", [(2, 1), (3, 2), (5, None), (8, None), (20, 19)])
def test_every_decay_step_falls_below_the_peak(total, decay):
    """The last decay_steps steps all fall, linearly, to 1 / (D + 1) at the last step; even a run of
    a few steps decays (20 % of it rounds to at least 1 step)."""
    opt = torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), total_steps=total, warmup_steps=0, decay_steps=decay)
    d = sched.scale.decay_steps
    factors = [sched.scale.factor(t) for t in range(total)]
    assert factors[: total - d] == [1.0] * (total - d)
    assert factors[total - d:] == pytest.approx([(total - t) / (d + 1) for t in range(total - d, total)])
    assert factors[-1] == pytest.approx(1 / (d + 1)) and sched.scale.factor(total) == 0.0


@pytest.mark.filterwarnings("ignore:AutoLR.step was called twice")
def test_state_without_warmup_loads_as_zero_and_bad_warmup_is_refused():
    model = nn.Linear(4, 2)
    ctrl = MLRSNet(hidden_size=8)
    sched = AutoLR(torch.optim.SGD(model.parameters(), lr=0.1), copy.deepcopy(ctrl), total_steps=30, warmup_steps=0)
    model(torch.randn(3, 4)).sum().backward()
    sched.step(torch.tensor(1.0))
    state = copy.deepcopy(sched.state_dict())
    other = nn.Linear(4, 2)
    twin = AutoLR(torch.optim.SGD(other.parameters(), lr=0.1), copy.deepcopy(ctrl), total_steps=30)
    before = copy.deepcopy(twin.state_dict())
    for key, value in (("warmup_steps", -3), ("warmup_steps", 30), ("warmup_steps", 2.0), ("warmup_steps", None),
                       ("total_steps", 0), ("envelope", "linear"), ("envelope", None), ("decay_steps", None),
                       ("decay_steps", 0), ("decay_steps", 31)):
        bad = copy.deepcopy(state)
        bad["scale"][key] = value
        with pytest.raises(ValueError, match="state_dict's rate scale has a bad"):
            twin.load_state_dict(bad)
        after = twin.state_dict()
        assert twin.scale.warmup_steps == 2 and twin.step_count == 0, "a refused state changes nothing"
        for k in ("peak", "gamma"):  # NaN until the first loss
            torch.testing.assert_close(after["scale"][k], before["scale"][k], rtol=0, atol=0, equal_nan=True)
    del state["scale"]["warmup_steps"]  # a checkpoint without the key ran no warm-up
    twin.load_state_dict(state)
    assert twin.scale.warmup_steps == 0
    other(torch.randn(3, 4)).sum().backward()
    for t in range(1, 30):  # and goes on along the envelope without a warm-up, as the run it came from
        loss = torch.tensor(1.0 / t)
        sched.step(loss)
        twin.step(loss)
        assert torch.equal(sched.last_rate, twin.last_rate), t


@pytest.mark.filterwarnings("ignore:AutoLR.step was called twice")
def test_a_state_saved_before_the_envelope_had_a_shape_resumes_its_cosine():
    """A checkpoint without 'envelope' and 'decay_steps' ran the cosine envelope: a resume with the
    defaults goes on along it; one built with an explicit envelope keeps that one, and says so."""
    model = nn.Linear(4, 2)
    ctrl = MLRSNet(hidden_size=8)
    sched = AutoLR(torch.optim.SGD(model.parameters(), lr=0.1), copy.deepcopy(ctrl), total_steps=30,
                   envelope="cosine")
    model(torch.randn(3, 4)).sum().backward()
    sched.step(torch.tensor(1.0))
    state = copy.deepcopy(sched.state_dict())
    assert (state["scale"]["envelope"], state["scale"]["decay_steps"]) == ("cosine", None)
    del state["scale"]["envelope"], state["scale"]["decay_steps"]
    other = nn.Linear(4, 2)
    twin = AutoLR(torch.optim.SGD(other.parameters(), lr=0.1), copy.deepcopy(ctrl), total_steps=30)
    twin.load_state_dict(state)
    assert (twin.scale.shape, twin.scale.decay_steps) == ("cosine", None)
    other(torch.randn(3, 4)).sum().backward()
    for t in range(1, 30):
        loss = torch.tensor(1.0 / t)
        sched.step(loss)
        twin.step(loss)
        assert torch.equal(sched.last_rate, twin.last_rate), t
    explicit = AutoLR(torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1), copy.deepcopy(ctrl), total_steps=30,
                      envelope="wsd", decay_steps=6)
    with pytest.warns(RuntimeWarning, match="saved with total_steps=30, warmup_steps=2, envelope='cosine'; this "
                                            "AutoLR was built with .*envelope='wsd', decay_steps=6 and keeps"):
        explicit.load_state_dict(state)
    assert (explicit.scale.shape, explicit.scale.decay_steps) == ("wsd", 6)


def test_a_cap_controller_gets_no_warmup():
    """A non-relative action controller multiplies its own rate and gamma only caps it: a warm-up
    would clamp that rate to the first step's cap for good, so it gets none, and one asked for is
    refused."""
    from autolr_fast import ActionController

    def make():
        return ActionController(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), window=4, block=2, interval=8,
                                relative=False, default_gamma=1.0, start_rate=0.05)

    model = nn.Linear(4, 2)
    sched = AutoLR(torch.optim.SGD(model.parameters(), lr=0.05), make(), total_steps=40)
    assert sched.scale.warmup_steps == 0
    model(torch.randn(3, 4)).sum().backward()
    sched.step(torch.tensor(1.0))
    assert float(sched.last_rate) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="gamma only caps"):
        AutoLR(torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.05), make(), total_steps=40, warmup_steps=4)
    with pytest.raises(ValueError, match=">= 0"):  # a bad value is named as such first
        AutoLR(torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.05), make(), total_steps=40, warmup_steps=-1)
    state = copy.deepcopy(sched.state_dict())
    state["scale"]["warmup_steps"] = 4  # as an MLR-SNet's state would have it
    before = copy.deepcopy(sched.state_dict())
    with pytest.raises(ValueError, match="gamma only caps"):
        sched.load_state_dict(state)
    assert sched.step_count == before["step_count"] and sched.scale.warmup_steps == 0


@pytest.mark.filterwarnings("ignore:AutoLR.step was called twice")
def test_envelope_and_anchor_resume_bit_identically():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), total_steps=30)
    model(torch.randn(3, 4)).sum().backward()
    for t in range(10):
        sched.step(torch.tensor(1.0 + 0.1 * t))
    state = copy.deepcopy(sched.state_dict())
    other = nn.Linear(4, 2)
    twin = AutoLR(torch.optim.AdamW(other.parameters(), lr=1.0), MLRSNet(hidden_size=8))
    twin.load_state_dict(state)
    other(torch.randn(3, 4)).sum().backward()
    for t in range(10, 30):
        loss = torch.tensor(1.0 + 0.1 * t)
        sched.step(loss)
        twin.step(loss)
        assert torch.equal(sched.last_rate, twin.last_rate), t


def test_controller_gamma_far_from_lr_warns():
    opt = torch.optim.Adam(nn.Linear(4, 2).parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning, match="far from the rate you chose"):
        AutoLR(opt, load_pretrained("mnist1d-cnn"), gamma="controller")


def test_auto_gamma_with_momentum_or_adam_warns():
    for opt in (torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1, momentum=0.9),
                torch.optim.AdamW(nn.Linear(4, 2).parameters(), lr=1e-3)):
        with pytest.warns(RuntimeWarning, match="published rule for plain SGD"):
            AutoLR(opt, MLRSNet(), gamma="auto", num_classes=10)


def test_default_scale_gives_no_warning_on_any_optimizer():
    for make in OPTIMIZERS.values():
        opt = make(nn.Linear(4, 2).parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            AutoLR(opt, load_pretrained("mnist1d-cnn"), total_steps=10)


def _settles_at_zero() -> MLRSNet:
    ctrl = MLRSNet(hidden_size=8)
    with torch.no_grad():
        ctrl.head.bias.fill_(-30.0)  # p = sigmoid(-30 + ...) ~ 1e-13
    return ctrl


def test_a_controller_that_settles_at_zero_is_reported():
    """A controller whose output settles near 0 gives no usable anchor: the rate stays 0, said once."""
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, _settles_at_zero())
    model(torch.randn(3, 4)).sum().backward()
    with pytest.warns(RuntimeWarning, match="no usable scale"):
        sched.step(torch.tensor(1.0))
    assert float(sched.last_rate) == 0.0


def test_bad_scale_arguments_are_refused():
    opt = torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        AutoLR(opt, MLRSNet(hidden_size=8), total_steps=2.7)
    with pytest.raises(TypeError, match="gamma"):
        AutoLR(opt, MLRSNet(hidden_size=8), gamma=True)
    from autolr_fast.controllers.action import ActionController, make_action_model

    with pytest.raises(ValueError, match="needs an MLRSNet or a relative action controller"):
        AutoLR(opt, ActionController(make_action_model("mlp", 20)), gamma="lr")  # not relative
    assert AutoLR(opt, load_pretrained("action-mlp"), gamma="lr").scale.mode == "lr"  # the shipped one is


def test_action_controller_at_its_defaults_gives_no_warning():
    """The shipped one is relative: its scale is the optimizer's lr, nothing to warn about."""
    opt = torch.optim.Adam(nn.Linear(4, 2).parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = AutoLR(opt, load_pretrained("action-mlp"))
    assert float(sched.last_rate) == pytest.approx(1e-3)


def test_snapshots_and_export_use_the_peak_not_the_envelope(tmp_path):
    from autolr_fast import MetaConfig, export, load, load_controller

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), total_steps=4,
                   meta=MetaConfig(model, [(x[:8], y[:8])], nn.functional.cross_entropy, interval=1,
                                   snapshot_dir=str(tmp_path), snapshot_every=2))
    for _ in range(6):  # past total_steps: the envelope is 0 there
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sched.step(loss)
        opt.step()
    peak = float(sched.scale.peak)
    assert float(sched.gamma) == 0.0 and peak > 0
    for snap in sorted(tmp_path.glob("controller_*.pt")):
        assert load_controller(snap).default_gamma == pytest.approx(peak)
    export(sched, tmp_path / "c.pt")
    assert load(tmp_path / "c.pt").gamma == pytest.approx(peak)


def test_no_usable_scale_is_reported_where_the_peak_lives_on_the_device(monkeypatch):
    """On a GPU the host cannot read the peak without a sync: its verdict comes back through a
    device flag polled like the counters. Run here with found() answering as on a GPU."""
    from autolr_fast.rate_scale import RateScale

    monkeypatch.setattr(RateScale, "found", lambda self: setattr(self, "pending", False))  # None, as on a GPU
    model = nn.Linear(4, 2)
    sched = AutoLR(torch.optim.SGD(model.parameters(), lr=0.1), _settles_at_zero())
    model(torch.randn(3, 4)).sum().backward()
    with pytest.warns(RuntimeWarning, match="no usable scale"):
        sched.step(torch.tensor(1.0))
    assert sched._scale_check is None  # the verdict arrived and was reported

    good = AutoLR(torch.optim.SGD(model.parameters(), lr=0.1), MLRSNet(hidden_size=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good.step(torch.tensor(1.0))
    assert good._scale_check is None and float(good.last_rate) > 0


@pytest.mark.filterwarnings("ignore:AutoLR.step was called twice")
def test_loading_a_state_keeps_the_gamma_tensor_a_graph_may_read():
    """``gamma`` is written in place on load once it is a tensor of its own (a CUDA graph captured
    after the warm-up reads that tensor); it becomes one when the state brings an envelope."""
    model = nn.Linear(4, 2)
    sched = AutoLR(torch.optim.SGD(model.parameters(), lr=0.1), MLRSNet(hidden_size=8), total_steps=30)
    model(torch.randn(3, 4)).sum().backward()
    for t in range(4):
        sched.step(torch.tensor(1.0 + t))
    state = copy.deepcopy(sched.state_dict())
    gamma = sched.scale.gamma
    sched.load_state_dict(state)
    assert sched.scale.gamma is gamma and torch.equal(gamma, state["scale"]["gamma"])
    plain = AutoLR(torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1), MLRSNet(hidden_size=8))
    assert plain.scale.gamma is plain.scale.peak
    plain.load_state_dict(state)
    assert plain.scale.gamma is not plain.scale.peak and torch.equal(plain.scale.gamma, gamma)


def test_what_a_user_meets_off_the_common_path_is_said_clearly(tmp_path):
    import numpy as np

    from autolr_fast import available_pretrained, load_controller, load_pretrained, save_controller

    model = nn.Linear(4, 2)
    with pytest.warns(RuntimeWarning, match="published rule for plain SGD"):
        AutoLR(torch.optim.RMSprop(model.parameters(), lr=1e-2), MLRSNet(hidden_size=8), gamma="auto", num_classes=10)
    sched = AutoLR(torch.optim.SGD(model.parameters(), lr=0.1), MLRSNet(hidden_size=8), total_steps=np.int64(100))
    assert sched.scale.total_steps == 100 and "total_steps=100, warmup_steps=5" in repr(sched)
    sched.close()
    assert repr(sched).endswith(", closed)")

    class NoLr(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"rho": 0.9})

        def step(self, closure=None):
            return None

    with pytest.raises(TypeError, match="param groups have none"):
        AutoLR(NoLr(model.parameters()), MLRSNet(hidden_size=8))
    assert "default" in available_pretrained()
    with pytest.raises(KeyError, match="a name, not a path"):
        load_pretrained("../weights/default")
    path = tmp_path / "c.pt"
    save_controller(MLRSNet(hidden_size=8), path, gamma=0.1)
    blob = torch.load(path, weights_only=True)
    for damage, words in ((lambda b: b["config"].pop("hidden_size"), "does not describe an MLRSNet"),
                          (lambda b: b["config"].update(hidden_size="abc"), "does not describe an MLRSNet"),
                          (lambda b: next(iter(b["state_dict"].values())).fill_(float("nan")), "NaN or infinite")):
        bad = {**blob, "config": dict(blob["config"]),
               "state_dict": {k: v.clone() for k, v in blob["state_dict"].items()}}
        damage(bad)
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=words):
            load_controller(tmp_path / "bad.pt")


def test_a_saved_scale_of_another_mode_replacing_an_explicit_gamma_is_said():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = AutoLR(opt, MLRSNet(hidden_size=8))
    model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    saved.step(torch.tensor(1.0))
    state = saved.state_dict()
    saved.close()
    with pytest.warns(RuntimeWarning, match="state's scale is 'lr'.*replaces the 'fixed' scale"):
        AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5).load_state_dict(state)


def test_a_saved_gamma_replacing_an_explicit_other_gamma_is_said():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.1)
    model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    saved.step(torch.tensor(1.0))
    state = saved.state_dict()
    saved.close()
    with pytest.warns(RuntimeWarning, match=r"state's scale is 'fixed' \(peak 0.1\); it replaces .*gamma=0.05"):
        AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.05).load_state_dict(state)


def test_a_controllers_trained_envelope_is_the_default_and_decay_steps_means_wsd():
    class Cosine(MLRSNet):
        trained_envelope = "cosine"

    class Broken(MLRSNet):
        trained_envelope = "linear"

    def build(ctrl, **kwargs):
        return AutoLR(torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1), ctrl, total_steps=20, **kwargs)

    assert build(MLRSNet(hidden_size=8)).scale.shape == "wsd"
    assert build(Cosine(hidden_size=8)).scale.shape == "cosine"
    assert build(Cosine(hidden_size=8), envelope="wsd").scale.shape == "wsd"
    assert (build(Cosine(hidden_size=8), decay_steps=5).scale.shape, build(Cosine(hidden_size=8), decay_steps=5)
            .scale.decay_steps) == ("wsd", 5)  # only the wsd envelope has a decay length
    with pytest.raises(ValueError, match="Broken.trained_envelope is 'linear'.*pass envelope= to AutoLR"):
        build(Broken(hidden_size=8))


@pytest.mark.filterwarnings("ignore:AutoLR.step was called twice")
@pytest.mark.parametrize("kwargs, kept", [
    ({}, (10, "saved")), ({"envelope": "wsd"}, (10, "saved")), ({"decay_steps": 10}, (10, "saved")),
    ({"decay_steps": 30}, (30, "built")), ({"envelope": "cosine"}, (None, "built"))])
def test_a_resume_keeps_the_saved_decay_unless_another_is_asked_for(kwargs, kept):
    model = nn.Linear(4, 2)
    sched = AutoLR(torch.optim.SGD(model.parameters(), lr=0.1), MLRSNet(hidden_size=8), total_steps=100,
                   decay_steps=10)
    model(torch.randn(3, 4)).sum().backward()
    sched.step(torch.tensor(1.0))
    state = copy.deepcopy(sched.state_dict())
    resumed = AutoLR(torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1), MLRSNet(hidden_size=8),
                     total_steps=100, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_state_dict(state)
    told = [str(w.message) for w in caught if "AutoLR.load_state_dict" in str(w.message)]
    assert resumed.scale.decay_steps == kept[0]
    assert len(told) == (kept[1] == "built")
    if told:
        assert "keeps that envelope from step 1 on" in told[0]
