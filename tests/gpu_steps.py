"""GPU set-ups shared by the GPU tests and the GPU benchmarks (``bench/`` imports them)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from autolr_fast import AutoLR, MLRSNet

SCALES = (1.0, 0.5, 2.0)


def autolr_over_three_groups(hidden: int = 50, layers: int = 1,
                             gamma: float = 0.5) -> tuple[AutoLR, torch.optim.Optimizer]:
    """``AutoLR`` (a fixed gamma) with an ``MLRSNet(hidden, layers)`` over a fused SGD of three
    param groups whose lrs are in the ratios of ``SCALES``; gradients exist, so ``step`` may be
    called at once (repeatedly, without ``optimizer.step()``: it warns once about that)."""
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in SCALES]).cuda()
    groups = [{"params": m.parameters(), "lr": 0.1 * s} for m, s in zip(model, SCALES, strict=True)]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, fused=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return AutoLR(opt, MLRSNet(hidden, layers).cuda(), gamma=gamma), opt


def warm_up_for_capture(training_step: Callable[[], torch.Tensor], sched: AutoLR, steps: int = 3) -> None:
    """``steps`` eager calls of ``training_step`` (forward, backward, ``sched.step``,
    ``optimizer.step``) on a side stream, as torch.cuda.graphs asks before a capture (the scale is
    decided there), then ``sched.synchronize()``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(steps):
            training_step()
    torch.cuda.current_stream().wait_stream(side)
    sched.synchronize()


def capture_training_step(training_step: Callable[[], torch.Tensor],
                          optimizer: torch.optim.Optimizer) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``training_step`` (returning the loss) captured in a CUDA graph, after
    :func:`warm_up_for_capture`: ``(graph, static loss)``."""
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = training_step()
    return graph, static_loss
