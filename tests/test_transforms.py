"""Forward-mode AD and torch.func transforms: the fused loss gives what the
reference gives (jvp, jacfwd, grad, jacrev, hessian, per-sample gradients
with vmap(grad), vmap of the loss itself, torch.autograd.forward_ad).

Eager calls with plain tensors use the C++ autograd node, which supports
neither; kf.temporal_loss hands these calls to the Python FusedTemporalLoss
(setup_context form, a jvp rule, and a vmap rule for the operator)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import koemorph_fused as kf
from helpers import DEVICES, TOL, rand

FUNCS = [kf.temporal_loss, kf.reference.temporal_loss]


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred, target, prev, raw = (rand(shape, dtype, device, generator=g) for _ in range(4))
    mask = torch.rand(shape[:-1], generator=g).to(device) > 0.3
    return pred, target, prev, raw, mask


def _assert_same(fused, ref, dtype):
    rtol, atol = TOL[dtype]["grads"]
    torch.testing.assert_close(fused, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_jvp_is_the_directional_derivative(device, dtype):
    pred, target, prev, raw, mask = _inputs((6, 52), dtype, device)
    tangents = tuple(rand(x.shape, dtype, device) - 0.5 for x in (pred, target, raw))
    results = []
    for fn in FUNCS:
        _, t = jvp(lambda p, t, r: fn(p, t, prev, r, continuity=mask).total, (pred, target, raw), tangents)
        results.append(t)
    # The tangent has the dtype of total. (The reference's comes back float64
    # for float32 inputs: a quirk of eager forward AD with Python-float weights.)
    assert results[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert results[0].abs() > 0  # the bug this guards against: a tangent of exactly 0
    rtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(results[0].double(), results[1].double(), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_ad_dual_tensors(device):
    pred, target, prev, raw, mask = _inputs((5, 52), torch.float64, device)
    tangent = rand(pred.shape, torch.float64, device)
    results = []
    for fn in FUNCS:
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(pred, tangent), target, prev, raw, continuity=mask)
            results.append(fwAD.unpack_dual(out.total).tangent)
            assert fwAD.unpack_dual(out.terms).tangent is None  # terms are not differentiable
    assert results[0] is not None
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd"])
def test_gradients_under_transforms(device, transform):
    pred, target, prev, raw, mask = _inputs((4, 52), torch.float64, device)
    t = {"grad": grad, "jacrev": jacrev, "jacfwd": jacfwd}[transform]
    results = []
    for fn in FUNCS:
        f = lambda p, r: fn(p, target, prev, r, continuity=mask, weights=kf.LossWeights(temporal=0.3)).total
        results.append(t(f, argnums=(0, 1))(pred, raw))
    for a, b in zip(*results):
        assert a.abs().sum() > 0
        _assert_same(a, b, torch.float64)


def test_hessian_matches_reference():
    pred, target, prev, raw, mask = _inputs((3, 7), torch.float64, "cpu")
    groups = dict(mouth_indices=[0, 1, 1], expression_indices=[-1])
    results = [hessian(lambda p: fn(p, target, prev, raw, continuity=mask, **groups).total)(pred) for fn in FUNCS]
    assert results[0].shape == (3, 7, 3, 7)
    assert results[0].abs().sum() > 0
    _assert_same(results[0], results[1], torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_per_sample_gradients_with_vmap_grad(device, dtype):
    """vmap(grad(loss)) over the batch: each sample its own loss (one row),
    as differentially private training computes them."""
    pred, target, prev, raw, _ = _inputs((8, 52), dtype, device)
    results = []
    for fn in FUNCS:
        per_sample = vmap(grad(lambda p, t, v, r: fn(p[None], t[None], v[None], r[None]).total))
        results.append(per_sample(pred, target, prev, raw))
    assert results[0].shape == pred.shape
    _assert_same(results[0], results[1], dtype)
    # ...and they are the gradients of one-row calls, one by one.
    for i in (0, 7):
        p = pred[i:i + 1].clone().requires_grad_()
        kf.temporal_loss(p, target[i:i + 1], prev[i:i + 1], raw[i:i + 1]).total.backward()
        _assert_same(results[0][i], p.grad[0], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_of_the_loss(device):
    """vmap over a leading dimension: one independent loss per slice."""
    pred, target, prev, raw, mask = _inputs((3, 5, 52), torch.float64, device)
    outs = [vmap(lambda p, t, v, r, m: tuple(fn(p, t, v, r, continuity=m)))(pred, target, prev, raw, mask)
            for fn in FUNCS]
    (tf, sf), (tr, sr) = outs
    assert tf.shape == (3,) and sf.shape == (3, 5)
    torch.testing.assert_close(tf, tr)
    torch.testing.assert_close(sf, sr)
    for i in range(3):
        one = kf.temporal_loss(pred[i], target[i], prev[i], raw[i], continuity=mask[i])
        torch.testing.assert_close(one.total, tf[i])


def test_module_under_grad_transform():
    pred, target, prev, raw, mask = _inputs((4, 52), torch.float32, "cpu")
    fused, ref = kf.FusedKoeMorphLoss(temporal_weight=0.3), kf.reference.KoeMorphTemporalLoss(temporal_weight=0.3)
    g = [grad(lambda p: m(p, target, prev, raw, continuity=mask))(pred) for m in (fused, ref)]
    _assert_same(g[0], g[1], torch.float32)


def test_eager_calls_keep_the_cpp_node_after_a_transform():
    """The transform's state does not leak into later eager calls."""
    pred, target, *_ = _inputs((4, 52), torch.float32, "cpu")
    grad(lambda p: kf.temporal_loss(p, target).total)(pred)
    with fwAD.dual_level():
        kf.temporal_loss(fwAD.make_dual(pred, pred), target)
    out = kf.temporal_loss(pred.clone().requires_grad_(), target)
    assert "TemporalLossFunction" in out.total.grad_fn.name()


