"""The harness's progress-input MLR-SNet: its rate under AutoLR, its meta-gradient, its file."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from autolr_experiments import meta_train
from autolr_experiments.progress_input import ProgressMLRSNet, load_progress_controller, save_progress_controller
from autolr_fast import AutoLR, MLRSNet
from autolr_fast.rate_scale import SETTLE_STEPS, envelope


def _twin(seed: int) -> tuple[MLRSNet, ProgressMLRSNet]:
    """An MLR-SNet and a ProgressMLRSNet with the same weights, the progress column zero: the two
    must then give the same output."""
    torch.manual_seed(seed)
    plain = MLRSNet()
    prog = ProgressMLRSNet()
    with torch.no_grad():
        prog.cell.fc_i2h[0].weight.copy_(torch.cat([plain.cells[0].fc_i2h[0].weight, torch.zeros(25, 1)], dim=1))
        for name in ("fc_i2h.0.bias", "fc_i2h.2.weight", "fc_i2h.2.bias", "fc_h2h.0.weight", "fc_h2h.0.bias",
                     "fc_h2h.2.weight", "fc_h2h.2.bias"):
            prog.cell.get_parameter(name).copy_(plain.cells[0].get_parameter(name))
        prog.head.load_state_dict(plain.head.state_dict())
    return plain, prog


def _autolr_rates(controller, losses, total, lr=0.1):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if isinstance(controller, ProgressMLRSNet):
        controller.start_run(total)
    sched = AutoLR(opt, controller, total_steps=total)
    rates = []
    for value in losses:
        model(torch.ones(1, 2)).sum().backward()
        sched.step(torch.tensor(value))
        opt.step()
        opt.zero_grad()
        rates.append(float(sched.rate))
    return rates, sched


def test_without_the_progress_column_it_is_autolr_with_an_mlrsnet():
    """Zeroed progress weights: the same rates as AutoLR on the MLR-SNet (lr / p* anchor)."""
    losses = [2.3 * 0.97 ** t + 0.05 * math.sin(t) for t in range(30)]
    plain, prog = _twin(3)
    expected, _ = _autolr_rates(plain, losses, 30)
    got, _ = _autolr_rates(prog, losses, 30)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore:AutoLR. a non-finite")
def test_its_rate_is_the_envelope_times_p_over_the_settled_p():
    torch.manual_seed(0)
    prog = ProgressMLRSNet()
    losses = [1.5, 1.2, float("nan"), 1.0, 0.9, 0.8]
    total = 10
    rates, sched = _autolr_rates(prog, losses, total, lr=0.05)
    # replay by hand: settle at progress 0, then one output per finite loss
    probe = ProgressMLRSNet().requires_grad_(False)
    probe.load_state_dict(prog.state_dict())
    probe.reset()
    x0 = torch.tensor([1.5, 0.0])
    for _ in range(SETTLE_STEPS):
        p_star, h, c = probe.output(x0, probe.h, probe.c)
        probe.h.copy_(h)
        probe.c.copy_(c)
    want = []
    for t, value in enumerate(losses):
        if math.isfinite(value):
            p, h, c = probe.output(torch.tensor([value, t / total]), probe.h, probe.c)
            probe.h.copy_(h)
            probe.c.copy_(c)
            rate = 0.05 * envelope(t, total, sched.scale.warmup_steps, "wsd", sched.scale.decay_steps) * p / p_star
        want.append(float(rate))  # a NaN loss keeps the previous rate
    assert rates == pytest.approx(want, rel=1e-5)
    assert float(prog.t) == len(losses)  # every step counts towards the progress, NaN or not
    with pytest.raises(ValueError, match="run's length"):
        prog.start_run(0)


def _meta_step_update(ctrl, x, h, c, gamma, alpha):
    """The meta-steps ``DelayedMeta._meta_step`` took (0 or 1) and the change it made to ``ctrl``'s
    weights (meta-optimizer: SGD at 1, so the change is minus the theta gradient) for a recorded
    step and a fixed model."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    val = [(torch.randn(8, 3), torch.randn(8, 1))]
    spec = SimpleNamespace(model=model, task=SimpleNamespace(loss_fn=torch.nn.functional.mse_loss), val_data=val)
    meta_opt = torch.optim.SGD(ctrl.parameters(), lr=1.0)
    delayed = meta_train.DelayedMeta(SimpleNamespace(controller=ctrl), spec, interval=1, horizon=1, meta_opt=meta_opt)
    before = [w.detach().clone() for w in ctrl.parameters()]
    d = [torch.full_like(q, 0.1) for q in model.parameters()]
    delayed._meta_step({"x": x, "h": h, "c": c, "gamma": gamma, "alpha": alpha, "d": d})
    return delayed.meta_steps, [w.detach() - b for w, b in zip(ctrl.parameters(), before)]


