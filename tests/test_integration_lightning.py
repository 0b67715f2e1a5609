"""AutoLR in real PyTorch Lightning: runs examples/lightning_autolr.py (accumulate_grad_batches=2,
precision="bf16-mixed", checkpoint every epoch, resume) and checks what the controller read."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from conftest import replay_rates

pl = pytest.importorskip(
    "lightning.pytorch", reason='lightning is not installed (pip install lightning, or the "integrations" extra)'
)

from autolr_fast import AutoLR  # noqa: E402
from autolr_fast.integrations.lightning import AutoLRCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_autolr.py"
STEPS_PER_EPOCH = 6  # 12 micro-batches of 8, accumulate_grad_batches=2


def _as_tensor(lr) -> torch.Tensor:
    # AutoLR writes the rate as a 0-dim tensor or as a float, depending on device and optimizer
    return torch.as_tensor(lr, dtype=torch.float32).clone()


def _load_example():
    spec = importlib.util.spec_from_file_location("lightning_autolr_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder(pl.Callback):
    """Listed after AutoLRCallback, so its on_before_optimizer_step sees the rate just set."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.controller0 = None  # the controller's weights, with a fresh state, for a replay
        self.global_step = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        autolr = next(c for c in trainer.callbacks if isinstance(c, AutoLRCallback))
        sched = autolr.scheduler
        if self.controller0 is None:
            self.controller0 = copy.deepcopy(sched.controller)
            self.controller0.reset()
        self.steps.append({
            "fed": autolr.last_loss.clone(),
            "micro": list(pl_module.raw_losses),
            "rate": sched.last_rate.clone(),
            "group_lr": _as_tensor(optimizer.param_groups[0]["lr"]),
            "count": sched.step_count,
            "gamma": sched.gamma.clone(),
        })
        pl_module.raw_losses.clear()

    def on_train_end(self, trainer, pl_module) -> None:
        self.global_step = trainer.global_step


def _recording(example):
    """The example's module, keeping every micro-batch's loss as ``training_step`` returns it."""

    class Recording(example.TinyClassifier):
        def __init__(self):
            super().__init__()
            self.raw_losses = []

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.raw_losses.append(loss.detach().float().clone())  # before Lightning divides it
            return loss

    return Recording


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    example = _load_example()
    Recording = _recording(example)
    out = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    full = Recorder()
    example.fit(out, max_epochs=4, callbacks=[full], module=Recording)
    resumed = Recorder()
    example.fit(out, max_epochs=4, ckpt_path=out / "epoch=1.ckpt", callbacks=[resumed], module=Recording)
    return full, resumed


def test_one_controller_step_per_optimizer_step(runs):
    full, _ = runs
    assert full.global_step == 4 * STEPS_PER_EPOCH
    assert [s["count"] for s in full.steps] == list(range(1, 4 * STEPS_PER_EPOCH + 1))
    assert all(len(s["micro"]) == 2 for s in full.steps), "each optimizer step accumulates two micro-batches"


def test_controller_reads_the_mean_loss_of_the_accumulated_micro_batches(runs):
    full, _ = runs
    for s in full.steps:
        expected = torch.stack(s["micro"]).mean()
        assert torch.allclose(s["fed"], expected, rtol=1e-6, atol=0), (s["fed"], s["micro"])


def test_rate_follows_the_loss_every_optimizer_step(runs):
    full, _ = runs
    rates = torch.stack([s["rate"] for s in full.steps])
    assert (rates[1:] != rates[:-1]).all(), f"the rate must change at every optimizer step: {rates}"
    assert torch.equal(rates, torch.stack([s["group_lr"] for s in full.steps])), "the optimizer must get the rate"
    replay = replay_rates(full.controller0, [s["fed"] for s in full.steps], [s["gamma"] for s in full.steps])
    assert torch.allclose(rates, replay, rtol=1e-5, atol=1e-7)
    assert float(rates[0]) == pytest.approx(0.1, rel=1e-2), "the lr anchor: training starts at the optimizer's lr"


