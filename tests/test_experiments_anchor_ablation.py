"""anchor-ablation: find_anchor_lr's rules replayed on the same trials and scored by full cosine
runs; the scoring on known numbers, the new tasks, and the quick command end to end."""

import inspect
import json
import math

import pytest
import torch

from autolr_experiments import anchor_ablation, baselines
from autolr_experiments.anchor_ablation import EXPONENTS, RULES, score_task, summarize
from autolr_experiments.compare import task_settings
from autolr_experiments.tasks import get_task
from autolr_experiments.training import RunSpec, make_optimizer
from autolr_fast import AnchorResult, find_anchor_lr


def _choices(pick):
    return {0: {rule.name: pick(rule) for rule in RULES}}


def test_scoring_gaps_close_and_worse_than_default():
    """Classification: the gap is in points to the best grid rate; a choice below the default
    rate's accuracy is worse than the default. Regression: the gap is the loss ratio; a
    diverged rate is never close."""
    acc = {(0, e): v for e, v in zip(EXPONENTS, [0.50, 0.80, 0.90, 0.952, 0.10], strict=True)}
    scored = score_task("t", True, acc, _choices(lambda r: 0.5 if r.schedule == "cosine" else -0.5))
    assert scored["best_exponent"] == 0.5 and scored["default"] == 0.90
    cosine, constant = scored["rules"][RULES[1].name], scored["rules"][RULES[0].name]
    assert cosine["gap"] == pytest.approx(0.0) and cosine["close"] and not cosine["worse_than_default"]
    assert constant["gap"] == pytest.approx(-15.2) and not constant["close"] and constant["worse_than_default"]
    loss = {(0, e): v for e, v in zip(EXPONENTS, [2.0, 1.05, 1.0, float("nan"), float("nan")], strict=True)}
    scored = score_task("r", False, loss, _choices(lambda r: 0.5 if r.step_down else -0.5))
    assert scored["best"] == 1.0
    near, diverged = scored["rules"][RULES[1].name], scored["rules"][RULES[3].name]
    assert near["gap"] == pytest.approx(1.05) and near["close"] and near["worse_than_default"]
    assert diverged["gap"] == math.inf and not diverged["close"] and diverged["worse_than_default"]
    summary = summarize([scored])
    assert summary[RULES[1].name]["other"]["tasks"] == 1, "a task in no list counts as other"
    assert summary[RULES[1].name]["held-out 2"]["tasks"] == 0
    assert summary[RULES[1].name]["all"] == {"tasks": 1, "close": 1, "worse_than_default": 1}


@pytest.mark.parametrize("name", ["cancer-mlp", "wine-mlp", "digits-dropout-mlp", "mnist1d-cnn-adam",
                                  "markov-gru-sgd", "markov-attn", "friedman3-mlp", "moons-mlp",
                                  "noisy-classes-mlp", "markov-lstm", "mnist1d-mlp-adamw", "circles-mlp",
                                  "friedman2-mlp", "regress-exp-adam", "digits-bncnn-adamw", "cancer-mlp-sgd",
                                  "moons-mlp-adam", "grammar-lm", "shapes-gncnn", "clusters-resmlp",
                                  "manifold-ae"])
def test_new_tasks_build_train_a_step_and_have_settings(name):
    task = get_task(name)
    epochs, batch_size = task_settings(name)
    assert epochs > 0 and task.steps_per_epoch(batch_size) > 5
    torch.manual_seed(0)
    model = task.make_model()
    x, y = next(task.batches(batch_size, seed=0))
    loss = task.loss_fn(model(x), y)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and all(p.grad is not None for p in model.parameters())
    assert task.is_classification == (task.num_classes is not None)
    assert set(anchor_ablation.SEEN_TASKS + anchor_ablation.HELD_OUT_TASKS + anchor_ablation.HELD_OUT_2_TASKS) >= {name}
    ev = task.evaluate(model)
    assert ev["loss"] > 0 and (ev["acc"] is None) == (not task.is_classification)
    assert ev["acc"] is None or 0.0 <= ev["acc"] <= 1.0


