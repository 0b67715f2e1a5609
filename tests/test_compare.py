"""The comparison harness: SGD-HD against a plain reference, the rate grid, and the
``compare`` command end to end in CI size (records well formed, not specific numbers)."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from envelope_reference import written_out_envelope

from autolr_experiments import baselines, compare
from autolr_experiments.baselines import SGDHD, lr_grid
from autolr_experiments.report import strict_json
from autolr_experiments.tasks import get_task
from autolr_experiments.training import Schedule, rate_stats, train
from autolr_fast import load_controller, load_pretrained


# ------------------------------------------------------------------------------------------------
# SGD-HD
# ------------------------------------------------------------------------------------------------
def _reference_sgd_hd(w0, grad_fn, steps, lr, beta, momentum=0.0, weight_decay=0.0, nesterov=False):
    """Baydin et al. (2018), written out on one flat float64 vector: ``lr_t = lr_{t-1} +
    beta * <g_t, d_{t-1}>``, ``w <- w - lr_t * d_t`` (d: the SGD direction)."""
    w = w0.clone().double()
    buf, d_prev, lrs = None, None, []
    for _ in range(steps):
        g = grad_fn(w) + weight_decay * w
        if d_prev is not None:
            lr = lr + beta * float(g @ d_prev)
        if momentum:
            buf = g.clone() if buf is None else momentum * buf + g
            d = g + momentum * buf if nesterov else buf
        else:
            d = g
        w = w - lr * d
        d_prev = d.clone()
        lrs.append(lr)
    return w, lrs


@pytest.mark.parametrize("shapes", [[(7,)], [(3, 5), (5,)], [(2, 3, 4), (1,), (13,)]])
@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 5e-4), (0.5, True, 1e-2)])
def test_sgd_hd_matches_the_reference(shapes, momentum, nesterov, weight_decay):
    g = torch.Generator().manual_seed(len(shapes) * 7 + int(momentum * 10))
    sizes = [math.prod(s) for s in shapes]
    n = sum(sizes)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    hess = a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    target = torch.randn(n, generator=g, dtype=torch.float64)
    grad_fn = lambda w: hess @ (w - target)  # noqa: E731  (loss 0.5 (w-t)' H (w-t))
    w0 = torch.randn(n, generator=g, dtype=torch.float64)
    params = [p.clone().reshape(s).requires_grad_() for p, s in zip(w0.split(sizes), shapes, strict=True)]
    opt = SGDHD(params, lr=0.01, hypergrad_lr=3e-4, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    lrs = []
    for _ in range(25):
        opt.zero_grad()
        w = torch.cat([p.reshape(-1) for p in params])
        (0.5 * (w - target) @ hess @ (w - target)).backward()
        opt.step()
        lrs.append(float(opt.rates[0]))
    w_ref, lrs_ref = _reference_sgd_hd(w0, grad_fn, 25, 0.01, 3e-4, momentum, weight_decay, nesterov)
    torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in params]), w_ref, rtol=1e-5, atol=1e-5)
    # float32 rate tensor vs float64 reference
    assert abs(lrs_ref[-1] - 0.01) > 1e-4  # the rate did move
    torch.testing.assert_close(torch.tensor(lrs, dtype=torch.float64), torch.tensor(lrs_ref, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)


def test_sgd_hd_without_hypergradient_is_sgd():
    torch.manual_seed(0)
    a = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    x = torch.randn(3)
    hd = SGDHD(a, lr=0.05, hypergrad_lr=0.0, momentum=0.9, weight_decay=1e-3)
    sgd = torch.optim.SGD(b, lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(10):
        for ps, opt in ((a, hd), (b, sgd)):
            opt.zero_grad()
            ((ps[0] @ x).pow(2).sum() + ps[1].sin().sum()).backward()
            opt.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q)


def test_sgd_hd_raises_a_too_small_rate_on_a_quadratic():
    w = torch.full((10,), 5.0, requires_grad=True)
    opt = SGDHD([w], lr=1e-4, hypergrad_lr=1e-3)
    for _ in range(50):
        opt.zero_grad()
        (w.pow(2).sum()).backward()
        opt.step()
    assert float(opt.rates[0]) > 1e-3  # consecutive gradients agree: the rate grows


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(lr=float("nan")), dict(hypergrad_lr=-1.0),
                                    dict(momentum=1.0), dict(weight_decay=-1.0), dict(nesterov=True)])
def test_sgd_hd_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="SGDHD"):
        SGDHD([torch.zeros(2, requires_grad=True)], **kwargs)


# ------------------------------------------------------------------------------------------------
# Registry pieces
# ------------------------------------------------------------------------------------------------
def test_lr_grid_is_log_spaced_around_the_default():
    assert lr_grid(0.1, 1) == [0.1]
    g = lr_grid(0.1, 5)
    assert len(g) == 5 and math.isclose(g[0], 0.01) and math.isclose(g[2], 0.1) and math.isclose(g[-1], 1.0)
    ratios = [b / a for a, b in zip(g[:-1], g[1:], strict=True)]
    assert all(math.isclose(r, ratios[0]) for r in ratios)
    with pytest.raises(ValueError):
        lr_grid(0.1, 0)


def test_registry_covers_every_method_family():
    names = baselines.available_methods()
    for required in ("constant", "step", "multistep", "exponential", "cosine", "sgdr", "adam", "sgd-hd",
                     "sf-sgd", "sf-adamw", "prodigy", "dog", "dadapt", "mechanic", "autolr", "mlrsnet-official-200",
                     "shipped", "meta-online", "action"):
        assert required in names
    fams = {baselines.get_method(n).family for n in names}
    assert fams == {"hand", "untuned", "learned"}
    with pytest.raises(KeyError, match="unknown method"):
        baselines.get_method("nope")


def test_rate_stats():
    flat = rate_stats([0.1] * 20, 5)
    assert flat["epoch_cv"] == 0 and flat["jitter"] == 0 and flat["mean"] == pytest.approx(0.1)
    decaying = rate_stats([0.1 * 0.5 ** (i // 5) for i in range(20)], 5)
    assert decaying["epoch_cv"] > 0.3 and decaying["jitter"] == 0  # steps only at epoch boundaries
    assert rate_stats([], 5)["mean"] is None


def test_autolr_rates_are_recorded_without_a_host_read_per_step(monkeypatch):
    if baselines.get_method("mlrsnet-official-200").available():
        pytest.skip("published MLR-SNet checkpoints not found (../shared/fixtures/mlrsnet_official)")
    reads = {"n": 0}
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            reads["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    job = compare.Job("digits-mlp", "mlrsnet-official-200", None, None, False, 0, epochs=2, batch_size=32)
    rec = compare.run_one(job)
    monkeypatch.undo()
    assert rec["status"] == "ok" and rec["steps"] == 2 * 46
    assert len(rec["curves"]["rate"]) == rec["steps"]
    assert reads["n"] < rec["steps"] // 4, f"{reads['n']} host reads for {rec['steps']} steps"


# ------------------------------------------------------------------------------------------------
# The command, CI-sized
# ------------------------------------------------------------------------------------------------
def test_compare_command_writes_well_formed_records(tmp_path, capsys):
    out = tmp_path / "cmp"
    # --quick (digits-mlp and regress-sin, one seed), made CI-sized with one epoch and no grid
    rc = compare.main(["--quick", "--epochs", "1", "--grid", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["schema"] == compare.SCHEMA
    runs, rows = doc["runs"], doc["summary"]
    ran = {r["method"] for r in runs if r["status"] != "skipped"}
    # every method either ran on both tasks or is listed as skipped with a reason
    for name in baselines.available_methods():
        assert name in ran or doc["skipped_methods"].get(name), name
    for name in ("constant", "cosine", "cosine-warmup", "sgdr", "adam", "sgd-hd", "sf-sgd", "sf-adamw", "prodigy",
                 "autolr"):
        assert name in ran
    # cosine-warmup is AutoLR's envelope alone: 5 % linear warm-up from lr / W, then cosine to 0
    warmups = []
    for r in (r for r in runs if r["method"] == "cosine-warmup"):
        total, lr = r["steps"], r["lr"]
        w = round(0.05 * total)  # 0 on a run shorter than 10 steps
        expected = [lr * written_out_envelope(t, total, w) for t in range(total)]
        assert r["curves"]["rate"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
        warmups.append(w)
    assert max(warmups) >= 2, warmups
    for r in runs:
        if r["status"] == "skipped":
            assert r["message"]
            continue
        assert r["status"] in ("ok", "diverged")
        c = r["curves"]
        assert len(c["rate"]) == r["steps"] == c["steps"][-1]
        assert len(c["train_loss"]) == len(c["test_loss"]) == len(c["test_acc"]) == len(c["train_time_s"])
        assert all(v is None or v >= 0 for v in c["rate"])
        assert r["wall_time_s"] >= r["train_time_s"] > 0
        if r["classification"]:
            assert 0.0 <= r["final_test_acc"] <= 1.0 and r["final_metric"] == r["final_test_acc"]
        else:
            assert r["final_metric"] is None or r["final_metric"] == r["final_test_loss"]
        assert set(r["rate_stats"]) == {"mean", "min", "max", "epoch_cv", "jitter"}
    tasks = {r["task"] for r in rows}
    assert tasks == set(compare.QUICK_TASKS) and "diabetes-mlp" in tasks  # one task trained with Adam
    for row in rows:
        assert row["setting"] in ("best", "default", "best = default", "as shipped")
        assert row["seeds"] == 1 and row["target_reached"].endswith("/1")
    assert set(doc["targets"]) == tasks
    learned_ran = {r["method"] for r in rows if r["family"] == "learned"}
    assert {v["learned"] for v in doc["verdicts"]} == learned_ran
    for v in doc["verdicts"]:
        assert v["verdict"] in ("win", "tie", "lose")
        assert v["reference"].split()[0] in ("cosine", "sf-sgd", "sf-adamw", "prodigy")
    md = (out / "compare.md").read_text()
    assert "## digits-mlp" in md and "## regress-sin" in md and "| method | setting |" in md
    for task in tasks:
        for png in (out / f"{task}.png", out / f"{task}-summary.png"):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the equal-budget view: AutoLR with defaults, cosine at the default rate and tuned, the competitors
    assert doc["config"]["autolr_controller"] in ("default", "mnist1d-cnn")
    assert "## Equal-budget summary" in md and "### Done when (issue 15)" in md
    assert {b["task"] for b in doc["equal_budget"]} == tasks
    for b in doc["equal_budget"]:
        labels = [r["label"] for r in b["rows"]]
        # --grid 1: no validation runs, so the tuned row is picked on the test metric (and says so)
        assert labels[:4] == ["AutoLR (defaults)", "AutoLR + find_anchor_lr (defaults)", "cosine @ default lr",
                              "cosine tuned (grid, picked on test)"]
        assert {"Prodigy (lr 1, cosine)", "schedule-free AdamW @ default"} <= set(labels)
        for r in b["rows"]:
            assert r["runs"] == 1 and r["steps_per_run"] > 0 and r["cpu_s"] > 0
        for key in ("verdicts", "verdicts_find"):
            assert set(b[key]) >= {"never_diverged", "ge_cosine_default", "close_to_tuned", "beats_best_tuning_free"}
        # the trials' cost is shown beside the run, and what they chose
        find = b["rows"][1]
        steps = round(0.15 * find["steps_per_run"])
        assert find["trial_steps"] in range(max(1, steps), 5 * max(1, steps) + 1, max(1, steps))
        assert len(find["anchor_factors"]) == 1
        assert f"1 x {find['steps_per_run']} + {find['trial_steps']} in trials" in md
    assert doc["done_when"]["tasks"] == doc["done_when_find"]["tasks"] == len(tasks)
    assert "### The same lines for AutoLR + find_anchor_lr" in md and "find_anchor_lr chose the default rate x" in md


def test_compare_best_and_default_rows(tmp_path):
    out = tmp_path / "cmp"
    assert compare.main(["--epochs", "2", "--seeds", "2", "--grid", "3", "--tasks", "regress-sin", "--methods",
                         "constant", "prodigy", "--out", str(out), "--no-progress", "--no-plots"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert len([r for r in doc["runs"] if r["method"] == "constant"]) == 3 * 2
    rows = {(r["method"], r["setting"]): r for r in doc["summary"]}
    best = rows.get(("constant", "best")) or rows[("constant", "best = default")]
    assert best["seeds"] == 2 and best["final_metric_std"] is not None
    # "best" is the grid rate with the lowest mean final test loss
    by_lr: dict = {}
    for r in doc["runs"]:
        if r["method"] == "constant":
            by_lr.setdefault(r["lr"], []).append(r["final_metric"] if r["final_metric"] is not None else math.inf)
    assert best["lr"] == min(by_lr, key=lambda lr: sum(by_lr[lr]))
    assert ("prodigy", "as shipped") in rows


def test_compare_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit, match="unknown task"):
        compare.main(["--tasks", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown method"):
        compare.main(["--methods", "nope", "--out", str(tmp_path)])


def test_resume_reuses_recorded_runs_and_render_rebuilds_the_table(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    args = ["--epochs", "1", "--seeds", "1", "--grid", "1", "--tasks", "regress-sin", "--methods", "constant",
            "cosine", "--out", str(out), "--no-progress", "--no-plots"]
    assert compare.main(args) == 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2

    def must_not_run(*a, **k):
        raise AssertionError("a recorded run was run again")

    monkeypatch.setattr(compare, "run_one", must_not_run)
    assert compare.main(args + ["--resume"]) == 0
    # reporting only what was recorded: a method with no runs is listed as not run, nothing runs
    at = args.index("cosine") + 1
    more = args[:at] + ["sgdr"] + args[at:]
    assert compare.main(more + ["--resume", "--only-recorded"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["config"]["not_run"] == {"sgdr": ["regress-sin"]}
    assert {r["method"] for r in doc["runs"]} == {"constant", "cosine"}
    assert "## Not run" in (out / "compare.md").read_text()
    (out / "compare.md").unlink()
    assert compare.main(["--render", str(out / "compare.json"), "--out", str(out), "--no-plots"]) == 0
    md = (out / "compare.md").read_text()
    assert "## regress-sin" in md and "![" not in md, "without figures the report links none"
    drawn = tmp_path / "drawn"
    assert compare.main(["--render", str(out / "compare.json"), "--out", str(drawn)]) == 0
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (drawn / "compare.md").read_text())
    assert links and all((drawn / link).is_file() for link in links), "every figure the report links is drawn"


def test_a_new_method_is_one_registered_function(tmp_path, monkeypatch):
    monkeypatch.setattr(baselines, "_METHODS", dict(baselines._METHODS))

    @baselines.register_method("sgd-half", "hand", 0.05, "SGD at a halved rate, for this test")
    def sgd_half(spec):
        return Schedule(torch.optim.SGD(spec.model.parameters(), lr=spec.lr / 2))

    @baselines.register_method("needs-nothing", "learned", None, "never available",
                               available=lambda: "not built yet (test)")
    def never(spec):  # pragma: no cover - skipped by its availability check
        raise AssertionError

    out = tmp_path / "cmp"
    assert compare.main(["--epochs", "1", "--seeds", "1", "--grid", "1", "--tasks", "regress-sin", "--methods",
                         "sgd-half", "needs-nothing", "--out", str(out), "--no-progress", "--no-plots"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in doc["runs"]] == ["sgd-half"]
    assert all(v == 0.025 for v in doc["runs"][0]["curves"]["rate"])
    assert doc["skipped_methods"] == {"needs-nothing": "not built yet (test)"}
    assert "needs-nothing" in (out / "compare.md").read_text()


# ------------------------------------------------------------------------------------------------
# The equal-budget view and the tuning-free competitors
# ------------------------------------------------------------------------------------------------
def _row(task, method, setting, metric, lr=None, std=0.001, diverged=0, cls=True):
    return {"task": task, "method": method, "setting": setting, "lr": lr, "family": "x", "classification": cls,
            "final_metric": metric, "final_metric_std": std, "diverged": diverged, "seeds": 3}


def _runs(rows, cpu=1.0, steps=100, info=None):
    runs = []
    for r in rows:
        for seed in range(r["seeds"]):
            runs.append({"task": r["task"], "method": r["method"], "lr": r["lr"], "status": "ok", "seed": seed,
                         "cpu_time_s": cpu, "steps": steps, "info": info or {}})
    return runs


def test_equal_budget_verdicts_and_compute():
    rows = [_row("t", "autolr", "as shipped", 0.90), _row("t", "cosine", "default", 0.89, lr=0.1),
            _row("t", "cosine", "best", 0.904, lr=0.3), _row("t", "prodigy", "as shipped", 0.91),
            _row("t", "sf-sgd", "best = default", 0.80, lr=0.1)]
    grid = [_row("t", "cosine", "other", 0.5, lr=lr) for lr in (0.01, 0.03, 1.0)]
    info = {"controller": "default", "controller_tasks": ["t"], "trained_on_task": True, "optimizer": "sgd"}
    runs = _runs(rows + grid) + [{**r, "info": info} for r in _runs(rows[:1])][:1]
    (b,) = compare.equal_budget(rows, runs)
    by = {r["label"]: r for r in b["rows"]}
    tuned = by["cosine tuned (grid, picked on test)"]
    assert tuned["runs"] == 5 and tuned["cpu_s"] == pytest.approx(5.0) and b["tuned_picked_on"] == "test"
    assert by["AutoLR (defaults)"]["runs"] == 1 and by["cosine @ default lr"]["lr"] == 0.1
    assert "schedule-free SGD @ default" in by  # the default row that is also the best
    v = b["verdicts"]
    assert v["ge_cosine_default"] and v["close_to_tuned"] and not v["beats_best_tuning_free"]
    assert v["best_tuning_free"] == "Prodigy (lr 1, cosine)" and v["delta_vs_best_tuning_free"] == "-1.00 pts"
    assert v["rank_among_tuning_free"] == 2 and v["tuning_free_methods"] == 3  # behind Prodigy, ahead of sf-sgd
    assert b["trained_on"] and b["controller"] == "default"
    d = compare.done_when([b])
    assert d["held_out_tasks"] == 0 and not d["met"]["close to tuned cosine on >= 3/4 of the held-out tasks"]


def _full_runs(task, method, lr, metrics, cpu=1.0, split="test"):
    """Records with what summarize() reads, one per seed."""
    return [{"task": task, "method": method, "lr": lr, "status": "ok", "seed": seed, "cpu_time_s": cpu, "steps": 100,
             "info": {}, "split": split, "final_metric": m, "best_metric": m, "final_test_loss": 1 - m,
             "wall_time_s": 1.0, "train_time_s": 1.0, "rate_stats": {"epoch_cv": 0.7, "jitter": 0.0, "mean": lr}}
            for seed, m in enumerate(metrics)]


def test_equal_budget_tuned_row_is_picked_on_validation_runs():
    """The validation runs pick the rate; the row reports that rate's runs on all the data, and
    its compute counts the validation runs plus that run."""
    rows = [_row("t", "autolr", "as shipped", 0.90), _row("t", "cosine", "default", 0.89, lr=0.1),
            _row("t", "cosine", "best", 0.95, lr=0.3)]  # best on test: 0.3
    test = (_full_runs("t", "cosine", 0.1, [0.89, 0.89, 0.89]) + _full_runs("t", "cosine", 0.3, [0.95, 0.95, 0.95])
            + _full_runs("t", "cosine", 0.03, [0.80, 0.80, 0.80]))
    val = (_full_runs("t", "cosine", 0.1, [0.92, 0.90, 0.91], cpu=0.8, split="validation")
           + _full_runs("t", "cosine", 0.3, [0.90, 0.89, 0.90], cpu=0.8, split="validation")
           + _full_runs("t", "cosine", 0.03, [0.70, 0.70, 0.70], cpu=0.8, split="validation"))
    runs = _runs(rows[:1]) + test
    (b,) = compare.equal_budget(rows, runs, val)
    tuned = {r["label"]: r for r in b["rows"]}["cosine tuned (grid on a validation split, then 1 run)"]
    assert tuned["lr"] == 0.1 and tuned["final_metric"] == pytest.approx(0.89)  # validation prefers 0.1
    assert tuned["runs"] == 4 and tuned["cpu_s"] == pytest.approx(3 * 0.8 + 1.0)
    assert b["tuned_picked_on"] == "validation" and b["verdicts"]["delta_vs_tuned"] == "+1.00 pts"
    assert b["tuned_validation_metric"]["0.1"] == pytest.approx(0.91)
    md = "\n".join(compare._budget_section([b], 3))
    assert "picked on validation" in md and "optimistic" not in md
    # regression: the lowest validation loss wins
    for r in rows + test + val:
        r["classification"] = False
    (b,) = compare.equal_budget([dict(r, classification=False) for r in rows], _runs(rows[:1]) + test, val)
    assert {r["label"]: r for r in b["rows"]}["cosine tuned (grid on a validation split, then 1 run)"]["lr"] == 0.03


def test_a_diverged_validation_seed_counts_as_the_worst_result_also_after_json():
    """Regression: a diverged seed's loss is +inf in memory and null in JSON; either way the rate
    must lose, not be scored on its surviving seeds."""
    rows = [_row("r", "autolr", "as shipped", 0.5, cls=False), _row("r", "cosine", "default", 0.6, lr=0.1, cls=False),
            _row("r", "cosine", "best", 0.6, lr=0.1, cls=False)]
    test = [dict(r, classification=False) for r in _full_runs("r", "cosine", 0.1, [0.6] * 3)
            + _full_runs("r", "cosine", 0.3, [0.5] * 3)]
    val = [dict(r, classification=False) for r in _full_runs("r", "cosine", 0.1, [0.6] * 3, split="validation")
           + _full_runs("r", "cosine", 0.3, [0.5, math.inf, math.inf], split="validation")]
    for r in val[4:]:
        r["status"] = "diverged"
    round_tripped = [compare._as_recorded(json.loads(json.dumps(strict_json(r)))) for r in val]
    assert round_tripped[4]["final_metric"] == math.inf and round_tripped[0]["split"] == "validation"
    for records in (val, round_tripped):
        (b,) = compare.equal_budget(rows, _runs(rows[:1]) + test, records)
        tuned = next(r for r in b["rows"] if r["label"].startswith("cosine tuned"))
        assert tuned["lr"] == 0.1


def test_old_records_without_a_split_resume_as_test_runs(tmp_path):
    out = tmp_path / "cmp"
    args = ["--tasks", "regress-sin", "--methods", "cosine", "--seeds", "1", "--grid", "3", "--epochs", "1",
            "--out", str(out), "--no-progress", "--no-plots"]
    assert compare.main(args) == 0
    lines = (out / "runs.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert sorted(r["split"] for r in records) == ["test"] * 3 + ["validation"] * 3
    steps = {r["split"]: r["steps"] for r in records}
    assert steps["validation"] < steps["test"]  # trained without the validation split
    # records written before validation runs existed: no "split", no validation runs
    old = [{k: v for k, v in r.items() if k != "split"} for r in records if r["split"] == "test"]
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert compare.main(args + ["--resume", "--only-recorded"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert len(doc["runs"]) == 3 and doc["validation_runs"] == []  # the test runs kept, nothing rerun
    assert doc["config"]["not_run"] == {"cosine (validation runs)": ["regress-sin"]}
    assert doc["equal_budget"][0]["tuned_picked_on"] == "test"
    assert compare.main(args + ["--resume"]) == 0  # runs only the 3 missing validation runs
    records = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert len(records) == 6 and sum(r.get("split") == "validation" for r in records) == 3
    doc = json.loads((out / "compare.json").read_text())
    assert {r["seeds"] for r in doc["summary"]} == {1} and doc["equal_budget"][0]["tuned_picked_on"] == "validation"


def test_autolr_on_a_task_of_its_training_family_runs_leave_one_task_out(tmp_path, monkeypatch):
    """On a task the shipped controller was trained on, autolr runs the same recipe meta-trained
    without that task's data: every task sharing it (built once, reused on --resume, rebuilt when
    the shipped file changes)."""
    if "default" not in baselines.available_pretrained():
        pytest.skip("no shipped default controller")
    trained = baselines.controller_training_tasks(load_pretrained("default").info)
    task = "mnist1d-mlp"
    assert task in trained
    monkeypatch.setattr(compare, "LOTO_EPOCHS", 1)  # a short family, for the test
    monkeypatch.setenv(baselines.AUTOLR_CONTROLLER_ENV, "default")
    monkeypatch.setenv(baselines.AUTOLR_LOTO_ENV, "{}")  # restored after the test
    out = tmp_path / "cmp"
    args = ["--tasks", task, "--methods", "autolr", "--seeds", "1", "--grid", "1", "--epochs", "1", "--out", str(out),
            "--no-progress", "--no-plots"]
    assert compare.main(args) == 0
    loto = out / compare.LOTO_DIR / "default-without-mnist1d.pt"
    ctrl = load_controller(loto)
    assert ctrl.info["left_out"] == task and set(ctrl.info["tasks"]) < set(trained)
    assert not {"mnist1d-mlp", "mnist1d-cnn"} & set(ctrl.info["tasks"])  # the CNN trains on the same data
    doc = json.loads((out / "compare.json").read_text())
    (run,) = doc["runs"]
    assert run["variant"].startswith(compare.LOTO_VARIANT + "@") and run["info"]["leave_one_task_out"]
    assert not run["info"]["trained_on_task"] and run["info"]["controller"] == "default without mnist1d data"
    (b,) = doc["equal_budget"]
    assert b["leave_one_task_out"] and not b["trained_on"] and doc["done_when"]["held_out_tasks"] == 1
    (row,) = doc["summary"]
    assert row["setting"] == compare.LOTO_VARIANT and b["rows"][0]["final_metric"] == row["final_metric"]
    assert "**leave-one-task-out**" in (out / "compare.md").read_text()
    assert json.loads(os.environ[baselines.AUTOLR_LOTO_ENV]) == {}  # main restored the variable
    built = loto.stat().st_mtime_ns
    assert compare.main(args + ["--resume"]) == 0  # reused: neither the file nor the run is made again
    assert loto.stat().st_mtime_ns == built
    assert len((out / "runs.jsonl").read_text().splitlines()) == 1
    # a file of another recipe (here: another shipped file) is rebuilt when a run still needs it
    card = torch.load(loto, weights_only=False)
    card["info"]["recipe_of"] = "0" * 64
    torch.save(card, loto)
    edited = loto.stat().st_mtime_ns
    assert compare.main(args + ["--resume"]) == 0 and loto.stat().st_mtime_ns == edited  # no run needs it
    (out / "runs.jsonl").unlink()
    assert compare.main(args + ["--resume", "--only-recorded"]) == 1  # nothing recorded, nothing trained
    assert loto.stat().st_mtime_ns == edited
    assert compare.main(args) == 0 and loto.stat().st_mtime_ns != edited
    assert load_controller(loto).info["recipe_of"] != "0" * 64
    # the shipped controller itself, as before: marked as trained on the task
    assert compare.main(args + ["--no-leave-one-task-out", "--out", str(tmp_path / "plain")]) == 0
    (b,) = json.loads((tmp_path / "plain" / "compare.json").read_text())["equal_budget"]
    assert b["trained_on"] and not b["leave_one_task_out"]


def test_validation_runs_are_reused_only_with_the_same_split_settings(monkeypatch):
    job = compare.Job("regress-sin", "cosine", 0.1, 2, True, 0, 1, 32, split="validation")
    record = {"task": "regress-sin", "method": "cosine", "lr": 0.1, "seed": 0, "epochs": 1, "batch_size": 32,
              "split": "validation", "classification": False}  # recorded before the settings were stored
    assert compare._record_key(compare._as_recorded(dict(record))) == compare._key_of(job)
    monkeypatch.setattr(compare, "VALIDATION_FRACTION", 0.1)
    assert compare._record_key(compare._as_recorded(dict(record))) != compare._key_of(job)
    test_job = compare.Job("regress-sin", "cosine", 0.1, 2, True, 0, 1, 32)
    assert compare._key_of(test_job) == compare._record_key(compare._as_recorded({**record, "split": "test"}))


def test_records_are_reused_only_for_the_same_method_revision_controller_and_optimizer(monkeypatch):
    """--resume must not reuse a run whose method changed what it records (a revision), that ran
    another autolr controller, or that trained with another optimizer than the task's current one."""
    record = {"task": "regress-sin", "method": "dadapt", "lr": None, "seed": 0, "epochs": 1, "batch_size": 32,
              "classification": False}  # a record without revision and optimizer fields
    job = compare.Job("regress-sin", "dadapt", None, None, False, 0, 1, 32)
    assert baselines.get_method("dadapt").revision > 1
    assert compare._record_key(dict(record)) != compare._key_of(job)
    assert compare._record_key({**record, "revision": baselines.get_method("dadapt").revision}) == compare._key_of(job)
    cos = compare.Job("regress-sin", "cosine", 0.1, 2, True, 0, 1, 32)
    rec = {**record, "method": "cosine", "lr": 0.1}
    assert compare._record_key(rec) == compare._key_of(cos)  # no optimizer stored: the current one
    assert compare._record_key({**rec, "optimizer": "adam lr 0.001"}) != compare._key_of(cos)
    if "default" in baselines.available_pretrained():
        (marked,) = compare._with_controller_variant([compare.Job("regress-sin", "autolr", None, None, False, 0, 1,
                                                                  32)], "default")
        assert marked.variant.startswith("default@")
        assert compare._key_of(marked) != compare._record_key({**record, "method": "autolr"})
    if baselines.SHIPPED_ACTION_CONTROLLER in baselines.available_pretrained():
        job = compare.Job("friedman-mlp", "action", None, None, False, 0, 1, 32)
        (marked,) = compare._with_controller_variant([job], "default")
        assert marked.variant.startswith(baselines.SHIPPED_ACTION_CONTROLLER + "@")  # a new file: new runs
        assert compare._key_of(marked) != compare._key_of(job)


