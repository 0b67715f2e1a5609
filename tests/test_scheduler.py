"""AutoLR: the canonical loop, no host sync, exact resume, bad input, wrong use, compile."""

from __future__ import annotations

import copy
import os
import re
import warnings

import pytest
import torch
from conftest import SmallCNN, make_problem, train_steps
from host_sync_probe import HostReadCounter
from torch import nn

from autolr_fast import ActionController, AutoLR, MetaConfig, MLRSNet, optim_support
from autolr_fast.controllers.action import make_action_model

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
}


def run(model, opt, sched, steps, seed=0, losses_out=None):
    x, y = make_problem(seed)
    for i in range(steps):
        xb, yb = x[(i * 16) % 64 : (i * 16) % 64 + 16], y[(i * 16) % 64 : (i * 16) % 64 + 16]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        sched.step(loss)
        if losses_out is not None:
            losses_out.append(sched.last_rate.clone())
        opt.step()


@pytest.mark.parametrize("as_tensor", [True, None])
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_canonical_loop_sets_rate(kind, as_tensor):
    """A tensor lr when asked for (the GPU default), a float on the CPU by default."""
    model = SmallCNN()
    opt = OPTIMIZERS[kind](model.parameters())
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5, lr_as_tensor=as_tensor)
    before = copy.deepcopy(model.state_dict())
    rates = []
    run(model, opt, sched, 5, losses_out=rates)
    lr = opt.param_groups[0]["lr"]
    if as_tensor:
        assert isinstance(lr, torch.Tensor) and lr.dim() == 0
        assert torch.equal(lr, sched.last_rate)
    else:
        assert isinstance(lr, float) and lr == float(sched.last_rate)
    assert all(0.0 <= float(r) <= 0.5 for r in rates)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model must train"
    assert sched.get_last_lr() == [pytest.approx(float(sched.last_rate))]


def test_rate_is_the_controller_output_times_gamma():
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = MLRSNet(hidden_size=16)
    twin = copy.deepcopy(ctrl)
    sched = AutoLR(opt, ctrl, gamma=0.7)
    x, y = make_problem()
    for _ in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sched.step(loss)
        expected = 0.7 * twin(loss.detach())
        assert float(sched.last_rate) == pytest.approx(float(expected), rel=1e-6)
        opt.step()


def _action_controller():
    return ActionController(make_action_model("mlp", 4), window=4, block=1, interval=2, default_gamma=1.0)


CONTROLLERS = {
    "mlrsnet": lambda: (MLRSNet(hidden_size=16), {}),
    "mlrsnet_lr_anchor": lambda: (MLRSNet(hidden_size=16), {"gamma": None, "total_steps": 6}),
    "mlrsnet_auto_gamma": lambda: (MLRSNet(hidden_size=16), {"gamma": "auto", "num_classes": 3}),
    "metatest_order": lambda: (MLRSNet(hidden_size=16, gate_order="metatest"), {}),
    "action": lambda: (_action_controller(), {}),
}
FUSED = {
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
}


@pytest.mark.filterwarnings("ignore:AutoLR. a non-finite")
@pytest.mark.parametrize("meta", [False, True])
@pytest.mark.parametrize("opt_kind", sorted(FUSED))
@pytest.mark.parametrize("ctrl_kind", sorted(CONTROLLERS))
def test_step_reads_no_tensor_value_on_the_host(ctrl_kind, opt_kind, meta):
    """The GPU code path (tensor lr) reads no tensor value on the host: counted by a dispatch mode,
    which sees C++-level reads (x[tensor_index], if tensor: ...) as well as .item()."""
    if meta and ctrl_kind != "mlrsnet":
        pytest.skip("meta-training takes an MLRSNet with gate_order='train'")
    model = SmallCNN()
    opt = FUSED[opt_kind](model.parameters())
    x, y = make_problem()
    controller, kwargs = CONTROLLERS[ctrl_kind]()
    kwargs.setdefault("gamma", 0.5 if opt_kind == "sgd_fused" else 1e-3)
    if meta:
        kwargs["meta"] = MetaConfig(model, [(x[16:32], y[16:32])], nn.functional.cross_entropy, interval=2)
    sched = AutoLR(opt, controller, lr_as_tensor=True, **kwargs)
    for i in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
        if i == 3:
            loss = loss * float("nan")
        loss.backward()
        with HostReadCounter() as probe:
            sched.step(loss)
        assert probe.count == 0, f"step {i}: host reads {dict(probe.ops)}"
        opt.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)


def test_host_read_counter_sees_cpp_level_reads():
    """The control: indexing with a 0-dim tensor reads it on the host inside ATen."""
    values, index = torch.tensor([0.9, 1.0, 1.1]), torch.tensor(2)
    with HostReadCounter() as probe:
        values[index]
    assert probe.count >= 1


@pytest.mark.parametrize("kind", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("gamma", [0.3, "auto"])
def test_resume_gives_bit_identical_rates(tmp_path, kind, gamma):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = OPTIMIZERS[kind](model.parameters())
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=gamma, num_classes=3)
    run(model, opt, sched, 7)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, path)
    straight = []
    run(model, opt, sched, 9, seed=1, losses_out=straight)

    torch.manual_seed(123)  # a different init everywhere: everything must come from the file
    model2 = SmallCNN()
    opt2 = OPTIMIZERS[kind](model2.parameters())
    sched2 = AutoLR(opt2, MLRSNet(hidden_size=16), gamma=gamma, num_classes=3)
    blob = torch.load(path, weights_only=True)
    model2.load_state_dict(blob["model"])
    opt2.load_state_dict(blob["opt"])
    sched2.load_state_dict(blob["sched"])
    resumed = []
    run(model2, opt2, sched2, 9, seed=1, losses_out=resumed)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed)), "resumed rates differ from the uninterrupted run"
    assert sched2.step_count == sched.step_count


def linear_with_autolr():
    """A linear classifier, plain SGD, AutoLR with a small controller, and this step's loss
    (backward not called yet)."""
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5)
    x, y = make_problem()
    return model, opt, sched, nn.functional.cross_entropy(model(x), y)


def test_nonfinite_loss_keeps_rate_and_state_and_warns_once():
    _, opt, sched, loss = linear_with_autolr()
    loss.backward()
    sched.step(loss)
    rate, h, c = sched.last_rate.clone(), sched.controller.h.clone(), sched.controller.c.clone()
    opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bad in (float("nan"), float("inf"), float("-inf")):
            sched.step(torch.tensor(bad))
            assert torch.equal(sched.last_rate, rate)
            assert torch.equal(sched.controller.h, h) and torch.equal(sched.controller.c, c)
            assert opt.param_groups[0]["lr"] == float(rate)
            opt.step()
    msgs = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert sched.skipped_steps == 3
    sched.step(torch.tensor(1.0))
    assert not torch.equal(sched.controller.h, h)


