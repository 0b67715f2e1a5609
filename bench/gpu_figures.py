"""The GPU issue's figures, read from one run of ``.ci/gpu-check``: a markdown table.

Reads the GPU benchmarks' pytest-benchmark JSON and ``profile_autolr_step.py``'s log of the
same run and prints each figure with its target and whether it was met (``-`` where the run
has no such row)::

    python bench/gpu_figures.py --bench results/gpu-work/bench-gpu/bench.json \\
        --profile results/gpu-work/profile.log

Ratios are of medians of rows of the same run (the benchmark process), or of the fresh
process's interleaved side-by-side timings (the profile log).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

SIDE_BY_SIDE = re.compile(r"^\s+(\S+)\s+([\d.]+) us/call\s+([\d.]+)x tiny launch\s+([\d.]+)x graph replay")


def _rows(bench: dict) -> dict[str, dict]:
    return {b["name"]: b for b in bench.get("benchmarks", [])}


def _median(rows: dict, name: str) -> float | None:
    row = rows.get(name)
    return None if row is None else float(row["stats"]["median"])


def _ratio(rows: dict, num: str, den: str) -> float | None:
    a, b = _median(rows, num), _median(rows, den)
    return None if a is None or b is None or b <= 0 else a / b


def side_by_side(profile_text: str) -> dict[str, tuple[float, float, float]]:
    """``name -> (us per call, x tiny launch, x graph replay)`` from the fresh process's lines."""
    out = {}
    for line in profile_text.splitlines():
        m = SIDE_BY_SIDE.match(line)
        if m:
            out[m.group(1)] = (float(m.group(2)), float(m.group(3)), float(m.group(4)))
    return out


def figures(bench: dict, profile_text: str = "") -> list[tuple[str, str, str, str]]:
    """``(figure, measured, target, met)`` rows."""
    rows = _rows(bench)
    out: list[tuple[str, str, str, str]] = []

    def add(what: str, value: float | None, target: float | None, fmt: str = "{:.2f}x") -> None:
        if value is None:
            out.append((what, "not measured", "-" if target is None else f"<= {target}x", "-"))
            return
        met = "-" if target is None else ("yes" if value <= target else "no")
        out.append((what, fmt.format(value), "-" if target is None else f"<= {target}x", met))

    work = rows.get("test_device_work[autolr-step]", {}).get("extra_info", {})
    if work:
        kernels, syncs = work.get("kernels_per_step"), work.get("syncs_per_step")
        out.append(("kernels / host syncs per steady-state AutoLR.step (profiler)", f"{kernels:g} / {syncs:g}",
                    "1 / 0", "yes" if kernels == 1 and syncs == 0 else "no"))
    else:
        out.append(("kernels / host syncs per steady-state AutoLR.step (profiler)", "not measured", "1 / 0", "-"))
    fresh = side_by_side(profile_text).get("autolr-step")
    add("eager step / tiny Triton launch, fresh process", fresh and fresh[1], 1.3)
    add("eager step / one-kernel graph replay, fresh process", fresh and fresh[2], 2.0)
    for size in ("H50-L1", "H128-L2"):
        step = f"test_step[autolr-step-{size}]"
        add(f"eager step / tiny Triton launch, benchmark process ({size})",
            _ratio(rows, step, f"test_step[floor-tiny-triton-kernel-{size}]"), 1.3)
        add(f"eager step / one-kernel graph replay, benchmark process ({size})",
            _ratio(rows, step, f"test_step[triton-cudagraph-{size}]"), 2.0)
    inter = rows.get("test_resnet18_interleaved", {}).get("extra_info", {})
    add("ResNet-18 step, AutoLR defaults / cosine (interleaved medians)",
        inter.get("autolr-defaults_over_cosine_median"), 1.01, "{:.3f}x")
    add("ResNet-18 step, AutoLR published controller / cosine (interleaved medians)",
        inter.get("autolr-published-controller_over_cosine_median"), 1.01, "{:.3f}x")
    add("ResNet-18 step, published eager step with float(lr) / cosine (baseline)",
        inter.get("published-eager-float_over_cosine_median"), None, "{:.3f}x")
    plain = "test_resnet18_plain_autolr_step"
    for mode in ("batched", "streamed"):
        name = f"test_resnet18_meta_step_every_step[{mode}]"
        add(f"meta-step every step / plain step, ResNet-18 ({mode})", _ratio(rows, name, plain), 2.1)
    mems = [rows.get(n, {}).get("extra_info", {}).get("peak_mem_mib") for n in
            (plain, "test_resnet18_meta_step_every_step[streamed]", "test_resnet18_meta_step_every_step[batched]")]
    if all(m is not None for m in mems):
        out.append(("peak memory above the model: plain / meta streamed / meta batched",
                    " / ".join(f"{m:.0f}" for m in mems) + " MiB", "-", "-"))
    graph = _median(rows, "test_resnet18_step_in_a_cuda_graph[cuda-graph]")
    eager = _median(rows, "test_resnet18_step_in_a_cuda_graph[eager]")
    out.append(("ResNet-18 training step with AutoLR.step, CUDA-graph replay vs eager",
                "not measured" if graph is None or eager is None else f"{graph * 1e3:.2f} ms vs {eager * 1e3:.2f} ms",
                "replays", "-" if graph is None else "yes"))
    return out


def render(rows: list[tuple[str, str, str, str]]) -> str:
    lines = ["| figure | measured | target | met |", "| :--- | ---: | :--- | :--- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, help="the GPU benchmarks' pytest-benchmark JSON")
    p.add_argument("--profile", default=None, help="profile_autolr_step.py's log of the same run")
    args = p.parse_args(argv)
    bench_path = Path(args.bench)
    if not bench_path.is_file():
        print(f"no benchmark JSON at {bench_path}: run the bench-gpu stage first", file=sys.stderr)
        return 2
    profile = Path(args.profile).read_text() if args.profile and Path(args.profile).is_file() else ""
    print(render(figures(json.loads(bench_path.read_text()), profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
