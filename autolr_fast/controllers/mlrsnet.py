"""The MLR-SNet controller: a small LSTM that maps the training loss to a learning rate."""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor, nn

from ..ops import dispatch, reference
from .files import read_file

# Parameters and submodules registered in this process (register_parameter / add_module, which
# assigning an nn.Parameter or a module goes through): flat_weights' cache is rebuilt only when
# this count changed, so the every-step path is a few comparisons.
_REGISTRATIONS = [0]


def _count_registration(module: nn.Module, name: str, value) -> None:
    _REGISTRATIONS[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_count_registration)
nn.modules.module.register_module_module_registration_hook(_count_registration)


class _CountedSlots(dict):
    """A module's ``_parameters`` that counts every write: ``torch.func.functional_call`` and
    other reparametrisations write the slots directly, past the registration hooks. Reads keep
    the plain dict's speed."""

    def __setitem__(self, key, value) -> None:
        _REGISTRATIONS[0] += 1
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        _REGISTRATIONS[0] += 1
        super().__delitem__(key)

GateOrder = Literal["train", "metatest"]


class _FC(nn.Sequential):
    """Linear -> ReLU -> Linear, the input transform of every MLR-SNet gate pre-activation."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class MLRSNetCell(nn.Module):
    """One MLR-SNet cell: ``z = fc_i2h(x) + fc_h2h(h)``, then an LSTM state update."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        middle = max(hidden_size // 2, 1)
        self.fc_i2h = _FC(input_size, middle, 4 * hidden_size)
        self.fc_h2h = _FC(hidden_size, middle, 4 * hidden_size)

    def flat_weights(self) -> list[Tensor]:
        return [
            self.fc_i2h[0].weight, self.fc_i2h[0].bias, self.fc_i2h[2].weight, self.fc_i2h[2].bias,
            self.fc_h2h[0].weight, self.fc_h2h[0].bias, self.fc_h2h[2].weight, self.fc_h2h[2].bias,
        ]


