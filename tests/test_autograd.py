"""gradcheck, double backward and torch.library.opcheck on the fused operator.

Eager calls on plain tensors differentiate through the C++ autograd node
(csrc/loss_autograd.cpp); traced calls and tensor subclasses through the
Python FusedTemporalLoss. The autograd tests run on both."""

import pytest
import torch

import koemorph_fused as kf
from helpers import DEVICES, rand


@pytest.fixture(params=["cpp", "python"])
def autograd_path(request, monkeypatch):
    """Which autograd implementation kf.temporal_loss uses in this test."""
    if request.param == "python":
        monkeypatch.setattr(kf._ops, "_fast_loss", lambda *args: NotImplemented)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_autograd_path_is_the_one_asked_for(autograd_path, dtype):
    pred = rand((4, 52), dtype).requires_grad_()
    out = kf.temporal_loss(pred, rand((4, 52), dtype))
    name = type(out.total.grad_fn).__name__ if autograd_path == "python" else out.total.grad_fn.name()
    assert ("FusedTemporalLoss" in name) == (autograd_path == "python"), name
    assert ("TemporalLossFunction" in name) == (autograd_path == "cpp"), name
    assert not out.terms.requires_grad
    out.total.backward()
    assert pred.grad.dtype == dtype and pred.grad.shape == pred.shape


def away_from_kinks(shape, device, gap=0.05):
    """Float64 inputs whose differences pred-target and pred-raw stay at least
    `gap` from 0, where |x| has its kink, so finite differences are exact."""
    target = rand(shape, torch.float64, device)
    sign = torch.where(torch.rand(shape, device=device) > 0.5, 1.0, -1.0).double()
    pred = target + sign * (gap + rand(shape, torch.float64, device))
    raw = pred - sign.flip(-1) * (gap + rand(shape, torch.float64, device))
    prev = rand(shape, torch.float64, device)
    return pred, target, prev, raw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("continuity", [None, "mask", False])
@pytest.mark.parametrize("shape", [(3, 52), (2, 3, 7)])
def test_gradcheck(device, continuity, shape, autograd_path):
    pred, target, prev, raw = away_from_kinks(shape, device)
    mask = (torch.rand(shape[:-1], device=device) > 0.4).double() if continuity == "mask" else continuity
    groups = {} if shape[-1] >= 22 else {"mouth_indices": [0, 0, -1], "expression_indices": [2]}

    def fn(p, t, r):
        return kf.temporal_loss(p, t, prev, r, continuity=mask, **groups).total

    inputs = tuple(x.requires_grad_() for x in (pred, target, raw))
    assert torch.autograd.gradcheck(fn, inputs)
    # Double backward is exact too (the gradient is piecewise linear).
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_double_backward_matches_reference(autograd_path):
    pred, target, prev, raw = away_from_kinks((5, 52), "cpu")
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    v = rand((5, 52), torch.float64)
    hessian_vector = []
    for fn in (kf.temporal_loss, kf.reference.temporal_loss):
        p, t, r = (x.clone().requires_grad_() for x in (pred, target, raw))
        g = torch.autograd.grad(fn(p, t, prev, r, continuity=mask).total, (p, t, r), create_graph=True)
        hv = torch.autograd.grad(sum((gi * v).sum() for gi in g[:2]), (p, t), allow_unused=True, materialize_grads=True)
        hessian_vector.append(hv)
    for a, b in zip(*hessian_vector):
        torch.testing.assert_close(a, b)


