"""Multi-process helpers: every rank must feed the controller the same value and hold the
same controller weights, so that every rank gets the same learning rate."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed(mode: bool | str = "auto") -> bool:
    """``mode="auto"``: True when a process group with more than one rank is initialised."""
    if mode == "auto":
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not isinstance(mode, bool):  # "false" or "off" would be truthy
        raise ValueError(f"distributed must be True, False or 'auto', got {mode!r}")
    if mode and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "distributed=True but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() first (torchrun does this for you)"
        )
    return bool(mode)


def mean_across_ranks(value: Tensor) -> Tensor:
    """The mean of ``value`` over all ranks (a new tensor; the all-reduce is enqueued on the
    device's stream, so NCCL costs no host sync)."""
    out = value.detach().to(torch.float32).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(dist.get_world_size())


def min_max_across_ranks(value: int, device: torch.device) -> tuple[int, int]:
    """The smallest and the largest of an integer over all ranks (one all-reduce, a host read)."""
    both = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return int(-both[1]), int(both[0])


def broadcast_from_rank0_(tensors: Iterable[Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's values (same weights everywhere)."""
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data if t.requires_grad else t, src=0)
