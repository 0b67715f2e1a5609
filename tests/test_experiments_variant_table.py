"""variant-table: controller variants against autolr, counted on the tasks every variant ran on."""

import json

import pytest

from autolr_experiments import variant_table


def _row(task, method, metric, setting="as shipped", diverged=0):
    return {"task": task, "method": method, "setting": setting, "final_metric": metric, "diverged": diverged}


def _budget(task, cls, tuned, best_free):
    rows = [{"label": "cosine tuned (grid on a validation split, then 1 run)", "method": "cosine",
             "setting": "picked on validation", "final_metric": tuned},
            {"label": "AutoLR (defaults)", "method": "autolr", "setting": "as shipped", "final_metric": 99.0},
            {"label": "DoG", "method": "dog", "setting": "as shipped", "final_metric": best_free}]
    return {"task": task, "classification": cls, "rows": rows}


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


def test_counts_on_the_common_tasks(tmp_path):
    base = _write(tmp_path / "base.json", {"summary": [
        _row("acc", "cosine", 0.90, "best = default"), _row("acc", "autolr", 0.92),
        _row("mse", "cosine", 1.0, "best = default"), _row("mse", "autolr", 0.5),
        _row("other", "cosine", 0.5, "best = default"), _row("other", "autolr", 0.6)]})
    variant = _write(tmp_path / "v.json", {"summary": [
        _row("acc", "autolr-file", 0.93), _row("mse", "autolr-file", 0.9, diverged=1)]})
    ref = _write(tmp_path / "ref.json", {"equal_budget": [
        _budget("acc", True, 0.93, 0.925), _budget("mse", False, 0.45, 0.6), _budget("other", True, 0.6, 0.7)]})
    out = tmp_path / "out"
    assert variant_table.main(["--base", base, "--variant", f"v={variant}:autolr-file", "--reference", ref,
                               "--out", str(out)]) == 0
    result = json.loads((out / "variant_table.json").read_text())
    assert [e["task"] for e in result["tasks"]] == ["acc", "mse"]  # "other": the variant did not run there
    # autolr: 0.92 is 1 point below tuned 0.93; 0.5 is above 1.1 x 0.45
    assert result["counts"]["autolr"] == {"tasks": 2, "diverged_runs": 0, "ge_cosine_default": 2,
                                          "close_to_tuned": 0, "beats_best_tuning_free": 1,
                                          "better_than_reference": 0, "worse_than_reference": 0}
    # acc: 0.93 >= cosine, close, beats DoG (0.925), better than autolr; mse: 0.9 <= 1.0, not within 10 % of
    # 0.45, not below DoG's 0.6, worse than autolr's 0.5
    assert result["counts"]["v"] == {"tasks": 2, "diverged_runs": 1, "ge_cosine_default": 2, "close_to_tuned": 1,
                                     "beats_best_tuning_free": 1, "better_than_reference": 1, "worse_than_reference": 1}
    assert (out / "variant_table.png").stat().st_size > 0
    assert "| better than `autolr` | - | 1 |" in (out / "variant_table.md").read_text()
    assert variant_table.main(["--base", base, "--against", "cosine", "--variant", f"v={variant}:autolr-file",
                               "--reference", ref, "--out", str(out)]) == 0
    assert json.loads((out / "variant_table.json").read_text())["counts"]["v"]["better_than_reference"] == 2
    with pytest.raises(SystemExit, match="no runs of method 'autolr-progress'"):
        variant_table.main(["--base", base, "--variant", f"v={variant}:autolr-progress", "--reference", ref,
                            "--out", str(out)])


def test_variant_spec_is_label_path_method():
    v = variant_table.parse_variant("seed 2=results/a:b/compare.json:autolr-file")
    assert (v.label, v.path, v.method) == ("seed 2", "results/a:b/compare.json", "autolr-file")
    with pytest.raises(Exception, match="LABEL=PATH"):
        variant_table.parse_variant("no-method-here")
