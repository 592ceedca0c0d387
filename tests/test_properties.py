"""Property-based tests (hypothesis): random shapes, layouts, index lists,
weights, masks, NaN/Inf placements and dtypes; random misuse."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import koemorph_fused as kf
from helpers import DTYPES, TOL

SETTINGS = settings(max_examples=int(__import__("os").environ.get("KF_HYPOTHESIS_EXAMPLES", "120")), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    lead = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
    cols = draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def tensor(layout):
        shape = lead + (cols,)
        if layout == "strided-rows":  # every other row of a taller tensor
            base = torch.rand(lead[:-1] + (2 * lead[-1], cols), generator=g, dtype=torch.float64)
            return base[..., ::2, :].to(dtype)
        if layout == "transposed" and len(lead) >= 2:
            return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).transpose(0, 1).contiguous().transpose(0, 1)
        if layout == "column-strided":
            return torch.rand(lead + (cols, 2), generator=g, dtype=torch.float64)[..., 0].to(dtype)
        return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)

    layouts = st.sampled_from(["contiguous", "strided-rows", "transposed", "column-strided"])
    pred, target = tensor(draw(layouts)), tensor(draw(layouts))
    prev = tensor(draw(layouts)) if draw(st.booleans()) else None
    raw = tensor(draw(layouts)) if draw(st.booleans()) else None

    kind = draw(st.sampled_from(["none", "true", "false", "bool", "float"]))
    continuity = {"none": None, "true": True, "false": False}.get(kind)
    if kind in ("bool", "float"):
        m = torch.rand(lead, generator=g) > draw(st.floats(0, 1))
        continuity = m if kind == "bool" else m.to(dtype)

    index = st.integers(-cols, cols - 1)
    mouth = draw(st.lists(index, max_size=12))
    expression = draw(st.lists(index, max_size=12))
    weight = st.one_of(st.just(0.0), st.floats(1e-3, 1e3))
    weights = kf.LossWeights(*(draw(weight) for _ in range(5)))

    # Poison one element of one input with NaN or +-Inf, sometimes.
    poison = draw(st.sampled_from([None, "pred", "target", "prev", "raw"]))
    tensors = {"pred": pred, "target": target, "prev": prev, "raw": raw}
    if poison and tensors[poison] is not None:
        x = tensors[poison].clone()
        flat_index = draw(st.integers(0, x.numel() - 1))
        x[torch.unravel_index(torch.tensor(flat_index), x.shape)] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tensors[poison] = x
    requires_target = draw(st.booleans())
    grad_output = draw(st.floats(-4, 4).filter(lambda v: abs(v) > 1e-3))
    return tensors, dict(continuity=continuity, weights=weights, mouth_indices=mouth,
                         expression_indices=expression), requires_target, grad_output


def close_normwise(actual, expected, rtol, what):
    """Elementwise where finite, relative to the largest finite magnitude (so
    that gradients summing large parts of opposite signs compare fairly);
    NaN and Inf in exactly the same places."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.double(), expected.double()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN positions differ"
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), f"{what}: Inf positions differ"
    finite = torch.isfinite(e)
    if finite.any():
        scale = e[finite].abs().max().item()
        torch.testing.assert_close(a[finite], e[finite], rtol=rtol, atol=rtol * scale + 1e-30, msg=what)


@SETTINGS
@given(problems())
def test_fused_equals_reference(problem):
    tensors, kwargs, requires_target, grad_output = problem
    results = []
    for fn in (kf.temporal_loss, kf.reference.temporal_loss):
        pred = tensors["pred"].clone().requires_grad_()
        target = tensors["target"].clone().requires_grad_(requires_target)
        raw = None if tensors["raw"] is None else tensors["raw"].clone().requires_grad_()
        out = fn(pred, target, tensors["prev"], raw, **kwargs)
        leaves = [x for x in (pred, target, raw) if x is not None and x.requires_grad]
        grads = torch.autograd.grad(out.total, leaves, torch.tensor(grad_output, dtype=out.total.dtype),
                                    allow_unused=True, materialize_grads=True)
        results.append((out.total.detach(), out.terms, grads))
    (total, terms, grads), (r_total, r_terms, r_grads) = results
    rtol_v = TOL[tensors["pred"].dtype]["values"][0] * 5
    rtol_g = TOL[tensors["pred"].dtype]["grads"][0] * 5
    close_normwise(terms, r_terms, rtol_v, "terms")
    close_normwise(total, r_total, rtol_v, "total")
    for i, (a, b) in enumerate(zip(grads, r_grads)):
        close_normwise(a, b, rtol_g, f"gradient {i}")


BAD_VALUES = {
    "pred": [None, 3, "x", [1.0], torch.ones(3), torch.ones(2, 0), torch.ones(3, 52, dtype=torch.int64),
             torch.ones(3, 52, dtype=torch.complex64), torch.ones(4, 52)],
    "target": [None, 1.5, torch.ones(3, 51), torch.ones(52), torch.ones(3, 52, dtype=torch.bool), torch.ones(3, 52, 1)],
    "prev": [2, torch.ones(2, 52), torch.ones(3, 52, dtype=torch.int32)],
    "raw": ["raw", torch.ones(3, 53), torch.ones(3, 52, dtype=torch.uint8)],
    "continuity": ["yes", 1, 0.5, [1, 0, 1], torch.ones(4), torch.ones(3, 52), torch.ones(3, dtype=torch.complex64)],
    "weights": [[1, 2, 3, 4, 5], 1.0, {"mse_weight": -1}, {"mse_weight": math.nan}, {"bogus": 1.0},
                {"l1_weight": "0.1"}, {"temporal_weight": math.inf}],
    "mouth_indices": [5, [52], [-53], [1.5], ["a"], [True], torch.ones(2, 2, dtype=torch.long)],
    "expression_indices": [None, [100], torch.tensor([0.5])],
}


@SETTINGS
@given(st.data())
def test_random_misuse_raises_a_python_exception(data):
    arg = data.draw(st.sampled_from(sorted(BAD_VALUES)))
    value = data.draw(st.sampled_from(BAD_VALUES[arg]))
    fn = data.draw(st.sampled_from([kf.temporal_loss, kf.reference.temporal_loss]))
    call = dict(pred=torch.rand(3, 52), target=torch.rand(3, 52), prev=torch.rand(3, 52), raw=torch.rand(3, 52))
    call[arg] = value
    positional = [call.pop(k) for k in ("pred", "target", "prev", "raw")]
    with pytest.raises((TypeError, ValueError, RuntimeError)) as info:
        fn(*positional, **call)
    assert arg.split("_")[0] in str(info.value) or arg == "weights"
