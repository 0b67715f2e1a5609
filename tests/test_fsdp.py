"""FSDP2 (torch.distributed.fsdp.fully_shard) and DDP on two CPU processes with gloo.

One spawn runs everything (starting the processes is most of the cost), with the model and the
training loop of examples/fsdp_autolr.py: that loop under FSDP2 and under DDP from the same
weights, data and controller; fused AdamW under FSDP2; and an AutoLR with a meta-step
(MetaConfig) on the sharded model.
"""

from __future__ import annotations

import copy
import faulthandler
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import replay_rates
from torch import nn

from autolr_fast import AutoLR, MetaConfig, MLRSNet, load_pretrained

WORLD = 2
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp_autolr.py"

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")


def _load_example():
    spec = importlib.util.spec_from_file_location("fsdp_autolr_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _run(example, model, rank, **kwargs) -> dict:
    sched, rates, local = example.train(model, rank, **kwargs)
    twin = copy.deepcopy(sched.controller)  # the weights (no meta-step moves them), fresh state
    twin.reset()
    return {"rates": rates, "local": local, "gamma": sched.gamma.clone(), "twin": twin.state_dict(),
            "weights": [_full(p) for p in model.parameters()]}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    faulthandler.enable()  # a native abort prints where the Python code was
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        example = _load_example()
        mesh = init_device_mesh("cpu", (WORLD,))
        out = {}
        fsdp = example.sharded_model(mesh)
        out["sharded"] = all(type(p).__name__ == "DTensor" for p in fsdp.parameters())
        out["fsdp"] = _run(example, fsdp, rank)
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)))
        out["ddp"] = _run(example, ddp, rank)
        fsdp = example.sharded_model(mesh)
        out["adamw"] = _run(example, fsdp, rank, steps=3, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True))

        fsdp = example.sharded_model(mesh)
        opt = torch.optim.SGD(fsdp.parameters(), lr=0.1, momentum=0.9)
        val = [(torch.randn(8, 8), torch.randint(0, 3, (8,)))]
        try:
            AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.1,
                   meta=MetaConfig(fsdp, val, nn.functional.cross_entropy, interval=1))
            out["meta_refusal"] = None
        except Exception as exc:  # noqa: BLE001 - the test reads its type and message
            out["meta_refusal"] = f"{type(exc).__name__}: {exc}"
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        del fsdp, ddp, opt
        dist.barrier()  # tear down only once every rank is done communicating (see test_ddp.py)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(os.path.join(d, "init"), d), nprocs=WORLD, join=True, start_method="spawn")
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def test_fsdp2_runs_on_cpu_with_gloo(ranks):
    assert all(r["sharded"] for r in ranks), "fully_shard must turn the parameters into DTensors"


def test_every_rank_gets_the_same_rate_under_fsdp2(ranks):
    r0, r1 = ranks[0]["fsdp"], ranks[1]["fsdp"]
    assert not torch.equal(r0["local"], r1["local"]), "ranks must see different losses for the test to mean anything"
    assert torch.equal(r0["rates"], r1["rates"])
    assert (r0["rates"][1:] != r0["rates"][:-1]).all(), "the rate must follow the loss at every step"
    # the controller read the mean loss over ranks (its scale anchored on the first mean loss)
    twin = load_pretrained("default")
    twin.load_state_dict(r0["twin"])
    fed = list((r0["local"] + r1["local"]) / 2)
    expected = replay_rates(twin, fed, [r0["gamma"]] * len(fed))
    assert torch.allclose(r0["rates"], expected, rtol=1e-5, atol=1e-7)
    assert float(r0["rates"][0]) == pytest.approx(0.1, rel=1e-2), "the lr anchor: training starts at the lr"


def test_fsdp2_and_ddp_take_the_same_steps(ranks):
    # same weights, data and controller: the sharded optimizer must apply AutoLR's rate as DDP's does
    for r in ranks:
        assert torch.allclose(r["fsdp"]["rates"], r["ddp"]["rates"], rtol=1e-5, atol=1e-7)
        for a, b in zip(r["fsdp"]["weights"], r["ddp"]["weights"]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adamw_under_fsdp2(ranks):
    assert torch.equal(ranks[0]["adamw"]["rates"], ranks[1]["adamw"]["rates"])
    assert (ranks[0]["adamw"]["rates"] > 0).all()


def test_meta_step_refuses_sharded_parameters_with_a_clear_message(ranks):
    for r in ranks:
        msg = r["meta_refusal"]
        assert msg is not None, "AutoLR(meta=MetaConfig(fsdp_model, ...)) must refuse when it is built"
        assert "FSDP" in msg and "DTensor" in msg and "meta=None" in msg, msg


def test_docs_show_the_example_that_runs_here():
    docs = (EXAMPLE.parents[1] / "docs" / "frameworks.md").read_text()
    assert EXAMPLE.read_text().strip() in docs, "docs/frameworks.md must show examples/fsdp_autolr.py verbatim"
