"""Two CPU processes on the gloo backend: every rank gets the same rate and the same theta."""

from __future__ import annotations

import copy
import faulthandler
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from autolr_fast import AutoLR, MLRSNet
from autolr_fast.meta import MetaConfig

WORLD = 2


def _worker(rank: int, init_file: str, out_dir: str, meta: bool) -> None:
    faulthandler.enable()  # a native abort prints where the Python code was
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        torch.manual_seed(100 + rank)  # a different controller init per rank: AutoLR must broadcast rank 0's
        ctrl = MLRSNet(hidden_size=16)
        g = torch.Generator().manual_seed(rank)  # different data per rank
        x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
        xv, yv = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        # snapshots every step into one shared folder: rank 0 writes them (the ranks raced on one file)
        snaps = os.path.join(out_dir, "snaps")
        cfg = MetaConfig(ddp, [(xv, yv)], nn.functional.cross_entropy, interval=2, snapshot_dir=snaps,
                         snapshot_every=1) if meta else None
        sched = AutoLR(opt, ctrl, gamma="auto", num_classes=3, meta=cfg)
        twin = copy.deepcopy(sched.controller)  # rank 0's weights after the broadcast
        rates, local = [], []
        for i in range(6):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x[i * 8 : i * 8 + 8]), y[i * 8 : i * 8 + 8])
            loss.backward()
            sched.step(loss)
            opt.step()
            rates.append(sched.last_rate.clone())
            local.append(loss.detach().clone())
        dist.barrier()
        torch.save({"rates": torch.stack(rates), "local": torch.stack(local), "twin": twin.state_dict(),
                    "theta": sched.controller.state_dict(), "gamma": sched.gamma.clone(),
                    "snaps": sorted(os.listdir(snaps)) if meta else []},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # Tear down only once every rank is done communicating: a rank that destroys its gloo
        # group while the other still finishes the last all-reduce can abort (SIGABRT,
        # "terminate called without an active exception"; seen about once in 30 full runs).
        del sched, cfg, opt, ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(meta: bool):
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        mp.start_processes(_worker, args=(init_file, d, meta), nprocs=WORLD, join=True, start_method="spawn")
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_every_rank_gets_the_same_rate_from_the_mean_loss():
    r0, r1 = _run(meta=False)
    assert not torch.equal(r0["local"], r1["local"]), "ranks must see different losses for the test to mean anything"
    assert torch.equal(r0["rates"], r1["rates"])
    assert torch.equal(r0["gamma"], r1["gamma"])
    # the controller read the mean loss: replay it on rank 0's weights
    twin = MLRSNet(hidden_size=16)
    twin.load_state_dict(r0["twin"])
    mean = (r0["local"] + r1["local"]) / 2
    expected = torch.stack([r0["gamma"] * twin(m).detach() for m in mean])
    assert torch.allclose(r0["rates"], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_meta_training_keeps_theta_identical_across_ranks():
    r0, r1 = _run(meta=True)
    differ = {k: float((r0["theta"][k] - r1["theta"][k]).abs().max()) for k in r0["theta"]
              if not torch.equal(r0["theta"][k], r1["theta"][k])}
    assert not differ, f"theta differs between ranks (max abs difference per entry): {differ}"
    moved = [k for k in r0["theta"] if k not in ("h", "c") and not torch.equal(r0["theta"][k], r0["twin"][k])]
    assert moved, "theta must have moved"
    assert torch.equal(r0["rates"], r1["rates"]), f"rates differ between ranks: {r0['rates']} vs {r1['rates']}"
    assert r0["snaps"] == [f"controller_{i:04d}.pt" for i in range(1, 7)], r0["snaps"]


def _resume_worker(rank: int, d: str) -> None:
    """Meta-training with 3 validation batches on rank 0 and 5 on rank 1: a state saved on rank 0
    and loaded on both resumes each rank at its own place in its validation data."""
    faulthandler.enable()
    dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(rank)
        data = [(torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(8)]

        def build():
            torch.manual_seed(0)
            ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)))
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
            gv = torch.Generator().manual_seed(10 + rank)
            val = [(torch.randn(8, 8, generator=gv), torch.randint(0, 3, (8,), generator=gv))
                   for _ in range(3 if rank == 0 else 5)]
            torch.manual_seed(1)
            cfg = MetaConfig(ddp, val, nn.functional.cross_entropy, interval=1)
            return ddp, opt, AutoLR(opt, MLRSNet(hidden_size=16), gamma=0.05, meta=cfg)

        def train(ddp, opt, sched, batches):
            for x, y in batches:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(ddp(x), y)
                loss.backward()
                sched.step(loss)
                opt.step()

        ddp, opt, sched = build()
        train(ddp, opt, sched, data)
        straight = copy.deepcopy(sched.controller.state_dict())
        ddp, opt, sched = build()
        train(ddp, opt, sched, data[:4])
        if rank == 0:
            torch.save({"sched": sched.state_dict(), "model": ddp.module.state_dict(), "opt": opt.state_dict()},
                       f"{d}/ck.pt")
        dist.barrier()
        ck = torch.load(f"{d}/ck.pt", weights_only=False)
        ddp, opt, sched = build()
        ddp.module.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        train(ddp, opt, sched, data[4:])
        same = all(torch.equal(straight[k], v) for k, v in sched.controller.state_dict().items())
        torch.save(same, f"{d}/same{rank}.pt")
        del sched, opt, ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_meta_training_resumes_exactly_on_ranks_with_other_validation_lengths():
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_resume_worker, args=(d,), nprocs=WORLD, join=True, start_method="spawn")
        assert [torch.load(f"{d}/same{r}.pt") for r in range(WORLD)] == [True, True]