def test_nan_first_loss_with_auto_gamma_waits_for_a_finite_one():
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma="auto", num_classes=3)
    x, y = make_problem()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        sched.step(torch.tensor(float("nan")))
    assert float(sched.last_rate) == 0.0 and torch.isnan(sched.gamma)
    opt.step()
    sched.step(torch.tensor(1.2))
    expected = float(abs(1.2**0.5 * torch.log(torch.tensor(3.6)) / 3**0.25) / 4)
    assert float(sched.gamma) == pytest.approx(expected, rel=1e-6)
    assert 0 < float(sched.last_rate) <= float(sched.gamma)


def test_negative_loss_is_clamped_and_warned():
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    a = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5)
    b = AutoLR(torch.optim.SGD(nn.Linear(8, 3).parameters(), lr=0.1), copy.deepcopy(a.controller), gamma=0.5)
    for p in b.optimizer.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    x, y = make_problem()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="negative loss"):
        a.step(torch.tensor(-3.0))
    b.step(torch.tensor(0.0))
    assert torch.equal(a.last_rate, b.last_rate)


@pytest.mark.parametrize(
    "loss, error, match",
    [
        (1.0, TypeError, "as a tensor"),
        (torch.ones(3), ValueError, "scalar loss"),
        (torch.ones(2, 2), ValueError, "scalar loss"),
        (torch.ones((), device="meta"), ValueError, "is on meta"),
    ],
)
def test_wrong_loss_input_errors_and_leaves_state(loss, error, match):
    _, _, sched, good_loss = linear_with_autolr()
    good_loss.backward()
    before = copy.deepcopy(sched.state_dict())
    with pytest.raises(error, match=match):
        sched.step(loss)
    after = sched.state_dict()
    assert all(torch.equal(before["controller"][k], after["controller"][k]) for k in before["controller"])
    assert after["step_count"] == before["step_count"]


def test_optimizer_step_before_sched_step_is_an_error():
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5)
    x, y = make_problem()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="before AutoLR.step"):
        opt.step()


def test_sched_step_before_backward_is_an_error():
    _, _, sched, loss = linear_with_autolr()
    with pytest.raises(RuntimeError, match="before loss.backward"):
        sched.step(loss)


def test_double_step_warns():
    _, _, sched, loss = linear_with_autolr()
    loss.backward()
    sched.step(loss)
    with pytest.warns(RuntimeWarning, match="twice"):
        sched.step(loss)


def test_param_groups_keep_their_ratio():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[1].parameters(), "lr": 0.01}], lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5)
    x, y = make_problem()
    nn.functional.cross_entropy(model(x), y).backward()
    sched.step(nn.functional.cross_entropy(model(x), y))
    lr0, lr1 = (g["lr"] for g in opt.param_groups)
    assert float(lr1) == pytest.approx(float(lr0) * 0.1, rel=1e-6)
    assert sched.get_last_lr()[1] == pytest.approx(sched.get_last_lr()[0] * 0.1)


def test_bad_constructor_arguments():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="num_classes"):
        AutoLR(opt, MLRSNet(), gamma="auto")
    with pytest.raises(ValueError, match="positive finite"):
        AutoLR(opt, MLRSNet(), gamma=-1.0)
    with pytest.raises(ValueError, match="its own gamma"):
        AutoLR(opt, MLRSNet(), gamma="controller")
    with pytest.raises(ValueError, match="optimizer's lr"):
        AutoLR(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.0), MLRSNet())
    with pytest.raises(ValueError, match="total_steps"):
        AutoLR(opt, MLRSNet(), total_steps=0)
    with pytest.raises(TypeError, match="Optimizer"):
        AutoLR(object(), MLRSNet(), gamma=0.1)


def test_load_state_dict_rejects_bad_state_without_changes():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5)
    good = sched.state_dict()
    for bad in ({}, {"version": 99}, {**good, "controller": MLRSNet(hidden_size=8).state_dict()},
                {**good, "lr_scales": [1.0, 2.0]}):
        with pytest.raises(ValueError):
            sched.load_state_dict(bad)
    assert all(torch.equal(v, sched.controller.state_dict()[k]) for k, v in good["controller"].items())


class _PlainOptimizer(torch.optim.Optimizer):
    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        for g in self.param_groups:
            assert isinstance(g["lr"], float)
            for p in g["params"]:
                p.data.add_(p.grad, alpha=-g["lr"])


def test_unknown_optimizer_gets_float_rate_and_one_warning():
    model = nn.Linear(8, 3)
    opt = _PlainOptimizer(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="float"):
        sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5, lr_as_tensor=True)
    train_steps(model, opt, sched, *make_problem(), steps=3)
    assert opt.param_groups[0]["lr"] == pytest.approx(float(sched.last_rate))


def test_sync_free_detection():
    p = [nn.Parameter(torch.zeros(2))]
    cuda = torch.device("cuda")
    assert optim_support.sync_free_problem(torch.optim.SGD(p, lr=0.1), cuda)
    assert optim_support.sync_free_problem(torch.optim.SGD(p, lr=0.1, fused=True), cuda) is None
    assert optim_support.sync_free_problem(torch.optim.Adam(p, lr=0.1), cuda)
    assert optim_support.sync_free_problem(torch.optim.AdamW(p, lr=0.1, fused=True), cuda) is None
    assert optim_support.sync_free_problem(torch.optim.SGD(p, lr=0.1), torch.device("cpu")) is None


def test_compiled_optimizer_step_does_not_recompile_when_rate_changes():
    import torch._dynamo

    torch._dynamo.reset()
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5, lr_as_tensor=True)
    compiled = torch.compile(opt.step, backend="eager")
    x, y = make_problem()

    def one_step(i):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * (1 + 0.1 * i)
        loss.backward()
        sched.step(loss)
        compiled()
        return float(sched.last_rate)

    for i in range(2):  # warm-up: the first step creates the momentum buffers (one expected recompile)
        one_step(i)
    rates = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(20):
            rates.add(one_step(i))
    assert len(rates) > 10, "the rate must change between steps for this test to mean anything"


def test_float_rates_would_recompile():
    """The control for the test above: a float lr that changes does recompile."""
    import torch._dynamo

    torch._dynamo.reset()
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    compiled = torch.compile(opt.step, backend="eager")
    x, y = make_problem()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    compiled()
    compiled()
    with pytest.raises(Exception, match="[Rr]ecompil"):
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in range(5):
                opt.param_groups[0]["lr"] = 0.1 + 0.01 * i
                compiled()


