"""``python -m autolr_fast bench``: run the overhead benchmarks in ``bench/`` with pytest-benchmark
and render the result as a Markdown table and a PNG bar chart.

The benchmarks are part of the source checkout, not of the installed package: ``--bench-dir``
(default: ``bench/`` in the current directory, else the one of the checkout this package was
installed from in editable mode). Every ``test_bench_*.py`` there runs (or the files given with
``--files``); their JSON
(``bench.json``) is rendered to ``bench.md`` and ``bench.png`` in the output folder. Rows are
grouped by the benchmark's ``group``; each row's mean time is shown as a ratio to its group's
baseline (the benchmark with ``extra_info["baseline"] = True``, else one whose name contains
``baseline``). ``--render FILE`` only renders an existing pytest-benchmark JSON.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .json_files import read_json
from .report import color_cycle, fmt, markdown_table, plt, save_figure

#: ``bench/`` of the source checkout next to this package (an editable install), if there is one.
CHECKOUT_BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
#: pytest-benchmark options of ``--quick`` (a few rounds, no warm-up: checks that everything runs).
QUICK_OPTIONS = ["--benchmark-min-rounds=3", "--benchmark-max-time=0.02", "--benchmark-warmup=off"]


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _is_baseline(bench: dict) -> bool:
    return bool((bench.get("extra_info") or {}).get("baseline"))


def group_benchmarks(data: dict) -> dict[str, list[dict]]:
    """Benchmarks of a pytest-benchmark JSON by group (``name`` of the file when none), in order."""
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError("not a pytest-benchmark JSON file: expected a top-level 'benchmarks' list")
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        if "stats" not in b or "name" not in b:
            raise ValueError(f"benchmark entry without 'name'/'stats': {sorted(b)}")
        group = b.get("group") or b.get("fullname", b["name"]).split("::")[0]
        groups.setdefault(group, []).append(b)
    return groups


def find_baseline(benches: list[dict]) -> dict | None:
    """The group's reference: ``extra_info["baseline"]`` if any is flagged, else a name with
    ``baseline`` in it, else None (no ratios for that group)."""
    flagged = [b for b in benches if _is_baseline(b)]
    if flagged:
        return flagged[0]
    named = [b for b in benches if "baseline" in b["name"].lower()]
    return named[0] if named else None


def _extra(bench: dict) -> str:
    items = []
    for k, v in (bench.get("extra_info") or {}).items():
        if k == "baseline":
            continue
        items.append(f"{k}={fmt(v) if isinstance(v, float) else v}")
    return ", ".join(items) or "-"


def machine_summary(data: dict) -> str:
    m = data.get("machine_info") or {}
    cpu = m.get("cpu_model") or (m.get("cpu") or {}).get("brand_raw") or m.get("processor") or "unknown CPU"
    cores = (m.get("cpu") or {}).get("count")
    parts = [f"CPU: {cpu}" + (f" ({cores} cores)" if cores else "")]
    if m.get("torch"):
        parts.append(f"torch {m['torch']}" + (f", {m['torch_threads']} thread(s)" if m.get("torch_threads") else ""))
    parts.append(f"GPU: {m.get('gpu') or 'none'}")
    if m.get("python_version"):
        parts.append(f"Python {m['python_version']}")
    return "; ".join(parts)


def render_markdown(data: dict, title: str = "Overhead benchmarks") -> str:
    groups = group_benchmarks(data)
    out = [f"# {title}", "", f"Machine: {machine_summary(data)}  "]
    if data.get("datetime"):
        out.append(f"Run: {data['datetime']}  ")
    out += ["Times per call (mean ± std, median); `vs baseline`: mean / the group's baseline mean (and the "
            "same for medians, steadier on a busy machine).", ""]
    headers = ["group", "benchmark", "mean ± std", "median", "rounds", "vs baseline", "extra"]
    rows = []
    for group, benches in groups.items():
        base = find_baseline(benches)
        for b in benches:
            s = b["stats"]
            if base is None:
                ratio = "-"
            elif b is base:
                ratio = "1.00 (baseline)"
            else:
                ratio = f"{s['mean'] / base['stats']['mean']:.2f}x"
                if s.get("median") and base["stats"].get("median"):
                    ratio += f" (median {s['median'] / base['stats']['median']:.2f}x)"
            rows.append([group, b["name"], f"{_time(s['mean'])} ± {_time(s.get('stddev'))}", _time(s.get("median")),
                         s.get("rounds", "-"), ratio, _extra(b)])
    out.append(markdown_table(headers, rows, "llrrrrl"))
    out.append("")
    return "\n".join(out)


def render_chart(data: dict, path: str | Path) -> Path:
    """One horizontal bar panel per group: mean time per call (error bar: std), ratio labels."""
    groups = group_benchmarks(data)
    n = max(len(groups), 1)
    heights = [max(len(b), 1) * 0.45 + 0.9 for b in groups.values()] or [1.5]
    fig, axes = plt.subplots(n, 1, figsize=(9, sum(heights)), gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (group, benches) in zip(axes[:, 0], groups.items(), strict=False):  # no groups: one empty panel
        base = find_baseline(benches)
        means = [b["stats"]["mean"] for b in benches]
        scale, unit = (1e-3, "ms") if max(means) >= 1e-3 else (1e-6, "µs")
        colors = color_cycle(len(benches))
        y = list(range(len(benches)))
        stds = [(b["stats"].get("stddev") or 0.0) for b in benches]
        # error bar: one std, clipped at zero on the left
        xerr = [[min(sd, m) / scale for sd, m in zip(stds, means, strict=True)], [sd / scale for sd in stds]]
        ax.barh(y, [m / scale for m in means], xerr=xerr, color=colors, alpha=0.85, ecolor="0.4", capsize=3)
        ax.set_yticks(y)
        ax.set_yticklabels([b["name"] for b in benches], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"time per call ({unit})")
        ax.set_title(group, fontsize=10)
        if base is not None:
            for yi, m, sd in zip(y, means, stds, strict=True):
                ax.text((m + sd) / scale, yi, f"  {m / base['stats']['mean']:.2f}x", va="center", fontsize=8)
        ax.set_xlim(left=0)
        ax.margins(x=0.15)
    return save_figure(fig, path)


def render(json_path: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Render a pytest-benchmark JSON to ``bench.md`` and ``bench.png`` in ``out_dir``."""
    data = read_json(json_path, "a pytest-benchmark JSON", ("benchmarks",))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "bench.md"
    md.write_text(render_markdown(data))
    png = render_chart(data, out_dir / "bench.png")
    return md, png


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def find_bench_dir(given: str | None = None) -> Path:
    """``given``, else ``./bench``, else the checkout's ``bench/``; SystemExit saying where it looked."""
    candidates = [Path(given)] if given else [Path.cwd() / "bench", CHECKOUT_BENCH_DIR]
    for folder in candidates:
        if (folder / "conftest.py").is_file():
            return folder.resolve()
    raise SystemExit(f"[bench] no benchmark folder (bench/ with conftest.py) at {' or '.join(map(str, candidates))}; "
                     "the benchmarks are part of the source checkout, not of the installed package: run from the "
                     "checkout or pass --bench-dir")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autolr_fast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few rounds, no warm-up (checks that everything runs; "
                   "numbers are rough)")
    p.add_argument("--out", default="results/bench", help="output folder (default results/bench)")
    p.add_argument("--bench-dir", default=None, help="the benchmark folder (default: ./bench, else the source "
                   "checkout's bench/)")
    p.add_argument("--files", nargs="+", default=None, help="benchmark files (default: BENCH_DIR/test_bench_*.py)")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to select benchmarks")
    p.add_argument("--render", metavar="JSON", default=None, help="only render this pytest-benchmark JSON")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments after --, e.g. -- --benchmark-min-rounds=5")
    return p