def test_delayed_meta_step_moves_the_shared_weights_as_for_the_mlrsnet():
    """DelayedMeta's progress branch (rate = gamma * p / p*) against its MLR-SNet branch (rate =
    gamma' * p with gamma' = gamma / p*) on twins: the same change to every shared weight, and a
    change to the progress column of its own."""
    plain, prog = _twin(5)
    h, c = torch.randn(1, 50) * 0.1, torch.randn(1, 50) * 0.1
    p_star, gamma = 0.4, torch.tensor(0.2)
    prog.p_star.fill_(p_star)
    loss = torch.tensor(0.7)
    x_prog = torch.stack([loss, torch.tensor(0.4)])
    steps_plain, moved_plain = _meta_step_update(plain, loss, h, c, gamma / p_star, torch.tensor(0.1))
    steps_prog, moved_prog = _meta_step_update(prog, x_prog, h, c, gamma, torch.tensor(0.1))
    assert steps_plain == steps_prog == 1
    names_plain = [n for n, _ in plain.named_parameters()]
    names_prog = [n for n, _ in prog.named_parameters()]
    by_name = dict(zip(names_prog, moved_prog))
    for name, change in zip(names_plain, moved_plain):
        other = by_name[name.replace("cells.0.", "cell.")]
        if name == "cells.0.fc_i2h.0.weight":
            assert other[:, 1].abs().sum() > 0  # the progress column learns too
            other = other[:, :1]
        assert change.abs().sum() > 0
        assert torch.allclose(other, change, rtol=1e-4, atol=1e-8), name
    # no usable anchor (p* = 0): no meta-step
    prog.p_star.zero_()
    steps, _ = _meta_step_update(prog, x_prog, h, c, gamma, gamma)
    assert steps == 0


def test_file_round_trip_and_refusal(tmp_path):
    torch.manual_seed(1)
    prog = ProgressMLRSNet()
    save_progress_controller(prog, tmp_path / "p.pt", {"tasks": ["regress-exp"]})
    back = load_progress_controller(tmp_path / "p.pt")
    assert back.info == {"tasks": ["regress-exp"]}
    for k, v in prog.state_dict().items():
        if k != "p_star":
            assert torch.equal(v, back.state_dict()[k]), k
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a ProgressMLRSNet file"):
        load_progress_controller(tmp_path / "bad.pt")


def test_meta_train_family_progress_input_quick(tmp_path):
    out = tmp_path / "out"
    assert meta_train.main(["--family", "--quick", "--progress-input", "--check-seeds", "0", "--out", str(out)]) == 0
    runs = json.loads((out / "record.json").read_text())["family_runs"]
    assert all(r["meta_steps"] > 0 for r in runs)
    moved = load_progress_controller(out / "progress.pt")
    fresh = meta_train.fresh_controller(progress_input=True).state_dict()
    assert moved.info["settings"]["progress_input"] is True
    assert set(moved.info["progress_response"]) == {"2.3", "0.5", "0.05"}
    assert all(len(v) == 5 and v[0] == pytest.approx(1.0) for v in moved.info["progress_response"].values())
    assert "What the progress input does alone" in (out / "summary.md").read_text()
    assert any(not torch.equal(v, fresh[k]) for k, v in moved.state_dict().items() if k in fresh
               and k not in ("h", "c", "t", "total", "p_star"))
    with pytest.raises(SystemExit):
        meta_train.main(["--family", "--quick", "--progress-input", "--ship", str(tmp_path / "w")])


def test_autolr_file_runs_either_kind_of_file_and_refuses_its_training_data(tmp_path, monkeypatch):
    from autolr_experiments import baselines
    from autolr_experiments.tasks import get_task
    from autolr_experiments.training import MethodUnavailable, train
    from autolr_fast.controllers.pretrained import PRETRAINED_DIR

    method = baselines.get_method("autolr-file")
    monkeypatch.delenv(baselines.CONTROLLER_FILE_ENV, raising=False)
    assert "set " + baselines.CONTROLLER_FILE_ENV in method.available()
    torch.manual_seed(2)
    save_progress_controller(ProgressMLRSNet(), tmp_path / "p.pt", {"tasks": ["regress-exp"]})
    for path in (PRETRAINED_DIR / "default.pt", tmp_path / "p.pt"):
        monkeypatch.setenv(baselines.CONTROLLER_FILE_ENV, str(path))
        assert method.available() is None
        run = train(get_task("diabetes-mlp"), method, epochs=1, batch_size=64, seed=0)
        assert run.status == "ok" and run.schedule.info["controller_tasks"]
        with pytest.raises(MethodUnavailable, match="trained on regress-exp's data"):
            train(get_task("regress-exp"), method, epochs=1, batch_size=64, seed=0)


def test_no_usable_anchor_means_rate_zero_and_an_early_state_loads():
    torch.manual_seed(4)
    prog = ProgressMLRSNet()
    with torch.no_grad():
        prog.head.bias.fill_(-20.0)  # p ~ 2e-9 whatever the input: below MIN_SETTLED_P
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prog.start_run(10)
    sched = AutoLR(opt, prog, total_steps=10)
    early = sched.state_dict()  # before the first loss: the anchor is still unset
    other = ProgressMLRSNet()
    other.start_run(10)
    AutoLR(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1), other, total_steps=10).load_state_dict(early)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.warns(RuntimeWarning, match="no usable anchor"):
        sched.step(torch.tensor(1.0))
    assert float(sched.rate) == 0.0 and float(prog.p_star) == 0.0