@pytest.mark.parametrize("force_reference", [False, True])
def test_counters_agree_between_fast_path_and_reference(monkeypatch, force_reference):
    """Skipped and negative losses are counted the same on the fused path and the reference."""
    if force_reference:
        monkeypatch.setenv("AUTOLR_FAST_FORCE_REFERENCE", "1")
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5)
    x, y = make_problem()
    nn.functional.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for v in (1.0, float("nan"), -2.0, float("-inf"), 0.5, -0.1, float("inf")):
            sched.step(torch.tensor(v))
            opt.step()
    assert sched.counters.exact() == {"skipped": 3, "negative": 2}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_rate_stays_finite_and_in_range_for_any_loss(dtype):
    """Random losses over many magnitudes, signs and non-finite values, in several dtypes."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma="auto", num_classes=3)
    x, y = make_problem()
    nn.functional.cross_entropy(model(x), y).backward()
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 1e-30, 65504.0]
    for i in range(200):
        if i % 7 == 3:
            v = specials[int(torch.randint(len(specials), (1,), generator=g))]
        else:
            v = float(torch.randn((), generator=g) * 10 ** float(torch.randint(-6, 8, (), generator=g)))
        sched.step(torch.tensor(v, dtype=dtype))
        opt.step()
        r, gamma = float(sched.last_rate), float(sched.gamma)
        assert r == r and abs(r) != float("inf"), f"seed {seed}: rate {r} after loss {v}"
        if gamma == gamma:
            assert 0.0 <= r <= gamma, f"seed {seed}: rate {r} outside [0, {gamma}] after loss {v}"
        assert torch.isfinite(sched.controller.h).all() and torch.isfinite(sched.controller.c).all(), f"seed {seed}"


def test_warnings_point_at_the_callers_line():
    """AutoLR's warnings name the user's file and line, not a line inside autolr_fast."""
    model = nn.Linear(8, 3)
    opt = _PlainOptimizer(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5, lr_as_tensor=True)
        model(torch.randn(2, 8)).sum().backward()
        sched.step(torch.tensor(float("nan")))
    assert len(caught) == 2, [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in caught), [(w.filename, w.lineno) for w in caught]


def test_a_refused_autolr_leaves_the_optimizer_untouched():
    """AutoLR(...) that refuses its arguments (here a MetaConfig for another model) installs no hook:
    the optimizer keeps working, and a second AutoLR on it works."""
    model, other = nn.Linear(8, 3), nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_problem()
    with pytest.raises(ValueError):
        AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5, lr_as_tensor=True,
               meta=MetaConfig(other, [(x, y)], nn.functional.cross_entropy, interval=2))
    assert not opt._optimizer_step_pre_hooks and isinstance(opt.param_groups[0]["lr"], float)
    assert "initial_lr" not in opt.param_groups[0]
    model(x).sum().backward()
    opt.step()  # no AutoLR hook refuses it
    train_steps(model, opt, AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5), x, y, steps=2)


def test_load_state_dict_checks_the_scale_rate_and_counters_first():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5)
    good = copy.deepcopy(sched.state_dict())
    before = copy.deepcopy(sched.controller.state_dict())
    bad_states = [{**good, "scale": {"mode": "lr"}}, {**good, "scale": {**good["scale"], "peak": 1.0}},
                  {**good, "rate": torch.zeros(2)}, {**good, "counters": torch.zeros(3, dtype=torch.int64)}]
    for bad in bad_states:
        bad["controller"] = {k: v + 1 for k, v in good["controller"].items()}
        with pytest.raises(ValueError):
            sched.load_state_dict(bad)
        assert all(torch.equal(before[k], v) for k, v in sched.controller.state_dict().items())


def test_load_state_dict_checks_step_count_lr_scales_and_meta_state_first():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), meta=MetaConfig(model, [(x[:8], y[:8])], nn.functional.cross_entropy,
                                                                 interval=2))
    train_steps(model, opt, sched, x, y, steps=3)
    good = copy.deepcopy(sched.state_dict())
    train_steps(model, opt, sched, x, y, steps=2)
    before = copy.deepcopy((sched.controller.state_dict(), sched.rate, sched.step_count, sched.meta.state_dict()))
    meta_of_other = torch.optim.Adam([nn.Parameter(torch.zeros(1))]).state_dict()
    for bad in ({**good, "step_count": None}, {**good, "step_count": -1}, {**good, "lr_scales": [float("nan")]},
                {**good, "lr_scales": [-1.0]}, {**good, "meta": {"meta_steps": 1}},
                {**good, "meta": {**good["meta"], "optimizer": meta_of_other}},
                {**good, "meta": {**good["meta"], "meta_steps": "1"}}):
        with pytest.raises(ValueError):
            sched.load_state_dict(bad)
        after = (sched.controller.state_dict(), sched.rate, sched.step_count, sched.meta.state_dict())
        assert all(torch.equal(before[0][k], v) for k, v in after[0].items())
        assert torch.equal(before[1], after[1]) and before[2] == after[2]
        assert before[3]["meta_steps"] == after[3]["meta_steps"]
    sched.load_state_dict(good)  # the good state still loads after the refusals
    assert sched.step_count == 3


def _damage(state: dict, where: str, value) -> dict:
    bad = copy.deepcopy(state)
    if where.startswith("scale."):
        bad["scale"][where[6:]] = value
    elif where.startswith("controller."):
        bad["controller"][where[11:]] = value(bad["controller"][where[11:]])
    else:
        bad[where] = value
    return bad


@pytest.mark.parametrize("where,value,words", [
    ("scale.peak", torch.tensor(-1.0), "peak -1.0"),
    ("scale.gamma", torch.tensor(float("inf")), "gamma inf"),
    ("scale.peak", torch.tensor(float("nan")), "peak nan"),  # a fixed gamma is never undecided
    ("scale.peak", torch.tensor(1), "floating-point"),
    ("scale.base_lr", "x", "base_lr"),
    ("scale.base_lr", float("nan"), "base_lr"),
    ("scale.num_classes", 2.5, "num_classes"),
    ("rate", torch.tensor(-0.5), "'rate'"),
    ("rate", torch.tensor(float("nan")), "'rate'"),
    ("counters", torch.tensor([-1, 0]), "'counters'"),
    ("warned", 5, "'warned'"),
    ("controller.head.weight", lambda w: w.to(torch.int64), "not floating-point"),
    ("controller.head.weight", lambda w: w.index_fill(0, torch.tensor([0]), float("nan")), "non-finite"),
])
def test_a_damaged_state_is_refused_before_anything_changes(where, value, words):
    """Values no state_dict() writes (a negative or infinite scale or rate, NaN or integer weights, a
    bad base_lr, counters or warning list) are refused with the field named, and the scheduler, its
    controller and the optimizer's rates stay as they were (a negative scale would train uphill)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5)
    x, y = make_problem()
    train_steps(model, opt, sched, x, y, steps=5)
    saved = sched.state_dict()
    train_steps(model, opt, sched, x, y, steps=3)
    if where.startswith("controller.") and where[11:] not in saved["controller"]:
        pytest.fail(f"no {where[11:]!r} in {sorted(saved['controller'])}")
    before = copy.deepcopy((sched.state_dict(), opt.param_groups[0]["lr"]))
    with pytest.raises(ValueError, match=re.escape(words)):
        sched.load_state_dict(_damage(saved, where, value))
    after = (sched.state_dict(), opt.param_groups[0]["lr"])
    assert after[1] == before[1] and after[0]["step_count"] == before[0]["step_count"]
    assert after[0]["warned"] == before[0]["warned"] and after[0]["scale"]["mode"] == before[0]["scale"]["mode"]
    for key in ("rate", "counters"):
        assert torch.equal(after[0][key], before[0][key]), key
    for key in ("peak", "gamma"):
        assert torch.equal(after[0]["scale"][key], before[0]["scale"][key]), key
    assert all(torch.equal(v, after[0]["controller"][k]) for k, v in before[0]["controller"].items())
    sched.load_state_dict(saved)  # the undamaged state still loads
    assert sched.step_count == 5


