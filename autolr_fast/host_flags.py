"""Counters that live on the device and are read on the host without a sync.

``AutoLR`` counts skipped (non-finite) and clamped (negative) losses on the device. To warn
about them it needs the numbers on the host, which must never stall the training loop: on a
GPU a non-blocking copy into pinned memory is issued every ``every`` steps and read only once
its CUDA event has completed (``Event.query()`` does not block); on the CPU the counters are
host memory already and are read in place (through a NumPy view when NumPy is installed).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from . import optim_support


class DeviceCounters:
    def __init__(self, names: tuple[str, ...], device: torch.device, every: int = 32) -> None:
        self.names = names
        self.values = torch.zeros(len(names), dtype=torch.int64, device=device)
        self.every = max(int(every), 1)
        self._calls = 0
        if device.type == "cuda":
            self._host = torch.zeros(len(names), dtype=torch.int64).pin_memory()
            self._event: torch.cuda.Event | None = None
            self._view = None
        else:
            self._host = None
            self._event = None
            # shares memory: no copy, no sync, no dispatch
            self._view = self.values.numpy() if optim_support.numpy_available() else self.values
        self._seen = [0] * len(names)
        self._seen_steps = 0
        self._pending_steps = 0
        self._report: Mapping[str, int] | None = None  # what poll returns until new values arrive

    def poll(self, steps: int, eager: bool = False) -> Mapping[str, int]:
        """Counter values known on the host now (possibly a few steps old on a GPU), and under
        ``"steps"`` the host's step count ``steps`` at the moment they were captured. ``eager``
        starts a copy on every call (not every ``every``-th) while the caller waits for news."""
        self._calls += 1
        if self._view is not None:
            self._seen = self._view.tolist()
            self._seen_steps = steps
            self._report = None
        elif ((self._event is not None or eager or self._calls % self.every == 0)
              and not torch._C._cuda_isCurrentStreamCapturing()):  # a query or a copy would break a capture
            if self._event is not None and self._event.query():
                self._seen = self._host.tolist()
                self._seen_steps = self._pending_steps
                self._event = None
                self._report = None
            if self._event is None and (eager or self._calls % self.every == 0):
                self._host.copy_(self.values, non_blocking=True)
                self._event = torch.cuda.Event()
                # the copy runs on the values' device's stream, which is not the current
                # device's when the model lives on another GPU
                self._event.record(torch.cuda.current_stream(self.values.device))
                self._pending_steps = steps
        if self._report is None:  # read-only: the same mapping is handed out until new values arrive
            self._report = MappingProxyType({**dict(zip(self.names, (int(v) for v in self._seen))),
                                             "steps": self._seen_steps})
        return self._report

    def idle_tick(self) -> bool:
        """On a GPU, when :meth:`poll` would do nothing but count the call (no copy due, none in
        flight): count it and return True. Else return False and count nothing: call
        :meth:`poll`."""
        if self._view is None and self._event is None and (self._calls + 1) % self.every:
            self._calls += 1
            return True
        return False

    def refresh(self, steps: int) -> None:
        """Wait for the device and make the values seen on the host exact as of step ``steps``."""
        self._seen = self.values.tolist()
        self._seen_steps = steps
        self._event = None
        self._report = None

    def exact(self) -> dict[str, int]:
        """Exact values (synchronises with the device: for ``state_dict`` and reports)."""
        return dict(zip(self.names, (int(v) for v in self.values.tolist())))
