"""DistributedDataParallel over windows of uneven lengths: two gloo processes
on the CPU, each with its own clips, give the loss and the gradients of one
process on all the clips.

A mean over frames is only exact across ranks when every rank divides by the
same, global, number of frames (and of pairs). The convention tested here,
the one the README shows:

1. each rank computes its counts without the data,
   ``kf.sequence_counts((B, T), lengths=..., continuity=..., with_prev=..., ...)``,
   and all-reduces them (SUM) before the forward pass;
2. it passes them as ``counts=``: its loss is then its share of the global
   mean (its sums divided by the global counts), and the ranks' losses add up
   to the loss of one process on all the data;
3. it calls ``(loss * world_size).backward()``, because DDP averages the
   ranks' gradients (divides their sum by ``world_size``).

Without ``counts=`` each rank divides by its own counts and the result is
not the mean over all the data when the ranks have different numbers of
frames (checked too, so that the test could fail)."""

import os
import tempfile

import torch
import torch.distributed as dist

import koemorph_fused as kf
from helpers import free_port, spawn_workers

B, T, F, C = 6, 10, 12, 52
#: Rank 0 gets clips 0-3 (long ones), rank 1 clips 4-5 (one short, one empty): 34 frames against 3.
LENGTHS = torch.tensor([10, 9, 8, 7, 3, 0])
SPLIT = (slice(0, 4), slice(4, 6))
VELOCITY = 0.7


def make_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, F, generator=g)
    target = torch.rand(B, T, C, generator=g)
    prev, prev_target = torch.rand(B, C, generator=g), torch.rand(B, C, generator=g)
    continuity = torch.tensor([1, 0, 1, 1, 1, 0])  # windows 1 and 5 start a new file
    return x, target, prev, prev_target, LENGTHS, continuity


def make_model():
    torch.manual_seed(0)
    return torch.nn.GRU(F, C, batch_first=True)


def forward(model, x):
    out, _ = model(x)
    pred = torch.sigmoid(out)
    return pred, pred + 0.05 * torch.tanh(out)  # pred, raw


def loss_on(model, data, counts=None):
    x, target, prev, prev_target, lengths, continuity = data
    pred, raw = forward(model, x)
    loss_fn = kf.FusedKoeMorphSequenceLoss(velocity_weight=VELOCITY)
    total = loss_fn(pred, target, raw, prev=prev, prev_target=prev_target, lengths=lengths,
                    continuity=continuity, counts=counts)
    return total, loss_fn.last_counts


def worker(rank, world, port, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = [t[SPLIT[rank]] for t in make_data()]
        _, target, _, _, lengths, continuity = data
        results = {}
        for exact in (True, False):
            model = torch.nn.parallel.DistributedDataParallel(make_model())
            counts = None
            if exact:
                counts = kf.sequence_counts(target.shape[:2], lengths=lengths, continuity=continuity,
                                            with_prev=True, with_prev_target=True, with_raw=True)
                dist.all_reduce(counts)  # SUM over the ranks
            loss, local_counts = loss_on(model, data, counts)
            (loss * world).backward()  # DDP averages the gradients over the ranks
            summed = loss.detach().clone()
            dist.all_reduce(summed)
            results[exact] = dict(loss=summed, local_counts=local_counts, global_counts=counts,
                                  grads=[p.grad for p in model.module.parameters()])
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_with_uneven_lengths_equals_one_process():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "results.pt")
        spawn_workers(worker, 2, free_port(), out)
        results = torch.load(out)

    model = make_model()
    loss, counts = loss_on(model, make_data())
    loss.backward()
    loss = loss.detach()
    want = [p.grad for p in model.parameters()]
    assert counts.tolist() == [37, 37, 37, 36, 37, 36]  # pairs: every frame but window 1's frame 0 (a new file)

    exact = results[True]
    # rank 0's own counts (34 frames) and the all-reduced ones (all 37)
    assert exact["local_counts"].tolist() == [34, 34, 34, 33, 34, 33]
    assert exact["global_counts"].tolist() == counts.tolist()
    torch.testing.assert_close(exact["loss"], loss, rtol=1e-5, atol=1e-7)
    for got, w in zip(exact["grads"], want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-6)

    # Each rank dividing by its own counts: neither the loss nor the gradients are the mean over all frames.
    naive = results[False]
    assert abs(float(naive["loss"]) - float(loss)) > 1e-3 * float(loss)
    assert any((got - w).abs().max() > 1e-3 * w.abs().max() for got, w in zip(naive["grads"], want))