@pytest.mark.parametrize("lr_as_tensor", [False, True])
@pytest.mark.parametrize("user_sets_lr", [False, True])
def test_a_second_autolr_on_the_same_optimizer_takes_over(lr_as_tensor, user_sets_lr):
    """Building AutoLR again on an optimizer (a notebook cell run twice) closes the earlier one with
    a warning instead of failing at the next optimizer.step() with an error about the call order.
    The new one starts from the lr the groups had before the first (its last rate is not what the
    user means), unless the user set an lr since."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = make_problem()
    first = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=12, envelope="cosine", lr_as_tensor=lr_as_tensor)
    train_steps(model, opt, first, x, y, steps=10)  # near the end of its cosine
    assert float(opt.param_groups[0]["lr"]) < 0.03
    if user_sets_lr:
        opt.param_groups[0]["lr"] = 0.05
    with pytest.warns(RuntimeWarning, match=r"still driven by an earlier AutoLR.*takes over, from the lr "
                                            + ("you set since, \\[0.05\\]" if user_sets_lr else
                                               "the groups had before it, \\[0.1\\]")):
        second = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=12, warmup_steps=0, lr_as_tensor=lr_as_tensor)
    train_steps(model, opt, second, x, y, steps=1)  # no "optimizer.step() was called before AutoLR.step"
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.05 if user_sets_lr else 0.1, rel=1e-3)
    with pytest.raises(RuntimeError, match="closed"):
        first.step(torch.tensor(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second.close()
        AutoLR(opt, MLRSNet(hidden_size=16))  # the earlier one closed by the user: no warning


@pytest.mark.parametrize("lr_as_tensor", [False, True])
def test_an_lr_set_outside_autolr_is_warned_about_and_lr_scales_change_a_group(lr_as_tensor):
    """A group's lr set by hand (unfreezing a backbone) or by a torch scheduler would be overwritten
    at the next step without a word: on the float path AutoLR warns once, naming sched.lr_scales,
    which does change a group's share of the rate (also on the tensor path's steady-state fast
    path, where an lr set by hand is not seen without a sync)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}], lr=0.1)
    x, y = make_problem()
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.1, lr_as_tensor=lr_as_tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, opt, sched, x, y, steps=3)
    opt.param_groups[0]["lr"] = 0.1
    if lr_as_tensor:
        train_steps(model, opt, sched, x, y, steps=1)
    else:
        with pytest.warns(RuntimeWarning, match=r"param group 0's lr was set to 0.1 outside AutoLR.*lr_scales\[0\]"):
            train_steps(model, opt, sched, x, y, steps=1)
    assert float(opt.param_groups[0]["lr"]) == 0.0  # overwritten, as the warning says
    sched.lr_scales[0] = 0.5
    train_steps(model, opt, sched, x, y, steps=3)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.5 * float(opt.param_groups[1]["lr"]), rel=1e-6)
    assert float(opt.param_groups[0]["lr"]) > 0


@pytest.mark.parametrize("lr_as_tensor", [False, True])
@pytest.mark.parametrize("optimizer_first", [False, True])
def test_a_resume_in_either_order_warns_about_nothing(lr_as_tensor, optimizer_first):
    """optimizer.load_state_dict writes the saved lrs into the groups (new tensors on the tensor
    path): a resume is not an lr set outside AutoLR."""
    x, y = make_problem()

    def build():
        torch.manual_seed(0)
        model = nn.Linear(8, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, AutoLR(opt, MLRSNet(hidden_size=8), total_steps=20, lr_as_tensor=lr_as_tensor)

    model, opt, sched = build()
    train_steps(model, opt, sched, x, y, steps=3)
    saved = (copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))
    model, opt, sched = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if optimizer_first:
            opt.load_state_dict(saved[0])
            sched.load_state_dict(saved[1])
        else:
            sched.load_state_dict(saved[1])
            opt.load_state_dict(saved[0])
        train_steps(model, opt, sched, x, y, steps=3)


def test_a_torch_scheduler_on_the_optimizer_is_warned_about():
    """On the tensor path, where a scheduler's in-place writes cannot be seen later, when AutoLR is
    built; on the float path at the step after the scheduler sets an lr."""
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with pytest.warns(RuntimeWarning, match="a torch.optim.lr_scheduler was built on this optimizer"):
        AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.1, lr_as_tensor=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.1)
        train_steps(model, opt, sched, *make_problem(), steps=2)
    other.step()
    with pytest.warns(RuntimeWarning, match="set to 0.0.* outside AutoLR"):
        train_steps(model, opt, sched, *make_problem(), steps=1)


def test_taking_over_keeps_added_groups_and_a_refused_takeover_changes_nothing():
    """A group added after the first AutoLR (never written by it) does not stop the second from
    starting at the first group's initial_lr; with warnings as errors, the takeover's warning is
    raised before the earlier AutoLR is closed or an lr restored."""
    torch.manual_seed(0)
    a, b = nn.Linear(8, 3), nn.Linear(8, 3)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    x, y = make_problem()
    first = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=12)
    train_steps(a, opt, first, x, y, steps=10)
    opt.add_param_group({"params": b.parameters(), "lr": 0.1})
    decayed = opt.param_groups[0]["lr"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="takes over"):
            AutoLR(opt, MLRSNet(hidden_size=16), total_steps=12)
    assert opt.param_groups[0]["lr"] == decayed and not first._closed
    with pytest.warns(RuntimeWarning, match=r"or the one before it where you set none, \[0.1, 0.1\]"):
        second = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=12)
    assert second.scale.base_lr == 0.1 and second.lr_scales == [1.0, 1.0]


def test_a_fresh_autolr_then_an_optimizer_state_warns_about_nothing():
    """optimizer.load_state_dict without a scheduler state (switching to AutoLR on a resumed run):
    the loaded lrs are not an lr set outside AutoLR."""
    x, y = make_problem()
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, opt, AutoLR(opt, MLRSNet(hidden_size=8), total_steps=20), x, y, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), total_steps=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(saved)
        train_steps(model, opt, sched, x, y, steps=2)


