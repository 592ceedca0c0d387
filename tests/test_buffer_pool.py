"""The pool of large CPU gradient buffers (csrc/cpu_buffer_pool.cpp): reuse
across steps, also when the batch size changes, and idle memory bounded by
what the loop uses at once."""

import random

import pytest
import torch

import koemorph_fused as kf
from helpers import rand

lib = kf._ops.library
C = 52


@pytest.fixture(autouse=True)
def _empty_pool():
    """Each test starts from an empty pool (the bound restarts from what is in use)."""
    lib.cpu_buffer_pool_empty_cache()
    yield
    lib.cpu_buffer_pool_empty_cache()


def _step(rows: int, inputs) -> None:
    pred, target, prev, raw = (x[:rows] for x in inputs)
    p = pred.detach().requires_grad_()
    r = raw.detach().requires_grad_()
    kf.temporal_loss(p, target, prev, r).total.backward()
    assert p.grad.shape == (rows, C)


def _run(sizes):
    inputs = [rand((max(sizes), C)) for _ in range(4)]
    before = lib.cpu_buffer_pool_stats()
    for rows in sizes:
        _step(rows, inputs)
    after = lib.cpu_buffer_pool_stats()
    return {k: after[k] - before[k] for k in ("hits", "misses", "evictions")}, after


def test_stats_report_reuse_and_bound():
    stats = lib.cpu_buffer_pool_stats()
    for key in ("cached_bytes", "in_use_bytes", "peak_in_use_bytes", "limit_bytes", "cap_bytes",
                "hits", "misses", "evictions"):
        assert isinstance(stats[key], int) and stats[key] >= 0, key
    assert stats["limit_bytes"] == min(2 * stats["peak_in_use_bytes"], stats["cap_bytes"])


def test_fixed_batch_reuses_every_buffer():
    counts, after = _run([4096] * 20)
    assert counts["misses"] <= 2 and counts["hits"] >= 2 * 20 - 2


def test_smaller_last_batch_reuses_the_larger_blocks():
    counts, _ = _run([4096] * 10 + [3000])
    assert counts["misses"] <= 2  # the last, smaller batch fits the idle blocks


def test_changing_batch_sizes_reuse_blocks_and_stay_bounded():
    """Random B each step (as a bucketing data loader gives): most requests are
    served from the pool, and idle memory stays within twice the peak in use."""
    rng = random.Random(0)
    sizes = [rng.randint(500, 1500) for _ in range(60)]
    counts, after = _run(sizes)
    requests = counts["hits"] + counts["misses"]
    assert requests == 2 * len(sizes)
    assert counts["hits"] >= 0.8 * requests, counts
    assert after["cached_bytes"] <= 2 * after["peak_in_use_bytes"]
    # Two gradients of at most 1500 rows in use at once, in blocks at most twice their size.
    assert after["peak_in_use_bytes"] <= 2 * 2 * (1500 * C * 4 + 64)


def test_idle_bytes_never_exceed_the_peak_in_use():
    """Idle memory is bounded by what the loop has in use at once (twice its
    peak), whatever sizes pass through."""
    counts, after = _run([8192] * 3 + [1024] * 30)
    assert after["cached_bytes"] <= after["limit_bytes"] <= 2 * after["peak_in_use_bytes"]
    # Many distinct large sizes pass through: the oldest idle blocks are evicted.
    counts, after = _run([2048 * k for k in range(1, 9)] * 2)
    assert after["cached_bytes"] <= 2 * after["peak_in_use_bytes"]
    assert counts["evictions"] > 0


def test_buffers_from_the_pool_hold_correct_gradients():
    """Reused blocks (of a larger earlier batch) give exactly the reference's gradients."""
    inputs = [rand((3000, C)) for _ in range(4)]
    _step(3000, inputs)
    for rows in (2500, 2999, 2048):
        pred, target, prev, raw = (x[:rows] for x in inputs)
        grads = []
        for fn in (kf.temporal_loss, kf.reference.temporal_loss):
            p = pred.clone().requires_grad_()
            fn(p, target, prev, raw).total.backward()
            grads.append(p.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-9)
