"""AutoLR.step on a CUDA GPU: no host sync (``set_sync_debug_mode("error")``), one kernel per
steady-state step (counted by the profiler), and a whole training step captured in a CUDA graph."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SmallCNN, make_problem
from device_kernels import kernel_names
from gpu_steps import capture_training_step, warm_up_for_capture
from torch import nn

from autolr_fast import AutoLR, MetaConfig, MLRSNet
from autolr_fast.ops import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

OPTIMIZERS = {
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
}


def _configs(model, x, y):
    """``name -> (controller, AutoLR keyword arguments)``; ``model`` for the meta-step."""
    val = [(x[32:48], y[32:48])]
    return {
        "default": (None, {}),
        "default_total_steps": (None, {"total_steps": 50}),
        "default_warmup": (None, {"warmup_steps": 3}),
        "fixed_gamma": (MLRSNet(hidden_size=16), {"gamma": 0.05}),
        "published_auto": (MLRSNet(), {"gamma": "auto", "num_classes": 3}),
        "action": ("action-mlp", {}),
        "meta": (MLRSNet(), {"meta": MetaConfig(model, val, nn.functional.cross_entropy, interval=2)}),
    }


def _step_without_sync(sched: AutoLR, loss: torch.Tensor) -> None:
    """``sched.step(loss)`` with any synchronising CUDA call an error."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        sched.step(loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _problem(opt_kind):
    torch.manual_seed(0)
    model = SmallCNN().cuda()
    x, y = (t.cuda() for t in make_problem())
    return model, OPTIMIZERS[opt_kind](model.parameters()), x, y


@pytest.mark.filterwarnings("ignore:AutoLR")
@pytest.mark.parametrize("opt_kind", sorted(OPTIMIZERS))
@pytest.mark.parametrize("config", ["default", "default_total_steps", "default_warmup", "fixed_gamma",
                                    "published_auto", "action", "meta"])
def test_autolr_step_never_synchronizes(config, opt_kind):
    """Every call from the first (the lr anchor settles there; the Triton launcher is checked
    there), a NaN loss included, under ``set_sync_debug_mode("error")``."""
    model, opt, x, y = _problem(opt_kind)
    controller, kwargs = _configs(model, x, y)[config]
    sched = AutoLR(opt, controller, **kwargs)
    for i in range(12):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
        loss.backward()
        if i == 5:
            loss = loss * float("nan")
        _step_without_sync(sched, loss)
        opt.step()
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.is_cuda
    assert torch.isfinite(lr) and float(lr) > 0, float(lr)
    assert sched.skipped_steps == 1
    if config == "meta":
        assert sched.meta.meta_steps == 6


def _kernels_per_step(sched, losses) -> tuple[int, list[str]]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for loss in losses:
            sched.step(loss)
        torch.cuda.synchronize()
    names = kernel_names(prof)
    return len(names), names


@pytest.mark.filterwarnings("ignore:AutoLR")
@pytest.mark.parametrize("config, launches", [("default", 1), ("fixed_gamma", 1), ("default_total_steps", 2),
                                              ("default_warmup", 1)])
def test_steady_state_step_is_one_kernel(config, launches):
    """Counted by the profiler over 31 steps after the scale is decided: the step kernel alone
    (``total_steps`` adds the envelope's multiply; a warm-up alone is over by then)."""
    model, opt, x, y = _problem("sgd_fused")
    controller, kwargs = _configs(model, x, y)[config]
    sched = AutoLR(opt, controller, **kwargs)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
        loss.backward()
        sched.step(loss)
        opt.step()
        losses.append(loss.detach())
    sched.synchronize()
    assert not sched.scale.pending
    count, names = _kernels_per_step(sched, (losses * 4)[:31])
    assert count == 31 * launches, f"{count} kernels for 31 steps: {sorted(set(names))}"
    assert sum("mlrsnet_step" in n for n in names) == 31, sorted(set(names))


def _reference_rates(controller: MLRSNet, gamma: float, rate: float, losses: list[float]) -> list[float]:
    """The controller stepped by the plain PyTorch reference on the CPU over ``losses``."""
    ctrl = copy.deepcopy(controller).cpu()
    h, c = ctrl.h.clone(), ctrl.c.clone()
    weights = [w.detach() for w in ctrl.flat_weights()]
    g, r = torch.tensor(gamma), torch.tensor(rate)
    out = []
    for value in losses:
        reference.mlrsnet_scheduler_step_(torch.tensor(value), h, c, weights, g, r, [], [])
        out.append(float(r))
    return out