def test_taking_over_decides_group_by_group():
    """One group's lr set by hand before the takeover: that group starts from it, the other from its
    initial_lr, not from the decayed rate it still holds (the ratio of the groups is kept)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    x, y = make_problem()
    first = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=12)
    train_steps(model, opt, first, x, y, steps=10)
    opt.param_groups[1]["lr"] = 0.05
    with pytest.warns(RuntimeWarning, match=r"or the one before it where you set none, \[0.1, 0.05\]"):
        second = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=12)
    assert second.scale.base_lr == 0.1 and second.lr_scales == [1.0, 0.5]
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.05]


def test_a_run_continued_at_a_later_step_waits_for_a_finite_loss():
    """_start_at_step (a checkpoint of another schedule switched to AutoLR): a first step that is
    skipped (NaN loss, GradScaler) does not end the wait for the first finite loss, which the lr
    anchor needs (before, the scale was decided from no loss and the rate stayed 0)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), total_steps=40, envelope="cosine")
    sched._start_at_step(10)
    x, y = make_problem()
    model(x).sum().backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        sched.step(torch.tensor(float("nan")))
    opt.step()
    train_steps(model, opt, sched, x, y, steps=3)
    assert sched.step_count == 14 and 0.05 < float(opt.param_groups[0]["lr"]) < 0.1  # past the middle of the cosine


def test_a_continued_run_saved_before_its_first_finite_loss_resumes_the_same_wait():
    """The step a continued run started at (_start_at_step) is saved: resumed before the first
    finite loss, a skipped first step still does not end the wait."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    x, y = make_problem()

    def build():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return opt, AutoLR(opt, MLRSNet(hidden_size=8), total_steps=40, envelope="cosine")

    opt, sched = build()
    sched._start_at_step(10)
    saved = sched.state_dict()
    assert saved["first_step"] == 10
    opt, sched = build()
    sched.load_state_dict(saved)
    model(x).sum().backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        sched.step(torch.tensor(float("nan")))
    opt.step()
    train_steps(model, opt, sched, x, y, steps=3)
    assert 0.05 < float(opt.param_groups[0]["lr"]) < 0.1
    with pytest.raises(ValueError, match="'first_step'"):
        sched.load_state_dict({**saved, "first_step": 11})  # after its step_count


def test_the_moved_lr_warning_only_where_the_lr_sets_the_rate():
    """A relative action controller with a float gamma runs at gamma: a decayed lr is no matter."""
    from autolr_fast import ActionController

    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))  # a relative controller reads 4 channels
    for controller, gamma, warns in ((ActionController(model, window=4, block=2, interval=8, relative=True), 0.05,
                                      False),
                                     (MLRSNet(hidden_size=8), 0.05, False), (MLRSNet(hidden_size=8), None, True)):
        opt = torch.optim.SGD(nn.Linear(8, 3).parameters(), lr=0.1)
        opt.param_groups[0]["initial_lr"] = 0.3  # as a torch scheduler that decayed it leaves it
        sched = AutoLR(opt, controller, gamma=gamma)
        assert (sched._moved_lr is not None) == warns, (type(controller).__name__, gamma)


def test_an_optimizer_state_without_initial_lr_keeps_the_recorded_one():
    """A state saved under a scheduler that keeps no initial_lr (ReduceLROnPlateau): the peak AutoLR
    recorded survives the load, so a later AutoLR starts from it."""
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    AutoLR(opt, MLRSNet(hidden_size=8))
    state = copy.deepcopy(opt.state_dict())
    for g in state["param_groups"]:
        g.pop("initial_lr")
        g["lr"] = 1e-4
    opt.load_state_dict(state)
    assert opt.param_groups[0]["initial_lr"] == 0.1 and opt.param_groups[0]["lr"] == 1e-4
    # a group added later (adopted at a step) is kept the same way
    extra = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8))
    opt.add_param_group({"params": extra.parameters(), "lr": 0.05})
    x, y = make_problem()
    train_steps(model, opt, sched, x, y, steps=1)
    state = copy.deepcopy(opt.state_dict())
    for g in state["param_groups"]:
        g.pop("initial_lr")
    opt.load_state_dict(state)
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.05]


def test_a_loaded_state_replacing_explicit_lr_scales_says_so():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters()}]
    saved = AutoLR(torch.optim.SGD(groups, lr=0.1), MLRSNet(hidden_size=8), lr_scales=[1.0, 0.5]).state_dict()
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters()}]
    sched = AutoLR(torch.optim.SGD(groups, lr=0.1), MLRSNet(hidden_size=8), lr_scales=[1.0, 0.1])
    with pytest.warns(RuntimeWarning, match=r"lr_scales \[1.0, 0.5\] replace the lr_scales=\[1.0, 0.1\]"):
        sched.load_state_dict(saved)
    assert sched.lr_scales == [1.0, 0.5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = [{"params": model[0].parameters()}, {"params": model[1].parameters()}]
        AutoLR(torch.optim.SGD(groups, lr=0.1), MLRSNet(hidden_size=8)).load_state_dict(saved)  # none given
        # a state covering fewer groups: the others keep the scales given for them
        short = AutoLR(torch.optim.SGD(model[0].parameters(), lr=0.1), MLRSNet(hidden_size=8)).state_dict()
        groups = [{"params": model[0].parameters()}, {"params": model[1].parameters()}]
        sched = AutoLR(torch.optim.SGD(groups, lr=0.1), MLRSNet(hidden_size=8), lr_scales=[1.0, 0.1])
        sched.load_state_dict(short)
        assert sched.lr_scales == [1.0, 0.1]
        # a state saved after a group was added, loaded where that group was added again first
        opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
        sched = AutoLR(opt, MLRSNet(hidden_size=8), lr_scales=[1.0])
        opt.add_param_group({"params": model[1].parameters(), "lr": 0.05})
        longer = sched.state_dict()
        opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
        sched = AutoLR(opt, MLRSNet(hidden_size=8), lr_scales=[1.0])
        opt.add_param_group({"params": model[1].parameters(), "lr": 0.05})
        sched.load_state_dict(longer)
        assert sched.lr_scales == [1.0, 0.5]


def test_an_undecided_lr_anchor_state_loads():
    """A state saved before the first finite loss (the lr anchor's scale is still NaN) is a good state."""
    state = AutoLR(torch.optim.SGD(nn.Linear(8, 3).parameters(), lr=0.1), MLRSNet(hidden_size=16)).state_dict()
    assert torch.isnan(state["scale"]["peak"])
    AutoLR(torch.optim.SGD(nn.Linear(8, 3).parameters(), lr=0.1), MLRSNet(hidden_size=16)).load_state_dict(state)


@pytest.mark.parametrize("scales", [[float("nan")], [float("inf")], [-1.0], ["a"]])
def test_lr_scales_must_be_finite_and_not_negative(scales):
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lr_scales"):
        AutoLR(opt, MLRSNet(hidden_size=8), lr_scales=scales)
    assert "initial_lr" not in opt.param_groups[0]  # a refused AutoLR leaves the optimizer as it was


@pytest.mark.parametrize("lr_as_tensor", [False, True])
def test_resume_with_the_optimizer_loaded_before_autolr_is_constructed(lr_as_tensor):
    """opt.load_state_dict, then AutoLR(opt), then sched.load_state_dict: the groups hold the last
    rate (0 before the first step with tensor rates), and load_state_dict restores the peak."""
    torch.manual_seed(0)
    model = SmallCNN()
    start = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=20, lr_as_tensor=lr_as_tensor)
    straight, resumed = [], []
    for saved_at in (0, 3):  # before the first step, and mid-run
        if saved_at:
            run(model, opt, sched, saved_at, losses_out=straight)
        saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
        run(model, opt, sched, 4, seed=1, losses_out=straight)
        model.load_state_dict(saved["model"])
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt.load_state_dict(saved["opt"])
        sched = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=20, lr_as_tensor=lr_as_tensor)
        sched.load_state_dict(saved["sched"])
        run(model, opt, sched, 4, seed=1, losses_out=resumed)
        assert torch.equal(torch.stack(straight[-4:]), torch.stack(resumed[-4:]))
        model.load_state_dict(start)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = AutoLR(opt, sched.controller, total_steps=20, lr_as_tensor=lr_as_tensor)


