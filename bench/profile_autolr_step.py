"""cProfile of the eager ``AutoLR.step`` on a GPU: where its host time goes, by function.

``--what step``: the scheduler of ``test_bench_triton.py``'s ``autolr-step`` (MLR-SNet H=50,
fused SGD with three param groups, a fixed gamma), stepped ``--steps`` times after a warm-up.
``--what meta``: the ResNet-18 training step of ``test_bench_training_step.py`` with a meta-step
every step (``--steps`` of them). Prints the wall time per step without and with the profiler
and the functions with the most own time::

    python bench/profile_autolr_step.py [--what step|meta] [--steps 3000] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

from autolr_fast import AutoLR, MLRSNet


def _scheduler_step():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from gpu_steps import autolr_over_three_groups

    sched, _ = autolr_over_three_groups()
    loss = torch.tensor(2.3, device="cuda")
    warnings.simplefilter("ignore")  # steps without optimizer.step() in between
    return lambda: sched.step(loss)


def _side_by_side(rounds: int = 15, calls: int = 1000) -> None:
    """Eager ``AutoLR.step``, one tiny Triton launch and a CUDA-graph replay of the step kernel,
    timed in this fresh process in interleaved rounds (medians per call): the host-overhead
    ratios of the GPU issue without the profiler-touched process of the benchmarks."""
    from test_bench_triton import StepInputs, make_step_variant  # bench/, beside this file

    variants = {name: make_step_variant(name, StepInputs(50, 1))
                for name in ("autolr-step", "floor-tiny-triton-kernel", "triton-cudagraph")}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        for _ in range(200):
            fn()
    torch.cuda.synchronize()
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    tiny, graph = med["floor-tiny-triton-kernel"], med["triton-cudagraph"]
    print(f"side by side (fresh process, {rounds} interleaved rounds of {calls} calls, medians):")
    for name, us in med.items():
        print(f"  {name:26s} {us:7.2f} us/call  {us / tiny:5.2f}x tiny launch  {us / graph:5.2f}x graph replay")


def _meta_training_step():
    import torchvision

    from autolr_fast import MetaConfig

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).cuda()
    batches = [(torch.randn(128, 3, 32, 32, device="cuda"), torch.randint(0, 10, (128,), device="cuda"))
               for _ in range(4)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
    loss_fn = torch.nn.functional.cross_entropy
    sched = AutoLR(opt, MLRSNet(), gamma=0.1, meta=MetaConfig(model, batches[::-1], loss_fn, interval=1))
    count = [0]

    def step():
        x, y = batches[count[0] % len(batches)]
        count[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        sched.step(loss)
        opt.step()

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", choices=("step", "meta"), default="step")
    p.add_argument("--steps", type=int, default=None, help="default: 3000 (step), 20 (meta)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    steps = args.steps or (3000 if args.what == "step" else 20)
    step = _scheduler_step() if args.what == "step" else _meta_training_step()
    for _ in range(200 if args.what == "step" else 3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    plain = (time.perf_counter() - start) / steps
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    profiled = (time.perf_counter() - start) / steps
    print(f"{args.what}: {plain * 1e6:.1f} us per step ({profiled * 1e6:.1f} us under cProfile), "
          f"{steps} steps, {torch.cuda.get_device_name(0)}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    if args.what == "step":
        _side_by_side()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
