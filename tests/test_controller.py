"""MLRSNet: exact reproduction of the published controller, loading, and input handling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CHECKPOINTS

from autolr_fast import MLRSNet, auto_gamma
from autolr_fast.ops import reference


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_reproduces_published_trajectory(official_dir, name):
    data = json.loads((official_dir / "trajectory.json").read_text())
    net = MLRSNet.from_official(official_dir / name)
    assert (net.hidden_size, net.num_layers) == (data["hidden_size"], data["num_layers"])
    outputs = torch.stack([net(torch.tensor([[loss]])) for loss in data["losses"]]).detach()
    expected = torch.tensor(data["outputs"][name])
    err = (outputs - expected).abs().max().item()
    assert err <= 1e-5, f"{name}: max abs error {err:.3g} against the published trajectory"


def test_metatest_gate_order_is_a_different_function(official_dir):
    data = json.loads((official_dir / "trajectory.json").read_text())
    train = MLRSNet.from_official(official_dir / "mlr_snet_200.pth")
    other = MLRSNet.from_official(official_dir / "mlr_snet_200.pth", gate_order="metatest")
    a = torch.stack([train(torch.tensor(l)) for l in data["losses"][:50]])
    b = torch.stack([other(torch.tensor(l)) for l in data["losses"][:50]])
    assert (a - b).abs().max() > 1e-3
    assert torch.allclose(a.detach(), torch.tensor(data["outputs"]["mlr_snet_200.pth"][:50]), atol=1e-5)


def test_from_official_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="could not read"):
        MLRSNet.from_official(bad)
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not a published MLR-SNet checkpoint"):
        MLRSNet.from_official(other)
    shapes = tmp_path / "shapes.pth"
    sd = {k.replace("cells.0.", "layer1.").replace("head.", "layer3."): v
          for k, v in MLRSNet(hidden_size=8).state_dict().items() if k not in ("h", "c")}
    sd["layer1.fc_i2h.2.weight"] = torch.zeros(5, 4)
    torch.save(sd, shapes)
    with pytest.raises(ValueError, match="unexpected shapes"):
        MLRSNet.from_official(shapes)


def test_official_round_trip_of_two_layer_keys(tmp_path):
    net = MLRSNet(hidden_size=12, num_layers=2)
    sd = {}
    for k, v in net.state_dict().items():
        if k in ("h", "c"):
            continue
        k = k.replace("cells.0.", "layer1.").replace("cells.1.", "layer2.").replace("head.", "layer3.")
        sd[k] = v
    path = tmp_path / "two.pth"
    torch.save(sd, path)
    loaded = MLRSNet.from_official(path)
    assert loaded.num_layers == 2 and loaded.hidden_size == 12
    losses = torch.rand(20) * 3
    assert torch.equal(torch.stack([net(l) for l in losses]), torch.stack([loaded(l) for l in losses]))


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_forward_accepts_one_value(shape):
    net = MLRSNet(hidden_size=16)
    p = net(torch.full(shape, 1.5)).detach()
    assert p.shape == () and 0.0 <= float(p) <= 1.0


def test_forward_rejects_many_values():
    with pytest.raises(ValueError, match="reduce the loss"):
        MLRSNet()(torch.ones(4))


def test_state_carries_and_reset_zeroes():
    net = MLRSNet(hidden_size=20, num_layers=2)
    a = [float(net(torch.tensor(2.0)).detach()) for _ in range(3)]
    assert a[0] != a[1], "the recurrent state must carry across steps"
    assert net.h.abs().sum() > 0
    net.reset()
    assert net.h.abs().sum() == 0 and net.c.abs().sum() == 0
    assert float(net(torch.tensor(2.0))) == a[0]


def test_forward_gives_gradients_to_theta():
    net = MLRSNet(hidden_size=10)
    p = net(torch.tensor(1.0))
    p.backward()
    assert all(w.grad is not None for w in net.flat_weights())


def test_flat_weights_layout_matches_reference_docstring():
    net = MLRSNet(hidden_size=17, num_layers=2)
    w = net.flat_weights()
    assert len(w) == 8 * 2 + 2
    assert w[0].shape == (8, 1) and w[2].shape == (68, 8) and w[4].shape == (8, 17)
    assert w[8].shape == (8, 17) and w[-2].shape == (1, 17)


def test_auto_gamma_published_rule():
    # a fresh 10-class classifier has L0 ~ ln 10; the published rule then gives ~0.67
    g = float(auto_gamma(math.log(10.0), 10))
    expected = abs(math.sqrt(math.log(10)) * math.log(math.log(10) * 10) / 10**0.25) / 4
    assert g == pytest.approx(expected, rel=1e-6)
    assert g == pytest.approx(0.67, abs=0.01)


def test_guarded_step_keeps_state_on_nonfinite():
    net = MLRSNet(hidden_size=16)
    h = torch.randn(1, 16)
    c = torch.randn(1, 16)
    rate_prev = torch.tensor(0.3)
    for bad in (float("nan"), float("inf"), -float("inf")):
        rate, h2, c2, ok = reference.mlrsnet_guarded_step(torch.tensor(bad), h, c, net.flat_weights(),
                                                          torch.tensor(1.0), rate_prev)
        assert not bool(ok)
        assert torch.equal(h2, h) and torch.equal(c2, c) and float(rate) == pytest.approx(0.3)


def test_flat_weights_cache_follows_replaced_parameters():
    net = MLRSNet(hidden_size=8)
    first = net.flat_weights()
    assert net.flat_weights() is first  # cached
    net.head.bias = torch.nn.Parameter(torch.ones(1))
    assert net.flat_weights()[-1] is net.head.bias
    net.cells[0].fc_i2h[0].weight = torch.nn.Parameter(torch.ones(4, 1))
    assert net.flat_weights()[0] is net.cells[0].fc_i2h[0].weight
    net.double()
    assert all(w.dtype == torch.float64 for w in net.flat_weights())


def test_flat_weights_sees_a_replaced_parameter_anywhere():
    """The scheduler asks for the weights every step (a cached list); assigning a new Parameter to
    any weight, not only the first or last, must reach it."""
    from torch import nn

    from autolr_fast import MLRSNet

    ctrl = MLRSNet(hidden_size=8, num_layers=2)
    cached = ctrl.flat_weights()
    assert ctrl.flat_weights() is cached  # nothing changed: the same list
    new = nn.Parameter(torch.zeros_like(ctrl.cells[1].fc_h2h[2].weight))
    ctrl.cells[1].fc_h2h[2].weight = new
    assert any(w is new for w in ctrl.flat_weights())
    ctrl.head = nn.Linear(8, 1)  # a replaced submodule
    weight, bias = ctrl.flat_weights()[-2:]
    assert weight is ctrl.head.weight and bias is ctrl.head.bias
    again = ctrl.flat_weights()
    assert ctrl.flat_weights() is again  # nothing registered since: the same list


def test_a_damaged_controller_file_is_refused_with_what_is_wrong(tmp_path):
    from autolr_fast import load_controller, save_controller

    path = tmp_path / "c.pt"
    save_controller(MLRSNet(hidden_size=8), path, gamma=0.5)
    good = torch.load(path, weights_only=False)
    for key, value, says in (("gamma", float("nan"), "gamma"), ("gamma", -1.0, "gamma"), ("config", None, "config"),
                             ("state_dict", None, "state_dict")):
        blob = {**good, key: value} if value is not None else {k: v for k, v in good.items() if k != key}
        torch.save(blob, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=says):
            load_controller(tmp_path / "bad.pt")


@pytest.mark.parametrize("warm", [True, False])
def test_functional_call_on_the_controller_uses_the_given_weights_and_leaves_its_own(warm):
    torch.manual_seed(0)
    net = MLRSNet(hidden_size=8)
    if warm:
        net.flat_weights()  # AutoLR builds the cache on every step
    replaced = {"cells.0.fc_h2h.2.bias": torch.full((32,), 5.0)}
    twin = MLRSNet(hidden_size=8)
    twin.load_state_dict(net.state_dict())
    with torch.no_grad():
        twin.cells[0].fc_h2h[2].bias.fill_(5.0)
    x = torch.tensor(1.0)
    got = torch.func.functional_call(net, replaced, (x,))
    assert torch.equal(got, twin(x))
    own = {id(p) for p in net.parameters()}
    assert all(id(w) in own for w in net.flat_weights())  # the temporary tensor is not kept
    net.head = torch.nn.Linear(8, 1)  # a submodule assigned after construction
    net.flat_weights()
    net.reset()  # forward advances the recurrent state: both calls start from zero
    got = torch.func.functional_call(net, {"head.bias": torch.full((1,), 3.0)}, (x,))
    with torch.no_grad():
        net.head.bias.fill_(3.0)
    net.reset()
    assert torch.equal(got, net(x))
