"""Every misuse of SPEC "Bad input" raises a Python exception naming the
argument, from the fused loss, the reference, the module and the raw operator."""

import math

import pytest
import torch

import koemorph_fused as kf
from helpers import rand

P = rand((4, 52))

CASES = [
    # (description, kwargs for temporal_loss, exception, words the message must contain)
    ("pred not a tensor", dict(pred=[[0.0] * 52]), TypeError, ["pred", "Tensor"]),
    ("target not a tensor", dict(target=1.0), TypeError, ["target", "Tensor"]),
    ("shape mismatch", dict(target=rand((4, 51))), ValueError, ["target", "shape"]),
    ("prev shape mismatch", dict(prev=rand((5, 52))), ValueError, ["prev", "shape"]),
    ("raw shape mismatch", dict(raw=rand((4, 52, 1))), ValueError, ["raw", "shape"]),
    ("1-D pred", dict(pred=rand((52,)), target=rand((52,))), ValueError, ["pred", "2 dimensions"]),
    ("0-D pred", dict(pred=torch.tensor(1.0), target=torch.tensor(1.0)), ValueError, ["pred", "2 dimensions"]),
    ("empty batch", dict(pred=rand((0, 52)), target=rand((0, 52))), ValueError, ["pred", "empty"]),
    ("zero columns", dict(pred=rand((4, 0)), target=rand((4, 0))), ValueError, ["pred", "empty"]),
    ("integer pred", dict(pred=torch.ones(4, 52, dtype=torch.int64), target=torch.ones(4, 52, dtype=torch.int64)), TypeError, ["pred", "int64"]),
    ("integer target", dict(target=torch.ones(4, 52, dtype=torch.int32)), TypeError, ["target", "int32"]),
    ("bool raw", dict(raw=torch.ones(4, 52, dtype=torch.bool)), TypeError, ["raw", "bool"]),
    ("complex prev", dict(prev=torch.ones(4, 52, dtype=torch.complex64)), TypeError, ["prev", "complex64"]),
    ("mask wrong shape", dict(prev=rand((4, 52)), continuity=torch.ones(5)), ValueError, ["continuity", "shape"]),
    ("mask with C", dict(prev=rand((4, 52)), continuity=torch.ones(4, 52)), ValueError, ["continuity", "shape"]),
    ("mask complex", dict(prev=rand((4, 52)), continuity=torch.ones(4, dtype=torch.complex64)), TypeError, ["continuity"]),
    ("continuity a string", dict(continuity="yes"), TypeError, ["continuity"]),
    ("continuity an int", dict(continuity=1), TypeError, ["continuity"]),
    ("mouth index too large", dict(mouth_indices=[52]), ValueError, ["mouth_indices", "52"]),
    ("expression index too small", dict(expression_indices=[-53]), ValueError, ["expression_indices", "-53"]),
    ("index a float", dict(mouth_indices=[1.0]), TypeError, ["mouth_indices"]),
    ("index a bool", dict(expression_indices=[True]), TypeError, ["expression_indices"]),
    ("indices not iterable", dict(mouth_indices=5), TypeError, ["mouth_indices"]),
    ("2-D index tensor", dict(mouth_indices=torch.zeros(2, 2, dtype=torch.long)), TypeError, ["mouth_indices"]),
    ("negative weight", dict(weights={"mse_weight": -1.0}), ValueError, ["mse", ">= 0"]),
    ("nan weight", dict(weights={"l1_weight": math.nan}), ValueError, ["l1", "finite"]),
    ("inf weight", dict(weights={"temporal_weight": math.inf}), ValueError, ["temporal", "finite"]),
    ("string weight", dict(weights={"smoothing_weight": "0.1"}), TypeError, ["smoothing"]),
    ("unknown weight key", dict(weights={"mse": 1.0}), ValueError, ["mse", "unknown"]),
    ("weights a list", dict(weights=[1, 0.1, 0.5, 0.2, 0.1]), TypeError, ["weights"]),
    ("names without a layout", dict(mouth_indices="jawOpen"), ValueError, ["mouth_indices", "layout="]),
    ("names mixed with numbers", dict(mouth_indices=["jawOpen", 3], layout="arkit"), TypeError, ["mouth_indices"]),
    # On the meta device the dispatcher would run the fake kernel: uninitialized "terms".
    ("continuity on meta", dict(prev=rand((4, 52)), continuity=torch.ones(4, device="meta")), ValueError,
     ["continuity", "meta"]),
    ("prev on meta", dict(prev=torch.ones(4, 52, device="meta")), ValueError, ["prev", "meta"]),
    ("raw on meta", dict(raw=torch.ones(4, 52, device="meta")), ValueError, ["raw", "meta"]),
    ("target on meta", dict(target=torch.ones(4, 52, device="meta")), ValueError, ["target", "meta"]),
]


def call(fn, **override):
    args = dict(pred=P, target=rand((4, 52)), prev=None, raw=None)
    args.update(override)
    pred, target, prev, raw = (args.pop(k) for k in ("pred", "target", "prev", "raw"))
    return fn(pred, target, prev, raw, **args)