def test_quick_command_end_to_end_and_the_default_rule_matches_find_anchor_lr(tmp_path, monkeypatch):
    """The quick run writes its table, JSON and plot; the replayed default rule chooses what
    find_anchor_lr at its defaults chooses on the same trials."""
    assert anchor_ablation.main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "anchor_ablation.json").read_text())
    earlier = anchor_ablation.earlier_references(tmp_path / "anchor_ablation.json")
    assert len(earlier) >= len(anchor_ablation.QUICK_TASKS) * len(EXPONENTS), "every reference run, for --resume"

    def no_reference_run(job):
        raise AssertionError(f"--resume ran {job} again")

    with monkeypatch.context() as m:
        m.setattr(anchor_ablation, "run_one", no_reference_run)
        assert anchor_ablation.main(["--quick", "--out", str(tmp_path), "--no-progress", "--resume"]) == 0
    assert json.loads((tmp_path / "anchor_ablation.json").read_text())["tasks"] == doc["tasks"]
    md = (tmp_path / "anchor_ablation.md").read_text()
    assert (tmp_path / "anchor_ablation.png").stat().st_size > 1000
    assert [t["task"] for t in doc["tasks"]] == anchor_ablation.QUICK_TASKS
    assert set(doc["summary"]) == {r.name for r in RULES} and "## Per task" in md
    default_rule = anchor_ablation.DEFAULT_RULE
    defaults = inspect.signature(find_anchor_lr).parameters
    assert (default_rule.schedule, default_rule.fraction, default_rule.confidence, default_rule.step_down,
            default_rule.extend) == tuple(defaults[k].default for k in ("trial_schedule", "fraction", "confidence",
                                                                        "step_down", "extend"))
    total = anchor_ablation.QUICK_EPOCHS * get_task(anchor_ablation.QUICK_TASKS[0]).steps_per_epoch(
        task_settings(anchor_ablation.QUICK_TASKS[0])[1])
    recorded = doc["trials"][0]
    assert set(recorded["trials"]) == {anchor_ablation.trials_label(r.trials_key) for r in RULES}
    for key, res in recorded["trials"].items():
        fraction = float(key.split()[1])
        assert res["trial_steps"] == max(1, round(fraction * total)), f"the {key} trials ran at their own length"
    other = next(r for r in RULES if r.batch_seed_offset)
    same = recorded["trials"][anchor_ablation.trials_label(default_rule.trials_key)]
    moved = recorded["trials"][anchor_ablation.trials_label(other.trials_key)]
    n = len(moved["batch_losses"])  # the default's trials may go on past the grid
    assert moved["trial_steps"] == same["trial_steps"] and moved["batch_losses"] != same["batch_losses"][:n], \
        "the other-batches rule trains on other batches, as long"
    task = anchor_ablation.QUICK_TASKS[0]
    epochs, batch_size = anchor_ablation.QUICK_EPOCHS, task_settings(task)[1]
    t = get_task(task)
    replayed_trials = anchor_ablation.trials(t, 0, epochs, batch_size, "cosine")
    torch.manual_seed(0)
    model = t.make_model()
    spec = RunSpec(t, model, None, epochs, t.steps_per_epoch(batch_size), 0, batch_size)
    found = baselines.anchor_trials(spec, make_optimizer(model, t.optim), apply=False)
    n = len(found.batch_losses)  # the ablation's trials may go on past the grid (the rule that extends)
    assert repr(found.batch_losses) == repr(replayed_trials.batch_losses[:n]), "the same trials"
    replayed = next(x for x in doc["tasks"] if x["task"] == task)["rules"][default_rule.name]["choices"][0]
    assert replayed == round(2 * math.log10(found.lr / found.given_lr)) / 2


def test_bad_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(SystemExit, match="unknown task"):
        anchor_ablation.main(["--tasks", "no-such-task", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--seeds"):
        anchor_ablation.main(["--seeds", "0", "--out", str(tmp_path)])


def test_recorded_references_keep_the_half_decade_rates_only(tmp_path):
    """A compare.json's cosine runs at default x 10^(k/2) are reused, past the five grid rates too;
    runs at other rates (another --grid) and other methods are not."""
    default = 0.1

    def run(lr, method="cosine", metric=0.9, status="ok"):
        return {"task": "digits-mlp", "method": method, "lr": lr, "seed": 0, "epochs": 30, "batch_size": 32,
                "status": status, "final_metric": metric, "split": "test"}

    runs = [run(default * 10**e) for e in EXPONENTS] + [run(default * 10 ** (1 / 3)), run(0.1, method="step"),
                                                        run(1.0, status="diverged", metric=None),
                                                        run(default * 10**1.5, metric=0.5)]
    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"runs": runs}))
    got = anchor_ablation.recorded_references(path)
    assert sorted(k[2] for k in got) == sorted([*EXPONENTS, 1.5]) and all(k[0] == "digits-mlp" for k in got)
    assert got[("digits-mlp", 0, 1.5, 30, 32)] == 0.5
    assert math.isnan(got[("digits-mlp", 0, 1.0, 30, 32)]), "the diverged run at 10x"
    with pytest.raises(ValueError, match="every grid rate"):
        score_task("t", True, {(0, e): float("nan") for e in EXPONENTS}, _choices(lambda r: 0.0))


