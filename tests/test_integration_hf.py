"""AutoLR with the real Hugging Face Trainer: runs examples/hf_trainer_autolr.py (a tiny Llama from a
config, gradient_accumulation_steps=2, save_steps=6, resume mid-epoch) and checks what the
controller read."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import replay_rates

transformers = pytest.importorskip(
    "transformers",
    reason='transformers is not installed (pip install transformers accelerate, or the "integrations" extra)',
)
pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate (pip install accelerate)")

from autolr_fast import AutoLR  # noqa: E402
from autolr_fast.integrations.huggingface import AutoLRTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hf_trainer_autolr.py"
STEPS = 24  # 3 epochs of 8 optimizer steps (16 micro-batches of 4, gradient_accumulation_steps=2)
RESUME_AT = 12  # checkpoint-12, in the middle of the second epoch


def _load_example():
    spec = importlib.util.spec_from_file_location("hf_trainer_autolr_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingTrainer(AutoLRTrainer):
    """Records each micro-batch's plain mean token loss, computed here from the logits, and what
    AutoLR did at each optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro: list[torch.Tensor] = []
        self.steps: list[dict] = []
        self.controller0 = None
        self.add_callback(_Recorder(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        logits, labels = outputs.logits.detach().float(), inputs["labels"]
        self.micro.append(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()))
        return (loss, outputs) if return_outputs else loss


class _Recorder(transformers.TrainerCallback):
    def __init__(self, trainer: RecordingTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):  # after optimizer.step(), same rate
        t = self.trainer
        if t.controller0 is None:
            t.controller0 = copy.deepcopy(t.autolr.controller)
            t.controller0.reset()
        t.steps.append({
            "fed": t.autolr_last_loss.clone(),
            "micro": list(t.micro),
            "rate": t.autolr.last_rate.clone(),
            # AutoLR writes the rate as a 0-dim tensor or as a float, depending on device and optimizer
            "group_lrs": [torch.as_tensor(g["lr"], dtype=torch.float32).clone()
                          for g in t.autolr.optimizer.param_groups],
            "count": t.autolr.step_count,
            "gamma": t.autolr.gamma.clone(),
        })
        t.micro.clear()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    example = _load_example()
    out = str(tmp_path_factory.mktemp("hf"))
    full = example.make_trainer(out, trainer_class=RecordingTrainer)
    full.train()
    resumed = example.make_trainer(out, trainer_class=RecordingTrainer)
    resumed.train(resume_from_checkpoint=f"{out}/checkpoint-{RESUME_AT}")
    return full, resumed


def test_one_controller_step_per_optimizer_step(runs):
    full, _ = runs
    assert full.state.global_step == STEPS
    assert [s["count"] for s in full.steps] == list(range(1, STEPS + 1))
    assert all(len(s["micro"]) == 2 for s in full.steps), "each optimizer step accumulates two micro-batches"


def test_controller_reads_the_mean_loss_of_the_accumulated_micro_batches(runs):
    full, _ = runs
    for s in full.steps:
        expected = torch.stack(s["micro"]).mean()  # same token count in every micro-batch
        assert torch.allclose(s["fed"], expected, rtol=1e-5, atol=0), (s["fed"], s["micro"])


def test_rate_follows_the_loss_every_optimizer_step(runs):
    full, _ = runs
    rates = torch.stack([s["rate"] for s in full.steps])
    assert (rates[1:] != rates[:-1]).all(), f"the rate must change at every optimizer step: {rates}"
    for s in full.steps:
        assert all(torch.equal(lr, s["rate"]) for lr in s["group_lrs"]), "every param group must get the rate"
    replay = replay_rates(full.controller0, [s["fed"] for s in full.steps], [s["gamma"] for s in full.steps])
    assert torch.allclose(rates, replay, rtol=1e-5, atol=1e-9)
    assert float(rates[0]) == pytest.approx(1e-3, rel=1e-2), "the lr anchor: training starts at the optimizer's lr"
    logged = [e["learning_rate"] for e in full.state.log_history if "learning_rate" in e]
    assert logged == pytest.approx(rates.tolist(), rel=1e-6), "Trainer's logs must show AutoLR's rate"


def test_resume_from_checkpoint_gives_the_same_rates(runs):
    full, resumed = runs
    after = full.steps[RESUME_AT:]
    assert [s["count"] for s in resumed.steps] == [s["count"] for s in after]
    assert torch.equal(torch.stack([s["fed"] for s in resumed.steps]), torch.stack([s["fed"] for s in after]))
    assert torch.equal(torch.stack([s["rate"] for s in resumed.steps]), torch.stack([s["rate"] for s in after]))


def test_a_second_scheduler_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizers=\(optimizer, None\)"):
        AutoLRTrainer(model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none",
                                                                        use_cpu=True),
                      optimizers=(opt, torch.optim.lr_scheduler.ConstantLR(opt)), autolr=lambda o: None)


def test_docs_show_the_example_that_runs_here():
    docs = (ROOT / "docs" / "frameworks.md").read_text()
    assert EXAMPLE.read_text().strip() in docs, "docs/frameworks.md must show examples/hf_trainer_autolr.py verbatim"