def _sample_args(device, dtype, **flags):
    rows, cols = 6, 52
    pred, target, prev, raw = (rand((rows, cols), dtype, device) for _ in range(4))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    colw = kf._ops.column_weights(kf.MOUTH_INDICES, kf.EXPRESSION_INDICES, cols, dtype, torch.device(device))
    mask = (torch.rand(rows, device=device) > 0.5).to(acc)
    return (pred, target, prev if flags.get("prev", True) else None, raw if flags.get("raw", True) else None,
            mask if flags.get("mask", True) else None, colw, kf.LossWeights().as_tensor(),
            flags.get("gp", True), flags.get("gt", True), flags.get("gr", True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flags", [{}, {"prev": False, "mask": False}, {"raw": False, "gt": False}, {"gp": False, "gt": False, "gr": False}])
def test_opcheck_forward(device, dtype, flags):
    torch.library.opcheck(torch.ops.koemorph_fused.temporal_loss_forward.default, _sample_args(device, dtype, **flags))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_scale_gradients(device):
    op = torch.ops.koemorph_fused.scale_gradients.default
    empty = torch.empty(0, device=device)
    go = torch.tensor(0.75, device=device)
    g = rand((6, 52), torch.float32, device)
    torch.library.opcheck(op, (go, g, empty, g.clone(), torch.float32))
    torch.library.opcheck(op, (go, g, empty, g.clone(), torch.float16))  # float16 gradients are kept in float32
    gb = rand((6, 52), torch.bfloat16, device)
    torch.library.opcheck(op, (go, gb, gb.clone(), empty.bfloat16(), torch.bfloat16))
    torch.library.opcheck(op, (go.double(), empty.double(), empty.double(), empty.double(), torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_float16_gradients_do_not_underflow_before_grad_output(device, autograd_path):
    """With grad_output = 2**16 (a GradScaler's factor) and a large batch, the
    per-element gradients (~1e-7) are below float16's normal range; they must
    be scaled before rounding to float16, as the reference does."""
    pred, target = (rand((4096, 52), torch.float16, device) for _ in range(2))
    results = []
    for fn in (kf.temporal_loss, kf.reference.temporal_loss):
        p = pred.clone().requires_grad_()
        out = fn(p, target)
        (g,) = torch.autograd.grad(out.total, p, torch.tensor(2.0**16, device=device))
        results.append(g)
    torch.testing.assert_close(results[0], results[1], rtol=2e-3, atol=0)


def test_backward_twice_with_retain_graph(autograd_path):
    pred = rand((9, 52)).requires_grad_()
    raw = rand((9, 52)).requires_grad_()
    out = kf.temporal_loss(pred, rand((9, 52)), rand((9, 52)), raw)
    g1 = torch.autograd.grad(out.total, (pred, raw), retain_graph=True)
    g2 = torch.autograd.grad(out.total * 2, (pred, raw), retain_graph=True)
    g3 = torch.autograd.grad(out.total, (pred, raw))
    for a, b, c in zip(g1, g2, g3):
        torch.testing.assert_close(b, 2 * a)
        assert torch.equal(a, c)


def test_terms_do_not_need_grad_and_total_unused(autograd_path):
    pred = rand((3, 52)).requires_grad_()
    out = kf.temporal_loss(pred, rand((3, 52)))
    # A loss that only uses terms (not differentiable) -> error from autograd, not a crash.
    with pytest.raises(RuntimeError):
        out.terms.sum().backward()
    # total participates through another path with zero weight
    (out.total * 0.0).backward()
    assert torch.count_nonzero(pred.grad) == 0


def test_inputs_changed_in_place_before_a_create_graph_backward_raise(autograd_path):
    """Double backward reads pred and target again: changed in place after
    forward, they raise (as autograd's saved tensors do); a plain backward
    reads only the saved gradients, so there the change does not matter."""
    pred, target = rand((5, 52), torch.float64).requires_grad_(), rand((5, 52), torch.float64)
    expected = torch.autograd.grad(kf.temporal_loss(pred, target).total, pred)[0]
    total = kf.temporal_loss(pred, target).total
    target.add_(1)
    target.sub_(1)  # the same values, a new version
    assert torch.equal(torch.autograd.grad(total, pred)[0], expected)
    total = kf.temporal_loss(pred, target).total
    target.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation: temporal_loss's target"):
        torch.autograd.grad(total, pred, create_graph=True)


def test_saved_tensor_hooks_apply_to_the_saved_gradients(autograd_path):
    """Saved-tensor hooks (offloading, checkpointing) see the saved gradients.
    At this size the C++ node runs the kernel without the GIL; the Python
    hooks run after it, with the GIL."""
    rows = 2048  # 2048 * 52 elements: above the size that releases the GIL
    pred, raw = rand((rows, 52)).requires_grad_(), rand((rows, 52)).requires_grad_()
    target, prev = rand((rows, 52)), rand((rows, 52))
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = kf.temporal_loss(pred, target, prev, raw)
    assert packed.count((rows, 52)) == 2  # grad_pred and grad_raw
    got = torch.autograd.grad(out.total, (pred, raw))
    want = torch.autograd.grad(kf.reference.temporal_loss(pred, target, prev, raw).total, (pred, raw))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_retained_gradients_are_not_the_saved_buffers(autograd_path):
    """With retain_graph=True the graph keeps its saved gradients for the next
    backward: the caller must get a tensor of its own, which it may modify."""
    pred = rand((2048, 52)).requires_grad_()
    target, raw = rand((2048, 52)), rand((2048, 52)).requires_grad_()
    out = kf.temporal_loss(pred, target, None, raw)
    first = torch.autograd.grad(out.total, (pred, raw), retain_graph=True)
    expected = [g.clone() for g in first]
    for g in first:
        g.clamp_(0.0, 0.0)  # the caller's own tensors
    again = torch.autograd.grad(out.total, (pred, raw))  # graph freed now: may hand over
    for a, b in zip(again, expected):
        assert torch.equal(a, b)


def test_freed_graph_hands_over_the_saved_gradients():
    """Without retain_graph, the C++ node's backward with grad_output 1 hands
    the saved buffers over (no copy): the pool sees no new allocation."""
    lib = kf._ops.library
    pred, target = rand((2048, 52)).requires_grad_(), rand((2048, 52))
    kf.temporal_loss(pred, target).total.backward()  # warm-up
    pred.grad = None
    out = kf.temporal_loss(pred, target)
    before = lib.cpu_buffer_pool_stats()
    out.total.backward()
    after = lib.cpu_buffer_pool_stats()
    assert after["hits"] + after["misses"] == before["hits"] + before["misses"]
    assert pred.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_both_autograd_paths_give_the_same_gradients(dtype, monkeypatch):
    """Backward scales in the accumulation dtype and rounds once, on either
    path: a grad_output that is not 1 gives bitwise the same gradients (a
    bfloat16 gradient times a float32 0-dim grad_output in plain torch would
    round grad_output to bfloat16 first)."""
    pred, target, raw = (rand((64, 52), dtype) for _ in range(3))
    results = []
    for python_path in (False, True):
        if python_path:
            monkeypatch.setattr(kf._ops, "_fast_loss", lambda *args: NotImplemented)
        p, r = pred.clone().requires_grad_(), raw.clone().requires_grad_()
        out = kf.temporal_loss(p, target, None, r)
        assert ("FusedTemporalLoss" in type(out.total.grad_fn).__name__) == python_path
        (out.total * 0.3337).backward()
        results.append((p.grad, r.grad))
    for a, b in zip(*results):
        assert a.dtype == dtype and torch.equal(a, b)
