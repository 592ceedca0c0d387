"""continuity_mask: file indices -> the temporal term's per-row mask."""

import pytest
import torch

import koemorph_fused as kf
from helpers import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_mask_values(device):
    cur = torch.tensor([0, 1, 2, 3], device=device)
    prev = torch.tensor([0, 0, 2, 4], device=device)
    m = kf.continuity_mask(cur, prev)
    assert m.dtype == torch.bool and m.device == cur.device
    assert m.tolist() == [True, False, True, False]
    none = kf.continuity_mask(cur, None)
    assert none.shape == (4,) and none.dtype == torch.bool and not none.any()


def test_mask_drives_the_temporal_term():
    g = torch.Generator().manual_seed(1)
    pred, target, prev = (torch.rand(4, 52, generator=g) for _ in range(3))
    mask = kf.continuity_mask(torch.tensor([5, 5, 6, 6]), torch.tensor([5, 4, 6, 1]))
    out = kf.temporal_loss(pred, target, prev, continuity=mask)
    expected = ((pred - prev)[mask] ** 2).mean()
    torch.testing.assert_close(out.terms[3], expected)
    first = kf.temporal_loss(pred, target, prev, continuity=kf.continuity_mask(torch.arange(4), None))
    assert first.terms[3].item() == 0.0


def test_mask_multi_dim_and_int_dtypes():
    cur = torch.tensor([[1, 2], [3, 4]], dtype=torch.int32)
    prev = torch.tensor([[1, 0], [3, 0]], dtype=torch.int32)
    assert kf.continuity_mask(cur, prev).tolist() == [[True, False], [True, False]]


@pytest.mark.parametrize("cur, prev, exc, word", [
    ([0, 1], None, TypeError, "file_index"),
    (torch.tensor([0.0, 1.0]), None, TypeError, "file_index"),
    (torch.tensor([True, False]), None, TypeError, "file_index"),
    (torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), TypeError, "prev_file_index"),
    (torch.tensor([0, 1]), torch.tensor([0, 1, 2]), ValueError, "prev_file_index must have the shape"),
    (torch.tensor([0, 1]), [0, 1], TypeError, "prev_file_index"),
])
def test_bad_arguments(cur, prev, exc, word):
    with pytest.raises(exc, match=word):
        kf.continuity_mask(cur, prev)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(ValueError, match="device"):
        kf.continuity_mask(torch.tensor([0, 1], device="cuda"), torch.tensor([0, 1]))
