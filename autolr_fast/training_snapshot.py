"""A bit-for-bit copy of a model, its optimizer and the random state, restored in place.

``find_lr`` and ``find_anchor_lr`` train trials from the weights they were called with and must
leave everything as they found it. :class:`TrainingSnapshot` keeps what a trial can change:

* parameters and buffers, copied back into the same tensor objects (the optimizer and any hook
  keep pointing at them); a buffer slot re-assigned during a trial gets its original tensor
  back, and one that appeared during a trial (a lazy cache) is removed again;
* the optimizer's per-parameter state (parameters without state at snapshot time get none
  again, so a fresh Adam starts fresh in every trial) and the param groups' hyper-parameters (a
  tensor ``lr``, as :class:`AutoLR` installs, is restored in place);
* every module's ``training`` flag; gradients are cleared;
* the random state: torch's CPU and (initialised) CUDA generators, Python's ``random``, NumPy's
  global generator, and the ``torch.Generator`` of every loader given (a ``DataLoader(...,
  generator=g)`` or its sampler's), so that every trial sees the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import optim_support

_MISSING = object()


def clone_state(v: Any) -> Any:
    """A deep copy of an optimizer state entry: tensors cloned, containers rebuilt."""
    if isinstance(v, Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: clone_state(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(clone_state(x) for x in v)
    return v


class BufferSlots:
    """Every module's buffer slots (``module._buffers``) and a copy of their values."""

    def __init__(self, model: nn.Module) -> None:
        self.slots = [(m._buffers, dict(m._buffers)) for m in model.modules()]
        self.copies = {id(b): b.detach().clone() for _, saved in self.slots for b in saved.values() if b is not None}

    @torch.no_grad()
    def restore(self) -> None:
        for buffers, saved in self.slots:
            for name in [n for n in buffers if n not in saved]:
                del buffers[name]  # appeared since the snapshot
            for name, b in saved.items():
                buffers[name] = b
                if b is not None:
                    b.copy_(self.copies[id(b)])


def loader_generators(loaders: Iterable[Any]) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that decide the order of ``loaders`` (a DataLoader's own,
    its sampler's, its batch sampler's sampler's), each once."""
    found: dict[int, torch.Generator] = {}
    for loader in loaders:
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, sampler, getattr(batch_sampler, "sampler", None)):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator):
                found.setdefault(id(g), g)
    return list(found.values())


class TrainingSnapshot:
    """The state of ``model``, ``optimizer`` and the random generators at construction;
    :meth:`restore` puts it back (see the module docstring for what is kept). ``loaders``: the
    batch sources the trials iterate, whose generators are kept too."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loaders: Iterable[Any] = ()) -> None:
        self.model, self.optimizer = model, optimizer
        self.params = self._parameters()
        self.param_copies = [p.detach().clone() for p in self.params]
        self.buffers = BufferSlots(model)
        self.opt_state = {p: clone_state(s) for p, s in optimizer.state.items()}
        self.groups = [{k: clone_state(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        # the flag a torch lr_scheduler's step() reads to warn about a scheduler stepped first
        self.opt_called = optimizer.__dict__.get("_opt_called", _MISSING)
        self.training = [(m, m.training) for m in model.modules()]
        self.cpu_rng = torch.get_rng_state()
        cuda_on = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda_rng = torch.cuda.get_rng_state_all() if cuda_on else None
        self.python_rng = random.getstate()
        self.numpy_rng = _numpy_random().get_state() if optim_support.numpy_available() else None
        self.generators = [(g, g.get_state()) for g in loader_generators(loaders)]

    def _parameters(self) -> list[Tensor]:
        """The model's parameters and any parameter the optimizer trains outside the model (e.g.
        one inside the loss function)."""
        tensors = list(self.model.parameters())
        seen = {id(t) for t in tensors}
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    tensors.append(p)
        return tensors

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.params, self.param_copies, strict=True):
            p.copy_(saved)
        self.buffers.restore()
        self.optimizer.state.clear()
        for p, s in self.opt_state.items():
            self.optimizer.state[p] = clone_state(s)
        for g, saved in zip(self.optimizer.param_groups, self.groups, strict=True):
            for k, v in saved.items():
                if isinstance(v, Tensor) and isinstance(g.get(k), Tensor) and g[k].shape == v.shape:
                    g[k].copy_(v)
                else:
                    g[k] = clone_state(v)
        if self.opt_called is _MISSING:
            self.optimizer.__dict__.pop("_opt_called", None)
        else:
            self.optimizer._opt_called = self.opt_called
        for m, mode in self.training:
            m.training = mode
        for p in (*self.params, *self.model.parameters()):  # the latter: also one added since the snapshot
            p.grad = None
        self.restore_rng()

    def restore_rng(self) -> None:
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.python_rng)
        if self.numpy_rng is not None:
            _numpy_random().set_state(self.numpy_rng)
        for g, state in self.generators:
            g.set_state(state)


def _numpy_random():
    import numpy  # only where optim_support found it

    return numpy.random