@pytest.mark.parametrize("case", ["not_synchronized", "total_steps", "warmup", "meta", "float_rate"])
def test_capture_is_refused_before_anything_changes(monkeypatch, case):
    """The host side of the CUDA-graph check (the capture itself is tested on a GPU in
    test_scheduler_gpu.py): what a replay could not repeat is refused, and nothing moved."""
    model = SmallCNN()
    x, y = make_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kwargs = {"total_steps": 50} if case == "total_steps" else {"warmup_steps": 3} if case == "warmup" else {}
    if case == "meta":
        kwargs["meta"] = MetaConfig(model, [(x[16:32], y[16:32])], nn.functional.cross_entropy, interval=2)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), lr_as_tensor=case != "float_rate", **kwargs)
    loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
    loss.backward()
    if case != "not_synchronized":
        sched.step(loss.detach())
        opt.step()
        sched.synchronize()
    sched._on_cuda = True  # as on a GPU, with a capture under way
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: True, raising=False)
    before = (sched.step_count, sched.rate.clone(), sched.controller.h.clone(), sched.gamma.clone())
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        sched.step(loss.detach())
    assert sched.step_count == before[0]
    if case == "warmup":  # after the warm-up's steps gamma holds the peak: a capture is fine
        sched._on_cuda = False
        for _ in range(2):
            sched.step(loss.detach())
        sched._on_cuda = True
        sched.step(loss.detach())
        assert sched.step_count == before[0] + 3
        return
    assert torch.equal(sched.rate, before[1]) and torch.equal(sched.controller.h, before[2])
    torch.testing.assert_close(sched.gamma, before[3], rtol=0, atol=0, equal_nan=True)
    sched._on_cuda = False
    sched.step(loss.detach())  # no capture: the same call steps
    assert sched.step_count == before[0] + 1


@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_param_group_added_later_gets_the_rate_at_its_ratio(as_tensor):
    """optimizer.add_param_group after AutoLR(...): the new group follows the rate at its lr's ratio
    to the first group's initial lr, like the groups present at the start."""
    first, later = nn.Linear(4, 2), nn.Linear(2, 2)
    opt = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5, lr_as_tensor=as_tensor)
    opt.add_param_group({"params": later.parameters(), "lr": 0.01})
    for _ in range(3):
        opt.zero_grad()
        later(first(torch.randn(5, 4))).pow(2).mean().backward()
        sched.step(torch.tensor(1.0))
        opt.step()
    rate = float(sched.last_rate)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(rate)
    assert float(opt.param_groups[1]["lr"]) == pytest.approx(rate * 0.1)
    assert sched.lr_scales == pytest.approx([1.0, 0.1])


@pytest.mark.parametrize("gamma", [None, 0.5])
def test_a_group_frozen_with_lr_zero_stays_frozen(gamma):
    """A first group at lr=0 (a frozen backbone): the scales are relative to the first positive
    lr, so the frozen group never moves, with the lr anchor and with a fixed gamma alike."""
    torch.manual_seed(0)
    backbone, head = nn.Linear(8, 8), nn.Linear(8, 3)
    opt = torch.optim.SGD([{"params": backbone.parameters(), "lr": 0.0},
                           {"params": head.parameters(), "lr": 0.05}], momentum=0.9)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), gamma)
    frozen = copy.deepcopy(backbone.state_dict())
    x, y = make_problem()
    train_steps(nn.Sequential(backbone, head), opt, sched, x, y, steps=3)
    assert sched.lr_scales == [0.0, 1.0]
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in frozen.items())
    assert float(sched.last_rate) > 0 and float(opt.param_groups[1]["lr"]) == pytest.approx(float(sched.last_rate))
    if gamma is None:
        assert float(sched.last_rate) == pytest.approx(0.05, rel=0.2)  # anchored on the head's lr
    with pytest.raises(ValueError, match="no group has a positive lr"):
        AutoLR(torch.optim.SGD([{"params": backbone.parameters(), "lr": 0.0}], lr=0.0), MLRSNet())


@pytest.mark.parametrize("rebuild", ["group_before_autolr", "group_after_autolr"])
def test_a_checkpoint_taken_right_after_add_param_group_resumes_exactly(rebuild):
    """state_dict() right after optimizer.add_param_group (before the next step has adopted the
    group) saves the scale that step gives it: the checkpoint loads whichever order the resumed
    run adds the group in, and continues with the same rates."""
    torch.manual_seed(0)
    first, later = nn.Linear(8, 8), nn.Linear(8, 3)
    x, y = make_problem()
    model = nn.Sequential(first, later)

    def make(with_group: bool):
        m = copy.deepcopy(model)
        o = torch.optim.SGD(m[0].parameters(), lr=0.1, momentum=0.9)
        s = None
        if rebuild == "group_after_autolr":
            s = AutoLR(o, MLRSNet(hidden_size=8), gamma=0.5)
        if with_group:
            o.add_param_group({"params": m[1].parameters(), "lr": 0.02})
        return m, o, s or AutoLR(o, MLRSNet(hidden_size=8), gamma=0.5)

    m, o, s = make(with_group=False)
    train_steps(m, o, s, x, y, steps=2)
    o.add_param_group({"params": m[1].parameters(), "lr": 0.02})
    blob = copy.deepcopy({"m": m.state_dict(), "o": o.state_dict(), "s": s.state_dict()})
    assert blob["s"]["lr_scales"] == pytest.approx([1.0, 0.2])
    straight = []
    run(m, o, s, 3, losses_out=straight)
    m2, o2, s2 = make(with_group=True)
    m2.load_state_dict(blob["m"])
    o2.load_state_dict(blob["o"])
    s2.load_state_dict(blob["s"])
    resumed = []
    run(m2, o2, s2, 3, losses_out=resumed)
    assert torch.equal(torch.stack(straight), torch.stack(resumed))
    assert [float(g["lr"]) for g in o2.param_groups] == [float(g["lr"]) for g in o.param_groups]


