"""LossMonitor: rows, flags, one synchronisation per flush, none per record."""

import math

import pytest
import torch

import koemorph_fused as kf
from koemorph_fused.schedule import Phase


def out_with(total, terms=(0.1, 0.2, 0.3, 0.4, 0.5), dtype=torch.float32, device="cpu"):
    return kf.LossOutput(torch.tensor(total, dtype=dtype, device=device),
                         torch.tensor(terms, dtype=dtype, device=device))


def test_rows_hold_terms_total_and_metadata():
    g = torch.Generator().manual_seed(0)
    pred, target, prev, raw = (torch.rand(8, 52, generator=g) for _ in range(4))
    out = kf.temporal_loss(pred, target, prev, raw)
    mon = kf.LossMonitor()
    mon.record(out, stride=8, file_transition=False)
    assert len(mon) == 1
    (row,) = mon.flush()
    expected = out.as_dict()
    for name in kf.TERM_NAMES + ("total",):
        assert row[name] == pytest.approx(expected[name], rel=1e-6)
        assert isinstance(row[name], float)
    assert row["stride"] == 8 and row["file_transition"] is False and row["flags"] == []
    assert row["step"] == 0 and row["phase"] is None and row["epoch"] is None
    assert len(mon) == 0 and mon.flush() == []


def test_record_a_loss_module():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 52, generator=g, requires_grad=True)
    target = torch.rand(4, 52, generator=g)
    mon = kf.LossMonitor()
    for module in (kf.FusedKoeMorphLoss(), kf.reference.KoeMorphTemporalLoss()):
        with pytest.raises(ValueError, match="last_terms"):
            mon.record(module, total=torch.tensor(0.0))
        loss = module(pred, target)
        with pytest.raises(TypeError, match="total="):
            mon.record(module)
        mon.record(module, total=loss, stride=1)
    a, b = mon.flush()
    assert [a["step"], b["step"]] == [0, 1]
    for name in kf.TERM_NAMES + ("total",):
        assert a[name] == pytest.approx(b[name], rel=1e-5)
    # A (total, terms) pair works like a LossOutput.
    mon.record((loss, torch.zeros(5)))
    assert mon.flush()[0]["mse"] == 0.0


def test_flags_divergence_nonfinite_expected():
    mon = kf.LossMonitor()
    early = Phase("early", 3, 32, kf.LossWeights(), (0.15, 0.6))
    mon.record(out_with(0.3), stride=32, phase=early)         # inside
    mon.record(out_with(0.1), stride=32, phase=early)         # below range
    mon.record(out_with(1.5), stride=32, phase=early)         # divergence and outside
    mon.record(out_with(1.5), stride=32)                      # divergence, no range given
    mon.record(out_with(float("nan")), stride=32)
    mon.record(out_with(0.5), expected_total=(0.0, 0.4))       # explicit range
    mon.record(out_with(0.99))                                # below the threshold
    rows = mon.flush()
    assert [r["flags"] for r in rows] == [
        [], ["outside_expected"], ["divergence", "outside_expected"], ["divergence"], ["nonfinite"],
        ["outside_expected"], [],
    ]
    assert rows[0]["phase"] == "early" and rows[0]["epoch"] == 3
    assert math.isnan(rows[4]["total"])
    strict = kf.LossMonitor(divergence_threshold=0.5)
    strict.record(out_with(0.6))
    assert strict.flush()[0]["flags"] == ["divergence"]


def test_temporal_jump_flagged_only_off_file_transitions():
    mon = kf.LossMonitor(temporal_jump_factor=4.0)
    calm = (0.1, 0.2, 0.3, 0.01, 0.5)
    jump = (0.1, 0.2, 0.3, 0.5, 0.5)
    mon.record(out_with(0.3, (0.1, 0.2, 0.3, 0.0, 0.5)))      # no temporal term yet: ignored
    for _ in range(5):
        mon.record(out_with(0.3, calm))
    mon.record(out_with(0.3, jump), file_transition=True)     # normal at a file boundary
    mon.record(out_with(0.3, jump), file_transition=torch.tensor([True, False]))
    mon.record(out_with(0.3, jump))                            # within a file: flagged
    rows = mon.flush()
    assert [r["flags"] for r in rows] == [[]] * 8 + [["temporal_jump"]]
    assert [r["file_transition"] for r in rows] == [False] * 6 + [True, True, False]
    # the baseline carries over flushes; None disables the flag
    # baseline now 0.9 * 0.01 + 0.1 * 0.5 = 0.059
    mon.record(out_with(0.3, (0.1, 0.2, 0.3, 0.2, 0.5)))
    assert mon.flush()[0]["flags"] == []  # 0.2 < 4 * 0.059
    mon.record(out_with(0.3, (0.1, 0.2, 0.3, 1.0, 0.5)))
    assert mon.flush()[0]["flags"] == ["temporal_jump"]  # 1.0 > 4 * (0.9 * 0.059 + 0.1 * 0.2)
    off = kf.LossMonitor(temporal_jump_factor=None)
    off.record(out_with(0.3, calm))
    off.record(out_with(0.3, jump))
    assert [r["flags"] for r in off.flush()] == [[], []]