def test_resume_from_a_lightning_checkpoint_gives_the_same_rates(runs):
    full, resumed = runs
    after = full.steps[2 * STEPS_PER_EPOCH:]  # the checkpoint was written after epoch 2 (epoch=1.ckpt)
    assert [s["count"] for s in resumed.steps] == [s["count"] for s in after]
    assert torch.equal(torch.stack([s["fed"] for s in resumed.steps]), torch.stack([s["fed"] for s in after]))
    assert torch.equal(torch.stack([s["rate"] for s in resumed.steps]), torch.stack([s["rate"] for s in after]))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_short_last_window_and_loss_scaling(precision):
    """11 micro-batches with accumulate_grad_batches=3: windows of 3, 3, 3 and 2, each read as its
    own mean. "16-mixed" runs with a CPU GradScaler (Lightning hands over the scaled loss)."""
    from lightning.pytorch.plugins import MixedPrecision

    example = _load_example()
    Recording = _recording(example)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if precision == "16-mixed" else None
    recorder = Recorder()
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=3, accelerator="cpu", devices=1,
                         plugins=[MixedPrecision(precision, "cpu", scaler=scaler)],
                         callbacks=[AutoLRCallback(lambda opt: example.AutoLR(opt)),
                                    recorder],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Recording(), example.loader(n=88))
    assert [len(s["micro"]) for s in recorder.steps] == [3, 3, 3, 2]
    for s in recorder.steps:
        assert torch.allclose(s["fed"], torch.stack(s["micro"]).mean(), rtol=1e-6, atol=0)


def test_docs_show_the_example_that_runs_here():
    docs = (ROOT / "docs" / "frameworks.md").read_text()
    assert EXAMPLE.read_text().strip() in docs, "docs/frameworks.md must show examples/lightning_autolr.py verbatim"


class _Tiny(pl.LightningModule):
    """A small classifier; ``make_optimizer`` and ``inf_grad_at`` (a global step whose gradient
    is made infinite, with a finite loss) set per test."""

    def __init__(self, make_optimizer, inf_grad_at=None, none_at_batch=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.make_optimizer, self.inf_grad_at, self.none_at_batch = make_optimizer, inf_grad_at, none_at_batch
        self.optimizer_steps = 0

    def training_step(self, batch, batch_idx):
        if batch_idx == self.none_at_batch:
            return None  # Lightning's way to skip a batch
        out = self.net(batch[0])
        if self.global_step == self.inf_grad_at:
            out.register_hook(lambda g: g * float("inf"))
        return torch.nn.functional.cross_entropy(out, batch[1])

    def configure_optimizers(self):
        opt = self.make_optimizer(self.parameters())
        opt.register_step_post_hook(lambda *a: setattr(self, "optimizer_steps", self.optimizer_steps + 1))
        return opt


def _tiny_loader(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :3].argmax(1)), batch_size=8)


def _fit(module, callback, max_steps, **trainer_kwargs):
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[callback], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **trainer_kwargs)
    trainer.fit(module, _tiny_loader())
    return trainer


def test_lbfgs_is_read_once_per_optimizer_step():
    """LBFGS evaluates the closure several times per step; the controller reads the first."""
    module = _Tiny(lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=4))
    callback = AutoLRCallback(lambda opt: AutoLR(opt))
    _fit(module, callback, max_steps=3)
    assert module.optimizer_steps == 3 and callback.scheduler.step_count == 3


