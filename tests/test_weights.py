"""LossWeights: defaults, presets, config mappings and validation."""

import math

import pytest

import koemorph_fused as kf


def test_defaults_are_the_seed_config():
    assert kf.LossWeights().as_tuple() == (1.0, 0.1, 0.5, 0.2, 0.1)
    assert kf.TERM_NAMES == ("mse", "l1", "perceptual", "temporal", "smoothing")
    assert list(kf.MOUTH_INDICES) == list(range(12, 22))
    assert list(kf.EXPRESSION_INDICES) == list(range(0, 10))


def test_presets_for_stride():
    assert kf.LossWeights.for_stride(1) == kf.LossWeights(1.0, 0.1, 0.5, 0.3, 0.15)
    for stride in (2, 8, 32):
        assert kf.LossWeights.for_stride(stride) == kf.LossWeights(1.0, 0.1, 0.7, 0.1, 0.05)
    with pytest.raises(ValueError, match="stride"):
        kf.LossWeights.for_stride(0)
    with pytest.raises(TypeError, match="stride"):
        kf.LossWeights.for_stride(1.5)


def test_from_config_round_trip_and_errors():
    cfg = {"mse_weight": 2, "l1_weight": 0.0, "perceptual_weight": 0.25, "temporal_weight": 1, "smoothing_weight": 3}
    w = kf.LossWeights.from_config(cfg)
    assert w.as_tuple() == (2.0, 0.0, 0.25, 1.0, 3.0) and all(isinstance(v, float) for v in w.as_tuple())
    assert w.to_config() == {k: float(v) for k, v in cfg.items()}
    assert kf.LossWeights.from_config({"temporal_weight": 0.3}) == kf.LossWeights(temporal=0.3)
    with pytest.raises(ValueError, match="unknown.*'foo'"):
        kf.LossWeights.from_config({"foo": 1})
    with pytest.raises(TypeError):
        kf.LossWeights.from_config([("mse_weight", 1.0)])


@pytest.mark.parametrize("bad", [-1e-9, math.nan, math.inf, -math.inf])
def test_invalid_values(bad):
    with pytest.raises(ValueError):
        kf.LossWeights(temporal=bad)


def test_frozen_and_lerp():
    w = kf.LossWeights()
    with pytest.raises(AttributeError):
        w.mse = 2.0
    sparse, dense = kf.LossWeights.for_stride(4), kf.LossWeights.for_stride(1)
    assert sparse.lerp(dense, 0.0) == sparse and sparse.lerp(dense, 1.0) == dense
    mid = sparse.lerp(dense, 0.5)
    assert mid.temporal == pytest.approx(0.2) and mid.perceptual == pytest.approx(0.6)


@pytest.mark.parametrize("loss", ["function", "module"])
def test_the_row_loss_under_a_plain_fake_tensor_mode(loss):
    """The shared weights tensor of LossWeights is real: under a plain
    FakeTensorMode() kf.temporal_loss refused it ("Please convert all Tensors
    to FakeTensors"), while the sequence loss, which makes its own, worked."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        pred = torch.rand(4, 52, requires_grad=True)
        target = torch.rand(4, 52)
        total = kf.temporal_loss(pred, target).total if loss == "function" else kf.FusedKoeMorphLoss()(pred, target)
        total.backward()
        assert isinstance(total, FakeTensor) and total.shape == ()
        assert isinstance(pred.grad, FakeTensor) and pred.grad.shape == (4, 52)
    assert not isinstance(kf.LossWeights().as_tensor(), FakeTensor)


def test_weight_tensors_stay_on_the_cpu_under_another_default_device():
    """The weights tensors are made on the CPU, whatever the default device:
    under `with torch.device("meta")` a LossWeights (and, in a dispatch mode,
    each call's weights) came out on the meta device, and CPU data was
    refused ("weights must be on the CPU or on the device of pred")."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    pred, target = torch.rand(3, 52, device="cpu"), torch.rand(3, 52, device="cpu")
    want = kf.temporal_loss(pred, target, weights=kf.LossWeights(l1=0.3)).total
    want_seq = kf.sequence_loss(pred[None], target[None], velocity_weight=0.2).total
    with torch.device("meta"):
        weights = kf.LossWeights(l1=0.3)
        assert weights.as_tensor().device.type == "cpu"
        with PassThrough():
            assert kf.temporal_loss(pred, target, weights=weights).total == want
        assert kf.temporal_loss(pred, target, weights=weights).total == want
        assert kf.sequence_loss(pred[None], target[None], velocity_weight=0.2).total == want_seq