def test_file_transition_tensor_is_kept_on_device():
    mon = kf.LossMonitor()
    cont = kf.continuity_mask(torch.tensor([1, 2]), torch.tensor([1, 1]))
    mon.record(out_with(0.3), file_transition=~cont.all())
    mon.record(out_with(0.3), file_transition=~kf.continuity_mask(torch.tensor([1, 2]), torch.tensor([1, 2])).all())
    assert [r["file_transition"] for r in mon.flush()] == [True, False]


def test_record_stores_tensors_and_does_not_synchronise(monkeypatch):
    """record() keeps device tensors: every host read-back (item, tolist, bool,
    float, int, numpy) is forbidden while recording, and flush() reads back once."""
    out = out_with(0.3)
    mon = kf.LossMonitor()

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in LossMonitor.record")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
            m.setattr(torch.Tensor, name, forbidden)
        for i in range(10):
            mon.record(out, stride=4, file_transition=torch.tensor(i % 3 == 0))
    pending = mon._pending
    assert all(isinstance(rec["total"], torch.Tensor) and isinstance(rec["terms"], torch.Tensor) for rec in pending)
    assert all(isinstance(rec["transition"], torch.Tensor) for rec in pending)

    calls = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        calls.append(tuple(self.shape))
        return real_tolist(self)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", counting_tolist)
        m.setattr(torch.Tensor, "item", lambda self: (_ for _ in ()).throw(AssertionError("item in flush")))
        rows = mon.flush()
    assert calls == [(10, 7)]  # one read-back for all ten records: 5 terms, total, file_transition
    assert [r["file_transition"] for r in rows] == [i % 3 == 0 for i in range(10)]


def test_mixed_dtypes_in_one_flush():
    mon = kf.LossMonitor()
    mon.record(out_with(0.25, dtype=torch.float32))
    mon.record(out_with(1 / 3, dtype=torch.float64))
    a, b = mon.flush()
    assert a["total"] == 0.25 and b["total"] == pytest.approx(1 / 3, abs=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_record_does_not_sync_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    pred, target, prev = (torch.rand(64, 52, device="cuda", generator=g) for _ in range(3))
    mask = kf.continuity_mask(torch.arange(64, device="cuda") % 3, torch.arange(64, device="cuda") % 2)
    out = kf.temporal_loss(pred, target, prev, continuity=mask)
    mon = kf.LossMonitor()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            mon.record(out, stride=2, file_transition=~mask.all(), phase=kf.TrainingSchedule(4).at(2))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    rows = mon.flush()
    assert len(rows) == 5 and rows[0]["file_transition"] is True


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(out=torch.tensor(1.0)), TypeError, "LossOutput"),
    (dict(out=(torch.tensor(1.0), torch.zeros(4))), TypeError, "terms"),
    (dict(out=(torch.zeros(2), torch.zeros(5))), TypeError, "total"),
    (dict(out=(1.0, torch.zeros(5))), TypeError, "total"),
    (dict(out=(torch.tensor(1), torch.zeros(5, dtype=torch.long))), TypeError, "floating"),
    (dict(out=None), TypeError, "LossOutput"),
    (dict(stride=2.0), TypeError, "stride"),
    (dict(file_transition="yes"), TypeError, "file_transition"),
    (dict(total=torch.tensor(1.0)), TypeError, "total="),
])
def test_bad_record_arguments(kwargs, exc, word):
    args = dict(out=out_with(0.3))
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        kf.LossMonitor().record(**args)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(divergence_threshold="1"), TypeError), (dict(temporal_jump_factor=1.0), ValueError),
    (dict(temporal_jump_factor="x"), TypeError),
])
def test_bad_monitor_arguments(kwargs, exc):
    with pytest.raises(exc):
        kf.LossMonitor(**kwargs)


def test_records_a_sequence_loss_output():
    """kf.sequence_loss's own result is recorded as it is (its counts are not
    a column); a per-frame result ("none") is an error."""
    pred, target = torch.rand(2, 4, 52), torch.rand(2, 4, 52)
    out = kf.sequence_loss(pred, target, velocity_weight=0.5)
    mon = kf.LossMonitor()
    mon.record(out)
    (row,) = mon.flush()
    assert row["velocity"] == pytest.approx(out.terms[5].item()) and row["total"] == pytest.approx(out.total.item())
    with pytest.raises(ValueError, match="reduction='none'"):
        mon.record(kf.sequence_loss(pred, target, reduction="none"))