def test_a_reused_record_takes_the_current_grid_position(tmp_path):
    """Which grid rate is the default follows the grid of this comparison, not the record's."""
    job = compare.Job("regress-sin", "cosine", 0.1, 2, True, 0, 1, 32)
    partial = tmp_path / "runs.jsonl"
    rec = {"task": "regress-sin", "method": "cosine", "lr": 0.1, "seed": 0, "epochs": 1, "batch_size": 32,
           "classification": False, "status": "ok", "is_default": False, "grid_index": 4, "curves": {}}
    partial.write_text(json.dumps(rec) + "\n")
    (got,) = compare._run_all([job], 1, progress=False, partial=partial, resume=True)
    assert got["is_default"] is True and got["grid_index"] == 2


def test_validation_task_holds_out_part_of_the_training_data():
    task = get_task("regress-sin")
    val = compare.validation_task(task, seed=3)
    n_val = int(len(task.x_train) * compare.VALIDATION_FRACTION)
    assert len(val.x_test) == n_val and len(val.x_train) == len(task.x_train) - n_val
    held = {tuple(x.tolist()) for x in val.x_test}
    assert not held & {tuple(x.tolist()) for x in val.x_train}
    assert held <= {tuple(x.tolist()) for x in task.x_train}  # drawn from the training data, not the test set
    pairs = {tuple(x.tolist()): tuple(y.tolist()) for x, y in zip(task.x_train, task.y_train)}
    assert all(pairs[tuple(x.tolist())] == tuple(y.tolist()) for x, y in zip(val.x_test, val.y_test))
    again = compare.validation_task(task, seed=3)
    other = compare.validation_task(task, seed=4)
    assert torch.equal(again.x_test, val.x_test) and not torch.equal(other.x_test, val.x_test)
    jobs, _, _ = compare.make_jobs(compare.build_parser().parse_args(
        ["--tasks", "regress-sin", "--methods", "cosine", "constant", "--seeds", "2", "--grid", "3"]))
    by_split = {(j.method, j.split) for j in jobs}
    assert ("cosine", "validation") in by_split and ("constant", "validation") not in by_split
    assert sum(j.split == "validation" for j in jobs) == 3 * 2


