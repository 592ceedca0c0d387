"""scale_gradients_ (the in-place backward scaling) and the backward hand-over.

Backward scales the saved gradients in place and returns them when the graph
is being freed and they already have the input's dtype; otherwise it takes
the out-of-place scale_gradients. Both autograd paths (the C++ node and the
Python Function) must give the same bits either way. Runs on the CPU and,
where there is one, on a GPU."""

import pytest
import torch

import koemorph_fused as kf
from helpers import DEVICES, DTYPES, rand

scale_ = torch.ops.koemorph_fused.scale_gradients_
scale = torch.ops.koemorph_fused.scale_gradients

SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 52), (4, 1, 9, 17), (0,), (5, 0)]


@pytest.fixture(params=["cpp", "python"])
def autograd_path(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(kf._ops, "_fast_loss", lambda *args: NotImplemented)
    return request.param


def out_of_place(go, g):
    """scale_gradients' answer for g (saved float32 for float16, like forward)."""
    saved = g.float() if g.dtype == torch.float16 else g
    empty = saved.new_empty(0)
    return scale(go, saved.reshape(-1), empty, empty, g.dtype)[0].reshape(g.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("go_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_in_place_equals_out_of_place_bitwise(device, dtype, shape, go_dtype):
    grads = [rand(shape, dtype, device) - 0.5 for _ in range(4)]  # > 3: two launches on a GPU
    go = torch.tensor(-1.37, dtype=go_dtype, device=device)
    expected = [out_of_place(go, g) for g in grads]
    versions = [g._version for g in grads]
    scale_(go, grads)
    for g, e, v in zip(grads, expected, versions):
        assert g.dtype == dtype and g.shape == shape
        assert torch.equal(g, e)
        assert g._version > v  # the Autograd kernel bumps the version counter


# Signalling NaNs: any multiply, even by 1, returns them quieted (other bits).
SIGNALLING_NAN = {
    torch.float16: (torch.int16, 0x7C01),
    torch.bfloat16: (torch.int16, 0x7F81),
    torch.float32: (torch.int32, 0x7F800001),
    torch.float64: (torch.int64, 0x7FF0000000000001),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_grad_output_of_one_writes_nothing(device, dtype):
    bits, nan = SIGNALLING_NAN[dtype]
    g = rand((5, 52), dtype, device)
    g.view(bits).view(-1)[::3] = nan
    before = g.view(bits).clone()
    scale_(torch.tensor(1.0, device=device), [g])
    assert torch.equal(g.view(bits), before)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.ones(2), [torch.ones(3)]), ValueError, "0-dim"),
        ((torch.tensor(2), [torch.ones(3)]), TypeError, "floating"),
        ((torch.tensor(2.0), [torch.ones(3), torch.ones(3).double()]), TypeError, "one dtype"),
        ((torch.tensor(2.0), [torch.ones(3, 4).t()]), ValueError, "contiguous"),
        ((torch.tensor(2.0), [torch.ones(3, dtype=torch.int32)]), TypeError, "float16, bfloat16"),
        ((torch.tensor(2.0), [torch.ones(3, requires_grad=True)]), ValueError, "require grad"),
    ],
)
def test_bad_arguments_are_named(args, error, match):
    with pytest.raises(error, match=match):
        scale_(*args)


def test_empty_list_and_empty_tensors_are_fine():
    scale_(torch.tensor(2.0), [])
    e = torch.empty(0, dtype=torch.int64)  # empty tensors are skipped whatever their dtype
    scale_(torch.tensor(2.0), [e])


def test_opcheck():
    g = [torch.rand(3, 52), torch.rand(2, 2, 5)]
    torch.library.opcheck(scale_.default, (torch.tensor(3.0), g),
                          test_utils=("test_schema", "test_faketensor"))


def _backward(autograd_path, dtype, grad_output, retain, device="cpu"):
    """pred.grad and target.grad after one backward, and the koemorph ops it ran."""
    gen = torch.Generator().manual_seed(0)  # the same inputs on every call
    pred, target, prev, raw = (rand((6, 52), dtype, device, gen) for _ in range(4))
    pred.requires_grad_()
    target.requires_grad_()
    out = kf.temporal_loss(pred, target, prev, raw)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grads = torch.autograd.grad(out.total, (pred, target), grad_outputs=grad_output, retain_graph=retain)
    if retain:  # the retained buffers are intact: a second backward gives the same
        again = torch.autograd.grad(out.total, (pred, target), grad_outputs=grad_output)
        assert all(torch.equal(a, b) for a, b in zip(grads, again))
    ops = {e.name for e in prof.events() if e.name.startswith("koemorph_fused::")}
    return grads, ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("factor", [1.0, 65536.0, -0.3])
def test_hand_over_gives_the_bits_of_the_scaling_pass(autograd_path, device, dtype, factor):
    go = torch.tensor(factor, device=device)
    handed, ops = _backward(autograd_path, dtype, go, retain=False, device=device)
    scaled, retained_ops = _backward(autograd_path, dtype, go, retain=True, device=device)
    for a, b in zip(handed, scaled):
        assert a.dtype == dtype and torch.equal(a, b)
    # Retained graphs always take the out-of-place pass; a freed one scales in
    # place when the saved gradients have the input's dtype (float16 keeps them
    # in float32), except that the C++ node skips the call for a CPU 1.
    assert "koemorph_fused::scale_gradients_" not in retained_ops
    in_place = dtype != torch.float16
    skipped = autograd_path == "cpp" and device == "cpu" and factor == 1.0
    assert ("koemorph_fused::scale_gradients_" in ops) == (in_place and not skipped), ops
    assert ("koemorph_fused::scale_gradients" in ops) == (not in_place), ops


def test_both_paths_agree(monkeypatch):
    results = []
    for path in ("cpp", "python"):
        if path == "python":
            monkeypatch.setattr(kf._ops, "_fast_loss", lambda *args: NotImplemented)
        results.append(_backward(path, torch.bfloat16, torch.tensor(3.0), retain=False)[0])
    assert all(torch.equal(a, b) for a, b in zip(*results))
