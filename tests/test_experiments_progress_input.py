"""The harness's progress-input MLR-SNet: its rate under AutoLR, its meta-gradient, its file."""

import json
import math

import pytest
import torch

from autolr_experiments import meta_train
from autolr_experiments.progress_input import ProgressMLRSNet, load_progress_controller, save_progress_controller
from autolr_fast import AutoLR, MLRSNet
from autolr_fast.ops import dispatch, reference
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


def test_delayed_meta_gradient_matches_the_mlrsnet_one():
    """The theta gradient of the progress path equals the fused MLR-SNet one on the shared weights
    (progress column zero), and has a progress column of its own."""
    plain, prog = _twin(5)
    x, h, c = torch.tensor(0.7), torch.randn(1, 50) * 0.1, torch.randn(1, 50) * 0.1
    gamma, dot = torch.tensor(0.2), torch.tensor(0.3)
    grads_plain = dispatch.mlrsnet_param_grads(x.reshape(1), h, c, [w.detach() for w in plain.flat_weights()],
                                               -gamma * dot)
    xp = torch.stack([x, torch.tensor(0.4)])
    with torch.enable_grad():
        out = prog.output(xp, h, c)[0]
    alpha = gamma * out.detach()  # the rate at the recorded step: gamma * p
    grads_prog = torch.autograd.grad(out, prog.weights(), grad_outputs=-dot * alpha / out.detach())
    assert torch.allclose(grads_prog[0][:, :1], grads_plain[0], rtol=1e-4, atol=1e-7)
    for a, b in zip(grads_prog[1:], grads_plain[1:]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert grads_prog[0][:, 1].abs().sum() > 0
    with torch.no_grad():
        assert float(reference.mlrsnet_forward(x.reshape(1), h, c, plain.flat_weights())[0]) == pytest.approx(
            float(out))


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