class MLRSNet(nn.Module):
    """The MLR-SNet learning-rate controller (Shu et al., 2021), as published.

    Every step reads the training loss ``L`` and returns ``p = sigmoid(head(h'))`` in
    ``[0, 1]``; the learning rate is ``gamma * p`` (the scale lives in :class:`AutoLR`).
    The recurrent state ``(h, c)``, shape ``(num_layers, hidden_size)`` each, is kept in
    buffers, carried from step to step, and saved with ``state_dict()``; :meth:`reset`
    zeroes it.

    Args:
        hidden_size: LSTM width ``H`` (published: 50). The input MLPs have ``H // 2`` units.
        num_layers: stacked cells (published: 1).
        gate_order: ``"train"`` (default) is the cell of the code that trained the published
            checkpoints: gates (input, forget, output, cell) and forget gate
            ``sigmoid(z1 - 1)``. ``"metatest"`` is how the published meta-test script reads
            the same files (input, forget without ``-1``, cell, output); only for reproducing
            those transfer runs.
    """

    def __init__(self, hidden_size: int = 50, num_layers: int = 1, gate_order: GateOrder = "train") -> None:
        super().__init__()
        if hidden_size < 2:
            raise ValueError(f"hidden_size must be >= 2, got {hidden_size}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if gate_order not in ("train", "metatest"):
            raise ValueError(f"gate_order must be 'train' or 'metatest', got {gate_order!r}")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.gate_order = gate_order
        self.cells = nn.ModuleList(
            [MLRSNetCell(1 if i == 0 else hidden_size, hidden_size) for i in range(num_layers)]
        )
        self.head = nn.Linear(hidden_size, 1)
        self.register_buffer("h", torch.zeros(num_layers, hidden_size))
        self.register_buffer("c", torch.zeros(num_layers, hidden_size))

    # -- weights ---------------------------------------------------------------------------
    def flat_weights(self) -> list[Tensor]:
        """The weights in the layout of :mod:`autolr_fast.reference` (``8 * layers + 2``).

        Cached (the scheduler asks every step); rebuilt after ``.to()``/``_apply``, after any
        parameter or submodule was registered in the process (so a new ``nn.Parameter`` or module
        assigned anywhere in the controller is seen), and after a parameter slot of the controller
        was written directly (``torch.func.functional_call``).
        """
        cache = self.__dict__.get("_flat_cache")
        # (plain dict look-ups: Module.__getattr__ and Sequential.__getitem__ cost microseconds)
        if (cache is not None and self.__dict__["_flat_seen"] == _REGISTRATIONS[0]
                and cache[-1] is self._modules["head"]._parameters.get("bias")):
            return cache  # nothing registered anywhere since it was built
        for module in self.modules():  # a submodule assigned since construction counts its writes too
            if type(module._parameters) is dict:
                module._parameters = _CountedSlots(module._parameters)
        out: list[Tensor] = []
        for cell in self.cells:
            out.extend(cell.flat_weights())
        out.extend([self.head.weight, self.head.bias])
        self.__dict__["_flat_cache"] = out
        self.__dict__["_flat_seen"] = _REGISTRATIONS[0]
        return out

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_flat_cache", None)
        return super()._apply(fn, recurse)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "gate_order": self.gate_order}

    # -- stepping --------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero the recurrent state (the start of a new training run)."""
        with torch.no_grad():
            self.h.zero_()
            self.c.zero_()

    def step_functional(self, loss: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(p, h_new, c_new)`` without touching the stored state (gradients flow to theta)."""
        return reference.mlrsnet_forward(loss, h, c, self.flat_weights(), self.gate_order == "metatest")

    # -- the Controller interface of AutoLR -------------------------------------------------
    default_gamma: float | None = None  # set by the loaders of saved controllers

    def initial_rate(self, base_lr: float) -> float:
        return 0.0  # no rate before the first loss has been read

    def scheduler_step_(self, loss: Tensor, gamma: Tensor, rate: Tensor) -> None:
        """The guarded step (:func:`reference.mlrsnet_guarded_step`) in place on ``h``, ``c`` and
        ``rate``. ``AutoLR`` runs the fused op instead for ``gate_order="train"``; this plain
        path serves ``"metatest"``."""
        with torch.no_grad():
            new_rate, h_new, c_new, _ = reference.mlrsnet_guarded_step(
                loss, self.h, self.c, self.flat_weights(), gamma, rate, self.gate_order == "metatest")
            self.h.copy_(h_new)
            self.c.copy_(c_new)
            rate.copy_(new_rate)

    @torch.no_grad()
    def settle_(self, loss: Tensor, steps: int) -> Tensor:
        """Run ``steps`` guarded steps on the same ``loss``, the state updated in place; returns the
        last ``p`` (0-dim; 0 when the loss is not finite, the state then unchanged). On the device,
        no host sync: ``AutoLR`` anchors its scale on the output this settles at."""
        one = torch.ones((), device=self.h.device)
        p = torch.zeros((), device=self.h.device)
        weights = self.flat_weights()
        for _ in range(steps):
            if self.gate_order == "train":
                dispatch.mlrsnet_step_(loss, self.h, self.c, weights, one, p, [], [])
            else:
                self.scheduler_step_(loss, one, p)
        return p

    def forward(self, loss: Tensor | float) -> Tensor:
        """Advance one step on ``loss`` (a scalar or ``(1, 1)`` tensor) and return ``p``.

        ``p`` carries the autograd graph to the weights (one-step truncation: the stored
        state is detached).
        """
        x = torch.as_tensor(loss, dtype=self.h.dtype, device=self.h.device)
        if x.numel() != 1:
            raise ValueError(
                f"MLRSNet takes one loss value (a scalar or a (1, 1) tensor), got shape "
                f"{tuple(x.shape)}; reduce the loss first, e.g. loss.mean()"
            )
        grad = torch.is_grad_enabled()
        # the graph saves the state it read: give it copies so the in-place update below is safe
        h, c = (self.h.clone(), self.c.clone()) if grad else (self.h, self.c)
        p, h_new, c_new = self.step_functional(x.detach(), h, c)
        with torch.no_grad():
            self.h.copy_(h_new)
            self.c.copy_(c_new)
        return p

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_official(
        cls, path: str | os.PathLike, gate_order: GateOrder = "train", map_location: str = "cpu"
    ) -> MLRSNet:
        """Load a checkpoint released with the MLR-SNet paper (``mlr_snet_*.pth``).

        The file is a plain ``state_dict`` with keys ``layer1.fc_i2h.0.weight`` ...
        ``layer3.bias`` (``layer2.*`` for a second cell), often saved from CUDA tensors.
        Sizes are read from the file. ``gate_order="train"`` (default) reproduces the code
        that trained the checkpoints; ``"metatest"`` is the other reading (see the class doc).
        """
        state = read_file(path, "an MLR-SNet checkpoint", map_location)
        if not isinstance(state, dict) or "layer1.fc_i2h.0.weight" not in state or "layer3.weight" not in state:
            raise ValueError(
                f"{os.fspath(path)!r} is not a published MLR-SNet checkpoint: expected keys "
                "'layer1.fc_i2h.0.weight' ... 'layer3.bias'"
            )
        hidden = state["layer3.weight"].shape[1]
        layers = 2 if "layer2.fc_i2h.0.weight" in state else 1
        net = cls(hidden_size=hidden, num_layers=layers, gate_order=gate_order)
        mapped = {}
        for key, value in state.items():
            if key.startswith("layer3."):
                mapped["head." + key[len("layer3."):]] = value
            elif key.startswith("layer1.") or key.startswith("layer2."):
                idx = int(key[len("layer")]) - 1
                mapped[f"cells.{idx}." + key[len("layerN."):]] = value
            else:
                raise ValueError(f"unexpected key {key!r} in MLR-SNet checkpoint {os.fspath(path)!r}")
        mapped["h"] = torch.zeros(layers, hidden)
        mapped["c"] = torch.zeros(layers, hidden)
        try:
            net.load_state_dict(mapped, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {os.fspath(path)!r} has unexpected shapes: {exc}") from exc
        return net
