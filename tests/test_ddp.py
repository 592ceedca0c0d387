"""DistributedDataParallel: two gloo processes on the CPU, each with half the
batch, give the gradients of one process on the whole batch.

Each term is a mean over the rank's own rows and DDP averages the ranks'
gradients, so this holds when the ranks have equal batch sizes (and, for the
temporal term with a mask, equal numbers of continuous rows)."""

import os
import tempfile

import torch
import torch.distributed as dist

import koemorph_fused as kf
from helpers import free_port, spawn_workers

ROWS = 64


def make_data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(ROWS, 16, generator=g)
    target, prev, raw = (torch.rand(ROWS, 52, generator=g) for _ in range(3))
    # Same number of continuous rows in each half.
    mask = torch.tensor([i % 4 != 0 for i in range(ROWS)])
    return x, target, prev, raw, mask


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(16, 52)


def worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        loss_fn = kf.FusedKoeMorphLoss()
        half = ROWS // world
        x, target, prev, raw, mask = (t[rank * half:(rank + 1) * half] for t in make_data())
        pred = model(x)
        loss = loss_fn(pred, target, prev=prev, raw=raw + 0.01 * pred, continuity=mask)
        loss.backward()
        if rank == 0:
            torch.save([p.grad for p in model.module.parameters()], out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "grads.pt")
        spawn_workers(worker, 2, free_port(), out)
        ddp_grads = torch.load(out)

    model = make_model()
    x, target, prev, raw, mask = make_data()
    pred = model(x)
    kf.FusedKoeMorphLoss()(pred, target, prev=prev, raw=raw + 0.01 * pred, continuity=mask).backward()
    for got, want in zip(ddp_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