def _benchmark_files(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The benchmark folder and the files to run (SystemExit with the reason if there are none)."""
    if args.files:
        files = [Path(f).resolve() for f in args.files]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SystemExit(f"[bench] benchmark file(s) not found: {', '.join(missing)}")
        return find_bench_dir(args.bench_dir or str(files[0].parent)), files
    bench_dir = find_bench_dir(args.bench_dir)
    files = sorted(bench_dir.glob("test_bench_*.py"))
    if not files:
        raise SystemExit(f"[bench] no benchmark files (test_bench_*.py) in {bench_dir}")
    return bench_dir, files


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        md, png = render(args.render, out)
        print(md.read_text())
        print(f"[bench] wrote {md} and {png}", file=sys.stderr)
        return 0
    bench_dir, files = _benchmark_files(args)
    json_path = out.resolve() / "bench.json"
    json_path.unlink(missing_ok=True)  # never render a stale result
    cmd = [sys.executable, "-m", "pytest", *map(str, files), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={json_path}", "--benchmark-sort=name", "--benchmark-columns=mean,stddev,median,rounds"]
    if args.quick:
        cmd += QUICK_OPTIONS
    if args.keyword:
        cmd += ["-k", args.keyword]
    cmd += args.pytest_args
    print("[bench] " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, cwd=bench_dir.parent)
    if not json_path.is_file():
        print(f"[bench] pytest exited with {proc.returncode} and wrote no {json_path}", file=sys.stderr)
        return proc.returncode or 1
    md, png = render(json_path, out)
    print(md.read_text())
    print(f"[bench] wrote {json_path}, {md} and {png}", file=sys.stderr)
    return proc.returncode
