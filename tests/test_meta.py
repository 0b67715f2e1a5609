"""Online meta-training: the exact hypergradient, an untouched model, snapshots."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import SmallCNN, train_steps
from torch import nn

from autolr_fast import AutoLR, MLRSNet, load_controller
from autolr_fast.meta import MetaConfig

OFFICIAL_KEYS = [
    "layer1.fc_i2h.0.weight", "layer1.fc_i2h.0.bias", "layer1.fc_i2h.2.weight", "layer1.fc_i2h.2.bias",
    "layer1.fc_h2h.0.weight", "layer1.fc_h2h.0.bias", "layer1.fc_h2h.2.weight", "layer1.fc_h2h.2.bias",
    "layer3.weight", "layer3.bias",
]


class _CaseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_theta_gradient_matches_the_published_meta_step(official_dir):
    case = torch.load(official_dir / "metagrad_case.pt", weights_only=False)
    net = _CaseNet()
    net.load_state_dict(case["weights"])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=case["weight_decay"])
    ctrl = MLRSNet.from_official(official_dir / case["controller"])
    sched = AutoLR(opt, ctrl, gamma=case["gamma"],
                   meta=MetaConfig(net, [(case["x_val"], case["y_val"])], nn.functional.cross_entropy, interval=1))
    loss = nn.functional.cross_entropy(net(case["x_train"]), case["y_train"])
    loss.backward()
    assert float(loss.detach()) == pytest.approx(case["train_loss"], rel=1e-6)
    grads, val_loss, ok = sched.meta.hypergradient(loss.detach().float())
    assert bool(ok)
    assert float(val_loss) == pytest.approx(case["val_loss_after_lookahead"], rel=1e-5)
    for key, g in zip(OFFICIAL_KEYS, grads):
        ref = case["theta_grad"][key]
        scale = ref.abs().max().clamp_min(1e-12)
        rel = ((g - ref).abs().max() / scale).item()
        assert rel <= 1e-4 or (ref.abs().max() == 0 and g.abs().max() <= 1e-12), f"{key}: relative error {rel:.3g}"


def _setup(kind, seed=0):
    torch.manual_seed(seed)
    model = SmallCNN().double()
    opts = {
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3),
        "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    }
    opt = opts[kind](model.parameters())
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 3, (32,))
    xv, yv = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    # two plain steps first, so momentum buffers / Adam moments are non-trivial
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return model, opt, loss.detach(), (xv, yv)


@pytest.mark.parametrize("kind", ["sgd_momentum", "sgd_nesterov", "adam", "adamw"])
def test_hypergradient_matches_finite_differences_in_alpha(kind):
    """dL_val/dalpha from the fused path vs a float64 central difference of L_val(w - alpha*d)."""
    model, opt, loss, (xv, yv) = _setup(kind)
    ctrl = MLRSNet(hidden_size=16).double()
    sched = AutoLR(opt, ctrl, gamma=0.5, meta=MetaConfig(model, [(xv, yv)], nn.functional.cross_entropy, interval=1))
    sched.meta.hypergradient(loss)
    dot = sched.meta.last_hypergrad.double()  # <grad L_val(w_hat), d>

    # the direction d the optimizer takes, read off a real optimizer step on a copy, in float64
    from autolr_fast.ops import reference
    p = reference.mlrsnet_forward(loss, ctrl.h, ctrl.c, [w.detach() for w in ctrl.flat_weights()])[0]
    alpha = float(0.5 * p)
    m2, o2 = copy.deepcopy((model, opt))  # one deepcopy keeps the parameter <-> state mapping
    for a, b in zip(m2.parameters(), model.parameters()):
        a.grad = b.grad.clone()  # deepcopy does not copy .grad
    w0 = [q.detach().clone() for q in m2.parameters()]
    for g in o2.param_groups:
        g["lr"] = 1.0
    o2.step()
    d = [w - q.detach() for w, q in zip(w0, m2.parameters())]

    def val_loss(a):
        params = {n: w - a * dd for (n, _), w, dd in zip(model.named_parameters(), w0, d)}
        params.update({n: b.clone() for n, b in model.named_buffers()})
        return float(nn.functional.cross_entropy(torch.func.functional_call(model, params, (xv,)), yv))

    eps = 1e-6
    fd = (val_loss(alpha + eps) - val_loss(alpha - eps)) / (2 * eps)
    assert -float(dot) == pytest.approx(fd, rel=1e-5, abs=1e-9), f"{kind}: analytic {-float(dot)} vs FD {fd}"


@pytest.mark.parametrize("kind", ["sgd_momentum", "adamw"])
def test_meta_step_leaves_the_model_untouched(kind):
    model, opt, loss, (xv, yv) = _setup(kind)
    model.train()
    sched = AutoLR(opt, MLRSNet(hidden_size=16).double(), gamma=0.5,
                   meta=MetaConfig(model, [(xv, yv)], nn.functional.cross_entropy, interval=1))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    state = copy.deepcopy(opt.state_dict())
    theta = copy.deepcopy(sched.controller.state_dict())
    sched.meta.step(loss.float())
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters())
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    after = opt.state_dict()
    for k, st in state["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][k][name])), name
    assert any(not torch.equal(theta[k], v) for k, v in sched.controller.state_dict().items()), "theta must move"


def test_meta_interval_and_snapshots(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    val = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]  # 3 batches, cycled
    cfg = MetaConfig(model, val, nn.functional.cross_entropy, interval=3, snapshot_dir=str(tmp_path), snapshot_every=5)
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma="auto", num_classes=3, meta=cfg)
    train_steps(model, opt, sched, x, y, steps=10)
    assert sched.meta.meta_steps == 3  # steps 3, 6, 9
    snaps = sorted(p.name for p in tmp_path.iterdir())
    assert snaps == ["controller_0001.pt", "controller_0002.pt"]
    loaded = load_controller(tmp_path / "controller_0002.pt")
    assert loaded.default_gamma == pytest.approx(float(sched.gamma))
    own = {k: v for k, v in sched.controller.state_dict().items() if k not in ("h", "c")}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in own.items())
    # plug-and-play: a frozen controller on a new task, gamma from the file
    model2 = nn.Linear(8, 3)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    sched2 = AutoLR(opt2, loaded)
    opt2.zero_grad()
    loss = nn.functional.cross_entropy(model2(x), y)
    loss.backward()
    sched2.step(loss)
    opt2.step()
    assert 0 < float(sched2.last_rate) <= loaded.default_gamma


def test_meta_state_round_trips_through_state_dict():
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))

    def make():
        m = copy.deepcopy(model)
        o = torch.optim.SGD(m.parameters(), lr=0.1)
        s = AutoLR(o, MLRSNet(hidden_size=8), gamma=0.5,
                   meta=MetaConfig(m, [(x[:8], y[:8])], nn.functional.cross_entropy, interval=2))
        return m, o, s

    def steps(m, o, s, n):
        out = []
        for _ in range(n):
            o.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            s.step(loss)
            o.step()
            out.append(s.last_rate.clone())
        return out

    m, o, s = make()
    steps(m, o, s, 5)
    blob = copy.deepcopy({"m": m.state_dict(), "o": o.state_dict(), "s": s.state_dict()})
    straight = steps(m, o, s, 6)
    m2, o2, s2 = make()
    m2.load_state_dict(blob["m"])
    o2.load_state_dict(blob["o"])
    s2.load_state_dict(blob["s"])
    assert torch.equal(torch.stack(straight), torch.stack(steps(m2, o2, s2, 6)))


@pytest.mark.parametrize("device_side", [False, True])
def test_nonfinite_validation_loss_leaves_theta(device_side):
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xv = torch.full((4, 8), float("nan"))
    sched = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5,
                   meta=MetaConfig(model, [(xv, torch.zeros(4, dtype=torch.long))], nn.functional.cross_entropy,
                                   interval=1))
    sched.meta.device_side_guard = device_side
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    # one good meta-step first (finite validation batch), so the meta-optimizer has state
    good = sched.meta.config.val_data
    sched.meta.config.val_data = [(x, y)]
    sched.meta._val_iter = None
    sched.meta.step(loss.detach())
    sched.meta.config.val_data = good
    sched.meta._val_iter = None
    theta = copy.deepcopy(sched.controller.state_dict())
    adam = copy.deepcopy(sched.meta.optimizer.state_dict())
    sched.meta.step(loss.detach())
    assert all(torch.equal(theta[k], v) for k, v in sched.controller.state_dict().items())
    after = sched.meta.optimizer.state_dict()
    for i, st in adam["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][i][k]), (i, k)


@pytest.mark.parametrize("meta_optimizer", ["adam", "rprop"])
def test_a_skipped_first_meta_step_leaves_no_trace_on_the_device_side_path(meta_optimizer):
    """The first meta-step creates the meta-optimizer's state; when the device-side guard skips
    it, the next good step must be the meta-optimizer's first, as on the host-side path (Adam,
    the default: its created state is zeroed; Rprop: its zero-gradient step changes nothing)."""
    factory = None if meta_optimizer == "adam" else (lambda params: torch.optim.Rprop(params, lr=1e-3))
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    bad = [(torch.full((4, 8), float("nan")), torch.zeros(4, dtype=torch.long))]
    controller = MLRSNet(hidden_size=8)
    results = []
    for device_side in (False, True):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = AutoLR(opt, copy.deepcopy(controller), gamma=0.5,
                       meta=MetaConfig(model, bad, nn.functional.cross_entropy, interval=1, optimizer=factory))
        sched.meta.device_side_guard = device_side
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sched.meta.step(loss.detach())  # skipped: the validation loss is NaN
        sched.meta.config.val_data = [(x, y)]
        sched.meta._val_iter = None
        sched.meta.step(loss.detach())
        state = sched.meta.optimizer.state_dict()["state"]
        results.append((sched.controller.state_dict(), state))
        sched.close()  # the next AutoLR on the same optimizer
    (theta_host, adam_host), (theta_dev, adam_dev) = results
    assert all(float(st["step"]) == 1.0 for st in adam_host.values())
    for k, v in theta_host.items():
        assert torch.allclose(theta_dev[k], v, rtol=1e-6, atol=1e-7), k
    if meta_optimizer != "adam":
        return  # Rprop counts the skipped step in its own "step" entry, which no update reads
    for i, st in adam_host.items():
        for k, v in st.items():
            assert torch.allclose(adam_dev[i][k], v, rtol=1e-6, atol=1e-10), (i, k)


def test_meta_rejects_unsupported_setups():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="SGD, Adam and AdamW"):
        AutoLR(torch.optim.RMSprop(model.parameters(), lr=0.1), MLRSNet(), gamma=0.1,
               meta=MetaConfig(model, [], nn.functional.mse_loss))
    with pytest.raises(ValueError, match="not parameters of MetaConfig.model"):
        AutoLR(torch.optim.SGD(model.parameters(), lr=0.1), MLRSNet(), gamma=0.1,
               meta=MetaConfig(nn.Linear(2, 2), [], nn.functional.mse_loss))


@pytest.mark.parametrize("kind", ["sgd_momentum", "adamw"])
def test_streamed_and_batched_hypergradients_agree(kind):
    model, opt, loss, (xv, yv) = _setup(kind)
    results = []
    for low_memory, fold in ((True, 1), (True, 4 << 20), (False, 0)):
        sched = AutoLR(opt, MLRSNet(hidden_size=16).double(), gamma=0.5,
                       meta=MetaConfig(model, [(xv, yv)], nn.functional.cross_entropy, interval=1,
                                       low_memory=low_memory, fold_bytes=fold))
        torch.manual_seed(0)
        sched.controller.load_state_dict(MLRSNet(hidden_size=16).double().state_dict())
        grads, val_loss, ok = sched.meta.hypergradient(loss)
        results.append((sched.meta.last_hypergrad, grads))
        sched.close()  # the next AutoLR on the same optimizer
    dot_b, g_b = results[-1]
    for dot_a, g_a in results[:-1]:
        assert torch.allclose(dot_a.double(), dot_b.double(), rtol=1e-6)
        for a, b in zip(g_a, g_b):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-12)


def test_streamed_hypergradient_frees_each_gradient():
    """Low-memory mode: no validation gradient is left on w_hat, the model's own grads untouched."""
    model, opt, loss, (xv, yv) = _setup("sgd_momentum")
    seen = []
    sched = AutoLR(opt, MLRSNet(hidden_size=16).double(), gamma=0.5,
                   meta=MetaConfig(model, [(xv, yv)], nn.functional.cross_entropy, interval=1, fold_bytes=1))
    original = sched.meta._group_hyper_dot

    def spy(val_grads, args):
        seen.append(len(val_grads))
        return original(val_grads, args)

    sched.meta._group_hyper_dot = spy
    sched.meta.hypergradient(loss)
    n_params = len([p for p in model.parameters()])
    assert seen == [1] * n_params, "with a 1-byte budget: one gradient folded at a time, each exactly once"
    assert all(p.grad is not None for p in model.parameters())
    # the default budget (4 MiB) holds this whole model: the batched path, one fold, no hooks
    seen.clear()
    sched.meta.config.fold_bytes = 4 << 20
    hooks = []
    register = torch.Tensor.register_post_accumulate_grad_hook
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "register_post_accumulate_grad_hook",
                   lambda self, hook: hooks.append(hook) or register(self, hook))
        sched.meta.hypergradient(loss)
    assert seen == [n_params] and hooks == []


