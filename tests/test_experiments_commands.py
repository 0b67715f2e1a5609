"""The demo and meta-training commands in their quick form: records, plots, the shipped file."""

import json

import pytest
import torch

from autolr_experiments import demo, meta_train
from autolr_fast import load_controller
from autolr_fast.controllers.pretrained import PRETRAINED_DIR


def test_meta_train_quick_writes_record_plot_and_shipped_file(tmp_path):
    shipped = tmp_path / "ship" / "mnist1d-cnn.pt"
    before = sorted(PRETRAINED_DIR.iterdir())
    assert meta_train.main(["--quick", "--epochs", "2", "--out", str(tmp_path), "--ship", str(shipped)]) == 0
    record = json.loads((tmp_path / "record.json").read_text())
    names = {r["name"] for r in record["runs"]}
    assert names == {"meta", "cosine", "constant", "pretrained"}
    for r in record["runs"]:
        assert len(r["epochs"]) == 2 and len(r["rates"]) == 2 * 35
        assert all(0 <= e["test_acc"] <= 1 for e in r["epochs"])
    meta = [r for r in record["runs"] if r["name"] == "meta"][0]
    assert meta["extra"]["meta_steps"] == 70 // 5
    assert (tmp_path / "meta_train.png").stat().st_size > 10_000
    assert "| meta |" in (tmp_path / "summary.md").read_text()
    ctrl = load_controller(shipped)  # written where asked, not into the package
    assert ctrl.default_gamma > 0 and ctrl.info["seed"] == 0
    assert sorted(PRETRAINED_DIR.iterdir()) == before


