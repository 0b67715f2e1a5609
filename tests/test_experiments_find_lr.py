"""``python -m autolr_fast find-lr``: the range test on a harness task, quick, mid-training."""

import json
import math

import pytest

from autolr_experiments.find_lr import main


def test_cli_quick(tmp_path):
    out, png = tmp_path / "f.json", tmp_path / "f.png"
    args = ["--task", "regress-sin", "--quick", "--horizons", "1", "4", "--out", str(out), "--plot", str(png)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["horizons"] == [1, 4] and data["settings"]["task"] == "regress-sin"
    assert math.isfinite(data["suggestion"]) and png.stat().st_size > 1000


def test_cli_quick_mid_training(tmp_path):
    out = tmp_path / "f.json"
    args = ["--task", "regress-sin", "--quick", "--pretrain-steps", "20", "--out", str(out),
            "--plot", str(tmp_path / "p.png")]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["pretrain_steps"] == 20 and math.isfinite(data["suggestion"])


@pytest.mark.parametrize("command", ["find-lr", "collect"])
def test_unknown_task_is_a_usage_error_not_a_traceback(command, capsys):
    from autolr_fast.__main__ import main as cli

    with pytest.raises(SystemExit) as exc:
        cli([command, "--task", "no-such-task"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'no-such-task'" in err and "mnist1d-cnn" in err and "Traceback" not in err


def test_cli_task_optimizer_around_its_default(tmp_path, capsys):
    """--optimizer task --around-default: the task's own optimizer, rates default/10 .. x10."""
    out = tmp_path / "f.json"
    args = ["--task", "diabetes-mlp", "--optimizer", "task", "--around-default", "--num", "5", "--horizons", "3",
            "--smoothing", "1", "--out", str(out), "--plot", str(tmp_path / "p.png")]
    assert main(args) == 0
    data = json.loads(out.read_text())
    rates = data["rates"]["3"]
    assert rates[0] == pytest.approx(1e-4) and len(rates) <= 5  # diabetes-mlp: Adam at 1e-3
    assert "suggestion / default lr 0.001" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs --optimizer task"):
        main(["--task", "diabetes-mlp", "--around-default"])


def test_a_folder_as_out_is_refused_before_the_work(tmp_path):
    with pytest.raises(SystemExit, match="is a folder"):
        main(["--quick", "--out", str(tmp_path)])
