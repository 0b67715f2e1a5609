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
