"""Run a model's forward on look-ahead weights, with its buffers on scratch copies.

The meta-step evaluates ``L_val(w_hat)`` every ``interval`` steps. ``torch.func.functional_call``
does that, but walks the whole module tree two or three times per call (tied-weight detection,
then one ``get_submodule`` per name); on a host-bound step that walking is a large part of the
meta-step's cost. :class:`ModelSwap` walks the tree once, at construction, and keeps the
``(module, name)`` slot of every parameter and buffer; each call writes the replacements into
those slots (the same mechanism as ``functional_call``), runs the forward and puts the originals
back, also when the forward raises.

Buffers are copied into scratch tensors kept from call to call (one fused copy; they stay
allocated between calls, one copy of every buffer), so a forward in training mode (BatchNorm's
running statistics) changes the copies, never the model. A parameter or buffer object that
appears in several modules (tied weights) is replaced in all of them.

The module structure is read at construction: modules added to or removed from the model later
are not seen, and a replacement for a parameter of a module added later is refused (construct a
new ``AutoLR`` after such surgery). Tensors re-assigned into existing slots are seen, since the
slots are read on every call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class ModelSwap:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._param_slots: list[tuple[dict, str]] = []
        self._buffer_slots: list[tuple[dict, str]] = []
        # each module once: one used at two places of the forward has one slot dict, and a second
        # swap would find the replacement there and detach it
        for module in model.modules():
            # every slot, also one holding None now: a buffer allocated later (a lazy cache) must
            # still be swapped for a copy, or the meta-step's forward would write into the model
            self._param_slots += [(module._parameters, n) for n in module._parameters]
            self._buffer_slots += [(module._buffers, n) for n in module._buffers]
        self._scratch: dict[int, Tensor] = {}  # id(live buffer) -> its copy

    def parameter_ids(self) -> set[int]:
        """``id`` of every parameter in the slots read at construction (their current tensors)."""
        return {id(p) for slots, name in self._param_slots if (p := slots.get(name)) is not None}

    def _buffer_copies(self) -> list[tuple[dict, str, Tensor, Tensor]]:
        """``(slot dict, name, live buffer, scratch copy)`` per buffer slot, the copies refreshed
        from the live buffers with one fused copy per call."""
        entries = []
        fresh: dict[int, Tensor] = {}
        for slots, name in self._buffer_slots:
            live = slots.get(name)
            if live is None:
                continue
            copy = fresh.get(id(live))
            if copy is None:
                copy = self._scratch.get(id(live))
                if copy is None or copy.shape != live.shape or copy.dtype != live.dtype or copy.device != live.device:
                    copy = torch.empty_like(live)
                fresh[id(live)] = copy
            entries.append((slots, name, live, copy))
        self._scratch = fresh
        if fresh:
            unique = {id(c): (c, live) for _, _, live, c in entries}
            copies, lives = zip(*unique.values())
            with torch.no_grad():
                torch._foreach_copy_(list(copies), list(lives))
        return entries

    def __call__(self, replacements: dict[int, Tensor], *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with each parameter ``p`` replaced by ``replacements[id(p)]``
        where there is one, every other parameter by ``p.detach()`` (no graph is recorded for
        it), and every buffer by its scratch copy."""
        swapped: list[tuple[dict, str, Tensor]] = []
        try:
            replaced: set[int] = set()
            for slots, name in self._param_slots:
                original = slots.get(name)
                if original is None:
                    continue
                new = replacements.get(id(original))
                if new is not None:
                    replaced.add(id(original))
                elif original.requires_grad:
                    new = original.detach()  # each call: `p.data = ...` may have replaced its storage
                else:
                    continue
                swapped.append((slots, name, original))
                slots[name] = new
            if len(replaced) != len(replacements):
                raise RuntimeError(
                    f"{len(replacements) - len(replaced)} of the parameters to replace are not in the modules the "
                    "model had when this ModelSwap (the meta-step's) was built: modules added to the model since "
                    "AutoLR(...) was constructed are not seen; construct a new AutoLR after changing the model"
                )
            for slots, name, live, copy in self._buffer_copies():
                swapped.append((slots, name, live))
                slots[name] = copy
            return self.model(*args, **kwargs)
        finally:
            for slots, name, original in reversed(swapped):
                slots[name] = original