def test_a_rate_past_the_grid_gets_its_own_reference_run():
    """A rule that extends past 10x is scored by a cosine run at the rate it chose, trained on
    demand and kept for --resume."""
    recorded = {}
    got = anchor_ablation.reference_runs("digits-mlp", [(0, 1.5)], 1, 32, recorded)
    assert list(got) == [(0, 1.5)] and ("digits-mlp", 0, 1.5, 1, 32) in recorded
    assert anchor_ablation._exponent(0.1 * 10**1.5, 0.1) == 1.5 and anchor_ablation._exponent(0.1 * 2.15, 0.1) is None


def test_trial_length_rules_run_their_own_trials():
    """Each (schedule, trial length) pair runs once, as far past the grid as its rules go; a rule's
    trial length sets the trial steps as a share of the run."""
    settings = anchor_ablation.trial_settings()
    assert set(settings) == {r.trials_key for r in RULES}
    assert settings[anchor_ablation.DEFAULT_RULE.trials_key] == max(r.extend for r in RULES)
    assert all(settings[r.trials_key] >= r.extend for r in RULES)
    task = get_task("regress-sin")
    epochs, batch_size = 2, 32
    total = epochs * task.steps_per_epoch(batch_size)
    for fraction in (0.05, 0.25):
        res = anchor_ablation.trials(task, 0, epochs, batch_size, "cosine", fraction, extend=0)
        assert res.trial_steps == max(1, round(fraction * total)) and res.trial_schedule == "cosine"


def test_evaluate_scores_sequence_outputs_per_position():
    """A model whose class scores sit on dim 1 of a (batch, classes, positions) output is scored
    per position: the accuracy is the share of positions right, not of sequences."""
    task = get_task("grammar-lm")
    x, y = task.x_test[:50], task.y_test[:50]
    classes = task.num_classes

    def perfect(inputs):
        return 10.0 * torch.nn.functional.one_hot(y[: len(inputs)], classes).transpose(1, 2).float()

    def always_zero(inputs):
        out = torch.zeros(len(inputs), classes, y.shape[1])
        out[:, 0] = 1.0
        return out

    class Wrap(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, inputs):
            return self.fn(inputs)

    assert task.evaluate(Wrap(perfect), x, y)["acc"] == 1.0
    assert task.evaluate(Wrap(always_zero), x, y)["acc"] == pytest.approx(float((y == 0).float().mean()))


def test_each_rule_replays_the_trials_of_its_own_length():
    """A rule replays the trials of its schedule and length: trials of different lengths that rank
    the rates differently give each rule its own choice."""
    def result(fraction, best_index):
        rates = [0.1 * 10 ** e for e in EXPONENTS]
        losses = [1.0] * len(rates)
        losses[best_index] = 0.5
        return AnchorResult(lr=rates[2], given_lr=rates[2], rates=rates, losses=losses, start_loss=2.0,
                            trial_steps=max(1, round(fraction * 100)), trials_run=len(rates),
                            seconds=0.0, lowest_lr=rates[best_index], t_statistics=[0.0] * len(rates),
                            t_threshold=0.0, confidence=0.0, trial_schedule="cosine",
                            batch_losses=[[v, v] for v in losses], batch_weights=[1.0, 1.0])

    found = {key: result(key[1], 0) for key in anchor_ablation.trial_settings()}
    short = next(r for r in RULES if r.fraction == 0.05)
    found[short.trials_key] = result(short.fraction, 4)
    choices = anchor_ablation.replay(found)
    assert choices[short.name] == 1.0
    assert choices[anchor_ablation.DEFAULT_RULE.name] == -1.0


