"""AutoLR under FSDP2 (torch.distributed.fsdp.fully_shard): two CPU processes with gloo, no glue.

AutoLR is built after fully_shard, on the optimizer of the sharded (DTensor) parameters; under an
initialised process group it reads the mean loss over ranks and starts from rank 0's controller,
so every rank writes the same rate. The same code runs under DDP (wrap the model in
DistributedDataParallel instead of fully_shard) and, with torchrun, on GPUs.

Run: python examples/fsdp_autolr.py   (CPU, two processes)
"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from autolr_fast import AutoLR


def sharded_model(mesh):
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train(model, rank, steps=6, optimizer=None):
    """The canonical AutoLR loop, each rank on its own data; returns (sched, rates, local losses)."""
    # SGD without fused=True: torch 2.14 has no DTensor rule for the fused SGD kernel (fused AdamW has one)
    opt = optimizer(model.parameters()) if optimizer else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = AutoLR(opt)  # the shipped controller, scaled to the optimizer's lr
    g = torch.Generator().manual_seed(rank)
    rates, losses = [], []
    for _ in range(steps):
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sched.step(loss)  # all-reduces the loss: the same rate on every rank
        opt.step()
        rates.append(sched.last_rate.clone())
        losses.append(loss.detach().clone())
    return sched, torch.stack(rates), torch.stack(losses)


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = sharded_model(init_device_mesh("cpu", (world,)))
        _, rates, _ = train(model, rank)
        torch.save(rates, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # every rank done communicating before the group goes away
    finally:
        dist.destroy_process_group()


def main(world=2):
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(worker, args=(world, os.path.join(d, "init"), d), nprocs=world, start_method="spawn")
        rates = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
    for r, rank_rates in enumerate(rates):
        print(f"rank {r} rates:", " ".join(f"{float(v):.4f}" for v in rank_rates))


if __name__ == "__main__":
    main()
