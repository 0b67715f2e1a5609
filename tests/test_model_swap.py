"""ModelSwap against its reference, ``torch.func.functional_call`` with cloned buffers."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from autolr_fast.model_swap import ModelSwap


class Tied(nn.Module):
    """An embedding tied to the output layer (the same Parameter in two modules), BatchNorm, and
    a parametrized weight (stored at ``parametrizations.weight.original``)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.BatchNorm1d(6)
        self.mid = nn.Linear(6, 6)
        parametrize.register_parametrization(self.mid, "weight", _Symmetric())
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        h = self.emb(tokens).mean(1)
        return self.out(torch.tanh(self.mid(self.norm(h))))


class _Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.T) / 2


def _models():
    torch.manual_seed(0)
    return {
        "bn-cnn": (nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3)),
                   lambda: torch.randn(5, 2, 8)),
        "tied-parametrized": (Tied(), lambda: torch.randint(0, 11, (7, 4))),
    }


@pytest.mark.parametrize("name", ["bn-cnn", "tied-parametrized"])
@pytest.mark.parametrize("subset", ["all", "some"])
def test_swap_matches_functional_call(name, subset):
    model, make_input = _models()[name]
    model.train()
    params = dict(model.named_parameters())
    picked = list(params.items()) if subset == "all" else list(params.items())[::2]
    hats = {n: (p.detach() + 0.1 * torch.randn_like(p)).requires_grad_(True) for n, p in picked}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swap = ModelSwap(model)
    for _ in range(2):  # the second call reuses the scratch buffers
        x = make_input()
        out = swap({id(params[n]): h for n, h in hats.items()}, x)
        reference_inputs = {n: p.detach() for n, p in params.items()}
        reference_inputs.update(hats)
        reference_inputs.update({n: b.clone() for n, b in model.named_buffers()})
        expected = torch.func.functional_call(model, reference_inputs, (x,))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        grads = torch.autograd.grad(out.square().sum(), list(hats.values()))
        expected_grads = torch.autograd.grad(expected.square().sum(), list(hats.values()))
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert dict(model.named_parameters()).keys() == params.keys()


def test_tied_weight_is_replaced_in_every_module():
    model = Tied()
    hat = torch.zeros_like(model.emb.weight)
    seen = []
    model.out.register_forward_pre_hook(lambda m, args: seen.append(m.weight))
    ModelSwap(model)({id(model.emb.weight): hat}, torch.randint(0, 11, (3, 4)))
    assert seen[0] is hat
    assert model.out.weight is model.emb.weight and isinstance(model.out.weight, nn.Parameter)


def test_originals_are_restored_when_the_forward_raises():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    weight, mean = model[0].weight, model[1].running_mean
    with pytest.raises(RuntimeError):
        ModelSwap(model)({id(weight): torch.zeros(3, 3)}, torch.randn(2, 4))  # wrong input width
    assert model[0].weight is weight and model[1].running_mean is mean


def test_a_buffer_reassigned_after_construction_is_read():
    model = nn.BatchNorm1d(3)
    swap = ModelSwap(model)
    model.eval()
    model.running_mean = torch.full((3,), 5.0)  # a new tensor in the existing slot
    out = swap({}, torch.full((2, 3), 5.0))
    assert torch.allclose(out, torch.zeros(2, 3), atol=1e-6)


def test_scratch_buffers_follow_in_place_changes_between_calls():
    """Eval mode reads the running statistics: the scratch copies must be refreshed every call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    swap = ModelSwap(model)
    weight = model[0].weight
    hat = weight.detach() + 0.1
    for shift in (0.0, 2.0):
        model[1].running_mean.add_(shift)
        x = torch.randn(5, 3)
        expected = torch.func.functional_call(model, {"0.weight": hat}, (x,))
        torch.testing.assert_close(swap({id(weight): hat}, x), expected, rtol=0, atol=0)


def test_parameters_without_a_replacement_record_no_graph():
    """A parameter left out of the optimizer (no look-ahead) must not cost activation memory."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    hat = model[2].weight.detach().clone().requires_grad_(True)
    out = ModelSwap(model)({id(model[2].weight): hat}, torch.randn(4, 3))
    assert torch.autograd.grad(out.sum(), [model[0].weight, hat], allow_unused=True)[0] is None
    assert model[0].weight.requires_grad and isinstance(model[0].weight, nn.Parameter)


def test_a_parameter_of_a_module_added_later_is_refused():
    model = nn.Sequential(nn.Linear(3, 3))
    swap = ModelSwap(model)
    model.append(nn.Linear(3, 1))
    with pytest.raises(RuntimeError, match="construct a new AutoLR"):
        swap({id(model[1].weight): torch.zeros(1, 3)}, torch.randn(2, 3))
    assert isinstance(model[0].weight, nn.Parameter)


class _LazyCount(nn.Module):
    """A buffer registered as None and allocated by the first forward, then counted up in place."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("calls", None)

    def forward(self, x):
        if self.calls is None:
            self.calls = torch.zeros(())
        self.calls.add_(1)
        return self.lin(x)


def test_a_buffer_allocated_after_construction_is_swapped_too():
    model = _LazyCount()
    swap = ModelSwap(model)  # the slot holds None here
    model(torch.randn(1, 2))
    swap({}, torch.randn(1, 2))
    assert float(model.calls) == 1.0  # the swapped forward counted on its copy


def test_a_module_used_twice_in_the_forward_gets_gradients_through_both_uses():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), shared, nn.Tanh(), shared)
    x = torch.randn(4, 3)
    named = dict(model.named_parameters())  # the shared layer's parameters are listed once
    hats = {n: (p.detach() + 0.1).requires_grad_(True) for n, p in named.items()}
    out = ModelSwap(model)({id(named[n]): h for n, h in hats.items()}, x)
    grads = torch.autograd.grad(out.sum(), list(hats.values()))
    assert all(p is named[n] for n, p in model.named_parameters())  # the originals are back
    ref_hats = {n: h.detach().clone().requires_grad_(True) for n, h in hats.items()}
    ref = torch.func.functional_call(model, ref_hats, (x,))
    ref_grads = torch.autograd.grad(ref.sum(), list(ref_hats.values()))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