def test_action_controller_is_judged_against_constant_at_the_same_start():
    rows = [_row("a", "action", "as shipped", 0.70), _row("a", "constant", "best", 0.75, lr=0.3),
            _row("a", "constant", "default", 0.65, lr=0.1),
            _row("b", "action", "as shipped", 0.50), _row("b", "constant", "best = default", 0.60, lr=0.1),
            _row("c", "constant", "best = default", 0.60, lr=0.1),  # action not run here (trained on c)
            _row("a", "cosine", "default", 0.72, lr=0.1)]  # the envelope alone, at the same start
    verdicts = compare.action_vs_constant(rows)
    assert [(v["task"], v["beats"], v["lr"]) for v in verdicts] == [("a", True, 0.1), ("b", False, 0.1)]
    assert verdicts[0]["delta"] == "+5.00 pts"
    assert verdicts[0]["delta_cosine"] == "-2.00 pts" and not verdicts[0]["beats_cosine"]
    assert verdicts[1]["cosine"] is None and verdicts[1]["delta_cosine"] is None
    d = compare.done_when([], verdicts)
    assert d["action_tasks"] == 2 and d["action_beats_constant"] == 1
    assert not d["met"]["the action controller beats a constant rate at the same start on the tasks it was not "
                        "trained on"]
    assert "the action controller" not in " ".join(compare.done_when([])["met"])  # no action runs: no line


