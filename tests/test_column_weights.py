"""What the column-weights cache keeps, and when (koemorph_fused._ops.column_weights).

The rules protect CUDA graphs and streams (docs/design.md, "Column weights");
they are decided in Python, so they are checked here on the CPU, with a
CUDA graph capture simulated where needed. tests/test_cuda.py checks the
same on a GPU."""

import pytest
import torch

import koemorph_fused as kf
from koemorph_fused import _ops


@pytest.fixture
def empty_cache(monkeypatch):
    """A fresh, empty cache for the test (the module's own is restored after)."""
    monkeypatch.setattr(_ops, "_COLUMN_WEIGHTS", {})
    monkeypatch.setattr(_ops, "_CAPTURE_SOURCES", {})
    return _ops._COLUMN_WEIGHTS


def build(mouth, cols=8, dtype=torch.float32):
    return _ops.column_weights(mouth, (cols - 1,), cols, dtype, torch.device("cpu"))


def test_values_and_dtype(empty_cache):
    colw = _ops.column_weights((0, 2, 2), (2, 3), 5, torch.bfloat16, torch.device("cpu"))
    assert colw.dtype == torch.float32  # the accumulation dtype
    torch.testing.assert_close(colw, torch.tensor([1 / 3, 0, 2 / 3 + 1 / 2, 1 / 2, 0]))
    assert _ops.column_weights((0, 2, 2), (2, 3), 5, torch.float64, torch.device("cpu")).dtype == torch.float64


def test_a_key_is_built_once_and_kept(empty_cache):
    first = build((1, 2))
    assert build((1, 2)) is first
    assert list(empty_cache.values()) == [first]


def test_past_the_limit_calls_build_their_own_and_nothing_is_evicted(empty_cache, monkeypatch):
    """Entries are never evicted (a captured graph may read them); a key past
    the limit gets a tensor per call, equal to what the cache would hold."""
    monkeypatch.setattr(_ops, "_MAX_CACHED_KEYS", 3)
    kept = [build((i,)) for i in range(3)]
    extra = build((3,))
    assert build((3,)) is not extra and torch.equal(build((3,)), extra)
    assert len(empty_cache) == 3 and all(build((i,)) is t for i, t in enumerate(kept))


def test_nothing_built_during_a_capture_is_cached(empty_cache, monkeypatch):
    """Inside a capture the device tensor would be filled only by a replay:
    it is never cached, and the host tensor that the captured copy reads is
    kept for good (one per key). The first eager call afterwards builds its own."""
    monkeypatch.setattr(_ops, "_capturing", lambda device: True)
    captured = build((1, 4))
    again = build((1, 4))
    assert not empty_cache
    assert list(_ops._CAPTURE_SOURCES) == [((1, 4), (7,), 8, torch.float32, torch.device("cpu"))]
    source = next(iter(_ops._CAPTURE_SOURCES.values()))
    assert torch.equal(captured, source) and torch.equal(again, source)

    monkeypatch.setattr(_ops, "_capturing", lambda device: False)
    eager = build((1, 4))
    assert list(empty_cache.values()) == [eager] and torch.equal(eager, source)


def test_only_cuda_streams_are_asked_about_capture():
    assert not _ops._capturing(torch.device("cpu"))


def test_the_loss_uses_the_cached_tensor(empty_cache, monkeypatch):
    pred, target = torch.rand(3, 52), torch.rand(3, 52)
    kf.temporal_loss(pred, target)
    (colw,) = empty_cache.values()
    seen = []
    original = _ops.fused_forward
    monkeypatch.setattr(_ops, "fused_forward", lambda *args: seen.append(args[5]) or original(*args))
    kf.temporal_loss(pred, target)
    assert len(seen) == 1 and seen[0] is colw


def test_a_fake_tensor_mode_neither_reads_nor_fills_the_cache(empty_cache):
    """Under FakeTensorMode a call gets a fake tensor of its own: a real
    cached one would mix modes, and a kept fake one would break every later
    eager call."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    real = build((1, 2))
    with FakeTensorMode():
        fake = build((1, 2))
        assert isinstance(fake, FakeTensor)
        windows = torch.rand(2, 3, 8)
        assert kf.sequence_loss(windows, windows, mouth_indices=(1, 2), expression_indices=(7,)).total.shape == ()
    assert not isinstance(real, FakeTensor) and list(empty_cache.values()) == [real]
    windows = torch.rand(2, 3, 8)
    assert kf.sequence_loss(windows, windows, mouth_indices=(1, 2), expression_indices=(7,)).terms[0] == 0  # mse


def test_inference_mode_keeps_nothing(empty_cache):
    """A tensor made in inference mode could not be saved for a later
    backward (double backward of the sequence loss saves it)."""
    pred = torch.rand(2, 3, 52, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 3, 52, dtype=torch.float64)
    with torch.inference_mode():
        kf.sequence_loss(pred.detach(), target)
    assert not any(t.is_inference() for t in empty_cache.values())
    g, = torch.autograd.grad(kf.sequence_loss(pred, target).total, pred, create_graph=True)
    g.sum().backward()
    assert pred.grad is not None and pred.grad.isfinite().all()


def test_eager_calls_do_not_recompile_a_compiled_caller(empty_cache):
    """Compiled code does not read the cache, so keys added by eager calls
    elsewhere (other dtypes, other groups) put no guard on it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda p, t: kf.temporal_loss(p, t).total, fullgraph=True, backend="eager")
    x = torch.rand(4, 52)
    compiled(x, x)
    for lo in range(4):
        kf.temporal_loss(x.double(), x.double(), mouth_indices=range(lo, lo + 3))
        compiled(x, x)
    assert counters["stats"]["unique_graphs"] == 1