def test_a_checkpoint_with_fewer_groups_adopts_the_added_ones():
    """Loading a checkpoint saved before a group existed into an optimizer that has it: the extra
    group is adopted at its lr's ratio, as a group added after AutoLR(...) is; the reverse (a
    checkpoint with more groups than the optimizer) is refused before anything changes."""
    torch.manual_seed(0)
    first, later = nn.Linear(8, 8), nn.Linear(8, 3)
    opt = torch.optim.SGD(first.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5)
    saved = sched.state_dict()
    opt.add_param_group({"params": later.parameters(), "lr": 0.05})
    sched2 = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5)
    sched2.load_state_dict(saved)
    assert sched2.lr_scales == pytest.approx([1.0, 0.5])
    fewer = AutoLR(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), MLRSNet(hidden_size=8), gamma=0.5)
    before = fewer.state_dict()
    with pytest.raises(ValueError, match="lr scales for 2 param groups, this optimizer has 1"):
        fewer.load_state_dict(sched2.state_dict())
    assert fewer.state_dict()["lr_scales"] == before["lr_scales"] and fewer.step_count == 0


def test_a_step_marked_skip_keeps_the_rate_and_the_state():
    """skip=True (a step the GradScaler will not take): the controller reads nothing, as for a
    NaN loss; skip=False changes nothing against a plain step."""
    model, opt, sched, loss = linear_with_autolr()
    loss.backward()
    sched.step(loss, skip=torch.tensor(False))
    opt.step()
    twin = copy.deepcopy(sched.state_dict())
    state, rate = copy.deepcopy(sched.controller.state_dict()), sched.last_rate.clone()
    with pytest.warns(RuntimeWarning, match="or a step the GradScaler skipped"):
        sched.step(loss.detach(), skip=torch.tensor(True))
    assert torch.equal(sched.last_rate, rate) and sched.skipped_steps == 1
    assert all(torch.equal(v, sched.controller.state_dict()[k]) for k, v in state.items())
    assert sched.step_count == twin["step_count"] + 1
    with pytest.raises(TypeError, match="1-element bool tensor"):
        sched.step(loss.detach(), skip=True)
    import warnings

    with warnings.catch_warnings():  # no optimizer.step() after a skipped step: not a double step
        warnings.simplefilter("error")
        sched.step(loss.detach(), skip=torch.tensor(False))


def _steady_state_run(monkeypatch, full_steps_only: bool) -> tuple[list, dict]:
    """A run with tensor rates through every event that must leave the steady-state step: NaN and
    negative losses, a param group added, an lr replaced by a float, a resume, a double step.
    Returns the trace (rate, lrs, counters, controller state after each step) and how many steps
    each path took."""
    torch.manual_seed(0)
    model, extra = nn.Linear(8, 3), nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5, lr_as_tensor=True)
    taken = {"fast": 0, "full": 0}
    full, fast = sched._step, sched._fast_step

    def count_full(*args):
        taken["full"] += 1
        return full(*args)

    def count_fast(*args):
        taken["fast"] += 1
        return fast(*args)

    monkeypatch.setattr(sched, "_step", count_full)
    monkeypatch.setattr(sched, "_fast_step", count_fast)
    if full_steps_only:
        monkeypatch.setattr(sched, "_steady_step_fn", lambda: None)
    x, y = make_problem()
    trace = []
    losses = [2.0, 1.5, float("nan"), 1.2, -0.5, 1.1, 1.0, float("inf"), 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for i, value in enumerate(losses):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if i == 4:
                opt.add_param_group({"params": extra.parameters(), "lr": 0.05})
            if i == 7:
                opt.param_groups[0]["lr"] = 0.3  # a float: the next step reinstalls a tensor
            if i == 9:
                sched.load_state_dict(copy.deepcopy(sched.state_dict()))
            sched.step(torch.tensor(value, requires_grad=True) * 1.0)
            if i == 11:
                sched.step(torch.tensor(value))  # a double step: warned by the full step
            opt.step()
            trace.append((sched.last_rate.clone(), [float(g["lr"]) for g in opt.param_groups],
                          sched.counters.exact(), {k: v.clone() for k, v in sched.controller.state_dict().items()},
                          sorted(sched._warned), sched.step_count))
    return trace, taken


def test_the_steady_state_step_does_what_the_full_step_does(monkeypatch):
    """Once nothing is left to decide on the host, AutoLR.step takes a short path (the steady
    state of a GPU loop); every event that needs a decision goes back to the full step, and the
    rates, lrs, counters, controller state and warnings are the same as with full steps only."""
    fast_trace, fast_taken = _steady_state_run(monkeypatch, full_steps_only=False)
    monkeypatch.undo()
    full_trace, full_taken = _steady_state_run(monkeypatch, full_steps_only=True)
    assert full_taken["fast"] == 0
    assert fast_taken["fast"] >= 8, f"the steady state must take the short path: {fast_taken}"
    # the first step, the added group, the replaced lr, the resume and the double step
    assert fast_taken["full"] >= 5
    for i, (got, want) in enumerate(zip(fast_trace, full_trace)):
        assert torch.equal(got[0], want[0]), f"step {i}: rate"
        assert got[1] == want[1] and got[2] == want[2] and got[5] == want[5], f"step {i}"
        assert all(torch.equal(got[3][k], want[3][k]) for k in want[3]), f"step {i}: controller state"
        assert got[4] == want[4], f"step {i}: warnings"
    assert "double_step" in fast_trace[-1][4] and "nonfinite" in fast_trace[-1][4]


def test_counters_idle_tick_leaves_due_polls_to_poll():
    """``idle_tick`` counts only the polls that would do nothing: on a GPU (no host view), not
    the every-th call (a copy is due) and never while a copy is in flight; on the CPU never."""
    from autolr_fast.host_flags import DeviceCounters

    cpu = DeviceCounters(("a",), torch.device("cpu"), every=4)
    assert not cpu.idle_tick() and cpu._calls == 0
    gpu_like = DeviceCounters(("a",), torch.device("cpu"), every=4)
    gpu_like._view = None  # what a CUDA device has
    assert [gpu_like.idle_tick() for _ in range(4)] == [True, True, True, False]
    assert gpu_like._calls == 3, "the due call is left to poll(), which counts it"
    gpu_like._calls, gpu_like._event = 0, object()  # a copy in flight
    assert not gpu_like.idle_tick() and gpu_like._calls == 0


def test_groups_that_share_one_lr_tensor_keep_their_own_ratios():
    """A tensor lr given to the constructor is one object in every group and in defaults."""
    torch.manual_seed(0)
    a, b, c, d = (nn.Linear(4, 4) for _ in range(4))
    opt = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters()}], lr=torch.tensor(0.1))
    sched = AutoLR(opt, MLRSNet(hidden_size=8), lr_scales=[1.0, 0.1], lr_as_tensor=True)
    x = torch.randn(8, 4)

    def step():
        opt.zero_grad()
        loss = sum(m(x).square().mean() for m in (a, b, c, d))
        loss.backward()
        sched.step(loss)
        opt.step()

    step()
    opt.add_param_group({"params": c.parameters()})  # takes defaults["lr"]: the given 0.1
    opt.add_param_group({**opt.param_groups[0], "params": d.parameters(), "lr": 0.05})  # group 0's settings, own lr
    step()
    step()
    lrs = [float(g["lr"]) for g in opt.param_groups]
    assert lrs == pytest.approx([float(sched.last_rate) * s for s in (1.0, 0.1, 1.0, 0.5)], rel=1e-6)
    assert len({id(g["lr"]) for g in opt.param_groups}) == 4


