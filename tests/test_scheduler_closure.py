"""optimizer.step(closure): the closure runs backward and sched.step(loss) inside optimizer.step
(the pattern of Lightning's automatic optimization and of LBFGS-style loops)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autolr_fast import AutoLR, MLRSNet


def _setup():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.1)


def _closure(model, opt, sched, x, y, call_step=True):
    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if call_step:
            sched.step(loss)
        return loss

    return closure


def test_closure_step_gives_the_rates_of_the_plain_loop():
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    model, opt, sched = _setup()
    closure_rates = []
    for _ in range(4):
        opt.step(_closure(model, opt, sched, x, y))
        closure_rates.append(sched.last_rate.clone())
    assert not opt._optimizer_step_post_hooks, "the one-off check must not stay on the optimizer"
    model, opt, sched = _setup()
    plain_rates = []
    for _ in range(4):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        sched.step(loss)
        opt.step()
        plain_rates.append(sched.last_rate.clone())
    assert torch.equal(torch.stack(closure_rates), torch.stack(plain_rates))


def test_a_closure_without_sched_step_is_refused():
    model, opt, sched = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="did not call AutoLR.step"):
        opt.step(_closure(model, opt, sched, torch.randn(8, 4), torch.randn(8, 2), call_step=False))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # refused before the update
    with pytest.raises(RuntimeError, match="did not call AutoLR.step"):  # also given by keyword
        opt.step(closure=_closure(model, opt, sched, torch.randn(8, 4), torch.randn(8, 2), call_step=False))


def test_optimizer_step_before_sched_step_is_still_refused():
    model, opt, sched = _setup()
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="before AutoLR.step"):
        opt.step()


def test_lbfgs_advances_autolr_once_per_optimizer_step():
    """LBFGS evaluates the closure up to max_iter times per step: AutoLR reads the first (the loss
    at the step's start), so its steps, envelope and rates follow optimizer steps, unwarned."""
    import warnings

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), total_steps=50, warmup_steps=10)
    read = []
    step = sched.step
    sched.step = lambda loss, *a, **k: (read.append(float(loss.detach())), step(loss, *a, **k))[1]
    evaluations = []
    closure = _closure(model, opt, sched, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "called twice without optimizer.step()"
        for _ in range(10):
            before = len(read)
            opt.step(closure)
            evaluations.append(len(read) - before)
    assert sched.step_count == 10 and max(evaluations) > 1  # LBFGS did evaluate several times


@pytest.mark.parametrize("losses, words", [((1.0, -0.5, -3.0, 1.0, 1.0), "negative"),
                                            ((1.0, 0.9, float("-inf"), float("-inf"), 0.8), "non-finite")])
def test_the_action_controller_reads_negative_losses_as_zero_and_skips_minus_infinity(losses, words):
    """As the MLR-SNet kernel does: a negative loss is read as 0, and -inf (like NaN) is skipped,
    not clamped to a finite 0."""
    from autolr_fast import ActionController

    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = ActionController.pretrained("action-mlp")
    sched = AutoLR(opt, ctrl)
    model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    with pytest.warns(RuntimeWarning, match=words):
        for loss in losses:
            sched.step(torch.tensor(loss))
    skipped = sum(not math.isfinite(v) for v in losses)
    assert sched.skipped_steps == skipped and int(ctrl.steps) == len(losses) - skipped
    assert float(ctrl.initial) >= 0.0 and float(ctrl.lowest) >= 0.0