@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")
@pytest.mark.parametrize("warmup", [0, 2])  # after a warm-up (no total_steps) gamma holds the peak
@pytest.mark.parametrize("opt_kind", sorted(OPTIMIZERS))
def test_whole_training_step_replays_in_a_cuda_graph(opt_kind, warmup):
    """Forward, backward, ``AutoLR.step`` and the fused optimizer step captured once; each replay
    on a new batch runs the controller on that batch's loss: the rates change from replay to
    replay and equal the reference controller's on the same losses."""
    model, opt, x, y = _problem(opt_kind)
    if opt_kind == "adamw_fused":
        for group in opt.param_groups:
            group["capturable"] = True
    sched = AutoLR(opt, warmup_steps=warmup)  # the 3 eager steps below end the warm-up
    static_x, static_y = x[:16].clone(), y[:16].clone()

    def training_step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(static_x), static_y)
        loss.backward()
        sched.step(loss)
        opt.step()
        return loss

    warm_up_for_capture(training_step, sched)
    state = copy.deepcopy(sched.controller)  # as the capture finds it: capturing runs no kernel
    gamma, rate = float(sched.gamma), float(sched.rate)
    graph, static_loss = capture_training_step(training_step, opt)
    losses, rates = [], []
    for i in range(12):
        rows = torch.arange(16, device="cuda") + 16 * (i % 4)
        static_x.copy_(x[rows])
        static_y.copy_(y[rows])
        graph.replay()
        losses.append(float(static_loss.detach()))
        rates.append(float(opt.param_groups[0]["lr"]))
    assert len(set(rates)) > 1, f"the replays did not change the rate: {rates}"
    want = _reference_rates(state, gamma, rate, losses)
    torch.testing.assert_close(torch.tensor(rates), torch.tensor(want), rtol=1e-4, atol=1e-7)
    assert all(torch.isfinite(torch.tensor(losses))), losses


@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")
@pytest.mark.filterwarnings("ignore:AutoLR")
@pytest.mark.parametrize("case", ["not_warmed_up", "total_steps", "meta"])
def test_capture_refuses_what_a_replay_cannot_repeat(case):
    model, opt, x, y = _problem("sgd_fused")
    kwargs = {"total_steps": 100} if case == "total_steps" else {}
    if case == "meta":
        kwargs["meta"] = MetaConfig(model, [(x[32:48], y[32:48])], nn.functional.cross_entropy, interval=2)
    sched = AutoLR(opt, MLRSNet() if case == "meta" else None, **kwargs)
    loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
    loss.backward()
    if case != "not_warmed_up":
        sched.step(loss.detach())
        opt.step()
        sched.synchronize()
    before = (sched.step_count, sched.rate.clone(), sched.controller.h.clone())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            sched.step(loss.detach())
    assert sched.step_count == before[0]
    assert torch.equal(sched.rate, before[1]) and torch.equal(sched.controller.h, before[2])


def test_no_usable_scale_is_reported_on_the_gpu():
    """The peak lives on the device: its verdict arrives through a polled flag, without a sync."""
    model, opt, x, y = _problem("sgd_fused")
    ctrl = MLRSNet(hidden_size=8)
    with torch.no_grad():
        ctrl.head.bias.fill_(-30.0)  # settles near 0: no usable anchor
    sched = AutoLR(opt, ctrl)
    with pytest.warns(RuntimeWarning, match="no usable scale"):
        for _ in range(20):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
            loss.backward()
            _step_without_sync(sched, loss)
            opt.step()
            torch.cuda.synchronize()  # the flag's copy arrives by the next step


def test_a_meta_optimizer_with_host_state_works_on_the_gpu():
    """A custom, non-fused meta-optimizer keeps its step count on the CPU: the device-side undo of
    a skipped meta-step must reach that state too (with one warned sync), and a good meta-step
    must still update theta."""
    model, opt, x, y = _problem("sgd_fused")
    bad = [(torch.full_like(x[:8], float("nan")), y[:8])]
    sched = AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.05,
                   meta=MetaConfig(model, bad, nn.functional.cross_entropy, interval=1,
                                   optimizer=lambda p: torch.optim.Adam(p, lr=1e-3)))
    theta = copy.deepcopy(sched.controller.state_dict())
    with pytest.warns(RuntimeWarning, match="keeps state on cpu"):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
        loss.backward()
        sched.step(loss)  # the meta-step is skipped: its validation loss is NaN
        opt.step()
    assert all(torch.equal(v, sched.controller.state_dict()[k]) for k, v in theta.items() if k not in ("h", "c"))
    steps = [s["step"] for s in sched.meta.optimizer.state.values()]
    assert steps and all(t.device.type == "cpu" and float(t) == 0.0 for t in steps)
    sched.meta.config.val_data = [(x[:8], y[:8])]
    sched.meta._val_iter = None
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x[:16]), y[:16])
    loss.backward()
    sched.step(loss)
    opt.step()
    assert all(float(s["step"]) == 1.0 for s in sched.meta.optimizer.state.values())
    assert any(not torch.equal(v, sched.controller.state_dict()[k]) for k, v in theta.items() if k not in ("h", "c"))
