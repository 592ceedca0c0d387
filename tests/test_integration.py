"""Autocast, concurrent callers, and what a training step allocates."""

import threading

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import koemorph_fused as kf
from helpers import TOL, rand


class OpLog(TorchDispatchMode):
    """Records every operator that runs (below autograd)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


AUTOCAST = [("cpu", torch.bfloat16)] + [
    pytest.param("cuda", dt, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
    for dt in (torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_feeds_low_precision_straight_in(device, dtype):
    lin = torch.nn.Linear(16, 52).to(device)
    x = rand((32, 16), device=device)
    target, prev, raw = (rand((32, 52), dtype, device) for _ in range(3))
    with torch.autocast(device, dtype=dtype):
        pred = lin(x)
        assert pred.dtype == dtype
        with OpLog() as log:
            out = kf.temporal_loss(pred, target, prev, raw)
    # No upcast copy: the only kernel on the (32, 52) data is the fused one.
    assert not [op for op in log.ops if "_to_copy" in op or "clone" in op or "copy_" in op], log.ops
    assert any("koemorph_fused.temporal_loss_forward" in op for op in log.ops)
    assert out.total.dtype == torch.float32
    out.total.backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32
    ref = kf.reference.temporal_loss(pred.detach(), target, prev, raw)
    torch.testing.assert_close(out.total, ref.total, rtol=TOL[dtype]["values"][0], atol=TOL[dtype]["values"][1])


def test_concurrent_threads_get_their_own_answers():
    inputs = [[rand((500 + 17 * i, 52), torch.float64) for _ in range(4)] for i in range(8)]
    expected = []
    for p, t, v, r in inputs:
        p = p.clone().requires_grad_()
        out = kf.reference.temporal_loss(p, t, v, r)
        expected.append((out.total, torch.autograd.grad(out.total, p)[0]))
    results = [None] * len(inputs)
    errors = []

    def work(i):
        try:
            for _ in range(20):
                p, t, v, r = inputs[i]
                p = p.clone().requires_grad_()
                out = kf.temporal_loss(p, t, v, r)
                results[i] = (out.total, torch.autograd.grad(out.total, p)[0])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for (total, grad), (e_total, e_grad) in zip(results, expected):
        torch.testing.assert_close(total, e_total)
        torch.testing.assert_close(grad, e_grad)


def test_cpu_step_allocates_only_gradients_and_scalars():
    """After warm-up, forward+backward takes its two gradient buffers from the
    buffer pool (forward writes them; with grad_output == 1 backward hands
    them over as pred.grad and raw.grad) and allocates only the scalar outputs
    from torch's allocator."""
    rows = 4096
    pred, raw = rand((rows, 52)).requires_grad_(), rand((rows, 52)).requires_grad_()
    target, prev = rand((rows, 52)), rand((rows, 52))

    def step():
        pred.grad = raw.grad = None
        kf.temporal_loss(pred, target, prev, raw).total.backward()

    step()
    step()
    lib = kf._ops.library
    before = lib.cpu_buffer_pool_stats()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    after = lib.cpu_buffer_pool_stats()
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and not e.cpu_children)
    # total (4 B) and terms (20 B) from forward, the autograd seed of backward (4 B).
    assert allocated <= 64, allocated
    assert after["misses"] == before["misses"]
    assert after["hits"] - before["hits"] == 2
    grad_bytes = rows * 52 * 4
    assert after["in_use_bytes"] >= 2 * grad_bytes  # pred.grad and raw.grad are pool buffers
    assert pred.grad.data_ptr() != raw.grad.data_ptr()

    # Any other grad_output (a GradScaler's factor) scales them in place:
    # still two pool buffers. A retained graph takes the out-of-place
    # scaling pass: two more.
    for retain, buffers in ((False, 2), (True, 4)):
        before = lib.cpu_buffer_pool_stats()
        pred.grad = raw.grad = None
        (2 * kf.temporal_loss(pred, target, prev, raw).total).backward(retain_graph=retain)
        after = lib.cpu_buffer_pool_stats()
        assert (after["hits"] + after["misses"]) - (before["hits"] + before["misses"]) == buffers


def test_buffer_pool_empty_cache_and_limit():
    lib = kf._ops.library
    x = rand((2048, 52)).requires_grad_()
    kf.temporal_loss(x, rand((2048, 52))).total.backward()
    x.grad = None
    assert lib.cpu_buffer_pool_stats()["cached_bytes"] > 0
    lib.cpu_buffer_pool_empty_cache()
    assert lib.cpu_buffer_pool_stats()["cached_bytes"] == 0
    # Buffers stay correct after the cache is dropped.
    ref = kf.reference.temporal_loss(x, rand((2048, 52)))
    assert torch.isfinite(ref.total)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_allocates_only_gradients_and_scalars():
    rows = 4096
    pred, raw = rand((rows, 52), device="cuda").requires_grad_(), rand((rows, 52), device="cuda").requires_grad_()
    target, prev = rand((rows, 52), device="cuda"), rand((rows, 52), device="cuda")

    def step():
        pred.grad = raw.grad = None
        kf.temporal_loss(pred, target, prev, raw).total.backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    grad_bytes = rows * 52 * 4
    # Two saved gradients + two backward gradients alive at once at most, plus
    # scalars and the small partials buffer; the old .grad tensors were freed first.
    assert peak <= 4 * grad_bytes + 64 * 1024, peak