@pytest.mark.parametrize("transform", ["grad", "jvp", "vmap"])
def test_transforms_leave_no_wrapped_tensors_behind(transform):
    """Column weights first made inside a transform are that transform's
    wrapped tensors: they must not be kept for later eager calls."""
    pred, target, *_ = _inputs((4, 52), torch.float32, "cpu")
    groups = dict(mouth_indices=(1, 4, 4), expression_indices=(50, -1))  # not used by other tests
    kf._ops._COLUMN_WEIGHTS.clear()
    f = lambda p: kf.temporal_loss(p, target, **groups).total
    if transform == "grad":
        grad(f)(pred)
    elif transform == "jvp":
        jvp(f, (pred,), (pred,))
    else:
        vmap(lambda p, t: kf.temporal_loss(p, t, **groups).total)(pred[:, None], target[:, None])
    eager = kf.temporal_loss(pred, target, **groups)  # would fail on a wrapped colw: no storage
    torch.testing.assert_close(eager.terms, kf.reference.temporal_loss(pred, target, **groups).terms)
    for colw in kf._ops._COLUMN_WEIGHTS.values():
        colw.data_ptr()  # a plain tensor with storage


@pytest.mark.parametrize("loss", ["rows", "windows"])
@pytest.mark.parametrize("nesting", ["jacfwd(jacfwd)", "jvp(jvp)", "jacfwd(jvp)"])
def test_nested_forward_mode_raises(loss, nesting):
    """Forward mode inside forward mode: torch does not differentiate an
    autograd.Function's jvp at an outer forward level (it gave zeros, or an
    internal error), so both losses refuse it by name (docs/spec.md)."""
    pred = torch.rand(2, 3, 52, dtype=torch.float64)
    target = torch.rand(2, 3, 52, dtype=torch.float64)
    fn = (lambda p: kf.temporal_loss(p, target).total) if loss == "rows" else \
        (lambda p: kf.sequence_loss(p, target).total)
    ones = torch.ones_like(pred)

    def inner_jvp(p):
        return jvp(fn, (p,), (ones,))[1]

    nested = {"jacfwd(jacfwd)": lambda: jacfwd(jacfwd(fn))(pred),
              "jvp(jvp)": lambda: jvp(inner_jvp, (pred,), (ones,)),
              "jacfwd(jvp)": lambda: jacfwd(inner_jvp)(pred)}[nesting]
    with pytest.raises(NotImplementedError, match="forward-mode AD nested in forward-mode AD"):
        nested()


_COMPILED_TRANSFORMS = {
    "grad": lambda f, p, t: grad(f, argnums=(0, 1))(p, t),
    "jvp": lambda f, p, t: jvp(f, (p, t), (torch.ones_like(p), -torch.ones_like(t)))[1],
    "jacrev": lambda f, p, t: jacrev(f, argnums=1)(p, t),
    # pred computed inside the transform: dynamo sees that it requires grad,
    # but not that target (an input) does.
    "grad of 2 * pred": lambda f, p, t: grad(lambda a, b: f(2 * a, b), argnums=(0, 1))(p, t),
    "vmap(grad)": lambda f, p, t: vmap(grad(lambda a, b: f(a[None], b[None])))(p, t),
}


@pytest.mark.parametrize("loss", ["rows", "windows"])
@pytest.mark.parametrize("transform", list(_COMPILED_TRANSFORMS))
def test_compiled_transform_gives_the_reference_derivatives(loss, transform):
    """torch.compile drops an autograd.Function's backward inside a torch.func
    transform (a torch bug): compiled, both losses gave zero derivatives (or
    raised, for vmap(grad)). Traced inside a transform they now run eagerly
    (torch._dynamo.disable: a graph break), and fullgraph=True raises and says
    why."""
    g = torch.Generator().manual_seed(3)
    shape = (3, 52) if loss == "rows" else (3, 4, 52)
    pred, target = (torch.rand(shape, dtype=torch.float64, generator=g) for _ in range(2))
    if loss == "rows":
        def fused(p, t):
            return kf.temporal_loss(p, t).total

        def ref(p, t):
            return kf.reference.temporal_loss(p, t).total
    else:
        def fused(p, t):
            return kf.sequence_loss(p, t, velocity_weight=0.5).total

        def ref(p, t):
            return kf.reference.sequence_loss(p, t, velocity_weight=0.5).total
    run = _COMPILED_TRANSFORMS[transform]
    torch._dynamo.reset()
    got = torch.compile(lambda p, t: run(fused, p, t), backend="aot_eager")(pred, target)
    want = run(ref, pred, target)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    # The reason is the break's explanation, not only its debug context.
    with pytest.raises(Exception, match=r"\(reason: koemorph_fused: a torch.func transform of a fused loss cannot"):
        torch.compile(lambda p, t: run(fused, p, t), backend="aot_eager", fullgraph=True)(pred, target)
    # The transform around the compiled loss (the loss traced inside it).
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager")
    leaves = torch.utils._pytree.tree_leaves
    for a, b in zip(leaves(run(compiled, pred, target)), leaves(want)):
        torch.testing.assert_close(a, b)