def test_demo_quick(tmp_path):
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "demo.json").read_text())
    runs = record["runs"]
    assert [len(r["epochs"]) for r in runs] == [3, 3]
    assert [r["name"] for r in runs] == [demo.AUTOLR_NAME, demo.COSINE_NAME]
    assert set(record["summary"]) == {demo.AUTOLR_NAME, demo.COSINE_NAME}
    # the default scale: a warm-up over 5 % of the run to the optimizer's lr, the peak (times the
    # controller's near-flat factor), then linear to 1 / (decay + 1) of it over the last 20 %
    rates = runs[0]["rates"]
    warmup, decay = round(0.05 * len(rates)), round(0.2 * len(rates))
    assert abs(rates[0] - demo.DEMO_LR / warmup) < 1e-6 and abs(rates[warmup - 1] - demo.DEMO_LR) < 1e-3 * demo.DEMO_LR
    middle = rates[len(rates) // 2]
    assert 0.9 * demo.DEMO_LR < middle < 1.1 * demo.DEMO_LR
    assert rates[-1] == pytest.approx(middle / (decay + 1), rel=0.1)
    assert (tmp_path / "demo.png").is_file()


def test_meta_train_family_quick_writes_controller_record_and_ships(tmp_path):
    ship = tmp_path / "weights"
    before = sorted(PRETRAINED_DIR.iterdir())
    out = tmp_path / "out"
    assert meta_train.main(["--family", "--quick", "--out", str(out), "--ship", str(ship)]) == 0
    ctrl = load_controller(ship / "default.pt")
    card = json.loads((ship / "default.json").read_text())
    tasks = {r.task for r in meta_train.FAMILY[:4]}
    assert set(ctrl.info["tasks"]) == set(card["tasks"]) == tasks
    assert not tasks & meta_train.held_out_tasks()  # compare can mark leave-one-task-out
    assert card["command"].startswith("python -m autolr_fast meta-train --family")
    record = json.loads((out / "record.json").read_text())
    runs = record["family_runs"]
    assert [r["task"] for r in runs] == [r.task for r in meta_train.FAMILY[:4]]
    assert all(r["meta_steps"] > 0 and r["status"] == "ok" for r in runs)
    # the lr anchor: every run starts at its optimizer's lr (p_t / p* = 1 at step 0)
    assert all(abs(r["p_rel"][0] - 1.0) < 1e-4 for r in runs)
    assert {r["method"] for r in record["check"]} == {"cosine", "default", "fresh"}
    assert (out / "family_p.png").stat().st_size > 10_000 and (out / "summary.md").is_file()
    assert sorted(PRETRAINED_DIR.iterdir()) == before


def test_meta_train_family_horizon_moves_theta(tmp_path):
    """The k-steps-later objective (``--horizon``) takes meta-steps and changes the controller."""
    out = tmp_path / "out"
    assert meta_train.main(["--family", "--quick", "--horizon", "3", "--check-seeds", "0", "--out", str(out)]) == 0
    runs = json.loads((out / "record.json").read_text())["family_runs"]
    assert all(r["meta_steps"] > 0 for r in runs)
    moved = load_controller(out / "default.pt").state_dict()
    fresh = meta_train.fresh_controller().state_dict()
    assert any(not torch.equal(moved[k], fresh[k]) for k in moved if k not in ("h", "c"))


def test_meta_train_family_lr_spread_runs_every_setting_at_three_rates(tmp_path):
    out = tmp_path / "out"
    assert meta_train.main(["--family", "--quick", "--lr-spread", "3", "--check-seeds", "0", "--out", str(out)]) == 0
    runs = json.loads((out / "record.json").read_text())["family_runs"]
    want = [r.lr * f for r in meta_train.FAMILY[:4] for f in (1 / 3, 1.0, 3.0)]
    assert [r["lr"] for r in runs] == pytest.approx(want)
    assert json.loads((out / "default.json").read_text())["settings"]["lr_spread"] == 3


def test_meta_train_family_warmup_trains_and_checks_under_the_warm_up(tmp_path):
    out = tmp_path / "out"
    assert meta_train.main(["--family", "--quick", "--warmup", "--out", str(out)]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["info"]["settings"]["warmup"] is True
    for r in record["family_runs"]:  # p_t / p* is relative to the warm-up envelope: 1 at the start
        assert abs(r["p_rel"][0] - 1.0) < 1e-4
    assert {r["method"] for r in record["check"]} == {"cosine", "cosine-warmup", "default", "fresh"}


def test_meta_train_family_exclude_task_leaves_its_runs_out(tmp_path):
    out = tmp_path / "out"
    assert meta_train.main(["--family", "--quick", "--exclude-task", "regress-exp", "--check-seeds", "0",
                            "--out", str(out)]) == 0
    runs = json.loads((out / "record.json").read_text())["family_runs"]
    assert runs and "regress-exp" not in {r["task"] for r in runs}
    assert "regress-exp" not in load_controller(out / "default.pt").info["tasks"]
    assert load_controller(out / "default.pt").info["name"] == "default without regress-exp"
    with pytest.raises(ValueError, match="not in the training family"):
        meta_train.leave_one_task_out("digits-mlp", tmp_path / "x.pt", epochs=1)
    # leaving a task out leaves out its data: both MNIST-1D models train on the same samples
    assert not {r.task for r in meta_train.family_without("mnist1d-cnn")} & {"mnist1d-cnn", "mnist1d-mlp"}
    assert {r.task for r in meta_train.family_without("regress-exp")} >= {"mnist1d-cnn", "mnist1d-mlp"}
    with pytest.raises(SystemExit, match="not in the training family"):
        meta_train.main(["--family", "--quick", "--exclude-task", "regress-xp", "--out", str(out)])
    with pytest.raises(SystemExit, match="drop --ship"):
        meta_train.main(["--family", "--quick", "--exclude-task", "regress-exp", "--ship", str(tmp_path / "w")])


def test_normalised_loss_input_divides_by_the_first_finite_loss():
    seen = []
    step = meta_train.normalised_by_first_loss(seen.append)
    for x in (float("nan"), 4.0, 2.0, 1.0):
        step(torch.tensor(x))
    assert torch.isnan(seen[0]) and [float(v) for v in seen[1:]] == [1.0, 0.5, 0.25]


def test_meta_train_family_normalise_loss_is_recorded_and_read_back(tmp_path):
    out = tmp_path / "out"
    assert meta_train.main(["--family", "--quick", "--normalise-loss", "--check-seeds", "0", "--out", str(out)]) == 0
    ctrl = load_controller(out / "default.pt")
    assert ctrl.info["settings"]["normalise_loss"] is True and meta_train.reads_normalised_loss(ctrl)
    assert not meta_train.reads_normalised_loss(load_controller(PRETRAINED_DIR / "default.pt"))
    runs = json.loads((out / "record.json").read_text())["family_runs"]
    assert all(abs(r["p_rel"][0] - 1.0) < 1e-4 for r in runs)


def test_meta_train_ablation_runs_on_held_out_tasks_only(tmp_path):
    assert meta_train.main(["--ablation", "--epochs", "1", "--seeds", "1", "--out", str(tmp_path),
                            "--controller", str(PRETRAINED_DIR / "default.pt")]) == 0
    rows = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"cosine", "default", "mnist1d-cnn", "fresh"}
    trained_on = set(load_controller(PRETRAINED_DIR / "default.pt").info["tasks"])
    assert rows and not {r["task"] for r in rows} & trained_on
    assert "| vs cosine" in (tmp_path / "ablation.md").read_text()


def test_commands_refuse_bad_counts_and_repeated_inputs(tmp_path, capsys):
    from autolr_experiments import action_training, collect, compare

    parse = compare.build_parser().parse_args
    args = parse(["--tasks", "diabetes-mlp", "diabetes-mlp", "--methods", "cosine", "cosine", "constant",
                  "--seeds", "2", "--grid", "1", "--out", str(tmp_path)])
    jobs, _, _ = compare.make_jobs(args)
    assert len(jobs) == len({(j.task, j.method, j.lr, j.seed) for j in jobs}) == 4  # each name once
    for bad in (["--epochs", "0"], ["--batch-size", "-3"], ["--threads", "0"]):
        with pytest.raises(SystemExit, match="must be >= 1"):
            compare.make_jobs(parse(["--tasks", "diabetes-mlp", "--out", str(tmp_path), *bad]))
    with pytest.raises(SystemExit, match="cannot read it"):
        compare.main(["--render", str(tmp_path / "missing.json"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse's usage error (code 2), before the file is read
        action_training.main(["--data", str(tmp_path / "a.pt"), str(tmp_path / "a.pt"), "--out-dir", str(tmp_path)])
    assert "more than once" in capsys.readouterr().err
    (tmp_path / "d.pt.partial").write_bytes(b"not a progress file")
    with pytest.raises(SystemExit):
        collect.main(["--task", "diabetes-mlp", "--out", str(tmp_path / "d.pt"), "--resume"])
    for bad in (["--val-window", "0"], ["--segment", "30", "--window", "20"], ["--quick", "--steps", "20"],
                ["--quick", "--window", "3"]):  # --quick keeps a given --window (20 is no multiple of 3)
        with pytest.raises(SystemExit):
            collect.main(["--task", "diabetes-mlp", "--out", str(tmp_path / "c.pt"), *bad])
    with pytest.raises(SystemExit):
        meta_train.main(["--ablation", "--controller", str(tmp_path / "none.pt"), "--out", str(tmp_path / "abl")])
    for bad in (["--epochs", "0"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            meta_train.main([*bad, "--out", str(tmp_path / "mt")])
    one_task = tmp_path / "one.json"
    one_task.write_text('{"tasks": [{"task": "diabetes-mlp"}]}')
    from autolr_experiments import update_size

    with pytest.raises(SystemExit, match="needs 2 or more"):  # refused before training anything
        update_size.main(["--ablation", str(one_task), "--out", str(tmp_path / "u")])
    settings = {"window": 4, "val_window": 4}
    with pytest.raises(ValueError, match="different --val-window"):
        collect.merge_data([{"settings": settings}, {"settings": {**settings, "val_window": 2}}])
    from autolr_experiments import find_lr
    from autolr_fast import exporting
    from autolr_fast.ops import dispatch

    for bad in (["--num", "1"], ["--start-lr", "1", "--end-lr", "0.1"], ["--out", str(tmp_path / "no" / "x.json")]):
        with pytest.raises(SystemExit, match="find-lr"):
            find_lr.main(["--task", "diabetes-mlp", *bad])
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        dispatch.main(["--bogus"])
    assert exporting.main(["--pretrained", "default", "-o", str(tmp_path)]) == 2  # a folder, not a file


def test_json_inputs_that_are_missing_or_foreign_are_named(tmp_path):
    from autolr_experiments import compare, update_size
    from autolr_experiments.json_files import read_json

    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"something": 1}')
    with pytest.raises(SystemExit, match="is not an anchor-ablation output"):
        update_size.main(["--ablation", str(foreign), "--out", str(tmp_path / "u")])
    with pytest.raises(SystemExit, match="cannot read"):
        read_json(tmp_path / "missing.json", "a compare.json")
    runs = tmp_path / "runs.jsonl"
    runs.write_bytes(b'[1, 2]\n\xff\xfe not text\n{"cut off')
    assert compare._load_partial(runs) == {}  # lines that are not run records are passed over