def test_equal_budget_regression_uses_the_relative_loss():
    rows = [_row("r", "autolr", "as shipped", 1.09, cls=False), _row("r", "cosine", "default", 1.2, lr=0.1, cls=False),
            _row("r", "cosine", "best", 1.0, lr=0.3, cls=False), _row("r", "dog", "as shipped", 1.1, cls=False)]
    (b,) = compare.equal_budget(rows, _runs(rows))
    v = b["verdicts"]
    assert v["ge_cosine_default"] and v["close_to_tuned"] and v["beats_best_tuning_free"]
    assert v["delta_vs_tuned"] == "x1.090 loss" and not b["trained_on"]
    rows[0]["final_metric"] = 1.11  # more than 10 % above tuned cosine
    (b,) = compare.equal_budget(rows, _runs(rows))
    assert not b["verdicts"]["close_to_tuned"]


def test_a_missing_package_skips_its_method_with_the_reason(tmp_path, monkeypatch):
    assert "pip install" in baselines._needs("no_such_package_for_autolr")()
    monkeypatch.setattr(baselines.get_method("dog"), "available", lambda: "package 'dog' is not installed")
    out = tmp_path / "cmp"
    assert compare.main(["--epochs", "1", "--seeds", "1", "--grid", "1", "--tasks", "diabetes-mlp", "--methods",
                         "dog", "cosine", "--out", str(out), "--no-progress", "--no-plots"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["skipped_methods"] == {"dog": "package 'dog' is not installed"}


@pytest.mark.parametrize("name", ["dog", "dadapt", "mechanic"])
@pytest.mark.parametrize("task", ["diabetes-mlp", "friedman-mlp"])  # an Adam task and an SGD task
def test_tuning_free_competitors_train(name, task):
    method = baselines.get_method(name)
    if method.available():
        pytest.skip(method.available())
    run = train_task(task, name)
    assert run.status == "ok" and len(run.rates) == run.steps and run.rates[-1] > 0
    assert math.isfinite(run.curves["test_loss"][-1])


def train_task(task, method):
    return train(get_task(task), baselines.get_method(method), epochs=2, batch_size=64, seed=0)


def test_autolr_uses_the_task_optimizer_and_records_its_controller(monkeypatch):
    monkeypatch.setenv(baselines.AUTOLR_CONTROLLER_ENV, "mnist1d-cnn")
    assert baselines.autolr_controller_name() == "mnist1d-cnn"
    run = train(get_task("diabetes-mlp"), baselines.get_method("autolr"), epochs=8, batch_size=64, seed=0)
    assert isinstance(run.schedule.optimizer, torch.optim.Adam)
    warmup = run.schedule.autolr.scale.warmup_steps
    decay = run.schedule.autolr.scale.decay_steps
    assert warmup >= 1 and decay >= 2  # the envelope: a warm-up to the optimizer's lr, held, then linear to 0
    assert run.rates[0] == pytest.approx(1e-3 / warmup, rel=1e-4)
    assert run.rates[-1] == pytest.approx(max(run.rates) / (decay + 1), rel=0.1)  # the controller's factor: near 1
    info = run.schedule.info
    assert info["controller"] == "mnist1d-cnn" and info["controller_tasks"] == ["mnist1d-cnn"]
    assert info["trained_on_task"] is False


def test_controller_training_tasks_reads_the_usual_info_keys():
    assert baselines.controller_training_tasks({"task": "a"}) == ["a"]
    info = {"tasks": ["a", {"task": "b"}, {"name": "c"}], "training_tasks": ["a", "d"]}
    assert baselines.controller_training_tasks(info) == ["a", "b", "c", "d"]
    assert baselines.controller_training_tasks({}) == []


def test_plots_take_diverged_runs():
    # a diverged run's NaN rates and losses come back from JSON as null
    assert compare._mean_curve([{"curves": {"l": [1.0, None]}}, {"curves": {"l": [3.0, None]}}], "l", 2)[0] == 2.0
    assert math.isnan(compare._mean_curve([{"curves": {"l": [None]}}], "l", 1)[0])
    rates = compare._plottable([0.1, 0.0, None])
    assert rates[:2] == [0.1, 1e-8] and math.isnan(rates[2])


def test_a_task_sharing_a_controllers_training_data_counts_as_trained_on():
    """digits-bncnn trains on the digits that the action controller's digits-mlp runs saw: the
    action controller is not run there; and the shipped controllers are marked on their data."""
    from autolr_experiments.tasks import shares_data

    assert shares_data("digits-bncnn", ["digits-mlp"]) and shares_data("mnist1d-mlp", ["mnist1d-cnn"])
    assert not shares_data("digits-bncnn", ["regress-sin", "markov-gru"])
    if baselines.action_training_tasks():  # the shipped action controller's card is there
        assert "digits-mlp" in baselines.action_training_tasks()
        rec = compare.run_one(compare.Job("digits-bncnn", "action", None, None, False, 0, 1, 32))
        assert rec["status"] == "skipped" and "digits-bncnn's data" in rec["message"]


def test_a_diverged_autolr_row_wins_nothing_and_find_is_judged_on_its_own_runs():
    rows = [_row("r", "autolr", "as shipped", math.inf, diverged=3, cls=False),
            _row("r", "cosine", "default", math.inf, lr=0.1, diverged=3, cls=False),
            _row("r", "cosine", "best", 1.0, lr=0.3, cls=False), _row("r", "dog", "as shipped", math.inf, cls=False),
            _row("r", "autolr-find", "as shipped", 1.05, cls=False)]
    runs = [r for r in _runs(rows[:-1]) if r["method"] != "autolr"]
    runs += _runs([rows[0]], info={"controller": "another", "trained_on_task": False})
    runs += _runs([rows[-1]], info={"controller": "default", "trained_on_task": True})
    (b,) = compare.equal_budget(rows, runs)
    v = b["verdicts"]
    assert not v["never_diverged"] and not v["ge_cosine_default"] and not v["beats_best_tuning_free"]
    assert b["verdicts_find"]["ge_cosine_default"] and b["verdicts_find"]["close_to_tuned"]
    # each row is held out or not as its own runs say
    assert not b["trained_on"] and b["trained_on_find"]
    assert compare.done_when([b], None, "verdicts_find")["held_out_tasks"] == 0
    assert compare.done_when([b])["held_out_tasks"] == 1


def test_time_to_target_counts_the_anchor_trials_first():
    rec = {"classification": True, "steps": 100, "cpu_time_s": 3.0,
           "curves": {"test_acc": [0.5, 0.9, 0.95], "steps": [30, 60, 100]}}
    assert compare._time_to_target(rec, 0.9) == (60, pytest.approx(1.8))
    rec["info"] = {"anchor": {"cost_steps": 50}}  # 50 trial steps ran before the 100 of the run
    assert compare._time_to_target(rec, 0.9) == (60, pytest.approx((50 + 60) * 3.0 / 150))


def test_a_skipped_job_is_not_recorded_again_on_resume(tmp_path, monkeypatch):
    """A job whose method raises MethodUnavailable inside its build (a missing package found late)
    is recorded as skipped once; --resume tries it again without appending a duplicate."""
    from autolr_experiments import baselines
    from autolr_experiments.training import MethodUnavailable

    method = baselines.get_method("sgdr")

    def unavailable(spec):
        raise MethodUnavailable("not here")

    monkeypatch.setattr(method, "build", unavailable)
    out = tmp_path / "cmp"
    args = ["--epochs", "1", "--seeds", "1", "--grid", "1", "--tasks", "regress-sin", "--methods", "constant",
            "sgdr", "--out", str(out), "--no-progress", "--no-plots"]
    assert compare.main(args) == 0
    first = (out / "runs.jsonl").read_text().splitlines()
    assert sum('"skipped"' in line for line in first) == 1
    for extra in ([], ["--only-recorded"]):
        assert compare.main(args + ["--resume", *extra]) == 0
        assert (out / "runs.jsonl").read_text().splitlines() == first


def test_a_report_without_autolr_runs_says_so_instead_of_judging_zero_tasks(tmp_path):
    out = tmp_path / "cmp"
    assert compare.main(["--tasks", "regress-sin", "--methods", "cosine", "constant", "--epochs", "1", "--seeds", "1",
                         "--grid", "1", "--no-plots", "--no-progress", "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "AutoLR has no runs recorded on this task" in md and "nothing recorded yet" in md
    assert "0/0" not in md and "not trained on this task (controller `None`" not in md
