"""The fused loss against the plain-PyTorch reference: values and gradients
over dtypes, shapes, optional inputs, masks, layouts, index lists and weights."""

import itertools

import pytest
import torch

import koemorph_fused as kf
from helpers import DEVICES, DTYPES, TOL, assert_matches_reference, rand, run

ROWS = [1, 2, 4, 33, 1000, 4099]
COLS = [1, 7, 52, 300]


def groups_for(cols):
    """The ARKit groups where they fit, else a repeated and a negative index."""
    if cols >= 22:
        return {}
    return {"mouth_indices": [0, cols - 1, 0], "expression_indices": [-1]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", list(itertools.product(ROWS, COLS)))
def test_all_inputs_with_mask(device, dtype, rows, cols):
    pred, target, prev, raw = (rand((rows, cols), dtype, device) for _ in range(4))
    target.requires_grad_()
    mask = torch.rand(rows, device=device) > 0.3
    assert_matches_reference(pred, target, prev, raw, grad_output=1.7, continuity=mask, **groups_for(cols))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_prev,with_raw", list(itertools.product([True, False], repeat=2)))
@pytest.mark.parametrize("continuity", ["none", "true", "false", "bool-mask", "float-mask", "int-mask", "zero-mask"])
def test_optional_inputs_and_continuity(device, dtype, with_prev, with_raw, continuity):
    rows, cols = 37, 52
    pred, target = rand((rows, cols), dtype, device), rand((rows, cols), dtype, device)
    prev = rand((rows, cols), dtype, device) if with_prev else None
    raw = rand((rows, cols), dtype, device) if with_raw else None
    cont = {
        "none": None,
        "true": True,
        "false": False,
        "bool-mask": torch.rand(rows, device=device) > 0.5,
        "float-mask": (torch.rand(rows, device=device) > 0.5).to(dtype),
        "int-mask": (torch.rand(rows, device=device) > 0.5).long(),
        "zero-mask": torch.zeros(rows, device=device),
    }[continuity]
    (total, terms, _), _ = assert_matches_reference(pred, target, prev, raw, grad_output=0.3, continuity=cont)
    if not with_prev or continuity in ("false", "zero-mask"):
        assert terms[3].item() == 0.0  # temporal term off
    if not with_raw:
        assert terms[4].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_target_and_leading_dims(device, dtype):
    seq = rand((16, 256, 52), dtype, device)
    target = seq[:, -1, :]  # rows 256*52 elements apart, read in place
    assert not target.is_contiguous()
    pred, prev, raw = (rand((16, 52), dtype, device) for _ in range(3))
    assert_matches_reference(pred, target, prev, raw, grad_output=2.0)

    # Leading dimensions are rows; a transposed (non-mergeable) layout is copied once.
    p4, t4, v4, r4 = (rand((3, 5, 7, 52), dtype, device) for _ in range(4))
    mask = torch.rand(3, 5, 7, device=device) > 0.5
    assert_matches_reference(p4, t4.transpose(0, 1).contiguous().transpose(0, 1), v4, r4, continuity=mask)
    # Last dimension not contiguous.
    base = rand((52, 40), dtype, device)
    assert_matches_reference(rand((40, 52), dtype, device), base.t(), None, rand((40, 52), dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mouth,expression",
    [
        ([], []),
        ([], [0, 1]),
        ([12, 12, 13], [-1, -52, 0]),
        (list(range(52)), [51]),
        (torch.tensor([3, 4, 5]), range(40, 50)),
        ((5,), (5, 5, 5)),
    ],
)
def test_index_lists(device, mouth, expression):
    pred, target, prev, raw = (rand((9, 52), torch.float64, device) for _ in range(4))
    (_, terms, _), _ = assert_matches_reference(
        pred, target, prev, raw, mouth_indices=mouth, expression_indices=expression
    )
    if len(mouth) == 0 and len(expression) == 0:
        assert terms[2].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "weights",
    [
        kf.LossWeights(),
        kf.LossWeights(0, 0, 0, 0, 0),
        kf.LossWeights(mse=0.0, l1=3.0, perceptual=0.0, temporal=0.0, smoothing=0.0),
        kf.LossWeights(mse=1e-8, l1=1e6, perceptual=123.0, temporal=7.5, smoothing=0.0),
        {"temporal_weight": 2.5, "smoothing_weight": 0},
        kf.LossWeights.for_stride(1),
        kf.LossWeights.for_stride(8),
    ],
)
def test_weights(device, weights):
    pred, target, prev, raw = (rand((21, 52), torch.float64, device) for _ in range(4))
    target.requires_grad_()
    assert_matches_reference(pred, target, prev, raw, grad_output=-0.7, weights=weights)


def test_zero_weight_reports_term_but_leaves_total():
    pred, target = rand((4, 52)), rand((4, 52))
    out = kf.temporal_loss(pred, target, weights=kf.LossWeights(mse=0, l1=0, perceptual=0, temporal=0, smoothing=0))
    assert out.total.item() == 0.0
    assert out.terms[0].item() > 0 and out.terms[1].item() > 0 and out.terms[2].item() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["pred-mouth", "pred-outside-groups", "target", "prev-masked-row", "raw"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_reference(device, dtype, where, bad):
    rows, cols = 6, 52
    pred, target, prev, raw = (rand((rows, cols), dtype, device) for _ in range(4))
    target.requires_grad_()
    mask = torch.tensor([1, 0, 1, 1, 0, 1], device=device, dtype=torch.bool)
    if where == "pred-mouth":
        pred[2, 13] = bad
    elif where == "pred-outside-groups":
        pred[3, 40] = bad
    elif where == "target":
        target = target.detach().clone()
        target[0, 0] = bad
        target.requires_grad_()
    elif where == "prev-masked-row":
        prev[1, 5] = bad
    else:
        raw[5, 51] = bad
    # Separately with zero weights: a term switched off must not leak its NaN.
    for weights in (kf.LossWeights(), kf.LossWeights(mse=0, l1=0.1, perceptual=0, temporal=0, smoothing=0.1)):
        assert_matches_reference(pred, target, prev, raw, continuity=mask, weights=weights)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_only_for_inputs_that_need_them(device):
    pred, target, prev, raw = (rand((8, 52), torch.float32, device) for _ in range(4))
    pred.requires_grad_()
    prev.requires_grad_()  # prev never gets a gradient
    out = kf.temporal_loss(pred, target, prev, raw)
    out.total.backward()
    assert pred.grad is not None and prev.grad is None and target.grad is None
    assert not out.terms.requires_grad
    assert out.total.requires_grad


def test_seed_worked_example():
    """The seed's example: terms (0.02, 0.05, 0.03, 0.01, 0.008) and the default
    weights give a total of 0.0428. Inputs built to realise exactly those terms:
    one row of C = 8 with d = 0.4 in column 0 only (mse 0.16/8, l1 0.4/8), column 0
    three times among 16 mouth indices (perceptual 3*0.16/16), prev 0.1 and raw
    0.008 below pred everywhere."""
    pred = torch.full((1, 8), 0.5, dtype=torch.float64)
    target = pred.clone()
    target[0, 0] -= 0.4
    mouth = [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]
    for fn in (kf.temporal_loss, kf.reference.temporal_loss):
        out = fn(pred, target, pred - 0.1, pred - 0.008, mouth_indices=mouth, expression_indices=[1])
        torch.testing.assert_close(out.terms, torch.tensor([0.02, 0.05, 0.03, 0.01, 0.008], dtype=torch.float64))
        assert out.total.item() == pytest.approx(0.0428, abs=1e-12)


def test_as_dict_and_output_dtypes():
    pred = rand((4, 52), torch.bfloat16)
    out = kf.temporal_loss(pred, rand((4, 52), torch.bfloat16), rand((4, 52), torch.bfloat16))
    assert out.total.dtype == torch.float32 and out.terms.dtype == torch.float32
    d = out.as_dict()
    assert list(d) == list(kf.TERM_NAMES) + ["total"]
    assert all(isinstance(v, float) for v in d.values())
    assert d["total"] == pytest.approx(out.total.item())


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_are_promoted_and_grads_keep_their_dtype(device):
    pred = rand((10, 52), torch.float16, device).requires_grad_()
    target = rand((10, 52), torch.float32, device).requires_grad_()
    raw = rand((10, 52), torch.bfloat16, device).requires_grad_()
    prev = rand((10, 52), torch.float64, device)
    out = kf.temporal_loss(pred, target, prev, raw)
    ref = kf.reference.temporal_loss(pred, target, prev, raw)
    assert out.total.dtype == torch.float64  # float16/float32/bfloat16/float64 promote to float64
    torch.testing.assert_close(out.total, ref.total)
    g = torch.autograd.grad(out.total, [pred, target, raw])
    gr = torch.autograd.grad(ref.total, [pred, target, raw])
    for a, b, x in zip(g, gr, (pred, target, raw)):
        assert a.dtype == x.dtype
        torch.testing.assert_close(a, b)


def test_module_matches_reference_module():
    fused, ref = kf.FusedKoeMorphLoss(temporal_weight=0.3), kf.reference.KoeMorphTemporalLoss(temporal_weight=0.3)
    pred, target, prev, raw = (rand((5, 52), torch.float64) for _ in range(4))
    mask = torch.tensor([1, 1, 0, 1, 0])
    a = fused(pred, target, prev=prev, raw=raw, continuity=mask)
    b = ref(pred, target, prev=prev, raw=raw, continuity=mask)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(fused.last_terms, ref.last_terms)
    fused.weights = {"mse_weight": 0.0}
    assert fused.weights == kf.LossWeights(mse=0.0)
    assert fused(pred, target).item() == pytest.approx(
        kf.reference.temporal_loss(pred, target, weights=kf.LossWeights(mse=0.0)).total.item()
    )


def test_no_grad_path_allocates_no_gradients(monkeypatch):
    """Under no_grad (or with no input requiring grad) the operator is asked for
    no gradient buffers. Watched on the Python path (the operator call is
    visible there); test_cpp_node_allocates_only_wanted_gradients covers the
    C++ node of eager calls."""
    from koemorph_fused import _ops

    monkeypatch.setattr(_ops, "_fast_loss", lambda *args: NotImplemented)
    seen = []
    real = _ops.forward_op

    def spy(*args):
        seen.append(args[-3:])
        out = real(*args)
        seen.append(tuple(g.numel() for g in out[2:]))
        return out

    monkeypatch.setattr(_ops, "forward_op", spy)
    pred = rand((64, 52)).requires_grad_()
    with torch.no_grad():
        kf.temporal_loss(pred, rand((64, 52)), rand((64, 52)), rand((64, 52)))
    kf.temporal_loss(pred.detach(), rand((64, 52)), rand((64, 52)), rand((64, 52)))
    assert seen == [(False, False, False), (0, 0, 0)] * 2
    kf.temporal_loss(pred, rand((64, 52)), None, rand((64, 52)))  # only pred needs one
    assert seen[-2] == (True, False, False) and seen[-1] == (64 * 52, 0, 0)


def test_cpp_node_allocates_only_wanted_gradients():
    """The same on the C++ node, through the gradient buffer pool: at this size
    every gradient buffer is a pool buffer, so the pool counts them."""
    lib = kf._ops.library
    rows = 1024  # 1024 * 52 * 4 bytes >= the pool's 64 KiB minimum
    pred = rand((rows, 52)).requires_grad_()
    target, prev, raw = rand((rows, 52)), rand((rows, 52)), rand((rows, 52))

    def pool_allocations(fn):
        before = lib.cpu_buffer_pool_stats()
        fn()
        after = lib.cpu_buffer_pool_stats()
        return (after["hits"] + after["misses"]) - (before["hits"] + before["misses"])

    with torch.no_grad():
        assert pool_allocations(lambda: kf.temporal_loss(pred, target, prev, raw)) == 0
    assert pool_allocations(lambda: kf.temporal_loss(pred.detach(), target, prev, raw)) == 0
    out = []
    assert pool_allocations(lambda: out.append(kf.temporal_loss(pred, target, None, raw))) == 1  # grad_pred only
    assert "TemporalLossFunction" in out[0].total.grad_fn.name()


def test_random_grad_output_scales_gradients():
    pred, target = rand((7, 52), torch.float64), rand((7, 52), torch.float64)
    _, _, g1 = run(kf.temporal_loss, pred, target, grad_output=1.0)
    _, _, g2 = run(kf.temporal_loss, pred, target, grad_output=-3.25)
    torch.testing.assert_close(g2["pred"], -3.25 * g1["pred"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(2, 8), (5, 13), (333, 13), (97, 52), (3, 127), (200, 127)])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("grads", ["pred-raw", "pred-target", "pred-only"])
def test_flat_and_row_paths_agree(dtype, rows, cols, masked, grads):
    """The CPU kernel reads contiguous inputs as one flat array (the column
    pattern repeating every lcm(C, vector width) elements) and strided ones
    row by row. The same values in both layouts give the reference's answer:
    odd C, steps that straddle two rows with different continuity values,
    partial last periods, several chunks, and the gradient combinations that
    decide which path runs (an output that is not wanted sends the kernel to
    the row path)."""
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    values = [rand((rows, cols), dtype, generator=g) for _ in range(4)]
    mask = (torch.rand(rows, generator=g) > 0.3) if masked else None
    groups = groups_for(cols)
    want = {"pred": True, "target": grads == "pred-target", "raw": grads == "pred-raw"}

    def layout(strided):
        """Leaves (pred, target, raw) and the inputs the loss sees: the values
        themselves, or views with row stride 2C of wider leaves."""
        leaves, inputs = {}, []
        for name, v in zip(("pred", "target", "prev", "raw"), values):
            base = torch.cat([v, v], dim=1) if strided else v.clone()
            if want.get(name):
                base.requires_grad_()
                leaves[name] = base
            x = base[:, :cols] if strided else base
            assert x.is_contiguous() != strided
            inputs.append(x)
        return leaves, inputs

    results = []
    for strided in (False, True):
        for fn in (kf.temporal_loss, kf.reference.temporal_loss):
            leaves, inputs = layout(strided)
            out = fn(*inputs, continuity=mask, **groups)
            out.total.backward()
            grads_ = {k: v.grad[:, :cols] for k, v in leaves.items()}
            results.append((out.total.detach(), out.terms.detach(), grads_))
    tol = TOL[dtype]
    (flat, flat_ref, row, row_ref) = results
    for fused, ref in ((flat, flat_ref), (row, row_ref), (flat, row)):
        torch.testing.assert_close(fused[0], ref[0], rtol=tol["values"][0], atol=tol["values"][1])
        torch.testing.assert_close(fused[1], ref[1], rtol=tol["values"][0], atol=tol["values"][1])
        assert fused[2].keys() == ref[2].keys() == {k for k, w in want.items() if w}
        for name in fused[2]:
            torch.testing.assert_close(fused[2][name], ref[2][name], rtol=tol["grads"][0], atol=tol["grads"][1])


@pytest.mark.parametrize("cast", ["half", "bfloat16", "float", "double", "to_bfloat16", "to_empty"])
def test_module_casts_keep_the_weights_exact(cast):
    """Casting the module (as model.half() does to every submodule) must not
    round the weight buffer: 0.1 as float16 is 0.09998."""
    weights = kf.LossWeights(mse=1.0, l1=0.1, perceptual=0.7, temporal=0.3, smoothing=0.15)
    loss_fn = kf.FusedKoeMorphLoss(*weights.as_tuple())
    if cast == "to_bfloat16":
        loss_fn = loss_fn.to(torch.bfloat16)
    elif cast == "to_empty":  # built on meta, materialized on the CPU: the values come back too
        loss_fn = loss_fn.to("meta").to_empty(device="cpu")
    else:
        loss_fn = getattr(loss_fn, cast)()
    assert loss_fn.weight_values.dtype == torch.float64
    assert loss_fn.weight_values.tolist() == list(weights.as_tuple())
    assert loss_fn.weights == weights
    pred, target, prev, raw = (rand((4, 52), dtype=torch.float32) for _ in range(4))
    got = loss_fn(pred, target, prev, raw)
    want = kf.temporal_loss(pred, target, prev, raw, weights=weights).total
    assert torch.equal(got, want)
    # and assigning weights afterwards updates the module's own copy only
    loss_fn.weights = kf.LossWeights(mse=2.0)
    assert loss_fn.weight_values.tolist()[0] == 2.0
    assert kf.LossWeights().as_tensor().tolist()[0] == 1.0


def test_moving_the_module_where_it_is_keeps_its_weight_buffer():
    """A no-op .to() keeps the very buffer (a captured CUDA graph reads it);
    assigning weights afterwards updates that buffer."""
    loss_fn = kf.FusedKoeMorphLoss()
    buffer = loss_fn.weight_values
    loss_fn.to("cpu")
    loss_fn.to(torch.device("cpu"))
    assert loss_fn.weight_values is buffer
    loss_fn.weights = kf.LossWeights(temporal=0.9)
    assert buffer.tolist() == list(kf.LossWeights(temporal=0.9).as_tuple())