def _trainer(tmp_path, **args):
    model = torch.nn.Linear(2, 2)
    return AutoLRTrainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, **args), autolr=lambda o: None)


def test_scheduler_arguments_that_autolr_replaces_are_named(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _trainer(tmp_path)  # the defaults: nothing to say
    with pytest.warns(UserWarning, match=r"lr_scheduler_type='cosine', warmup_steps=3 have no effect"):
        _trainer(tmp_path, lr_scheduler_type="cosine", warmup_steps=3)
    with pytest.warns(UserWarning, match="save_only_model=True.*restarts AutoLR"):
        _trainer(tmp_path, save_only_model=True)


def test_a_step_the_grad_scaler_skips_is_passed_as_skip():
    """The flag handed to AutoLR.step: the scaler's finding for this optimizer, on the device."""
    from autolr_fast.integrations.amp import scaler_skips

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    assert scaler_skips(None, opt, torch.device("cpu")) is None
    assert scaler_skips(scaler, opt, torch.device("cpu")) is None  # nothing unscaled yet
    for bad in (False, True):
        opt.zero_grad()
        scaler.scale(model(torch.ones(1, 2)).sum() * (float("inf") if bad else 1.0)).backward()
        scaler.unscale_(opt)
        flag = scaler_skips(scaler, opt, torch.device("cpu"))
        assert flag.dtype is torch.bool and flag.dim() == 0 and bool(flag) is bad
        scaler.step(opt)
        scaler.update()


FIND_EXAMPLE = ROOT / "examples" / "hf_find_anchor_lr.py"


def test_find_anchor_lr_runs_on_the_trainers_optimizer_and_batches(tmp_path):
    """examples/hf_find_anchor_lr.py: the trials run on the Trainer's own optimizer and training
    DataLoader with the model's own loss, leave the weights and the RNG as they were, set the
    optimizer's lr, and the Trainer's AutoLR starts from that lr."""
    spec = importlib.util.spec_from_file_location("hf_find_anchor_lr_example", FIND_EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = example.token_dataset(96)
    total = example.EPOCHS * 64 // example.BATCH
    trainer = example.make_trainer(str(tmp_path), data[:64], total)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    found = example.find_anchor(trainer, data[64:], total)
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items()), "weights restored"
    assert torch.equal(torch.get_rng_state(), rng), "the RNG is restored"
    assert not trainer.optimizer.state, "no trial's optimizer state carries into training"
    assert found.lr != pytest.approx(found.given_lr), "the example moves the rate (else the anchor check is void)"
    assert found.trials_run == len(found.rates) == 5 and found.trial_steps == round(0.15 * total)
    assert len({round(x, 6) for x in found.losses}) == 5, "every trial trained (different held-out losses)"
    assert found.lr in found.rates and found.given_lr == pytest.approx(1e-3)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([found.lr] * len(
        trainer.optimizer.param_groups)), "the optimizer's lr is the chosen rate"
    trainer.train()
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    # the first step is the warm-up's first: 1 / warmup_steps of the peak
    assert logged[0] * trainer.autolr.scale.warmup_steps == pytest.approx(found.lr, rel=1e-6), \
        "AutoLR anchors on the rate find_anchor_lr chose"
    assert trainer.autolr.step_count == total == len(logged)
    # the trials leave no trace but the lr: the same run without them, started at the chosen lr
    plain = example.make_trainer(str(tmp_path / "plain"), data[:64], total)
    plain.args.learning_rate = found.lr
    plain.train()
    keys = ("loss", "learning_rate", "grad_norm")
    assert [{k: e[k] for k in keys} for e in plain.state.log_history if "loss" in e] == \
        [{k: e[k] for k in keys} for e in trainer.state.log_history if "loss" in e]


def test_docs_show_the_find_anchor_example_that_runs_here():
    docs = (ROOT / "docs" / "frameworks.md").read_text()
    assert FIND_EXAMPLE.read_text().strip() in docs, \
        "docs/frameworks.md must show examples/hf_find_anchor_lr.py verbatim"


class _LinearTask(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.lin(x), labels)}


def _linear_trainer(tmp_path, total_steps, rates, trainer_class=AutoLRTrainer, **arguments):
    class Record(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            rates.append(float(optimizer.param_groups[0]["lr"]))

    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "labels": torch.randn(1)} for _ in range(32)]
    arguments = {"num_train_epochs": 1, "save_strategy": "no", **arguments}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
                                          report_to="none", use_cpu=True, disable_tqdm=True, **arguments)
    return trainer_class(model=_LinearTask(), args=args, train_dataset=data, callbacks=[Record()],
                         autolr=lambda opt: AutoLR(opt, total_steps=total_steps))


def test_a_second_train_starts_a_new_autolr_from_the_peak(tmp_path):
    rates = []
    trainer = _linear_trainer(tmp_path, 8, rates)
    trainer.train()
    first, rates[:] = list(rates), []
    old = trainer.autolr
    trainer.train()
    assert trainer.autolr is not old and trainer.autolr.step_count == 8
    # the same envelope from the same peak again (the controller's small wiggle follows the new
    # run's losses), not the last run's final rate
    assert rates[0] == pytest.approx(first[0], rel=1e-6) and rates == pytest.approx(first, rel=0.01)
    decay = trainer.autolr.scale.decay_steps  # the last step of the decay: 1 / (decay + 1) of the peak
    assert first[0] > 0 and decay >= 2 and first[-1] == pytest.approx(max(first) / (decay + 1), rel=0.05)


