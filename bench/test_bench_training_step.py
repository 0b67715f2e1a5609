"""What AutoLR costs per training step, measured side by side in one run.

Groups (each row's time is reported as a ratio to its group's baseline):

* ``mnist1d-cnn step (cpu)``: the MNIST-1D CNN, batch 100, SGD with momentum, with
  CosineAnnealingLR (baseline) and with AutoLR driven by the published MLR-SNet controller.
* ``resnet18 step (cuda, batch 128)``: the same pair for torchvision's ResNet-18 on
  CIFAR-shaped random data, fused SGD (skipped without a GPU).
* ``meta-step``: AutoLR with a meta-step every step (``MetaConfig(interval=1)``) against the
  plain AutoLR step (baseline), on the MNIST-1D CNN (CPU) and ResNet-18 (GPU).
* ``resnet18 step, interleaved (cuda)``: blocks of steps of CosineAnnealingLR, AutoLR with its
  defaults (``AutoLR(opt)``), AutoLR with the published controller, and the published script's
  eager controller with ``float(lr)``, alternating on four copies of one model; the median
  ratios of the block times to cosine's are in ``extra_info`` (robust to clock and load drift).
* ``resnet18 step, CUDA graph``: the whole training step with ``AutoLR.step`` inside, eager
  (baseline) and captured once and replayed.

``extra_info``: ``host_syncs_per_step`` (host reads of tensor values per step; on a GPU every
synchronising call), and for the meta-step the peak memory of one step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from bench_utils import host_syncs_per_step, peak_memory

from autolr_fast import MetaConfig


def _cnn(mnist1d_task):
    torch.manual_seed(0)
    return mnist1d_task.make_model()


def _record(benchmark, step, device="cpu", baseline=False, **extra):
    benchmark.extra_info["host_syncs_per_step"] = host_syncs_per_step(step, device)
    if baseline:
        benchmark.extra_info["baseline"] = True
    benchmark.extra_info.update(extra)


# ------------------------------------------------------------------------------------------------
# MNIST-1D CNN on the CPU
# ------------------------------------------------------------------------------------------------
CPU_GROUP = "mnist1d-cnn step (cpu)"


@pytest.mark.benchmark(group=CPU_GROUP)
def test_cnn_step_cosine(benchmark, mnist1d_task, mnist1d_batches, make_train_step):
    step = make_train_step(_cnn(mnist1d_task), mnist1d_batches, mnist1d_task.loss_fn, "cosine")
    _record(benchmark, step, baseline=True)
    benchmark(step)


@pytest.mark.benchmark(group=CPU_GROUP)
def test_cnn_step_autolr(benchmark, mnist1d_task, mnist1d_batches, make_train_step, official_controller):
    step = make_train_step(_cnn(mnist1d_task), mnist1d_batches, mnist1d_task.loss_fn, "autolr", official_controller)
    _record(benchmark, step)
    benchmark(step)


# ------------------------------------------------------------------------------------------------
# ResNet-18 on a GPU
# ------------------------------------------------------------------------------------------------
GPU_GROUP = "resnet18 step (cuda, batch 128)"


def _resnet_problem(device):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [(torch.randn(128, 3, 32, 32, generator=g).to(device),
                torch.randint(0, 10, (128,), generator=g).to(device))
               for _ in range(4)]
    return model, batches


def _timed_on_gpu(benchmark, step):
    def run():
        step()
        torch.cuda.synchronize()

    benchmark(run)


@pytest.mark.gpu
@pytest.mark.benchmark(group=GPU_GROUP)
def test_resnet18_step_cosine(benchmark, cuda_device, make_train_step):
    model, batches = _resnet_problem(cuda_device)
    step = make_train_step(model, batches, torch.nn.functional.cross_entropy, "cosine", fused=True)
    _record(benchmark, step, cuda_device, baseline=True)
    _timed_on_gpu(benchmark, step)


@pytest.mark.gpu
@pytest.mark.benchmark(group=GPU_GROUP)
def test_resnet18_step_autolr(benchmark, cuda_device, make_train_step, official_controller):
    model, batches = _resnet_problem(cuda_device)
    step = make_train_step(model, batches, torch.nn.functional.cross_entropy, "autolr", official_controller, fused=True)
    _record(benchmark, step, cuda_device)
    _timed_on_gpu(benchmark, step)


@pytest.mark.gpu
@pytest.mark.benchmark(group=GPU_GROUP)
def test_resnet18_step_published_eager_float(benchmark, cuda_device, make_train_step, official_controller):
    model, batches = _resnet_problem(cuda_device)
    step = make_train_step(model, batches, torch.nn.functional.cross_entropy, "published", official_controller,
                           fused=True)
    _record(benchmark, step, cuda_device)
    _timed_on_gpu(benchmark, step)


@pytest.mark.gpu
@pytest.mark.benchmark(group="resnet18 step, interleaved (cuda)")
def test_resnet18_interleaved(benchmark, cuda_device, make_train_step, official_controller):
    """Blocks of 10 steps of each schedule, in a new random order every round (a fixed order
    gives each position its own warm or cold caches), each block timed between two
    synchronizations; ``extra_info[name]`` is the median over the rounds of (block time /
    cosine's block time in that round)."""
    import random
    import statistics
    import time

    model, batches = _resnet_problem(cuda_device)
    kinds = {"cosine": ("cosine", None), "autolr-defaults": ("autolr-defaults", None),
             "autolr-published-controller": ("autolr", official_controller),
             "published-eager-float": ("published", official_controller)}
    steps = {name: make_train_step(copy.deepcopy(model), batches, torch.nn.functional.cross_entropy, kind,
                                   controller, fused=True)
             for name, (kind, controller) in kinds.items()}
    ratios: dict[str, list[float]] = {name: [] for name in steps}
    order = random.Random(0)

    def one_round():
        times = {}
        names = list(steps)
        order.shuffle(names)
        for name in names:
            step = steps[name]
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                step()
            torch.cuda.synchronize()
            times[name] = time.perf_counter() - start
        for name in steps:
            ratios[name].append(times[name] / times["cosine"])

    one_round()  # warm-up (cuDNN autotuning, the Triton compile, the lr anchor's settle)
    for values in ratios.values():
        values.clear()
    benchmark.pedantic(one_round, rounds=40, iterations=1)
    benchmark.extra_info["baseline"] = True
    for name, values in ratios.items():
        benchmark.extra_info[f"{name}_over_cosine_median"] = round(statistics.median(values), 4)
    benchmark.extra_info["rounds"] = len(ratios["cosine"])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager", "cuda-graph"])
def test_resnet18_step_in_a_cuda_graph(benchmark, cuda_device, mode):
    """AutoLR with its defaults inside the whole training step; ``cuda-graph`` captures it once
    (after the warm-up torch.cuda.graphs asks for) and replays it."""
    from autolr_fast import AutoLR

    model, batches = _resnet_problem(cuda_device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
    sched = AutoLR(opt)
    static_x, static_y = (t.clone() for t in batches[0])

    def training_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(static_x), static_y)
        loss.backward()
        sched.step(loss)
        opt.step()
        return loss

    if mode == "cuda-graph":
        from gpu_steps import capture_training_step, warm_up_for_capture  # tests/ (on sys.path: conftest.py)

        warm_up_for_capture(training_step, sched)
        step = capture_training_step(training_step, opt)[0].replay
    else:
        for _ in range(3):
            training_step()
        step = training_step
    benchmark.group = "resnet18 step, CUDA graph (cuda, batch 128)"
    if mode == "eager":
        benchmark.extra_info["baseline"] = True
    rates = []

    def run():
        step()
        rates.append(opt.param_groups[0]["lr"].clone())
        torch.cuda.synchronize()

    benchmark(run)
    assert len(set(torch.stack(rates).tolist())) > 1, "the rate did not change from step to step"


# ------------------------------------------------------------------------------------------------
# Meta-step every step vs the plain step
# ------------------------------------------------------------------------------------------------
def _meta(val_batches, loss_fn, low_memory=True):
    return lambda model: MetaConfig(model=model, val_data=val_batches, loss_fn=loss_fn, interval=1,
                                    low_memory=low_memory)


@pytest.mark.benchmark(group="meta-step (cpu, mnist1d-cnn)")
def test_cnn_plain_autolr_step(benchmark, mnist1d_task, mnist1d_batches, make_train_step, official_controller):
    step = make_train_step(_cnn(mnist1d_task), mnist1d_batches, mnist1d_task.loss_fn, "autolr", official_controller)
    _record(benchmark, step, baseline=True, **peak_memory(step))
    benchmark(step)


@pytest.mark.benchmark(group="meta-step (cpu, mnist1d-cnn)")
def test_cnn_meta_step_every_step(benchmark, mnist1d_task, mnist1d_batches, make_train_step, official_controller):
    meta = _meta(mnist1d_batches[::-1], mnist1d_task.loss_fn)
    step = make_train_step(_cnn(mnist1d_task), mnist1d_batches, mnist1d_task.loss_fn, "autolr", official_controller,
                           meta=meta)
    _record(benchmark, step, **peak_memory(step))
    benchmark(step)
    assert step.schedule.autolr.meta.meta_steps > 0


@pytest.mark.benchmark(group="meta-step (cpu, mnist1d-cnn)")
def test_cnn_meta_step_every_step_batched(benchmark, mnist1d_task, mnist1d_batches, make_train_step,
                                          official_controller):
    """MetaConfig(low_memory=False): all validation gradients, then one fused dot."""
    meta = _meta(mnist1d_batches[::-1], mnist1d_task.loss_fn, low_memory=False)
    step = make_train_step(_cnn(mnist1d_task), mnist1d_batches, mnist1d_task.loss_fn, "autolr", official_controller,
                           meta=meta)
    _record(benchmark, step, **peak_memory(step))
    benchmark(step)
    assert step.schedule.autolr.meta.meta_steps > 0


@pytest.mark.gpu
@pytest.mark.benchmark(group="meta-step (cuda, resnet18 batch 128)")
def test_resnet18_plain_autolr_step(benchmark, cuda_device, make_train_step, official_controller):
    model, batches = _resnet_problem(cuda_device)
    step = make_train_step(model, batches, torch.nn.functional.cross_entropy, "autolr", official_controller, fused=True)
    _record(benchmark, step, cuda_device, baseline=True, **peak_memory(step, cuda_device))
    _timed_on_gpu(benchmark, step)


@pytest.mark.gpu
@pytest.mark.benchmark(group="meta-step (cuda, resnet18 batch 128)")
@pytest.mark.parametrize("low_memory", [True, False], ids=["streamed", "batched"])
def test_resnet18_meta_step_every_step(benchmark, cuda_device, make_train_step, official_controller, low_memory):
    model, batches = _resnet_problem(cuda_device)
    meta = _meta(batches[::-1], torch.nn.functional.cross_entropy, low_memory=low_memory)
    step = make_train_step(model, batches, torch.nn.functional.cross_entropy, "autolr", official_controller,
                           meta=meta, fused=True)
    _record(benchmark, step, cuda_device, **peak_memory(step, cuda_device))
    _timed_on_gpu(benchmark, step)


# ------------------------------------------------------------------------------------------------
# A small ResNet on the CPU (BatchNorm: the meta-step must clone its buffers)
# ------------------------------------------------------------------------------------------------
class _Block(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(cout)
        self.c2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = torch.nn.BatchNorm2d(cout)
        self.skip = (torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else torch.nn.Identity())

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.skip(x))


def small_resnet(width: int = 16, num_classes: int = 10) -> torch.nn.Module:
    """A ResNet-8 (three stages of one basic block), for CPU benchmarks."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
        _Block(width, width, 1), _Block(width, 2 * width, 2), _Block(2 * width, 4 * width, 2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4 * width, num_classes),
    )


def _small_resnet_problem():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(8)]
    torch.manual_seed(0)
    return small_resnet(), batches


# ------------------------------------------------------------------------------------------------
# A host-bound model: about as many small tensors as ResNet-18 (82 parameters and 60 buffers
# against its 62 and 60) and little arithmetic, so the time is the per-tensor host work of the
# meta-step (a GPU step is host-bound the same way)
# ------------------------------------------------------------------------------------------------
def _many_tensors_problem():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(8)]
    torch.manual_seed(0)
    nn = torch.nn
    blocks = [nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU()) for _ in range(20)]
    return nn.Sequential(*blocks, nn.Linear(32, 10)), batches


#: benchmark group -> (the problem, whether to record peak memory)
CPU_META_PROBLEMS = {
    "meta-step (cpu, resnet-8 batch 64)": (_small_resnet_problem, True),
    "meta-step (cpu, host-bound: 20 Linear+BN blocks, batch 16)": (_many_tensors_problem, False),
}


@pytest.mark.parametrize("group", list(CPU_META_PROBLEMS), ids=["small_resnet", "many_tensors"])
def test_cpu_plain_autolr_step(benchmark, make_train_step, official_controller, group):
    problem, memory = CPU_META_PROBLEMS[group]
    benchmark.group = group
    model, batches = problem()
    step = make_train_step(model, batches, torch.nn.functional.cross_entropy, "autolr", official_controller)
    _record(benchmark, step, baseline=True, **(peak_memory(step) if memory else {}))
    benchmark(step)


@pytest.mark.parametrize("group", list(CPU_META_PROBLEMS), ids=["small_resnet", "many_tensors"])
def test_cpu_meta_step_every_step(benchmark, make_train_step, official_controller, group):
    problem, memory = CPU_META_PROBLEMS[group]
    benchmark.group = group
    model, batches = problem()
    meta = _meta(batches[::-1], torch.nn.functional.cross_entropy)
    step = make_train_step(model, batches, torch.nn.functional.cross_entropy, "autolr", official_controller, meta=meta)
    _record(benchmark, step, **(peak_memory(step) if memory else {}))
    benchmark(step)
    assert step.schedule.autolr.meta.meta_steps > 0


# ------------------------------------------------------------------------------------------------
# The same pair interleaved: robust to a machine whose load changes during the run
# ------------------------------------------------------------------------------------------------
@pytest.mark.benchmark(group="mnist1d-cnn step, interleaved (cpu)")
def test_autolr_over_cosine_interleaved_mnist1d(benchmark, mnist1d_task, mnist1d_batches, make_train_step,
                                                 official_controller):
    """Blocks of 20 steps of each schedule, alternating; the median ratio of the block times is
    AutoLR's relative cost on the same optimizer step (``extra_info``)."""
    import statistics
    import time

    cosine = make_train_step(_cnn(mnist1d_task), mnist1d_batches, mnist1d_task.loss_fn, "cosine")
    autolr = make_train_step(_cnn(mnist1d_task), mnist1d_batches, mnist1d_task.loss_fn, "autolr", official_controller)
    ratios = []

    def pair():
        times = []
        for step in (cosine, autolr):
            start = time.perf_counter()
            for _ in range(20):
                step()
            times.append(time.perf_counter() - start)
        ratios.append(times[1] / times[0])

    pair()  # warm-up
    ratios.clear()
    benchmark.pedantic(pair, rounds=60, iterations=1)
    benchmark.extra_info["autolr_over_cosine_median"] = round(statistics.median(ratios), 4)
    benchmark.extra_info["pairs"] = len(ratios)