def test_close_takes_autolr_off_its_optimizer():
    """close() removes the step hook (optimizer.step() without sched.step is allowed again, a new
    AutoLR can drive the optimizer) and a later step of the closed one raises, changing nothing."""
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_problem()
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5, lr_as_tensor=True)
    train_steps(model, opt, sched, x, y, steps=2)
    rate = opt.param_groups[0]["lr"].clone()
    sched.close()
    sched.close()  # again: nothing
    assert not opt._optimizer_step_pre_hooks
    with pytest.raises(RuntimeError, match="closed"):
        sched.step(torch.tensor(1.0))
    assert sched.step_count == 2 and torch.equal(opt.param_groups[0]["lr"], rate)
    model(x).sum().backward()
    opt.step()  # no hook refuses it
    train_steps(model, opt, AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5), x, y, steps=2)


@pytest.mark.parametrize("built_with", [None, 10, 20])
def test_a_resume_keeps_the_envelope_it_was_built_with(built_with):
    """A run saved at the end of a 10-step envelope (rate 0 at its end) and resumed by an AutoLR
    built with total_steps=20 follows the 20-step envelope (warned), instead of training on at 0.
    Built with the saved length, or without one, it resumes the saved envelope silently."""
    model = nn.Linear(8, 3)
    x, y = make_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=10)
    train_steps(model, opt, sched, x, y, steps=10)
    saved = copy.deepcopy({"opt": opt.state_dict(), "sched": sched.state_dict()})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.load_state_dict(saved["opt"])
    kwargs = {} if built_with is None else {"total_steps": built_with}
    resumed = AutoLR(opt, MLRSNet(hidden_size=16), **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_state_dict(saved["sched"])
    told = [str(w.message) for w in caught if "AutoLR.load_state_dict" in str(w.message)]
    train_steps(model, opt, resumed, x, y, steps=3)
    assert len(told) == 1
    if built_with == 20:
        assert "saved with total_steps=10, warmup_steps=0, envelope='wsd', decay_steps=2;" in told[0]
        assert "built with total_steps=20, warmup_steps=1, envelope='wsd', decay_steps=4 and keeps" in told[0]
        assert resumed.scale.total_steps == 20 and float(opt.param_groups[0]["lr"]) > 0.01
        assert resumed.state_dict()["scale"]["total_steps"] == 20
    else:  # the saved envelope, which has ended: said so
        assert "envelope ended at step 10 (this is step 10)" in told[0] and resumed.scale.total_steps == 10
        assert float(opt.param_groups[0]["lr"]) == 0.0


def test_an_explicit_warmup_at_the_same_length_is_kept_and_the_default_resumes_the_saved_one():
    model = nn.Linear(8, 3)
    x, y = make_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=40, warmup_steps=0)
    train_steps(model, opt, sched, x, y, steps=3)
    saved = copy.deepcopy(sched.state_dict())
    for warmup, kept in ((10, 10), (None, 0)):
        resumed = AutoLR(opt, MLRSNet(hidden_size=16), total_steps=40, warmup_steps=warmup)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed.load_state_dict(saved)
        assert resumed.scale.warmup_steps == kept
        told = [w for w in caught if "saved with total_steps=40, warmup_steps=0," in str(w.message)]
        assert len(told) == (1 if warmup else 0)


def test_the_state_of_another_scheduler_is_refused_with_what_to_do():
    opt = torch.optim.SGD(nn.Linear(8, 3).parameters(), lr=0.1)
    other = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10).state_dict()
    sched = AutoLR(opt, MLRSNet(hidden_size=16))
    with pytest.raises(ValueError, match="another scheduler.*start AutoLR fresh"):
        sched.load_state_dict(other)


def test_get_last_lr_lists_a_group_added_since_the_last_step():
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5)
    a.weight.grad, a.bias.grad = torch.zeros_like(a.weight), torch.zeros_like(a.bias)
    sched.step(torch.tensor(1.0))
    opt.add_param_group({"params": b.parameters(), "lr": 0.01})
    assert len(sched.get_last_lr()) == 2 and sched.get_last_lr()[1] == pytest.approx(0.01)


def test_adam_with_explicit_foreach_gets_a_float_rate_with_the_reason():
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    with pytest.warns(RuntimeWarning, match="foreach=True and capturable=False refuses a tensor lr"):
        sched = AutoLR(opt, MLRSNet(hidden_size=8), lr_as_tensor=True)
    model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    for _ in range(2):
        sched.step(torch.tensor(1.0))
        opt.step()  # torch raised "lr as a Tensor is not supported" with a tensor rate
    assert isinstance(opt.param_groups[0]["lr"], float)


def test_a_distributed_checkpoint_can_create_the_optimizer_state_under_autolr():
    """torch.distributed.checkpoint's set_state_dict steps a fresh optimizer at lr 0 to create its
    state; that is no training step and AutoLR lets it through (any other early step is refused)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), total_steps=10)
    model_state, optim_state = get_state_dict(model, opt)
    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)
    assert sched.step_count == 0
    model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    with pytest.raises(RuntimeError, match="before AutoLR.step"):
        opt.step()


def test_distributed_takes_a_bool_or_auto_only():
    opt = torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        AutoLR(opt, MLRSNet(hidden_size=8), distributed="false")
    assert not opt._optimizer_step_pre_hooks
