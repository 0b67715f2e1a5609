"""The harness's one training loop: hook order, rates without per-step host reads, branching from
a checkpoint, divergence, and the demo/comparison record shapes."""

import math

import pytest
import torch
from torch import nn

from autolr_experiments.baselines import get_method
from autolr_experiments.report import summarize
from autolr_experiments.tasks import Task, get_task
from autolr_experiments.training import (
    Method,
    Schedule,
    autolr_schedule,
    load_state,
    run_steps,
    save_state,
    torch_schedule,
    train,
    train_step,
)
from autolr_fast import MLRSNet


def _problem(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]
    torch.manual_seed(seed)
    return nn.Linear(3, 1), batches


def test_step_calls_the_hooks_in_the_canonical_order():
    model, batches = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("optimizer.step"))
    schedule = Schedule(opt, rate=lambda: calls.append("rate") or 0.1,
                        before_step=lambda loss: calls.append(("before_step", loss.requires_grad,
                                                               model.weight.grad is not None)),
                        after_step=lambda: calls.append("after_step"))
    rates = []
    train_step(model, schedule, nn.functional.mse_loss, batches[0], rates)
    assert calls == [("before_step", True, True), "optimizer.step", "rate", "after_step"] and rates == [0.1]


def test_run_steps_reads_tensor_rates_once(monkeypatch):
    model, batches = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = autolr_schedule(opt, MLRSNet(), gamma=0.5)
    reads = {"n": 0}
    for name in ("item", "__float__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            reads["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    losses, rates = run_steps(model, schedule, nn.functional.mse_loss, batches)
    monkeypatch.undo()
    assert losses.shape == (6,) and len(rates) == 6 and all(0 <= r <= 0.5 for r in rates)
    assert reads["n"] <= 2  # the rates' one tolist, not one read per step
    assert schedule.autolr.step_count == 6


def test_torch_schedule_steps_per_step_or_per_epoch():
    model, batches = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    per_step = torch_schedule(opt, torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))
    _, rates = run_steps(model, per_step, nn.functional.mse_loss, batches[:3])
    assert rates == pytest.approx([0.1, 0.05, 0.025])
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    per_epoch = torch_schedule(opt2, torch.optim.lr_scheduler.StepLR(opt2, 1, 0.5), per="epoch")
    _, rates = run_steps(model, per_epoch, nn.functional.mse_loss, batches[:3])
    assert rates == [0.1, 0.1, 0.1]
    per_epoch.after_epoch()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="per"):
        torch_schedule(opt, None, per="batch")


def test_branches_from_a_checkpoint_repeat_exactly():
    model, batches = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = Schedule(opt)
    run_steps(model, schedule, nn.functional.mse_loss, batches[:2])
    state = save_state(model, opt)
    first, _ = run_steps(model, schedule, nn.functional.mse_loss, batches[2:])
    load_state(model, opt, state)
    again, _ = run_steps(model, schedule, nn.functional.mse_loss, batches[2:])
    assert torch.equal(first, again)
    load_state(model, opt, state)
    for g in opt.param_groups:
        g["lr"] = 0.01
    other, _ = run_steps(model, schedule, nn.functional.mse_loss, batches[2:])
    assert torch.equal(other[0], first[0]) and not torch.equal(other, first)


def test_train_records_epochs_and_rates():
    task = get_task("regress-sin")
    run = train(task, get_method("cosine"), epochs=2, batch_size=256, seed=0, lr=0.05, name="cos")
    assert run.name == "cos" and run.status == "ok" and run.steps == 2 * 4 and len(run.rates) == 8
    assert run.rates[0] == pytest.approx(0.05) and run.rates[-1] < run.rates[0]
    rec = run.record()
    assert rec["final_metric"] == rec["final_test_loss"] == run.curves["test_loss"][-1]
    assert set(rec["curves"]) == {"train_loss", "test_loss", "test_acc", "train_time_s", "steps", "rate"}
    js = run.to_json()
    assert [e["epoch"] for e in js["epochs"]] == [1, 2] and set(js["epochs"][0]) == {
        "epoch", "train_loss", "test_loss", "test_acc", "time_s"}
    again = train(task, get_method("cosine"), epochs=2, batch_size=256, seed=0, lr=0.05)
    assert again.curves["test_loss"] == run.curves["test_loss"]  # same seed, same numbers
    stats = summarize([rec, again.record()])
    assert stats["seeds"] == 2 and stats["final_metric_std"] == 0
    assert rec["cpu_time_s"] > 0 and stats["cpu_time_s"] > 0