# ------------------------------------------------------------------------------------------------
# Per-parameter Adam steps, mixed dtypes, scalar reads, the Triton plan cache, exact resume
# ------------------------------------------------------------------------------------------------
@pytest.fixture(params=["fast", "reference"])
def backend(request, monkeypatch):
    """The fastest available backend (the C++ ops when built), or the plain PyTorch references."""
    from autolr_fast.ops import dispatch

    monkeypatch.setenv(dispatch.FORCE_REFERENCE_ENV, "1" if request.param == "reference" else "0")
    return request.param


def _real_step_direction(model, opt) -> list[torch.Tensor]:
    """``d = (w_before - w_after) / lr`` of one real step of ``opt`` on a copy (lr 1)."""
    m2, o2 = copy.deepcopy((model, opt))  # one deepcopy keeps the parameter <-> state mapping
    for a, b in zip(m2.parameters(), model.parameters()):
        a.grad = None if b.grad is None else b.grad.clone()  # deepcopy does not copy .grad
    w0 = [q.detach().clone() for q in m2.parameters()]
    for g in o2.param_groups:
        g["lr"] = 1.0
    o2.step()
    return [w - q.detach() for w, q in zip(w0, m2.parameters())]


@pytest.mark.parametrize("kind", ["adam", "adamw", "adamw_amsgrad"])
def test_adam_hypergradient_uses_each_parameters_step(kind, backend):
    """torch keeps a step count per parameter: one without a gradient on some steps (a frozen
    layer, an unused embedding) has a smaller count, so another bias correction. The fused
    ``<grad L_val(w_hat), d>`` must equal the one with ``d`` read off a real optimizer step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    make = {"adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
            "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
            "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2, amsgrad=True)}
    opt = make[kind](model.parameters())
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 3, (32,))
    xv, yv = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    skipped = [model[0].weight, model[2].bias]  # no gradient on steps 1 and 2 (the first parameter among them)
    for i in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if i in (1, 2):
            for q in skipped:
                q.grad = None
        opt.step()
    steps = [float(opt.state[q]["step"]) for q in model.parameters()]
    assert steps == [3.0, 5.0, 5.0, 3.0], steps
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    ctrl = MLRSNet(hidden_size=16).double()
    sched = AutoLR(opt, ctrl, gamma=0.5, meta=MetaConfig(model, [(xv, yv)], nn.functional.cross_entropy, interval=1))
    sched.meta.hypergradient(loss.detach())
    got = float(sched.meta.last_hypergrad)

    from autolr_fast.ops import reference

    p = reference.mlrsnet_forward(loss.detach(), ctrl.h, ctrl.c, [w.detach() for w in ctrl.flat_weights()])[0]
    alpha = float((0.5 * p).float())  # the rate is a float32 tensor
    d = _real_step_direction(model, opt)
    names = [n for n, _ in model.named_parameters()]
    w_hat = {n: (q.detach() - alpha * dd).requires_grad_(True) for n, q, dd in zip(names, model.parameters(), d)}
    val = nn.functional.cross_entropy(torch.func.functional_call(model, w_hat, (xv,)), yv)
    grads = torch.autograd.grad(val, list(w_hat.values()))
    want = float(sum((g * dd).sum() for g, dd in zip(grads, d)))
    assert got == pytest.approx(want, rel=1e-5), f"{kind} ({backend}): fused {got} vs real step {want}"


class _MixedDtypeNet(nn.Module):
    """A float32 layer and a bfloat16 layer in one module (one param group)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3).to(torch.bfloat16)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)).to(torch.bfloat16)).float()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("low_memory", [True, False])