def test_a_second_train_starts_from_an_lr_set_in_between(tmp_path):
    """An lr set between two train() calls (by hand, by find_anchor_lr) is the new run's peak, not
    replaced by the first run's initial_lr."""
    rates = []
    trainer = _linear_trainer(tmp_path, 8, rates)
    trainer.train()
    for g in trainer.autolr.optimizer.param_groups:
        g["lr"] = 3e-3
    rates.clear()
    trainer.train()
    assert rates[0] == pytest.approx(3e-3, rel=1e-3)  # the warm-up of 8 steps has one step: factor 1


def test_a_checkpoint_of_a_run_without_autolr_switches_to_autolr(tmp_path):
    """A plain Trainer's checkpoint (a torch scheduler's scheduler.pt): AutoLRTrainer says so, keeps
    the file so that Trainer loads optimizer.pt, and continues its envelope from the step reached."""
    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "labels": torch.randn(1)} for _ in range(32)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2,
                                          report_to="none", use_cpu=True, disable_tqdm=True, num_train_epochs=2,
                                          save_strategy="epoch")
    transformers.Trainer(model=_LinearTask(), args=args, train_dataset=data).train()
    moments = []

    class Moments(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            moments.append(len(trainer.autolr.optimizer.state))

    rates = []
    trainer = _linear_trainer(tmp_path, 16, rates, num_train_epochs=2)
    trainer.add_callback(Moments())
    with pytest.warns(RuntimeWarning, match=r"not AutoLR's state \(another scheduler's: .*continuing from step 8"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert moments == [2]  # the Adam state of the weight and the bias, from optimizer.pt
    assert len(rates) == 8 and trainer.autolr.step_count == 16
    # steps 8-15 of the 16-step envelope: the peak, then its decay over the last 3 steps (a restart
    # at step 0 would hold the peak through all 8)
    decay = trainer.autolr.scale.decay_steps
    assert decay == 3 and rates[0] == pytest.approx(1e-2, rel=0.05)
    assert rates[-1] == pytest.approx(rates[0] / (decay + 1), rel=0.05)


def test_total_steps_that_differ_from_the_trainers_are_warned_about(tmp_path):
    with pytest.warns(RuntimeWarning, match=r"total_steps=4\), but this train\(\) takes 8 optimizer steps"):
        _linear_trainer(tmp_path, 4, []).train()


def test_a_second_train_refuses_the_previous_autolr_and_warnings_point_at_the_caller(tmp_path):
    trainer = _linear_trainer(tmp_path, 8, [])
    trainer.train()
    first = trainer.autolr
    trainer._make_autolr = lambda opt: first  # a function that hands back the AutoLR it built before
    with pytest.raises(ValueError, match="returned the AutoLR of the previous train"):
        trainer.train()
    with pytest.warns(RuntimeWarning, match="total_steps=4") as record:
        _linear_trainer(tmp_path, 4, []).train()
    assert record[0].filename == __file__


def test_a_run_resumed_to_train_longer_follows_its_new_length_and_says_so(tmp_path):
    """Trainer loads scheduler.pt under catch_warnings and drops a single warning: the integration
    issues AutoLR's at the next step. The rate follows the 16-step envelope, not the saved 8-step
    one, which ended at 0."""
    first = []
    _linear_trainer(tmp_path / "a", 8, first, save_strategy="epoch").train()
    assert first[-1] == pytest.approx(max(first) / 3, rel=0.05)  # the envelope's last step (decay 2); the next: 0
    rates = []
    longer = _linear_trainer(tmp_path / "b", 16, rates, num_train_epochs=2)
    with pytest.warns(RuntimeWarning, match=r"saved with total_steps=8,.*built with total_steps=16,") as record:
        longer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    assert len(rates) == 8 and min(rates[:4]) > 0.1 * max(first)
    assert any(w.filename == __file__ for w in record)


def test_a_training_step_override_without_super_is_named(tmp_path):
    class Own(AutoLRTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = model(**inputs)["loss"]
            self.accelerator.backward(loss)
            return loss.detach()

    with pytest.raises(RuntimeError, match=r"must call super\(\)\.training_step"):
        _linear_trainer(tmp_path, 8, [], trainer_class=Own).train()


def test_the_adapter_used_directly_lets_autolrs_warnings_through():
    from autolr_fast.integrations.huggingface import AutoLRSchedulerAdapter

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = AutoLR(opt, total_steps=4)
    model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    for _ in range(4):
        saved.step(torch.tensor(1.0))
    state = saved.state_dict()
    saved.close()
    with pytest.warns(RuntimeWarning, match="saved with total_steps=4"):
        AutoLRSchedulerAdapter(AutoLR(opt, total_steps=8)).load_state_dict(state)