@pytest.mark.parametrize("name,kind", [("markov-gru", "adamw"), ("digits-bncnn", "sgd"), ("diabetes-mlp", "adam"),
                                       ("friedman-mlp", "sgd"), ("adding-lstm", "adam"), ("logreg-convex", "sgd"),
                                       ("spirals-deep-mlp", "adamw"), ("waves-cnn1d", "sgd"), ("gratings-vit", "adamw"),
                                       ("poisson-counts", "sgd"), ("reverse-bigru", "adam"),
                                       ("categorical-embed", "sgd")])
def test_new_tasks_train_with_their_default_optimizer(name, kind):
    task = get_task(name)
    again = get_task(name)
    assert torch.equal(task.x_train, again.x_train) and torch.equal(task.y_test, again.y_test)  # fixed data
    assert task.optim.kind == kind and task.optim.lr > 0
    assert len(task.x_train) > len(task.x_test) > 0
    run = train(task, get_method("cosine"), epochs=1, batch_size=64, seed=0)  # the grid centre: the task's lr
    assert run.status == "ok" and run.rates[0] == pytest.approx(task.optim.lr)
    opt = run.schedule.optimizer
    assert type(opt).__name__.lower() == kind
    assert math.isfinite(run.curves["test_loss"][-1])


def test_train_stops_a_diverged_run():
    x = torch.linspace(-1, 1, 64).unsqueeze(1)
    task = Task("blow-up", x, 100 * x, x, 100 * x, lambda: nn.Linear(1, 1), nn.functional.mse_loss, None)
    method = Method("huge", lambda spec: Schedule(torch.optim.SGD(spec.model.parameters(), lr=1e3)))
    run = train(task, method, epochs=5, batch_size=16)
    assert run.status == "diverged" and len(run.curves["test_loss"]) < 5
    assert run.record()["final_metric"] == math.inf


def test_spike_guard_halves_on_blocks_above_its_reference():
    from autolr_experiments.baselines import SpikeGuard

    guard = SpikeGuard("initial", block=2)
    factors = [guard.observe(v) for v in (1.0, 1.0, 0.5, 0.5, 1.5, 1.5, 0.2, 0.2, 1.2, 1.2)]
    assert factors == [1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25]  # blocks above the first block's 1.0
    assert guard.observe(float("nan")) == 0.125 and guard.halvings == 3
    doubling = SpikeGuard("lowest", block=1, ratio=2.0)
    assert [doubling.observe(v) for v in (1.0, 0.4, 0.9, 1.0, 2.0)] == [1, 1, 0.5, 0.5, 0.25]
    with pytest.raises(ValueError, match="reference"):
        SpikeGuard("median")


def test_a_method_drawing_from_the_global_rng_does_not_change_the_dropout_masks():
    """Two methods with the same rates, one of which draws from the global RNG when built (as a
    fresh controller's init does): on a dropout task they train identically."""
    task = get_task("digits-dropout-mlp")

    def constant(draws: bool) -> Method:
        def build(spec):
            if draws:
                torch.randn(1000)
            return Schedule(torch.optim.SGD(spec.model.parameters(), lr=0.05))
        return Method(f"constant, draws={draws}", build)

    runs = [train(task, constant(draws), epochs=1, batch_size=64, seed=3) for draws in (False, True)]
    assert runs[0].curves["train_loss"] == runs[1].curves["train_loss"]
    assert runs[0].curves["test_acc"] == runs[1].curves["test_acc"]