def test_update_size_quick_command_on_a_quick_ablation(tmp_path):
    """update-size reads an anchor-ablation output, measures the relative update size at each grid
    rate, and scores its leave-one-task-out rule with the ablation's own close / worse flags."""
    from autolr_experiments import update_size

    ablation = tmp_path / "ablation"
    assert anchor_ablation.main(["--quick", "--out", str(ablation), "--no-progress"]) == 0
    out = tmp_path / "size"
    assert update_size.main(["--quick", "--ablation", str(ablation / "anchor_ablation.json"), "--out", str(out),
                             "--no-progress"]) == 0
    doc = json.loads((out / "update_size.json").read_text())
    tasks = doc["tasks"]
    assert [t["task"] for t in tasks] == anchor_ablation.QUICK_TASKS
    for t in tasks:
        ratios = [t["ratios"][str(e)] for e in EXPONENTS]
        assert all(r > 0 for r in ratios[:4]), "a positive ratio at the rates that do not diverge"
    for t in tasks:
        alignments = [t["alignments"][str(e)] for e in EXPONENTS]
        assert all(a is not None and -1 <= a <= 1 for a in alignments[:4]), "a cosine at the rates that converge"
    assert tasks[1]["alignments"]["1.0"] is None, "no alignment where the run diverged"
    digits = [tasks[0]["ratios"][str(e)] for e in EXPONENTS]
    assert digits == sorted(digits) and digits[-1] > 10 * digits[0], "on digits-mlp a larger rate moves further"
    assert tasks[1]["ratios"]["1.0"] is None, "regress-sin diverges at 10x the default rate: no ratio"
    summary = doc["summary"]
    assert summary["tasks"] == 2 and len(summary["rule_picks"]) == 2
    assert "leave-one-task-out" in (out / "update_size.md").read_text().lower()
    assert len(summary["alignment"]["directions"]) == 2 and "alignment" in (out / "update_size.md").read_text()
    with pytest.raises(SystemExit, match="no anchor-ablation output"):
        update_size.main(["--ablation", str(tmp_path / "missing.json"), "--out", str(out)])


def test_update_size_rule_and_scores_on_known_numbers():
    """The rule picks, per task, the grid rate whose ratio is nearest the median best ratio of the
    other tasks; close and worse follow the ablation's definitions."""
    from autolr_experiments.update_size import analyse

    def task(name, best_e, ratios, grid, cls=True):
        return {"task": name, "classification": cls, "optimizer": "sgd", "best_exponent": best_e,
                "best": grid[best_e], "grid": grid, "ratios": dict(zip(EXPONENTS, ratios, strict=True))}

    acc = dict(zip(EXPONENTS, [0.5, 0.8, 0.9, 0.95, 0.2], strict=True))
    a = task("a", 0.5, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], acc)  # best ratio 3e-3
    b = task("b", 0.0, [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], {**acc, 0.0: 0.96})  # best ratio 3e-3
    c = task("c", -0.5, [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], {**acc, -0.5: 0.97})  # best ratio 3e-3
    s = analyse([a, b, c])
    assert s["rule_picks"] == [0.5, 0.0, -0.5], "a common best ratio is found on every task"
    assert s["rule_close"] == 3 and s["rule_worse"] == 0 and s["default_close"] == 1
    assert s["spread_best"] == pytest.approx(0.0) and s["monotone_in_rate"] == 3


def test_alignment_rules_and_scores_on_known_numbers():
    """The alignment's leave-one-task-out rule picks the grid rate nearest the other tasks' median
    best alignment; the direction rule says up where the default rate's alignment is above it, and
    is scored against the side of the best rate and with one grid step that way."""
    from autolr_experiments.update_size import analyse_alignment

    def task(name, best_e, alignments, grid):
        return {"task": name, "classification": True, "optimizer": "sgd", "best_exponent": best_e,
                "best": grid[best_e], "grid": grid, "alignments": dict(zip(EXPONENTS, alignments, strict=True))}

    acc = dict(zip(EXPONENTS, [0.5, 0.8, 0.9, 0.95, 0.2], strict=True))
    a = task("a", 0.5, [0.6, 0.4, 0.2, 0.0, -0.2], acc)  # best at +0.5: alignment 0.0; default 0.2 > 0: up
    b = task("b", -0.5, [0.2, 0.0, -0.2, -0.4, None], {**acc, -0.5: 0.97})  # best 0.0; default -0.2: down
    c = task("c", 0.0, [0.4, 0.2, 0.0, -0.2, -0.4], {**acc, 0.0: 0.96})  # best 0.0; default 0.0: not above: down
    s = analyse_alignment([a, b, c])
    assert s["rule_picks"] == [0.5, -0.5, 0.0], "a common best alignment is found on every task"
    assert s["directions"] == [0.5, -0.5, -0.5]
    assert (s["direction_tasks"], s["direction_right"], s["best_above_default"]) == (2, 2, 1)
    assert (s["rule_close"], s["rule_worse"]) == (3, 0)
    assert (s["step_close"], s["step_worse"]) == (2, 1), "c's step down (0.8) is worse than its default (0.96)"
    assert s["decreasing_in_rate"] == 2, "b diverged at the largest rate: not counted"
