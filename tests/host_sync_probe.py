"""Count the operations that read a tensor's value on the host (a device sync on a GPU).

A ``TorchDispatchMode`` sees every ATen op that runs inside it, including the ones PyTorch calls
internally (``x[idx_tensor]`` reading ``idx_tensor``, ``if tensor:``, ``Tensor.item()``...), so it
catches C++-level reads that patching Python methods cannot. The benchmarks report the same count.
"""

from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops whose result needs a tensor's value on the host
HOST_READ_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "item"})


class HostReadCounter(TorchDispatchMode):
    """``with HostReadCounter() as probe: ...`` then ``probe.count`` and ``probe.ops`` (op -> n)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::", 1)[-1]
        if name in HOST_READ_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))
