"""The CPU sequence operator (torch.ops.koemorph_fused.sequence_loss_forward)
and its autograd glue (koemorph_fused._sequence_ops) against the independent
loop oracle of tests/sequence_oracle.py."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import koemorph_fused as kf
from koemorph_fused import _ops
from koemorph_fused import _sequence_ops as seq
from koemorph_fused.terms import EXPRESSION_INDICES, MOUTH_INDICES
from sequence_oracle import sequence_oracle

OP = torch.ops.koemorph_fused.sequence_loss_forward.default
WEIGHTS = (1.0, 0.5, 0.7, 0.3, 0.2, 0.9)
# (rtol, atol) of values and of gradients, per input dtype (the gradients of
# float16 / bfloat16 inputs are rounded to float32 / bfloat16).
TOL = {
    torch.float64: ((1e-10, 1e-12), (1e-10, 1e-13)),
    torch.float32: ((2e-5, 1e-6), (2e-5, 1e-8)),
    torch.float16: ((3e-3, 1e-4), (3e-3, 1e-6)),
    torch.bfloat16: ((2e-2, 1e-3), (2e-2, 1e-5)),
}


def groups(cols):
    """Perceptual index groups that fit C (the real ones at C >= 22)."""
    if cols >= 22:
        return MOUTH_INDICES, EXPRESSION_INDICES
    return (0, cols - 1, cols - 1), tuple(range(1, min(cols, 4)))


def rand(shape, dtype, generator):
    return torch.rand(shape, dtype=torch.float64, generator=generator).to(dtype)


def make_case(batch, frames, cols, dtype=torch.float64, raw=True, prev="prev_target", valid="lengths",
              continuity="per_frame", seed=0):
    """Inputs of one call: tensors of `dtype`; `prev` in (None, "prev", "prev_target")."""
    g = torch.Generator().manual_seed(seed)
    case = dict(pred=rand((batch, frames, cols), dtype, g), target=rand((batch, frames, cols), dtype, g),
                raw=rand((batch, frames, cols), dtype, g) if raw else None, prev=None, prev_target=None,
                lengths=None, mask=None, continuity=None)
    if prev:
        case["prev"] = rand((batch, cols), dtype, g)
    if prev == "prev_target":
        case["prev_target"] = rand((batch, cols), dtype, g)
    if valid == "lengths":
        case["lengths"] = torch.randint(0, frames + 1, (batch,), generator=g, dtype=torch.int32)
    elif valid == "mask":
        case["mask"] = torch.rand(batch, frames, generator=g) > 0.3
    if continuity == "per_window":
        case["continuity"] = (torch.rand(batch, generator=g) > 0.4).to(torch.float32)
    elif continuity == "per_frame":  # file boundaries inside windows
        case["continuity"] = (torch.rand(batch, frames, generator=g) > 0.25).to(torch.uint8)
    return case


def call_op(case, reduction="mean", weights=WEIGHTS, counts=None, frame_scale=None, grads=(True, True, True)):
    pred = case["pred"]
    mouth, expression = groups(pred.shape[-1])
    colw = _ops.column_weights(tuple(mouth), tuple(expression), pred.shape[-1], pred.dtype, pred.device)
    return OP(pred, case["target"], case["raw"], case["prev"], case["prev_target"], case["lengths"], case["mask"],
              case["continuity"], colw, torch.tensor(weights, dtype=torch.float64), counts, frame_scale,
              seq.REDUCTIONS[reduction], *grads)


def call_oracle(case, reduction="mean", weights=WEIGHTS, counts=None, frame_scale=None):
    """(total, terms, counts, {name: gradient of total (weighted by frame_scale)})."""
    leaves = {k: case[k].double().clone().requires_grad_() for k in ("pred", "target", "raw") if case[k] is not None}
    others = {k: case[k].double() if case[k] is not None else None for k in ("prev", "prev_target")}
    mouth, expression = groups(case["pred"].shape[-1])
    total, terms, counts_out = sequence_oracle(
        leaves["pred"], leaves["target"], leaves.get("raw"), others["prev"], others["prev_target"], case["lengths"],
        case["mask"], case["continuity"], mouth, expression, weights, reduction, counts,
        None if frame_scale is None else frame_scale.double())
    grads = torch.autograd.grad(total.sum(), list(leaves.values()), allow_unused=True, materialize_grads=True) \
        if total.requires_grad else [torch.zeros_like(x) for x in leaves.values()]
    return total.detach(), terms.detach(), counts_out, dict(zip(leaves, grads))


def assert_matches(case, reduction="mean", counts=None, weights=WEIGHTS):
    dtype = case["pred"].dtype
    (vr, va), (gr, ga) = TOL[dtype]
    total, terms, counts_out, *grads = call_op(case, reduction, weights, counts)
    o_total, o_terms, o_counts, o_grads = call_oracle(case, reduction, weights, counts)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert total.dtype == acc and terms.dtype == acc and counts_out.dtype == torch.int64
    assert counts_out.tolist() == o_counts
    torch.testing.assert_close(terms.double(), o_terms, rtol=vr, atol=va)
    torch.testing.assert_close(total.double(), o_total, rtol=vr, atol=va)
    if reduction == "none":
        assert all(g.numel() == 0 for g in grads)
        return
    storage = _ops.gradient_storage_dtype(dtype)
    for name, g in zip(("pred", "target", "raw"), grads):
        if case[name] is None:
            assert g.numel() == 0
            continue
        assert g.dtype == storage and g.shape == case["pred"].shape and g.is_contiguous()
        torch.testing.assert_close(g.double(), o_grads[name], rtol=gr, atol=ga, msg=lambda m: f"grad_{name}: {m}")


SHAPES = [(2, 5, 52), (3, 4, 61), (2, 6, 7), (1, 1, 52), (3, 1, 13), (2, 3, 3)]
OPTIONS = list(itertools.product(
    SHAPES, [True, False], [None, "prev", "prev_target"], [None, "lengths", "mask"],
    [None, "per_window", "per_frame"], ["mean", "sum", "none"]))
SAMPLE = random.Random(16).sample(OPTIONS, 60)


@pytest.mark.parametrize("shape,raw,prev,valid,continuity,reduction", SAMPLE)
def test_float64_matches_oracle(shape, raw, prev, valid, continuity, reduction):
    case = make_case(*shape, raw=raw, prev=prev, valid=valid, continuity=continuity, seed=hash(str(shape)) % 1000)
    assert_matches(case, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 52), (3, 4, 61), (2, 3, 5)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dtypes_match_oracle(dtype, shape, reduction):
    assert_matches(make_case(*shape, dtype=dtype, seed=3), reduction)


def test_long_windows_cross_chunks():
    """Chunks of 4096 // C frames end inside windows: the velocity share of
    the next chunk's first frame still reaches the last frame's gradient."""
    case = make_case(3, 90, 52, valid="mask", continuity="per_window", seed=5)
    assert_matches(case, "sum")
    case = make_case(2, 200, 20, valid=None, continuity=None, seed=6)  # 204 frames a chunk
    assert_matches(case, "mean")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weights_of_zero_and_one(reduction):
    case = make_case(2, 4, 52, seed=8)
    for k in range(6):
        weights = [0.0] * 6
        weights[k] = 1.0
        assert_matches(case, reduction, weights=weights)


def test_counts_given():
    case = make_case(2, 5, 52, seed=9)
    counts = torch.tensor([20, 19, 18, 7, 25, 3], dtype=torch.int32)
    assert_matches(case, "mean", counts=counts)
    _, _, own, *_ = call_op(case, "mean", counts=counts)
    assert own.tolist() == call_oracle(case)[2]  # this call's, not the given ones
    counts = torch.zeros(6, dtype=torch.float64)  # max(count, 1)
    assert_matches(case, "mean", counts=counts)


def test_frame_scale_is_the_none_backward():
    case = make_case(3, 5, 52, seed=10)
    scale = torch.rand(3, 5, dtype=torch.float64) - 0.3
    total, terms, _, gp, gt, gr = call_op(case, "sum", frame_scale=scale)
    o_total, o_terms, _, o_grads = call_oracle(case, "sum", frame_scale=scale)
    torch.testing.assert_close(terms, o_terms)
    torch.testing.assert_close(total, o_total)
    for name, g in zip(("pred", "target", "raw"), (gp, gt, gr)):
        torch.testing.assert_close(g, o_grads[name])


def test_infinite_frame_scale_with_a_zero_coefficient():
    """A frame scale of inf (a "none" backward's grad_output) on columns whose d
    coefficient is 0 (no MSE weight, outside the perceptual groups) adds
    nothing there, as in the reference: the other terms' +-inf, not NaN."""
    case = make_case(2, 4, 52, valid=None, continuity=None, seed=29)
    weights = (0.0,) + WEIGHTS[1:]
    scale = torch.ones(2, 4, dtype=torch.float64)
    scale[0, 1] = float("inf")
    *_, gp, gt, gr = call_op(case, "sum", weights=weights, frame_scale=scale)
    o_grads = call_oracle(case, "sum", weights=weights, frame_scale=scale)[3]
    for name, g in zip(("pred", "target", "raw"), (gp, gt, gr)):
        torch.testing.assert_close(g, o_grads[name], equal_nan=True, msg=lambda m: f"grad_{name}: {m}")
    outside = [c for c in range(52) if c not in set(MOUTH_INDICES) | set(EXPRESSION_INDICES)]
    assert gr[0, 1, outside].isinf().all()  # smoothing's share alone: finite weights, infinite scale


@pytest.mark.parametrize("shape", [(0, 4, 52), (3, 0, 52), (0, 0, 7)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_windows(shape, reduction):
    case = make_case(*shape, valid=None, continuity=None, seed=1)
    total, terms, counts, gp, gt, gr = call_op(case, reduction)
    assert counts.tolist() == [0] * 6
    assert not terms.isnan().any() and (terms == 0).all() and (total == 0).all()
    if reduction != "none":
        assert gp.shape == shape and gr.shape == shape and gt.shape == shape
    assert_matches(case, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_valid_frame(reduction):
    case = make_case(2, 4, 52, seed=2)
    case["lengths"] = torch.zeros(2, dtype=torch.int64)
    total, terms, counts, gp, gt, gr = call_op(case, reduction)
    assert counts.tolist() == [0] * 6
    assert (terms == 0).all() and (total == 0).all()
    if reduction != "none":
        assert (gp == 0).all() and (gt == 0).all() and (gr == 0).all()


@pytest.mark.parametrize("valid", ["lengths", "mask"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_in_padded_frames_changes_nothing(valid, reduction):
    case = make_case(3, 6, 52, valid=valid, continuity="per_frame", seed=4)
    if valid == "lengths":
        case["lengths"] = torch.tensor([6, 3, 0])
        padded = torch.arange(6).unsqueeze(0) >= case["lengths"].unsqueeze(1)
    else:
        padded = ~case["mask"]
    clean = call_op(case, reduction)
    dirty = dict(case)
    for name in ("pred", "target", "raw"):
        x = case[name].clone()
        x[padded] = float("nan")
        dirty[name] = x
    dirty_out = call_op(dirty, reduction)
    for a, b in zip(clean, dirty_out):
        assert torch.equal(a, b)


def test_strided_inputs_read_in_place():
    """A (B, C, T) tensor transposed, a slice with a row stride, a column
    stride (the gather path) and expanded prev give what contiguous copies give."""
    g = torch.Generator().manual_seed(11)
    pred = rand((2, 52, 7), torch.float32, g).transpose(1, 2)  # column stride T
    target = rand((2, 7, 60), torch.float32, g)[:, :, 3:55]  # frame stride 60
    raw = rand((2, 14, 52), torch.float32, g)[:, ::2]  # frame stride 104
    prev = rand((1, 52), torch.float32, g).expand(2, 52)  # batch stride 0
    prev_target = rand((2, 104), torch.float32, g)[:, ::2]
    case = dict(pred=pred, target=target, raw=raw, prev=prev, prev_target=prev_target,
                lengths=torch.tensor([7, 5]), mask=None, continuity=None)
    contiguous = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    strided, packed = call_op(case, "sum"), call_op(contiguous, "sum")
    for a, b in zip(strided, packed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert_matches(case, "mean")


def test_continuity_forms_agree():
    """(B,) continuity equals (B, T) with ones after frame 0; any dtype."""
    case = make_case(3, 4, 52, valid=None, continuity=None, seed=12)
    first = torch.tensor([1, 0, 1])
    per_frame = torch.ones(3, 4, dtype=torch.bool)
    per_frame[:, 0] = first.bool()
    outs = []
    for c in (first, first.double(), per_frame, per_frame.to(torch.bfloat16)):
        outs.append(call_op(dict(case, continuity=c), "sum"))
    for out in outs[1:]:
        for a, b in zip(outs[0], out):
            assert torch.equal(a, b)


def test_matches_row_loss_at_one_frame():
    """T = 1 with (B,) continuity is the row loss on pred[:, 0] (velocity aside)."""
    import koemorph_fused as kf

    case = make_case(5, 1, 52, dtype=torch.float64, valid=None, continuity="per_window", seed=13)
    total, terms, *_ = call_op(case, "mean", weights=WEIGHTS[:5] + (0.0,))
    row = kf.temporal_loss(case["pred"][:, 0], case["target"][:, 0], case["prev"], case["raw"][:, 0],
                           continuity=case["continuity"], weights=kf.LossWeights(*WEIGHTS[:5]))
    torch.testing.assert_close(terms[:5], row.terms)
    torch.testing.assert_close(total, row.total)


def test_bad_arguments_are_named():
    case = make_case(2, 3, 52, seed=14)
    with pytest.raises(ValueError, match="lengths or mask"):
        call_op(dict(case, mask=torch.ones(2, 3)))
    with pytest.raises(ValueError, match="prev_target"):
        call_op(dict(case, prev=None))
    with pytest.raises(ValueError, match="counts"):
        call_op(case, "sum", counts=torch.ones(6))
    with pytest.raises(ValueError, match="target"):
        call_op(dict(case, target=case["target"][:, :2]))
    with pytest.raises(TypeError, match="lengths"):
        call_op(dict(case, lengths=torch.ones(2)))
    with pytest.raises(ValueError, match="reduction"):
        OP(case["pred"], case["target"], None, None, None, None, None, None,
           torch.zeros(52), torch.zeros(6, dtype=torch.float64), None, None, 3, False, False, False)


THREADS_SCRIPT = r"""
import sys, torch, hashlib
import koemorph_fused
from koemorph_fused import _ops, _sequence_ops as seq
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(7)
x = [torch.rand(8, 256, 52, generator=g) for _ in range(3)]
lengths = torch.randint(100, 257, (8,), generator=g)
colw = _ops.column_weights(tuple(range(12, 22)), tuple(range(10)), 52, torch.float32, torch.device("cpu"))
w = torch.tensor([1, 0.5, 0.7, 0.3, 0.2, 0.9], dtype=torch.float64)
out = torch.ops.koemorph_fused.sequence_loss_forward(x[0].transpose(0, 1).contiguous().transpose(0, 1), x[1], x[2],
    x[0][:, 0], x[1][:, 0], lengths, None, None, colw, w, None, None, 1, True, True, True)
h = hashlib.sha256()
for t in out:
    h.update(t.numpy().tobytes())
if len(sys.argv) > 2:
    torch.save(out, sys.argv[2])
sys.stdout.write(h.hexdigest())
"""


@pytest.mark.parametrize("isa", ["native", "default"])
def test_bitwise_identical_for_1_and_2_threads(isa):
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default") if isa == "default" else None
    outs = {n: subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(n)], capture_output=True, text=True,
                              check=True, env=env).stdout for n in (1, 2)}
    assert outs[1] == outs[2]


def test_baseline_and_avx2_kernels_agree(tmp_path):
    paths = {}
    for isa in ("default", "avx2"):
        paths[isa] = str(tmp_path / f"{isa}.pt")
        subprocess.run([sys.executable, "-c", THREADS_SCRIPT, "2", paths[isa]], check=True, capture_output=True,
                       env=dict(os.environ, ATEN_CPU_CAPABILITY=isa))
    a, b = torch.load(paths["default"]), torch.load(paths["avx2"])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)


def test_oracle_in_a_baseline_process():
    """The baseline (non-AVX2) build against the oracle, odd C included."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_sequence_op as t; "
            "[t.assert_matches(t.make_case(*s, dtype=d, seed=1), r) for s in [(2, 5, 52), (2, 3, 61), (2, 4, 3)] "
            "for d in (t.torch.float64, t.torch.float32, t.torch.bfloat16) for r in ('mean', 'none')]")
    subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], check=True,
                   env=dict(os.environ, ATEN_CPU_CAPABILITY="default"))


# ----------------------------------------------------------------------------
# The autograd glue: fused_sequence_forward, with the C++ node of eager calls
# (csrc/loss_autograd.cpp) or the Python FusedSequenceLoss (traced calls,
# tensor subclasses, torch.func). The autograd tests run on both.

@pytest.fixture(params=["cpp", "python"])
def autograd_path(request, monkeypatch):
    """Which autograd implementation fused_sequence_forward uses in this test."""
    if request.param == "python":
        monkeypatch.setattr(seq, "_fast_sequence_loss", lambda *args: NotImplemented)
    return request.param


def node_name(total):
    fn = total.grad_fn
    return fn.name() if hasattr(fn, "name") else type(fn).__name__

def forward(case, reduction="mean", weights=WEIGHTS, counts=None):
    pred = case["pred"]
    mouth, expression = groups(pred.shape[-1])
    colw = _ops.column_weights(tuple(mouth), tuple(expression), pred.shape[-1], pred.dtype, pred.device)
    return seq.fused_sequence_forward(pred, case["target"], case["raw"], case["prev"], case["prev_target"],
                                      case["lengths"], case["mask"], case["continuity"], colw,
                                      torch.tensor(weights, dtype=torch.float64), counts, reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_backward_matches_oracle(dtype, reduction, autograd_path):
    case = make_case(3, 5, 52, dtype=dtype, seed=15)
    for name in ("pred", "target", "raw"):
        case[name].requires_grad_()
    total, terms, counts = forward(case, reduction)
    assert total.requires_grad and not terms.requires_grad
    go = torch.rand(total.shape, dtype=total.dtype) + 0.5
    grads = torch.autograd.grad(total, [case[k] for k in ("pred", "target", "raw")], go)
    o_total, *_ = sequence_oracle_total(case, reduction)
    o_grads = torch.autograd.grad(o_total[0], o_total[1], go.double())
    (_, _), (gr, ga) = TOL[dtype]
    for g, o in zip(grads, o_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), o, rtol=max(gr, 1e-3 if dtype == torch.float16 else 0), atol=ga * 10)


def sequence_oracle_total(case, reduction):
    leaves = [case[k].detach().double().requires_grad_() for k in ("pred", "target", "raw")]
    mouth, expression = groups(case["pred"].shape[-1])
    total, _, _ = sequence_oracle(*leaves, case["prev"].double(), case["prev_target"].double(), case["lengths"],
                                  case["mask"], case["continuity"], mouth, expression, WEIGHTS, reduction)
    return (total, leaves),


def test_only_needed_gradients(autograd_path):
    case = make_case(2, 4, 52, seed=16)
    case["raw"].requires_grad_()
    total, _, _ = forward(case)
    (g_raw,) = torch.autograd.grad(total, [case["raw"]])
    assert g_raw.shape == case["raw"].shape
    with torch.no_grad():
        total, _, _ = forward(case)
    assert not total.requires_grad


def away_from_kinks(case):
    """pred - target, pred - raw stay away from 0 (|x| has its kink there)."""
    for name in ("target", "raw"):
        sign = torch.where(case["pred"] > case[name], 1.0, -1.0).double()
        case[name] = case["pred"] - sign * (0.05 + (case[name] - case["pred"]).abs())
    return case


@pytest.mark.parametrize("frames,temporal", [(1, 0.3), (4, 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_and_gradgradcheck(frames, temporal, reduction, autograd_path):
    """Where the temporal detach does not matter (temporal weight 0 or T = 1)."""
    case = away_from_kinks(make_case(2, frames, 7, seed=17))
    weights = (1.0, 0.5, 0.7, temporal, 0.2, 0.9)

    def fn(pred, target, raw):
        return forward(dict(case, pred=pred, target=target, raw=raw), reduction, weights)[0]

    inputs = tuple(case[k].clone().requires_grad_() for k in ("pred", "target", "raw"))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("raw", [True, False])
def test_autograd_path_is_the_one_asked_for(autograd_path, raw):
    case = make_case(2, 4, 52, dtype=torch.float32, raw=raw, seed=21)
    case["pred"].requires_grad_()
    total, terms, counts = forward(case)
    name = node_name(total)
    assert ("SequenceLossFunction" in name) == (autograd_path == "cpp"), name
    assert ("FusedSequenceLoss" in name) == (autograd_path == "python"), name
    assert not terms.requires_grad and not counts.requires_grad
    total.backward()
    assert case["pred"].grad.shape == case["pred"].shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("grad_output", ["one", "varied"])
def test_both_autograd_paths_give_the_same_results(dtype, reduction, grad_output, monkeypatch):
    """Bitwise: the same operator calls, and backward scales in the
    accumulation dtype and rounds once on either path."""
    case = make_case(3, 6, 52, dtype=dtype, seed=22)
    results = []
    for python_path in (False, True):
        if python_path:
            monkeypatch.setattr(seq, "_fast_sequence_loss", lambda *args: NotImplemented)
        leaves = {k: case[k].clone().requires_grad_() for k in ("pred", "target", "raw")}
        total, terms, counts = forward(dict(case, **leaves), reduction)
        assert ("FusedSequenceLoss" in node_name(total)) == python_path
        go = torch.ones_like(total) if grad_output == "one" else \
            torch.linspace(0.3, 1.7, total.numel(), dtype=total.dtype).reshape(total.shape)
        total.backward(go)
        results.append((total.detach(), terms, counts, *(leaves[k].grad for k in leaves)))
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_twice_with_retain_graph(autograd_path, reduction):
    """A retained graph keeps its saved gradients: the caller gets tensors of
    its own, which it may modify, and a second backward is unchanged."""
    case = make_case(3, 5, 52, dtype=torch.float32, seed=23)
    pred, raw = case["pred"].requires_grad_(), case["raw"].requires_grad_()
    total = forward(case, reduction)[0].sum()
    first = torch.autograd.grad(total, (pred, raw), retain_graph=True)
    expected = [g.clone() for g in first]
    for g in first:
        g.zero_()
    doubled = torch.autograd.grad(total * 2, (pred, raw), retain_graph=True)
    last = torch.autograd.grad(total, (pred, raw))  # the graph is freed now
    for a, b, c in zip(expected, doubled, last):
        torch.testing.assert_close(b, 2 * a)
        assert torch.equal(a, c)


@pytest.mark.parametrize("shape", [(0, 4, 52), (3, 0, 52)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("create_graph", [False, True])
def test_empty_windows_give_zero_gradients_upstream(shape, reduction, create_graph, autograd_path):
    """B = 0 or T = 0: pred, target and raw get empty gradients of their own
    shapes, so the layers that made them get zeros (as from the reference),
    never None (an optimizer would skip them)."""
    layers = [torch.nn.Linear(8, shape[-1], dtype=torch.float64) for _ in range(3)]
    x = torch.rand(*shape[:2], 8, dtype=torch.float64)
    pred, target, raw = (layer(x) for layer in layers)
    out = kf.sequence_loss(pred, target, raw, prev=torch.rand(shape[0], shape[-1], dtype=torch.float64),
                           velocity_weight=0.5, reduction=reduction)
    grads = torch.autograd.grad(out.total.sum(), [layer.weight for layer in layers], create_graph=create_graph,
                                allow_unused=True)
    for name, g in zip(("pred", "target", "raw"), grads):
        assert g is not None and not g.any(), name


def test_terms_do_not_need_grad_and_total_unused(autograd_path):
    case = make_case(2, 4, 52, dtype=torch.float32, seed=24)
    pred = case["pred"].requires_grad_()
    total, terms, _ = forward(case)
    with pytest.raises(RuntimeError):  # terms carry no graph: autograd's error, not a crash
        terms.sum().backward()
    (total * 0.0).backward()
    assert torch.count_nonzero(pred.grad) == 0


@pytest.mark.parametrize("changed", ["target", "lengths", "weights"])
def test_inputs_changed_in_place_before_a_backward_that_reads_them_raise(autograd_path, changed):
    """Reduction "none" and create_graph read the inputs again in backward:
    an input changed in place after forward raises, as autograd does for
    its saved tensors; "mean" without create_graph reads only the gradients
    forward saved, so the change does not matter there."""
    case = make_case(2, 4, 52, dtype=torch.float64, seed=27)
    pred = case["pred"].requires_grad_()
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)

    def change():
        {"target": case["target"], "lengths": case["lengths"], "weights": weights}[changed].add_(1)

    def total(reduction):
        return seq.fused_sequence_forward(
            pred, case["target"], case["raw"], case["prev"], case["prev_target"], case["lengths"], None, None,
            _ops.column_weights(MOUTH_INDICES, EXPRESSION_INDICES, 52, torch.float64, pred.device), weights,
            None, reduction)[0].sum()

    expected = torch.autograd.grad(total("mean"), pred)[0]
    mean = total("mean")
    change()
    assert torch.equal(torch.autograd.grad(mean, pred)[0], expected)
    for reduction, create_graph in (("none", False), ("mean", True)):
        out = total(reduction)
        change()
        with pytest.raises(RuntimeError, match=f"modified by an inplace operation: sequence_loss's {changed}"):
            torch.autograd.grad(out, pred, create_graph=create_graph)


def test_inference_tensors_as_frame_inputs(autograd_path):
    """lengths made under torch.inference_mode have no version counter: taken as they are."""
    case = make_case(2, 4, 52, dtype=torch.float64, seed=28)
    pred = case["pred"].requires_grad_()
    with torch.inference_mode():
        lengths = torch.tensor([3, 1])
    got = torch.autograd.grad(forward(dict(case, lengths=lengths), "none")[0].sum(), pred)[0]
    want = torch.autograd.grad(forward(dict(case, lengths=lengths.clone()), "none")[0].sum(), pred)[0]
    assert torch.equal(got, want)


def test_saved_tensor_hooks_see_the_saved_gradients(autograd_path):
    """Saved-tensor hooks (offloading, checkpointing) get the saved gradients.
    At this size the C++ node runs the kernel without the GIL; the Python
    hooks run after it, with the GIL."""
    case = make_case(4, 400, 52, dtype=torch.float32, seed=25)  # 83200 elements: the GIL is released
    pred, raw = case["pred"].requires_grad_(), case["raw"].requires_grad_()
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total = forward(case)[0]
    assert packed.count(tuple(pred.shape)) == 2  # grad_pred and grad_raw
    got = torch.autograd.grad(total, (pred, raw))
    want = torch.autograd.grad(forward(case)[0], (pred, raw))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_freed_graph_hands_over_the_saved_gradients():
    """Without retain_graph, the C++ node's backward with grad_output 1 hands
    the saved buffers over (no copy): the buffer pool sees no allocation."""
    case = make_case(64, 128, 52, dtype=torch.float32, seed=26)
    pred = case["pred"].requires_grad_()
    forward(case)[0].backward()  # warm-up
    pred.grad = None
    total = forward(case)[0]
    before = _ops.library.cpu_buffer_pool_stats()
    total.backward()
    after = _ops.library.cpu_buffer_pool_stats()
    assert after["hits"] + after["misses"] == before["hits"] + before["misses"]
    assert pred.grad is not None and pred.grad.shape == pred.shape


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_opcheck(reduction):
    case = make_case(2, 4, 13, dtype=torch.float32, seed=18)
    mouth, expression = groups(13)
    colw = _ops.column_weights(tuple(mouth), tuple(expression), 13, torch.float32, torch.device("cpu"))
    args = (case["pred"], case["target"], case["raw"], case["prev"], case["prev_target"], case["lengths"], None,
            case["continuity"], colw, torch.tensor(WEIGHTS, dtype=torch.float64), None, None,
            seq.REDUCTIONS[reduction], True, False, True)
    torch.library.opcheck(OP, args)


def test_compile_fullgraph_dynamic():
    torch._dynamo.reset()
    compiled = torch.compile(seq.fused_sequence_forward, fullgraph=True, dynamic=True)
    for shape in [(2, 5, 52), (3, 7, 52)]:
        case = make_case(*shape, dtype=torch.float32, seed=19)
        case["pred"].requires_grad_()
        eager = forward(case)
        mouth, expression = groups(52)
        colw = _ops.column_weights(tuple(mouth), tuple(expression), 52, torch.float32, torch.device("cpu"))
        out = compiled(case["pred"], case["target"], case["raw"], case["prev"], case["prev_target"],
                       case["lengths"], case["mask"], case["continuity"], colw,
                       torch.tensor(WEIGHTS, dtype=torch.float64), None, "mean")
        for a, b in zip(out, eager):
            torch.testing.assert_close(a, b)
        (g,) = torch.autograd.grad(out[0], case["pred"])
        (ge,) = torch.autograd.grad(eager[0], case["pred"])
        torch.testing.assert_close(g, ge)


def test_vmap_and_per_sample_gradients():
    """Each mapped slice is an independent loss (its own counts and means)."""
    cases = [make_case(2, 4, 13, dtype=torch.float64, seed=20 + i) for i in range(3)]
    stacked = {k: torch.stack([c[k] for c in cases]) for k in ("pred", "target", "raw")}
    base = cases[0]

    def total(pred, target, raw):
        return forward(dict(base, pred=pred, target=target, raw=raw))[0]

    mapped = torch.func.vmap(total)(stacked["pred"], stacked["target"], stacked["raw"])
    looped = torch.stack([total(c["pred"], c["target"], c["raw"]) for c in cases])
    torch.testing.assert_close(mapped, looped)
    grads = torch.func.vmap(torch.func.grad(total))(stacked["pred"], stacked["target"], stacked["raw"])
    for i, c in enumerate(cases):
        p = c["pred"].clone().requires_grad_()
        (expected,) = torch.autograd.grad(total(p, c["target"], c["raw"]), p)
        torch.testing.assert_close(grads[i], expected)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vmap_over_the_module_weights(reduction):
    """Per-weight-setting gradients, vmap(grad) over the module's weight
    values: the differentiable total read each weight on the host to leave
    out terms of weight 0 (float(weights[k])), which vmap refuses. (CPU
    weights must be finite and >= 0: the operator checks them.)"""
    g = torch.Generator().manual_seed(23)
    pred, target, raw = (rand((2, 5, 52), torch.float64, g) for _ in range(3))
    settings = torch.rand(4, 6, dtype=torch.float64, generator=g)
    settings[1, 2], settings[2, 0], settings[3, 3:] = 0.0, 0.0, 0.0
    module = kf.FusedKoeMorphSequenceLoss(reduction=reduction)

    def total(w, p):
        out = torch.func.functional_call(module, {"weight_values": w}, (p, target, raw))
        return out.sum()

    grads = torch.func.vmap(torch.func.grad(total, argnums=1), in_dims=(0, None))(settings, pred)
    names = ("mse_weight", "l1_weight", "perceptual_weight", "temporal_weight", "smoothing_weight")
    for i, w in enumerate(settings.tolist()):
        ref = kf.reference.KoeMorphSequenceLoss(**dict(zip(names, w[:5])), velocity_weight=w[5],
                                                reduction=reduction)
        p = pred.clone().requires_grad_()
        (expected,) = torch.autograd.grad(ref(p, target, raw).sum(), p)
        torch.testing.assert_close(grads[i], expected)


@pytest.mark.parametrize("case", ["prev_target inf, velocity 0", "prev inf, temporal and velocity 0"])
def test_a_term_of_weight_zero_brings_no_nan_into_any_gradient(case):
    """docs/spec.md, NaN and infinity: a term whose weight is 0 never brings
    a NaN into a gradient. The differentiable total (create_graph, torch.func)
    computed such a term and dropped it afterwards, and the reference took
    its total from slices of all six terms: 0 * inf = NaN in both."""
    g = torch.Generator().manual_seed(29)
    pred, target, prev, prev_target = (rand(shape, torch.float64, g) for shape in ((2, 4, 52),) * 2 + ((2, 52),) * 2)
    weights = kf.LossWeights()
    if case.startswith("prev_target"):
        prev_target[0, 3], velocity = float("inf"), 0.0
    else:
        prev[1, 5], velocity, weights = float("inf"), 0.0, kf.LossWeights(temporal=0.0)
    for fn in (kf.sequence_loss, kf.reference.sequence_loss):
        def total(p):
            return fn(p, target, prev=prev, prev_target=prev_target, weights=weights,
                      velocity_weight=velocity).total

        p = pred.clone().requires_grad_()
        (first,) = torch.autograd.grad(total(p), p, create_graph=True)
        (second,) = torch.autograd.grad(first.sum(), p)
        for gradient in (first, second, torch.func.grad(total)(pred)):
            assert gradient.isfinite().all(), fn.__module__


# Forward mode and higher-order transforms, against the reference (plain
# torch, so torch.func differentiates it op by op).

def transform_case(seed, raw=True):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 4, 13)
    pred, target = rand(shape, torch.float64, g), rand(shape, torch.float64, g)
    kwargs = dict(prev=rand((2, 13), torch.float64, g), prev_target=rand((2, 13), torch.float64, g),
                  lengths=torch.tensor([4, 2]), continuity=torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]]),
                  velocity_weight=0.7, mouth_indices=[0, 12, 12], expression_indices=[1, 2, 3])
    return pred, target, rand(shape, torch.float64, g) if raw else None, kwargs


LOSSES = {"fused": kf.sequence_loss, "reference": kf.reference.sequence_loss}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("raw", [True, False])
def test_jvp_and_forward_ad_match_reference(reduction, raw):
    pred, target, raw_t, kwargs = transform_case(30, raw)
    primals = (pred, target) + ((raw_t,) if raw else ())
    tangents = tuple(torch.rand_like(x) for x in primals)
    results = {}
    for name, loss in LOSSES.items():
        def total(*xs):
            return loss(*xs, reduction=reduction, **kwargs).total
        _, along = torch.func.jvp(total, primals, tangents)
        with fwAD.dual_level():
            dual = fwAD.make_dual(pred, tangents[0])
            dual_total = loss(dual, *primals[1:], reduction=reduction, **kwargs).total
            along_pred = fwAD.unpack_dual(dual_total).tangent
        results[name] = (along, along_pred)
    for a, b in zip(results["fused"], results["reference"]):
        assert a.shape == b.shape == (() if reduction != "none" else pred.shape[:2])
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transform", ["hessian", "jacrev_jacrev", "jacrev_jacfwd"])
def test_second_derivatives_under_transforms_match_reference(transform):
    """Inside torch.func the unwrapped inputs do not require grad; the second
    derivatives still come out (they were zero before double backward used
    torch.func.grad)."""
    pred, target, raw, kwargs = transform_case(31)
    outer, inner = {"hessian": (torch.func.jacfwd, torch.func.jacrev),
                    "jacrev_jacrev": (torch.func.jacrev, torch.func.jacrev),
                    "jacrev_jacfwd": (torch.func.jacrev, torch.func.jacfwd)}[transform]
    results = [outer(inner(lambda p: loss(p, target, raw, **kwargs).total))(pred) for loss in LOSSES.values()]
    assert results[1].abs().max() > 0
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


def test_jacfwd_of_reduction_none_matches_reference():
    pred, target, raw, kwargs = transform_case(32)
    results = [torch.func.jacfwd(lambda p: loss(p, target, raw, reduction="none", **kwargs).total)(pred)
               for loss in LOSSES.values()]
    assert results[0].shape == pred.shape[:2] + pred.shape
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)