def test_a_step_the_grad_scaler_skips_does_not_advance_the_controller():
    from lightning.pytorch.plugins import MixedPrecision

    module = _Tiny(lambda p: torch.optim.SGD(p, lr=0.1), inf_grad_at=2)
    callback = AutoLRCallback(lambda opt: AutoLR(opt))
    with pytest.warns(RuntimeWarning, match="or a step the GradScaler skipped"):
        _fit(module, callback, max_steps=6,
             plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    sched = callback.scheduler
    assert module.optimizer_steps == 5 and sched.step_count == 6 and sched.skipped_steps == 1


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_a_window_whose_last_batch_is_skipped_steps_the_controller_as_the_optimizer(precision):
    """Under 16-mixed Lightning does not step the optimizer after a window whose last
    training_step returned None; under bf16-mixed it steps on the earlier micro-batches."""
    from lightning.pytorch.plugins import MixedPrecision

    module = _Tiny(lambda p: torch.optim.SGD(p, lr=0.1), none_at_batch=3)
    callback = AutoLRCallback(lambda opt: AutoLR(opt))
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped step's warning
        _fit(module, callback, max_steps=3, accumulate_grad_batches=2,
             plugins=[MixedPrecision(precision, "cpu", scaler=scaler)])
    sched = callback.scheduler
    assert sched.step_count - sched.skipped_steps == module.optimizer_steps
    assert sched.skipped_steps == (1 if precision == "16-mixed" else 0)


def test_meta_steps_read_the_gradients_clipped_as_the_optimizer_applies_them(monkeypatch):
    from autolr_fast import MetaConfig, MLRSNet
    from autolr_fast.meta import MetaTrainer

    seen = []
    step = MetaTrainer.step

    def spy(self, x):
        seen.append(torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in self.model.parameters())))
        return step(self, x)

    monkeypatch.setattr(MetaTrainer, "step", spy)
    val = [next(iter(_tiny_loader(16)))]
    module = _Tiny(lambda p: torch.optim.SGD(p, lr=0.1))
    callback = AutoLRCallback(lambda opt: AutoLR(opt, MLRSNet(hidden_size=8), gamma=0.1, meta=MetaConfig(
        module.net, val, torch.nn.functional.cross_entropy, interval=1)))
    _fit(module, callback, max_steps=3, gradient_clip_val=0.01)
    assert len(seen) == 3 and all(float(n) <= 0.01 * (1 + 1e-4) for n in seen), seen


FIND_EXAMPLE = ROOT / "examples" / "lightning_find_anchor_lr.py"


class FirstRate(pl.Callback):
    """Listed after AutoLRCallback: the rate of the first optimizer step, and the optimizer's count."""

    def __init__(self) -> None:
        self.first_rate = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.first_rate is None:
            self.first_rate = float(_as_tensor(optimizer.param_groups[0]["lr"]))


def test_find_anchor_lr_sets_the_lr_that_configure_optimizers_builds_fit_with(tmp_path):
    """examples/lightning_find_anchor_lr.py: the trials run on the optimizer configure_optimizers
    builds, leave the weights and the RNG as they were, and the optimizer fit() builds starts at the
    chosen rate, where AutoLR anchors."""
    spec = importlib.util.spec_from_file_location("lightning_find_anchor_lr_example", FIND_EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    module = example.TinyClassifier()
    train, held_out = example.data()
    total = example.EPOCHS * len(train)
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    found = example.find_anchor(module, train, held_out, total)
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items()), "weights restored"
    assert torch.equal(torch.get_rng_state(), rng), "the RNG is restored (the shuffling DataLoader draws from it)"
    assert found.trials_run == 5 and len({round(x, 6) for x in found.losses}) == 5, "every trial trained"
    assert module.lr == found.lr and found.given_lr == pytest.approx(0.003) and found.lr in found.rates
    autolr = AutoLRCallback(lambda opt: AutoLR(opt, total_steps=total))
    first = FirstRate()
    trainer = pl.Trainer(max_epochs=example.EPOCHS, accelerator="cpu", devices=1, callbacks=[autolr, first],
                         default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train)
    # the first step is the warm-up's first: 1 / warmup_steps of the peak
    peak = first.first_rate * autolr.scheduler.scale.warmup_steps
    assert peak == pytest.approx(found.lr, rel=1e-6), "AutoLR anchors on the rate find_anchor_lr chose"
    assert autolr.scheduler.step_count == total


def test_docs_show_the_find_anchor_example_that_runs_here():
    docs = (ROOT / "docs" / "frameworks.md").read_text()
    assert FIND_EXAMPLE.read_text().strip() in docs, \
        "docs/frameworks.md must show examples/lightning_find_anchor_lr.py verbatim"


@pytest.mark.parametrize("total, warned", [(6, True), (3, False)])
def test_total_steps_that_differ_from_the_fits_are_warned_about(total, warned):
    """epochs * len(loader) with accumulate_grad_batches=2 counts micro-batches: 6 for a fit of
    3 optimizer steps, an envelope that never reaches 0."""
    module = _Tiny(lambda p: torch.optim.SGD(p, lr=0.1))
    callback = AutoLRCallback(lambda opt: AutoLR(opt, total_steps=total))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(module, callback, max_steps=-1, max_epochs=1, accumulate_grad_batches=2)
    told = [str(w.message) for w in caught if "AutoLRCallback: AutoLR(total_steps=" in str(w.message)]
    assert len(told) == int(warned)
    assert not warned or "AutoLR(total_steps=6), but this fit takes 3 optimizer steps" in told[0]
    assert callback.scheduler.step_count == 3


