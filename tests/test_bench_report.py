"""The benchmark report: rendering a hand-made pytest-benchmark JSON, and the ``bench`` command
in CI size (one fast benchmark file, a few rounds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autolr_experiments import bench_report

PNG = b"\x89PNG\r\n\x1a\n"
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def _bench(name, group, mean, extra=None):
    return {"name": name, "fullname": f"bench/test_x.py::{name}", "group": group, "params": None,
            "stats": {"mean": mean, "stddev": mean / 10, "median": mean, "min": mean, "max": mean, "rounds": 7},
            "extra_info": extra or {}}


SYNTHETIC = {
    "machine_info": {"cpu": {"brand_raw": "Test CPU 3000", "count": 2}, "python_version": "3.11.0",
                     "torch": "2.99", "torch_threads": 1, "gpu": None},
    "datetime": "2026-01-01T00:00:00",
    "benchmarks": [
        _bench("test_step_cosine", "step (cpu)", 2e-3, {"baseline": True, "host_syncs_per_step": 0.0}),
        _bench("test_step_autolr", "step (cpu)", 3e-3, {"host_syncs_per_step": 0.0}),
        _bench("test_meta_every_step", "meta", 9e-3, {"peak_mem_mib": 12.5}),
        _bench("test_plain_baseline", "meta", 3e-3),
        _bench("test_lonely", "no reference", 5e-6),
    ],
}


def test_render_markdown_groups_and_ratios():
    md = bench_report.render_markdown(SYNTHETIC)
    assert "Test CPU 3000 (2 cores)" in md and "torch 2.99" in md and "GPU: none" in md
    lines = {line.split("|")[2].strip(): line for line in md.splitlines() if line.startswith("| ") and "test_" in line}
    assert "1.00 (baseline)" in lines["test_step_cosine"]
    assert "1.50x" in lines["test_step_autolr"]  # 3 ms / 2 ms, flagged baseline
    assert "3.00x" in lines["test_meta_every_step"]  # 9 ms / 3 ms, baseline by name
    assert "peak_mem_mib=12.5" in lines["test_meta_every_step"]
    assert "| - |" in lines["test_lonely"]  # no reference in its group: no ratio
    assert "2 ms ± 200 µs" in lines["test_step_cosine"] and "5 µs" in lines["test_lonely"]


def test_render_writes_table_and_chart(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps(SYNTHETIC))
    md, png = bench_report.render(src, tmp_path / "out")
    assert md.read_text().startswith("# Overhead benchmarks")
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    assert bench_report.main(["--render", str(src), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "bench.png").is_file()


def test_render_rejects_other_json(tmp_path):
    with pytest.raises(ValueError, match="pytest-benchmark"):
        bench_report.render_markdown({"nope": 1})
    with pytest.raises(ValueError, match="name"):
        bench_report.render_markdown({"benchmarks": [{"group": "g"}]})


def test_bench_command_quick(tmp_path, monkeypatch):
    """The real command on the CPU training-step pair (a few rounds), run from another folder."""
    monkeypatch.chdir(tmp_path)
    files = [str(BENCH_DIR / "test_bench_training_step.py")]
    rc = bench_report.main(["--quick", "--files", *files, "-k", "cnn_step", "--out", "out"])
    out = tmp_path / "out"
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    names = {b["name"]: b for b in data["benchmarks"]}
    assert "test_cnn_step_cosine" in names
    assert names["test_cnn_step_cosine"]["extra_info"]["baseline"] is True
    for b in names.values():
        assert b["stats"]["rounds"] >= 3 and b["stats"]["mean"] > 0
        assert b["extra_info"]["host_syncs_per_step"] >= 0
    if "test_cnn_step_autolr" in names:  # needs the published checkpoints
        # AutoLR reads nothing on the host per step
        assert names["test_cnn_step_autolr"]["extra_info"]["host_syncs_per_step"] == 0
    md = (out / "bench.md").read_text()
    assert "mnist1d-cnn step (cpu)" in md and "1.00 (baseline)" in md
    assert (out / "bench.png").read_bytes()[:8] == PNG


def test_bench_command_reports_missing_files(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        bench_report.main(["--files", str(tmp_path / "nope.py"), "--out", str(tmp_path)])


def test_bench_dir_is_found_from_the_checkout_or_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench_report.find_bench_dir() == BENCH_DIR  # no ./bench here: the checkout's
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "conftest.py").write_text("")
    assert bench_report.find_bench_dir() == tmp_path / "bench"  # ./bench first
    with pytest.raises(SystemExit, match="--bench-dir"):
        bench_report.find_bench_dir(str(tmp_path / "elsewhere"))


def _gpu_figures():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_figures", BENCH_DIR / "gpu_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_figures_reads_one_run_into_the_issue_table(tmp_path, capsys):
    """The GPU check's figures: ratios of medians of the same run and the fresh process's
    side-by-side lines, each against its target; rows the run lacks say so."""
    figures = _gpu_figures()
    bench = {"benchmarks": [
        _bench("test_device_work[autolr-step]", "device work", 2e-5,
               {"kernels_per_step": 1.0, "syncs_per_step": 0.0}),
        _bench("test_step[autolr-step-H50-L1]", "step", 2.5e-3),
        _bench("test_step[floor-tiny-triton-kernel-H50-L1]", "step", 2.0e-3),
        _bench("test_step[triton-cudagraph-H50-L1]", "step", 1.0e-3),
        _bench("test_resnet18_interleaved", "inter", 0.25, {"autolr-defaults_over_cosine_median": 1.004,
                                                            "autolr-published-controller_over_cosine_median": 1.02,
                                                            "published-eager-float_over_cosine_median": 1.1}),
        _bench("test_resnet18_plain_autolr_step", "meta", 6e-3, {"peak_mem_mib": 111.2}),
        _bench("test_resnet18_meta_step_every_step[batched]", "meta", 12e-3, {"peak_mem_mib": 199.8}),
        _bench("test_resnet18_meta_step_every_step[streamed]", "meta", 13.2e-3, {"peak_mem_mib": 164.0}),
    ]}
    profile = ("step: 14.5 us per step\nside by side (fresh process, 15 interleaved rounds of 1000 calls, medians):\n"
               "  autolr-step                  14.22 us/call   1.28x tiny launch   2.34x graph replay\n"
               "  floor-tiny-triton-kernel     11.11 us/call   1.00x tiny launch   1.83x graph replay\n")
    rows = {what: (measured, target, met) for what, measured, target, met in figures.figures(bench, profile)}
    assert rows["kernels / host syncs per steady-state AutoLR.step (profiler)"] == ("1 / 0", "1 / 0", "yes")
    assert rows["eager step / tiny Triton launch, fresh process"] == ("1.28x", "<= 1.3x", "yes")
    assert rows["eager step / one-kernel graph replay, fresh process"] == ("2.34x", "<= 2.0x", "no")
    assert rows["eager step / tiny Triton launch, benchmark process (H50-L1)"] == ("1.25x", "<= 1.3x", "yes")
    assert rows["eager step / one-kernel graph replay, benchmark process (H50-L1)"][::2] == ("2.50x", "no")
    assert rows["eager step / tiny Triton launch, benchmark process (H128-L2)"] == ("not measured", "<= 1.3x", "-")
    assert rows["ResNet-18 step, AutoLR defaults / cosine (interleaved medians)"][::2] == ("1.004x", "yes")
    assert rows["ResNet-18 step, AutoLR published controller / cosine (interleaved medians)"][::2] == ("1.020x", "no")
    assert rows["meta-step every step / plain step, ResNet-18 (batched)"] == ("2.00x", "<= 2.1x", "yes")
    assert rows["meta-step every step / plain step, ResNet-18 (streamed)"][::2] == ("2.20x", "no")
    assert rows["peak memory above the model: plain / meta streamed / meta batched"][0] == "111 / 164 / 200 MiB"
    assert rows["ResNet-18 training step with AutoLR.step, CUDA-graph replay vs eager"][0] == "not measured"
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    assert figures.main(["--bench", str(path)]) == 0  # no profile log: the fresh-process rows are missing
    out = capsys.readouterr().out
    assert out.startswith("| figure | measured | target | met |")
    assert "| eager step / tiny Triton launch, fresh process | not measured | <= 1.3x | - |" in out
    assert figures.main(["--bench", str(tmp_path / "missing.json")]) == 2