def test_mixed_dtype_group_calls_the_ops_once_per_dtype(kind, low_memory, monkeypatch):
    """A param group mixing float32 and bfloat16 parameters: the list ops (whose CUDA kernels
    take one dtype per call) are called once per (device, dtype), and the hypergradient equals
    the one with one param group per dtype."""
    from autolr_fast.ops import dispatch

    torch.manual_seed(0)
    model = _MixedDtypeNet()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    xv, yv = torch.randn(16, 8), torch.randint(0, 3, (16,))

    def make_opt(params):
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2)

    def hypergradient(param_groups):
        m = copy.deepcopy(model)
        groups = [[p for n, p in m.named_parameters() if n in names] for names in param_groups]
        opt = make_opt([{"params": g} for g in groups])
        for _ in range(2):  # non-trivial optimizer state
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        torch.manual_seed(1)
        sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5,
                       meta=MetaConfig(m, [(xv, yv)], nn.functional.cross_entropy, interval=1,
                                       low_memory=low_memory))
        theta_grads, _, ok = sched.meta.hypergradient(loss.detach())
        assert bool(ok)
        return sched.meta.last_hypergrad, theta_grads

    calls = []

    def counted(name):
        op = getattr(dispatch, name)

        def call(*args):
            params = args[1] if name.startswith("hyper_dot") else args[0]
            calls.append((name, {(q.device, q.dtype) for q in params}))
            return op(*args)
        return call

    ops = ("lookahead_sgd", "hyper_dot_sgd") if kind == "sgd" else ("lookahead_adam", "hyper_dot_adam")
    for name in ops:
        monkeypatch.setattr(dispatch, name, counted(name))
    all_names = [n for n, _ in model.named_parameters()]
    mixed_dot, mixed_grads = hypergradient([all_names])
    assert all(len(keys) == 1 for _, keys in calls), f"an op got several dtypes in one call: {calls}"
    for name in ops:
        assert sorted(str(next(iter(k))[1]) for n, k in calls if n == name) == ["torch.bfloat16", "torch.float32"]
    calls.clear()
    per_dtype_dot, per_dtype_grads = hypergradient([[n for n in all_names if n.startswith("fc1")],
                                                    [n for n in all_names if n.startswith("fc2")]])
    torch.testing.assert_close(mixed_dot, per_dtype_dot, rtol=1e-6, atol=0)
    for a, b in zip(mixed_grads, per_dtype_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_meta_step_reads_no_scalar_with_tensor_betas():
    """Adam's betas may be tensors (on a GPU, a read would be a host sync): the meta-step reads
    them when AutoLR is built, not on every meta-step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ScalarReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
                self.reads.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(torch.tensor(0.9), torch.tensor(0.999)))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5,
                   meta=MetaConfig(model, [(x[:8], y[:8])], nn.functional.cross_entropy, interval=1))
    train_steps(model, opt, sched, x, y, steps=2)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    with ScalarReads() as probe:
        sched.meta.hypergradient(loss.detach())
    assert probe.reads == [], f"scalar reads in a meta-step: {probe.reads}"


def test_meta_steps_keep_the_schedulers_triton_plan(monkeypatch):
    """The meta-step runs the controller step on scratch copies of the state; they are reused,
    so the Triton step's plan cache holds one plan for them and the scheduler's own plan (the
    cache keeps 16) is never evicted. Checked with a stand-in backend that asks the plan cache
    (``_plan_for``, no launch) and computes with the reference."""
    pytest.importorskip("triton")
    from autolr_fast.ops import dispatch, reference
    from autolr_fast.ops import triton_kernels as k

    def planned_step(loss, h, c, weights, gamma, rate, lr_list, scales, counters=None, ok=None):
        ok = torch.empty((), dtype=torch.bool) if ok is None else ok
        lrs = list(lr_list)  # a float-lr optimizer on the CPU hands over no lr tensors
        plan, reason = k._plan_for(loss, h, c, list(weights), gamma, rate, lrs, list(scales)[:len(lrs)], ok, counters)
        assert reason is None, reason
        return reference.mlrsnet_scheduler_step_(loss, h, c, weights, gamma, rate, lr_list, scales, counters)

    dispatch._ensure_loaded()
    monkeypatch.delenv(dispatch.FORCE_REFERENCE_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_BACKENDS", {"plan-probe": {"available": True, "detail": "test", "devices": {"cpu"},
                                                               "ops": {"mlrsnet_step_": planned_step}}})
    monkeypatch.setattr(dispatch, "_SELECTED", {})
    monkeypatch.setattr(k, "_PLANS", {})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    sched = AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.5,
                   meta=MetaConfig(model, [(x[:8], y[:8])], nn.functional.cross_entropy, interval=1))
    train_steps(model, opt, sched, x, y, steps=1)
    own = k._PLANS[id(sched.controller.h)]
    train_steps(model, opt, sched, x, y, steps=20)
    assert sched.meta.meta_steps == 21
    assert k._PLANS.get(id(sched.controller.h)) is own, "the scheduler's plan was evicted or rebuilt"
    assert len(k._PLANS) == 2, f"{len(k._PLANS)} plans: the meta-step's scratch state must be reused"


def _meta_resume(tmp_path, template, val, interval, first, more):
    """Rates of ``first + more`` uninterrupted steps, and of ``first`` steps, a checkpoint through
    torch.save/torch.load (model, optimizer, AutoLR and the RNG) into fresh objects, ``more``
    steps; also the AutoLR of the first part, for checks on its state."""
    controller = MLRSNet(hidden_size=16)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))

    def make():
        model = copy.deepcopy(template)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = AutoLR(opt, copy.deepcopy(controller), gamma=0.5,
                       meta=MetaConfig(model, val(x, y), nn.functional.cross_entropy, interval=interval))
        return model, opt, sched

    def run(model, opt, sched, steps, start=0):
        rates = []
        for i in range(start, start + steps):
            batch = slice(8 * (i % 8), 8 * (i % 8) + 8)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            sched.step(loss)
            opt.step()
            rates.append(sched.last_rate.clone())
        return rates

    torch.manual_seed(1)
    straight = run(*make(), first + more)
    torch.manual_seed(1)
    model, opt, sched = make()
    rates = run(model, opt, sched, first)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "rng": torch.get_rng_state()}, path)
    blob = torch.load(path, weights_only=True)
    model2, opt2, sched2 = make()
    model2.load_state_dict(blob["model"])
    opt2.load_state_dict(blob["opt"])
    sched2.load_state_dict(blob["sched"])
    torch.set_rng_state(blob["rng"])
    resumed = rates + run(model2, opt2, sched2, more, start=first)
    return torch.stack(straight), torch.stack(resumed), (model, opt, sched, run)


def test_resume_with_several_validation_batches_is_bit_identical(tmp_path):
    """10 steps, a checkpoint, 10 more: the same rates, bit for bit, as 20 uninterrupted steps,
    with the validation batches cycling (3 batches, a meta-step every 2 steps)."""
    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    straight, resumed, _ = _meta_resume(tmp_path, template, lambda x, y: [(x[i:i + 8] + 0.5, y[i:i + 8])
                                                                          for i in range(0, 24, 8)], 2, 10, 10)
    assert torch.equal(straight, resumed), (straight - resumed).nonzero().flatten().tolist()


def test_a_one_shot_val_data_iterator_is_named_when_it_runs_out():
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = ((x[i : i + 8], y[i : i + 8]) for i in (0, 8))  # a generator: one pass only
    sched = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5,
                   meta=MetaConfig(model, batches, nn.functional.cross_entropy, interval=1))
    train_steps(model, opt, sched, x, y, 2)
    with pytest.raises(ValueError, match="ran out after 2 batch.*one-shot iterator"):
        train_steps(model, opt, sched, x, y, 1)


def test_validation_batches_unpack_as_the_range_finders_do():
    """A dict with the range finders' key names works; a batch with a third item (sample weights)
    is refused, naming MetaConfig(unpack=...), rather than cut to its first two: when AutoLR is
    built for a list of batches, at the first meta-step for an iterable read only then."""
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5,
                   meta=MetaConfig(model, [{"x": x, "y": y}], nn.functional.cross_entropy, interval=1))
    train_steps(model, opt, sched, x, y, 2)
    assert sched.meta.meta_steps == 2
    sched.close()
    error = r"of length 3.*MetaConfig\(unpack=fn\)"
    with pytest.raises(ValueError, match=error):
        AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5,
               meta=MetaConfig(model, [(x, y, torch.ones(16))], nn.functional.cross_entropy, interval=1))
    sched = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5,
                   meta=MetaConfig(model, iter([(x, y, torch.ones(16))]), nn.functional.cross_entropy, interval=1))
    with pytest.raises(ValueError, match=error):
        train_steps(model, opt, sched, x, y, 1)


def test_an_added_param_group_outside_the_model_is_refused_before_a_validation_batch_is_used():
    torch.manual_seed(0)
    model = nn.Linear(8, 3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5,
                   meta=MetaConfig(model, [(x, y)], nn.functional.cross_entropy, interval=1))
    stranger = nn.Linear(3, 3)
    opt.add_param_group({"params": stranger.parameters(), "lr": 0.1})
    loss = nn.functional.cross_entropy(stranger(model(x)), y)
    loss.backward()
    with pytest.raises(ValueError, match="2 an added param group's parameter.*not parameters of MetaConfig.model"):
        sched.step(loss)
    assert sched.step_count == 0 and sched.meta._val_used == 0 and len(sched.lr_scales) == 1


def test_a_meta_step_leaves_the_training_rng_stream_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), meta=MetaConfig(model, val, nn.functional.cross_entropy))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    before = torch.get_rng_state()
    masks = []
    model[2].register_forward_hook(lambda m, i, o: masks.append(o == 0))
    for _ in range(3):  # one batch per pass: a new pass over the shuffling loader every time
        sched.meta.step(loss.detach())
    assert sched.meta.meta_steps == 3 and torch.equal(torch.get_rng_state(), before)
    model(x)  # the next training forward's masks are not the last validation forward's
    assert masks[-1].shape == masks[-2].shape and not torch.equal(masks[-1], masks[-2])


def test_sparse_embeddings_are_refused_with_the_reason():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randint(0, 10, (4, 2)), torch.randint(0, 2, (4,))
    with pytest.raises(NotImplementedError, match="sparse=True"):
        AutoLR(opt, MLRSNet(hidden_size=8), meta=MetaConfig(model, [(x, y)], nn.functional.cross_entropy))
    assert "initial_lr" not in opt.param_groups[0]  # the refused AutoLR left the optimizer alone


def test_resume_from_a_plain_dataloader_with_dropout_is_bit_identical(tmp_path):
    """A DataLoader draws its workers' seed when a pass starts, and a resumed run starts one where
    the original was mid-pass: the validation forward's dropout masks must not depend on it. A
    state_dict kept in memory must not follow the live meta-optimizer either."""
    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))

    def val(x, y):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:48] + 0.5, y[:48]), batch_size=16)

    straight, resumed, (model, opt, sched, run) = _meta_resume(tmp_path, template, val, 1, 2, 3)
    assert torch.equal(straight, resumed), (straight - resumed).nonzero().flatten().tolist()
    kept = sched.state_dict()
    step_before = kept["meta"]["optimizer"]["state"][0]["step"].clone()
    run(model, opt, sched, 1, start=2)
    assert torch.equal(kept["meta"]["optimizer"]["state"][0]["step"], step_before)


def test_a_state_of_another_meta_optimizer_is_refused_before_anything_changes():
    model = nn.Linear(8, 3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))

    def make(meta_opt=None):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = MetaConfig(model, [(x, y)], nn.functional.cross_entropy, interval=1,
                         **({"optimizer": meta_opt} if meta_opt else {}))
        return opt, AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5, meta=cfg)

    opt, sgd_meta = make(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))
    train_steps(model, opt, sgd_meta, x, y, 2)
    state = sgd_meta.state_dict()
    sgd_meta.close()
    _, adam_meta = make()
    with pytest.raises(ValueError, match="meta-optimizer is a SGD, this AutoLR's is a Adam"):
        adam_meta.load_state_dict(state)
    assert adam_meta.step_count == 0


@pytest.mark.parametrize("change, words", [
    ({"interval": 2.5}, "interval=2.5"), ({"interval": True}, "interval=True"), ({"interval": 0}, "interval=0"),
    ({"snapshot_every": -1, "snapshot_dir": "x"}, "snapshot_every=-1"),
    ({"fold_bytes": -1}, "fold_bytes=-1"), ({"val_data": None}, "val_data=NoneType"),
    ({"loss_fn": None}, "loss_fn=None"),
])
def test_a_bad_meta_config_is_refused_when_autolr_is_built(change, words):
    model = nn.Linear(8, 3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"model": model, "val_data": [(x, y)], "loss_fn": nn.functional.cross_entropy, **change}
    with pytest.raises(ValueError, match=re.escape(words)):
        AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5, meta=MetaConfig(**cfg))
    assert not opt._optimizer_step_pre_hooks
    val = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(ValueError, match="not a Dataset"):
        AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5, meta=MetaConfig(model, val, nn.functional.cross_entropy))



def test_meta_configs_that_were_accepted_stay_accepted():
    """Whole floats, snapshot_every without a folder (the rank-0-only folder of DDP), 0 for no
    snapshots, and a batches object with __getitem__ but no __iter__."""
    model = nn.Linear(8, 3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))

    class Batches:
        def __getitem__(self, i):
            if i >= 2:
                raise IndexError
            return x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]

    for change in ({"interval": 2.0, "fold_bytes": 4e6}, {"snapshot_every": 5}, {"snapshot_every": 0},
                   {"val_data": Batches()}):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = {"model": model, "val_data": [(x, y)], "loss_fn": nn.functional.cross_entropy, "interval": 1, **change}
        sched = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.5, meta=MetaConfig(**cfg))
        train_steps(model, opt, sched, x, y, 2)
        sched.close()