def test_autolr_warnings_raised_inside_a_fit_point_at_the_callers_line():
    module = _Tiny(lambda p: torch.optim.SGD(p, lr=0.1))
    module.training_step = lambda batch, batch_idx: module.net(batch[0]).sum() * float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(module, AutoLRCallback(lambda opt: AutoLR(opt)), max_steps=2)
    told = [w for w in caught if "AutoLR" in str(w.message) and "finite" in str(w.message)]
    assert told and all(w.filename == __file__ for w in told), [(w.filename, str(w.message)[:60]) for w in told]


def test_a_continued_fit_with_a_new_autolr_for_its_steps_is_not_warned_about():
    """fit, raise max_epochs, fit again: the second fit's new AutoLR runs the 6 steps left, and an
    AutoLR of that length is what the check expects (it used to ask for all 12 steps, whose
    envelope would then stop at its middle)."""
    module = _Tiny(lambda p: torch.optim.SGD(p, lr=0.1))
    callback = AutoLRCallback(lambda opt: AutoLR(opt, total_steps=6))
    trainer = pl.Trainer(max_epochs=1, callbacks=[callback], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.fit(module, _tiny_loader())
        trainer.fit_loop.max_epochs = 2
        trainer.fit(module, _tiny_loader())
    assert trainer.global_step == 12 and callback.scheduler.step_count == 6
    callback = AutoLRCallback(lambda opt: AutoLR(opt, total_steps=12))
    trainer.callbacks = [callback]
    trainer.fit_loop.max_epochs = 3
    with pytest.warns(RuntimeWarning, match=r"takes 6 optimizer steps .*total_steps=trainer.estimated_stepping_batches "
                                            r"- trainer.global_step"):
        trainer.fit(module, _tiny_loader())


def test_a_scheduler_added_during_the_fit_is_warned_about():
    """StochasticWeightAveraging adds SWALR at its start epoch; AutoLR would override its rates."""
    module = _Tiny(lambda p: torch.optim.SGD(p, lr=0.1))
    callback = AutoLRCallback(lambda opt: AutoLR(opt))
    swa = pl.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    trainer = pl.Trainer(max_epochs=3, callbacks=[callback, swa], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(RuntimeWarning, match=r"a learning-rate scheduler was added during the fit \(SWALR"):
        trainer.fit(module, _tiny_loader())


def test_resuming_a_continued_fit_compares_its_autolr_with_the_steps_it_drives(tmp_path):
    """A checkpoint taken in a continued fit (a new AutoLR for the 6 steps left after 6) resumes
    without a total_steps warning: the step that AutoLR started at is kept in the checkpoint."""
    module = _Tiny(lambda p: torch.optim.SGD(p, lr=0.1))
    saver = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=3, save_top_k=-1)

    def trainer(epochs, callback, **kwargs):
        return pl.Trainer(max_epochs=epochs, callbacks=[callback, *kwargs.pop("extra", [])], accelerator="cpu",
                          devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)

    first = trainer(1, AutoLRCallback(lambda opt: AutoLR(opt, total_steps=6)), enable_checkpointing=False)
    first.fit(module, _tiny_loader())
    callback = AutoLRCallback(lambda opt: AutoLR(opt, total_steps=6))
    first.callbacks = [callback, saver]
    first.fit_loop.max_epochs = 2
    first.fit(module, _tiny_loader())
    checkpoint = str(next(tmp_path.glob("*step=9*.ckpt")))
    resumed = AutoLRCallback(lambda opt: AutoLR(opt, total_steps=6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer(2, resumed, enable_checkpointing=False).fit(_Tiny(lambda p: torch.optim.SGD(p, lr=0.1)),
                                                            _tiny_loader(), ckpt_path=checkpoint)
    assert resumed.scheduler.step_count == 6
