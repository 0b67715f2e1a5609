"""The action controller's harness: branching data collection, model training and comparison,
which signals predict the best action, and the quick commands (collect, train-action,
action-signal) end to end."""

import json
import math
import os

import pytest
import torch
from torch import nn

from autolr_experiments import action_signal, action_training, collect
from autolr_experiments.action_signal import READABLE, analyse, auc
from autolr_experiments.action_training import split_by_run, train_and_compare
from autolr_experiments.collect import COLUMNS, load_data
from autolr_experiments.tasks import Task, register_task
from autolr_fast import ActionController


@register_task("test-quadratic")
def _quadratic(seed: int = 0) -> Task:
    """loss = mean((w . x)^2): plain SGD at rates <= 0.1 never overshoots, so the larger rate is
    always better: the right label of every decision is x1.1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(640, 4, generator=g)

    def make():
        m = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            m.weight.fill_(1.0)
        return m

    return Task("test-quadratic", x, torch.zeros(640, 1), x[:64], torch.zeros(64, 1), make,
                nn.functional.mse_loss, None)


def _collect(tmp_path, name, *extra):
    out = str(tmp_path / name)
    assert collect.main(["--task", "test-quadratic", "--momentum", "0", "--segment", "10", "--window", "5",
                "--steps", "60", "--batch-size", "16", "--runs", "2", "--out", out, "--no-progress", *extra]) == 0
    return out


def test_collector_labels_the_known_best_action(tmp_path):
    data = load_data(_collect(tmp_path, "q.pt"))
    d = data["data"]
    assert set(data["columns"]) == set(COLUMNS) and data["settings"]["task"] == "test-quadratic"
    assert len(d["best"]) == 2 * 5
    assert (d["best"] == 2).all()
    assert (d["margins"][:, 2] == 0).all() and (d["margins"][:, :2] > 0).all()
    assert (d["val_after"][:, 0] > d["val_after"][:, 1]).all()
    # the followed branch sets the next rate
    for i in range(len(d["rate"]) - 1):
        if d["run"][i] == d["run"][i + 1]:
            m = data["settings"]["multipliers"][int(d["followed"][i])]
            assert float(d["rate"][i + 1]) == pytest.approx(float(d["rate"][i]) * m, rel=1e-6)
    assert 1e-4 <= float(d["rate"][0]) <= 0.1
    assert d["features"].shape == (10, 3, 5) and d["history"].shape == (10, 10)


def test_collector_resume_gives_the_same_file(tmp_path):
    full = load_data(_collect(tmp_path, "full.pt"))["data"]
    out = str(tmp_path / "part.pt")
    _collect(tmp_path, "part.pt", "--stop-after", "3")
    assert os.path.exists(out + ".partial") and not os.path.exists(out)
    _collect(tmp_path, "part.pt", "--resume")
    part = load_data(out)["data"]
    assert not os.path.exists(out + ".partial")
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_quick_cli_collect_and_train(tmp_path):
    data = str(tmp_path / "d.pt")
    assert collect.main(["--task", "regress-sin", "--quick", "--runs", "2", "--out", data, "--no-progress"]) == 0
    outdir = str(tmp_path / "models")
    assert action_training.main(["--data", data, "--quick", "--out-dir", outdir, "--no-progress"]) == 0
    for kind in ("mlp", "cnn", "gru"):
        info = json.loads(open(os.path.join(outdir, f"action-{kind}.json")).read())
        assert info["model"] == kind and 0 <= info["scores"]["accuracy"] <= 1
        ctrl = ActionController.load(os.path.join(outdir, f"action-{kind}.pt"))
        assert ctrl.window == 4 and ctrl.interval == 20
    assert "| always x1.0 |" in open(os.path.join(outdir, "results.md")).read()


def test_models_learn_a_learnable_rule():
    # Labels from a rule on the features (loss went up in the last block -> x0.9, else x1.1):
    # every model must beat the majority class on held-out runs.
    g = torch.Generator().manual_seed(0)
    n = 600
    feats = torch.randn(n, 3, 6, generator=g)
    best = torch.where(feats[:, 1, -1] > 0, 0, 2)
    data = {"features": feats, "best": best, "run": torch.arange(n) // 10,
            "margins": torch.where(torch.nn.functional.one_hot(best, 3).bool(), 0.0, 0.1),
            "val_history": torch.ones(n, 4), "val_initial": torch.ones(n)}
    report, _ = train_and_compare(data, ["mlp", "cnn", "gru"], window=6, multipliers=[0.9, 1.0, 1.1],
                                  epochs=40, test_frac=0.25, seed=0, show=False)
    res = report["results"]
    for kind in ("mlp", "cnn", "gru"):
        assert res[kind]["accuracy"] > res["majority class"]["accuracy"] + 0.2, (kind, res)
        assert res[kind]["regret"] < res["always x1.0"]["regret"]


def test_split_keeps_runs_whole():
    runs = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    tr, te = split_by_run(runs, 0.25, 0)
    assert (tr ^ te).all() and len(set(runs[te].tolist()) & set(runs[tr].tolist())) == 0
    with pytest.raises(ValueError, match="at least 2 runs"):
        split_by_run(torch.zeros(4, dtype=torch.long), 0.25, 0)


def test_label_horizon_keeps_the_path_and_the_greedy_columns(tmp_path):
    # The continuation only adds label steps: the followed path (rates, features, greedy
    # validation losses) must be the same as without it, and the greedy labels stay available.
    greedy = load_data(_collect(tmp_path, "g.pt"))["data"]
    for cont in ("action", "base"):
        data = load_data(_collect(tmp_path, f"h-{cont}.pt", "--label-horizon", "20", "--label-continue", cont))
        d = data["data"]
        assert data["settings"]["label_horizon"] == 20 and data["settings"]["label_continue"] == cont
        for k in ("rate", "features", "val_after", "best_greedy", "followed"):
            assert torch.equal(d[k], greedy[k]), k
        # on the quadratic a larger rate is better at any horizon: the label stays x1.1, and the
        # longer run reaches a lower validation loss than the segment alone
        assert (d["best"] == 2).all() and (d["margins"][:, 2] == 0).all()
        assert (d["val_label"][:, 2] < d["val_after"][:, 2]).all()
    # without a horizon the label is the greedy one
    assert torch.equal(greedy["val_label"], greedy["val_after"]) and torch.equal(greedy["best"], greedy["best_greedy"])


def test_greedy_labels_recomputed_from_val_after():
    vals = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.4, float("inf")]])
    data = {"val_after": vals, "best": torch.tensor([0, 2]), "margins": torch.zeros(2, 3)}
    g = action_training.greedy_labels(data)
    assert g["best"].tolist() == [2, 0]
    assert torch.allclose(g["margins"][0], torch.tensor([0.2, 0.1, 0.0]))
    assert g["margins"][1, 2] == float("inf") and data["best"].tolist() == [0, 2]


def test_merge_reads_files_without_label_columns(tmp_path):
    payload = load_data(_collect(tmp_path, "old.pt"))
    for k in ("val_label", "best_greedy"):  # as written before --label-horizon existed
        del payload["data"][k]
    merged = collect.merge_data([payload])
    assert torch.equal(merged["val_label"], merged["val_after"])


def test_keep_unless_clear_only_moves_the_target():
    vals = torch.tensor([[1.0, 1.0, 0.995], [1.0, 1.0, 0.8], [0.5, float("inf"), 0.7]])
    data = {"val_label": vals, "best": vals.argmin(1), "margins": vals - vals.min(1, keepdim=True).values}
    out = action_training.keep_unless_clear(data, [0.9, 1.0, 1.1], 0.01)
    # a 0.5% win is not clear (keep the rate), a 20% win is, and a diverged x1.0 never is kept
    assert out["best"].tolist() == [1, 2, 0]
    assert torch.equal(out["margins"], data["margins"])


def test_label_to_the_end_of_the_run(tmp_path):
    # --label-horizon -1 continues each branch to --steps: the last decision has nothing left to
    # continue (its label is the greedy one), the earlier ones reach lower losses on the quadratic
    greedy = load_data(_collect(tmp_path, "g.pt"))["data"]
    d = load_data(_collect(tmp_path, "end.pt", "--label-horizon", "-1"))["data"]
    assert torch.equal(d["features"], greedy["features"]) and torch.equal(d["val_after"], greedy["val_after"])
    last = d["step"] == int(d["step"].max())
    assert torch.equal(d["val_label"][last], d["val_after"][last])
    assert (d["val_label"][~last] < d["val_after"][~last]).all() and (d["best"] == 2).all()


def test_envelope_collection_trains_a_relative_controller(tmp_path):
    # --envelope trains every step at rate x the cosine envelope over --steps; the rows carry the
    # run's start rate, and --relative turns them into a controller that AutoLR anchors on lr
    from autolr_fast.rate_scale import cosine_envelope

    plain = load_data(_collect(tmp_path, "p.pt"))["data"]
    out = _collect(tmp_path, "e.pt", "--envelope", "--label-horizon", "-1")
    d = load_data(out)["data"]
    assert torch.equal(d["start_rate"], plain["start_rate"]) and torch.equal(d["rate"][:1], d["start_rate"][:1])
    # the first segment is the same batches at a decaying rate: the losses differ after step 0
    assert d["history"][0, 0] == plain["history"][0, 0] and not torch.equal(d["history"][0], plain["history"][0])
    assert cosine_envelope(59, 60) < 0.01
    models = str(tmp_path / "models")
    assert action_training.main(["--data", out, "--model", "mlp", "--relative", "--quick", "--out-dir", models,
                                 "--no-progress"]) == 0
    ctrl = ActionController.load(os.path.join(models, "action-mlp.pt"))
    assert ctrl.relative and ctrl.channels == 4 and ctrl.default_gamma is None
    assert json.load(open(os.path.join(models, "action-mlp.json")))["relative"] is True
    with pytest.raises(ValueError, match="start_rate"):
        action_training.model_inputs({"features": d["features"], "rate": d["rate"]}, False, relative=True)


def test_relative_training_needs_envelope_data_and_old_progress_resumes(tmp_path):
    plain = _collect(tmp_path, "p.pt")
    with pytest.raises(SystemExit, match="collect --envelope"):
        action_training.main(["--data", plain, "--relative", "--quick", "--out-dir", str(tmp_path / "m"),
                              "--no-progress"])
    enveloped = _collect(tmp_path, "e.pt", "--envelope")
    with pytest.raises(SystemExit, match="add --relative"):
        action_training.main(["--data", enveloped, "--quick", "--out-dir", str(tmp_path / "m"), "--no-progress"])
    # progress written before --envelope and start_rate existed resumes to the same file
    out = str(tmp_path / "old.pt")
    _collect(tmp_path, "old.pt", "--stop-after", "3")
    saved = torch.load(out + ".partial", weights_only=True)
    del saved["settings"]["envelope"]
    for r in saved["rows"]:
        del r["start_rate"]
    del saved["progress"]["state"]["start_rate"]
    torch.save(saved, out + ".partial")
    _collect(tmp_path, "old.pt", "--resume")
    assert all(torch.equal(load_data(plain)["data"][k], load_data(out)["data"][k]) for k in COLUMNS)


# ---- action-signal ----
def _auc_by_pairs(score, positive):
    pos, neg = score[positive], score[~positive]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return float(wins.mean())


def test_auc_matches_the_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        score = torch.randint(0, 6, (40,), generator=g).double()  # many ties
        positive = torch.rand(40, generator=g) < 0.3
        assert math.isclose(auc(score, positive), _auc_by_pairs(score, positive), rel_tol=0, abs_tol=1e-12)
    assert math.isnan(auc(torch.arange(4.0), torch.zeros(4, dtype=torch.bool)))


def _payload(task, n, seed, rule, aligned=False):
    """A synthetic collection file (runs of 5 decisions) whose x0.9-beats-x1.1 target is
    ``rule(slope)`` of the loss window (random when ``rule`` is None). ``aligned``: every other
    signal is also larger where x0.9 wins (to pin each signal's direction)."""
    g = torch.Generator().manual_seed(seed)
    window, block, steps = 5, 4, 100
    slope = torch.randn(n, generator=g)
    lower = rule(slope) if rule else torch.rand(n, generator=g) < 0.5
    up = lower.double() if aligned else torch.zeros(n, dtype=torch.float64)
    t = torch.arange(window * block, dtype=torch.float64) / block
    spread = 0.01 + 0.2 * up  # noise
    jitter = spread[:, None] * torch.randn(n, window * block, generator=g)
    history = torch.exp(slope[:, None].double() * 0.1 * t + jitter)
    label = torch.ones(n, 3)
    label[:, 0] = torch.where(lower, 0.9, 1.1)
    start = torch.exp(torch.randn(n, generator=g) + 3 * up)  # start_rate
    after = torch.ones(n, 3)
    after[:, 2] = torch.exp(0.5 * up - 0.25).float()  # the probes: x1.1's loss over x0.9's
    data = {"history": history.float(), "initial": torch.exp(-2 * up).float(),  # from_start
            "lowest": torch.exp(-2 * up - 1).float(),  # from_lowest
            "rate": (start * torch.exp(0.1 * torch.randn(n, generator=g) + up)).float(),  # level
            "start_rate": start.float(), "run": torch.arange(n) // 5, "decision": torch.arange(n) % 5,
            "step": torch.randint(0, steps // 2, (n,), generator=g) + (steps // 2) * up.long(),  # progress
            "val_label": label, "val_after": after, "train_after": after.clone()}
    settings = {"task": task, "multipliers": [0.9, 1.0, 1.1], "window": window, "steps": steps, "optimizer": "sgd"}
    return {"settings": settings, "data": data}


def test_a_signal_that_decides_the_label_transfers_and_random_labels_do_not():
    steep = {f"{t}.pt": _payload(t, 200, i, lambda s: s > 0.3) for i, t in enumerate(("a", "b", "c"))}
    result = analyse(steep)
    assert set(result["transfer"]) == {"a", "b", "c"} and not result["skipped"]
    for f in result["files"].values():
        assert f["auc"]["slope"] > 0.95 and f["rows"] == 200 and f["runs"] == 40
        lo, hi = f["interval"]["slope"]
        assert lo <= f["auc"]["slope"] <= hi
    for t in result["transfer"].values():
        assert t["auc"] > 0.95 and set(t["weights"]) == set(READABLE)
        assert t["interval"][0] > 0.9
    # the sign flips from task to task: fitted on the others, the left-out task is predicted backwards
    flipped = {"a.pt": _payload("a", 200, 0, lambda s: s > 0.3), "b.pt": _payload("b", 200, 1, lambda s: s > 0.3),
               "c.pt": _payload("c", 200, 2, lambda s: s < -0.3)}
    assert analyse(flipped)["transfer"]["c"]["auc"] < 0.1
    random = analyse({f"{t}.pt": _payload(t, 300, 10 + i, None) for i, t in enumerate(("a", "b"))})
    for t in random["transfer"].values():
        assert 0.35 < t["auc"] < 0.65 and t["interval"][0] < 0.5 < t["interval"][1]


def test_every_signal_points_towards_lowering_when_it_is_larger():
    aucs = analyse({"a.pt": _payload("a", 400, 3, lambda s: s > 0.0, aligned=True)})["files"]["a.pt"]["auc"]
    assert set(aucs) == set(READABLE) | set(action_signal.ORACLES)
    for name, value in aucs.items():
        assert value > 0.9, (name, value)


def test_diverged_branches_and_files_without_start_rates():
    p = _payload("a", 50, 0, lambda s: s > 0)
    p["data"]["val_label"][:10, 2] = math.inf  # x1.1 diverged: x0.9 wins
    p["data"]["val_label"][:5, 0] = math.inf  # both diverged: no information
    f = analyse({"a.pt": p})["files"]["a.pt"]
    expected = int((p["data"]["val_label"][5:, 0] < p["data"]["val_label"][5:, 2]).sum())
    assert f["rows"] == 45 and f["lower_wins"] == expected
    assert f["lower_wins"] >= 5  # rows 5-9
    old = _payload("a", 50, 0, lambda s: s > 0)
    del old["data"]["start_rate"]
    first = old["data"]["rate"][::5]
    assert analyse({"old.pt": old})["files"]["old.pt"]["auc"]["level"] == auc(
        torch.log(old["data"]["rate"].double() / first.repeat_interleave(5).double()),
        old["data"]["val_label"][:, 0] < old["data"]["val_label"][:, 2])
    old["data"]["decision"] = old["data"]["decision"] + 1  # no first decision to take the start from
    with pytest.raises(ValueError, match="old.pt has no start_rate column"):
        analyse({"old.pt": old})


def test_cli_on_collected_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [_collect(tmp_path, f"{folder}/run.pt", "--seed", str(seed)) for seed, folder in enumerate("ab")]
    out = tmp_path / "sig"
    assert action_signal.main(["--data", *files, "--out", str(out)]) == 0
    text = (out / "action_signal.md").read_text()
    assert f"{files[0]} (test-quadratic, sgd)" in text and f"{files[1]} (test-quadratic, sgd)" in text
    assert "python -m autolr_fast action-signal" in text and "No transfer score for test-quadratic" in text
    result = json.loads((out / "action_signal.json").read_text())  # strict JSON: NaN is null
    # plain SGD on the quadratic: raising is always better, so no row has x0.9 winning
    assert result["files"][files[0]]["lower_wins"] == 0 and result["files"][files[0]]["auc"]["slope"] is None
    assert result["files"][files[0]]["rows"] == len(collect.load_data(files[0])["data"]["best"])
    with pytest.raises(SystemExit):
        action_signal.main(["--data", files[0], files[0], "--out", str(out)])


@pytest.mark.parametrize("extra,words", [
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--multipliers", "1.0"], "at least two, each > 0"),
    (["--multipliers", "0.9", "-1", "1.1"], "at least two, each > 0"),
    (["--val-size", "630"], "fewer than one batch of 16"),  # 640 training samples: 10 left, used to loop forever
    (["--out", "{tmp}"], "is a folder; e.g. --out"),
    (["--out", "{tmp}/missing/x.pt"], "does not exist"),
])
def test_collect_refuses_bad_arguments_before_any_work(tmp_path, capsys, extra, words):
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    out = extra[extra.index("--out") + 1] if "--out" in extra else str(tmp_path / "d.pt")
    args = ["--task", "test-quadratic", "--momentum", "0", "--segment", "10", "--window", "5", "--steps", "60",
            "--batch-size", "16", "--runs", "2", "--out", str(tmp_path / "d.pt"), "--no-progress"]
    with pytest.raises(SystemExit):
        collect.main(args + extra)
    assert words in capsys.readouterr().err
    assert not os.path.exists(out + ".partial") and not os.path.exists(tmp_path / "d.pt.partial")


def test_train_action_refuses_bad_arguments_before_training(tmp_path, capsys):
    two_runs = _collect(tmp_path, "two.pt")
    one_run = str(tmp_path / "one.pt")
    assert collect.main(["--task", "test-quadratic", "--momentum", "0", "--segment", "10", "--window", "5", "--steps",
                         "60", "--batch-size", "16", "--runs", "1", "--out", one_run, "--no-progress"]) == 0
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for args, words in ((["--data", one_run], "hold 1 run(s)"), (["--data", two_runs, "--use-val"], "--model mlp only"),
                        (["--data", two_runs, "--out-dir", str(a_file)], "is a file, not a folder"),
                        (["--data", two_runs, "--hidden", "0"], "--hidden 0")):
        args = args if "--out-dir" in args else args + ["--out-dir", str(tmp_path / "models")]
        with pytest.raises(SystemExit) as exc:
            action_training.main(args + ["--quick", "--no-progress"])
        assert words in str(exc.value.code) + capsys.readouterr().err
        assert not os.path.exists(tmp_path / "models")


def test_task_batches_refuse_a_batch_larger_than_the_data():
    with pytest.raises(ValueError, match="batch size 641 for 640 training samples"):
        next(_quadratic().batches(641, seed=0))
