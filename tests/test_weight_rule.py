"""One weight rule, in float64, for the kernels and the create_graph linearisations.

A weight counts when it is finite and > 0, decided in float64 before any
rounding to the accumulation dtype: a weight between FLT_MAX and DBL_MAX
(finite in float64, infinite in float32) counts in the first derivative (the
kernel) and in the second (the linearisation) alike. Both autograd paths, on
the CPU and, where there is one, on a GPU."""

import pytest
import torch

import koemorph_fused as kf
from helpers import DEVICES, rand


@pytest.fixture(params=["cpp", "python"])
def autograd_path(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(kf._ops, "_fast_loss", lambda *args: NotImplemented)
    return request.param


def hessian_vector(pred, target, prev, weights, v):
    """(d total/d pred, d/d pred of <d total/d pred, v>) through create_graph."""
    p = pred.clone().requires_grad_()
    (g,) = torch.autograd.grad(kf.temporal_loss(p, target, prev, weights=weights).total, p, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), p)
    return g.detach(), hv


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("big", ["mse", "perceptual", "temporal"])
def test_weight_above_float_max_counts_in_both_derivatives(autograd_path, device, big):
    assert torch.finfo(torch.float32).max < 1e39 < torch.finfo(torch.float64).max
    weights = kf.LossWeights(**{big: 1e39})
    # 16 rows: every coefficient (2e39/R at most) stays below FLT_MAX.
    pred, target, prev, v = (rand((16, 52), torch.float64, device) for _ in range(4))
    want_g, want_hv = hessian_vector(pred, target, prev, weights, v)  # float64: nothing overflows
    got_g, got_hv = hessian_vector(pred.float(), target.float(), prev.float(), weights, v.float())
    # The second derivative holds the weight's coefficient, a finite float32:
    # it must be there, not dropped because the weight itself is not one.
    assert torch.isfinite(got_hv).all() and got_hv.abs().max() > 1e30
    # float32 inputs: pred - target loses digits where it is small, so the
    # error is measured against the largest value.
    for got, want in ((got_g, want_g), (got_hv, want_hv)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_linearisation_reads_cpu_weights_where_they_are(autograd_path, device):
    """Default LossWeights are a CPU tensor: the linearisation never copies
    them (no host-to-device copy, which would be a sync on a GPU)."""
    pred, target, prev, v = (rand((3, 52), torch.float32, device) for _ in range(4))
    weights = kf.LossWeights()
    assert weights.as_tensor().device.type == "cpu"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        hessian_vector(pred, target, prev, weights, v)
    copies = [e.name for e in prof.events()
              if e.name in ("aten::_to_copy", "aten::copy_") and [5] in (e.input_shapes or [])]
    assert not copies