@pytest.mark.parametrize("fn", [kf.temporal_loss, kf.reference.temporal_loss], ids=["fused", "reference"])
@pytest.mark.parametrize("desc,kwargs,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises(fn, desc, kwargs, exc, words):
    with pytest.raises(exc) as info:
        call(fn, **kwargs)
    message = str(info.value)
    for w in words:
        assert w in message, f"{desc}: {w!r} not in {message!r}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_different_devices():
    for fn in (kf.temporal_loss, kf.reference.temporal_loss):
        with pytest.raises(ValueError, match="target.*device"):
            fn(P, rand((4, 52)).cuda())


def test_module_rejects_bad_weights_and_inputs():
    with pytest.raises(ValueError, match="perceptual"):
        kf.FusedKoeMorphLoss(perceptual_weight=-0.5)
    loss = kf.FusedKoeMorphLoss()
    with pytest.raises(TypeError, match="weights"):
        loss.weights = (1, 2, 3)
    with pytest.raises(ValueError, match="target"):
        loss(P, rand((3, 52)))


# The raw operators check their arguments too (RuntimeError subclasses from TORCH_CHECK).
def op_args(**override):
    colw = torch.zeros(52)
    args = dict(pred=P, target=rand((4, 52)), prev=None, raw=None, continuity=None, colw=colw,
                weights=torch.tensor([1.0, 0.1, 0.5, 0.2, 0.1], dtype=torch.float64), gp=False, gt=False, gr=False)
    args.update(override)
    return tuple(args.values())


OP_CASES = [
    (dict(target=rand((4, 51))), ValueError, "target"),
    (dict(target=rand((4, 52), torch.float64)), TypeError, "target"),
    (dict(pred=rand((52,)), target=rand((52,))), ValueError, "pred"),
    (dict(pred=rand((0, 52)), target=rand((0, 52))), ValueError, "pred"),
    (dict(colw=torch.zeros(51)), ValueError, "column_weights"),
    (dict(colw=torch.zeros(52, dtype=torch.float64)), TypeError, "column_weights"),
    (dict(weights=torch.tensor([1.0, 0.1])), ValueError, "weights"),
    (dict(weights=torch.tensor([1.0, 0.1, -0.5, 0.2, 0.1])), ValueError, "weights"),
    (dict(weights=torch.tensor([1.0, 0.1, math.nan, 0.2, 0.1])), ValueError, "weights"),
    (dict(weights=torch.tensor([1, 0, 0, 0, 0])), TypeError, "weights"),
    (dict(prev=rand((4, 52)), continuity=torch.ones(3)), ValueError, "continuity"),
    (dict(pred=torch.ones(4, 52, dtype=torch.int32), target=torch.ones(4, 52, dtype=torch.int32)), TypeError, "pred"),
]


@pytest.mark.parametrize("override,exc,word", OP_CASES)
def test_operator_checks(override, exc, word):
    with pytest.raises(exc, match=word):
        torch.ops.koemorph_fused.temporal_loss_forward(*op_args(**override))


def test_scale_gradients_checks():
    with pytest.raises(ValueError, match="grad_output"):
        torch.ops.koemorph_fused.scale_gradients(torch.ones(2), P, torch.empty(0), torch.empty(0), torch.float32)
    with pytest.raises(TypeError, match="grad_output"):
        torch.ops.koemorph_fused.scale_gradients(torch.tensor(1), P, torch.empty(0), torch.empty(0), torch.float32)
    with pytest.raises(TypeError, match="saved gradients"):
        torch.ops.koemorph_fused.scale_gradients(torch.tensor(1.0), P, torch.empty(0), torch.empty(0), torch.bfloat16)


def test_nan_in_data_is_not_an_error():
    pred = rand((4, 52))
    pred[0, 0] = math.nan
    assert math.isnan(kf.temporal_loss(pred, rand((4, 52))).total.item())


def test_module_on_meta_rejects_cpu_inputs():
    """FusedKoeMorphLoss().to("meta") keeps its weights on meta: a CPU call
    must name them instead of returning uninitialized memory."""
    loss_fn = kf.FusedKoeMorphLoss().to("meta")
    with pytest.raises(ValueError, match=r"weights.*meta.*\.to\("):
        loss_fn(P, rand((4, 52)))
    # On meta inputs it runs the fake kernel, as torch modules do: shapes only.
    out = loss_fn(torch.empty(4, 52, device="meta"), torch.empty(4, 52, device="meta"))
    assert out.device.type == "meta" and out.shape == ()


@pytest.mark.parametrize("fn", [kf.temporal_loss, kf.reference.temporal_loss], ids=["fused", "reference"])
def test_index_arguments_do_not_depend_on_history(fn):
    """The same index argument gets the same answer whatever ran before: a
    generator is read exactly once (also when dtypes are mixed), and float or
    bool indices are rejected after default calls as in a fresh process."""
    pred, target = rand((4, 52)), rand((4, 52), torch.float64)
    expected = fn(pred, target, mouth_indices=list(range(12, 22))).terms
    got = fn(pred, target, mouth_indices=(i for i in range(12, 22))).terms  # mixed dtypes: promoted
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for _ in range(2):
        fn(pred, pred)  # default calls first
        for bad in ([12.0, 13.0], [True, 2], (12.0,)):
            with pytest.raises(TypeError, match="mouth_indices"):
                fn(pred, pred, mouth_indices=bad)


@pytest.mark.parametrize("fn", [kf.temporal_loss, kf.reference.temporal_loss], ids=["fused", "reference"])
def test_numpy_bool_continuity_means_bool(fn):
    np = pytest.importorskip("numpy")
    pred, target, prev = rand((4, 52)), rand((4, 52)), rand((4, 52))
    for flag in (False, True):
        torch.testing.assert_close(fn(pred, target, prev, continuity=np.bool_(flag)).terms,
                                   fn(pred, target, prev, continuity=flag).terms, rtol=0, atol=0)
    with pytest.raises(TypeError, match="numpy.float64"):
        fn(pred, target, prev, continuity=np.float64(1.0))
