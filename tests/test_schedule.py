"""TrainingSchedule: phase boundaries, strides, weight ramp, argument checks."""

import pytest

import koemorph_fused as kf
from koemorph_fused.schedule import EXPECTED_TOTAL
from koemorph_fused.weights import DEFAULT, DENSE, SPARSE

# total -> (names of each epoch as e/m/l, strides)
CASES = {
    1: ("e", [32]),
    2: ("el", [32, 1]),
    3: ("eml", [32, 32, 1]),
    4: ("emml", [32, 32, 8, 1]),
    5: ("emmml", [32, 32, 16, 4, 1]),
    7: ("eemmmll", [32, 32, 32, 16, 4, 1, 1]),
    10: ("eeemmmmlll", [32, 32, 32, 32, 16, 8, 4, 1, 1, 1]),
    12: ("eeemmmmmmlll", [32, 32, 32, 32, 32, 16, 8, 4, 2, 1, 1, 1]),
}


@pytest.mark.parametrize("total", sorted(CASES))
def test_boundaries_small_totals(total):
    names, strides = CASES[total]
    phases = [kf.TrainingSchedule(total).at(e) for e in range(total)]
    assert "".join(p.name[0] for p in phases) == names
    assert [p.stride for p in phases] == strides
    assert [p.epoch for p in phases] == list(range(total))


def test_seed_schedule_100_epochs():
    s = kf.TrainingSchedule(total_epochs=100)
    assert (s.n_early, s.n_mid, s.n_late) == (25, 50, 25)
    phases = list(s)
    assert [p.name for p in phases] == ["early"] * 25 + ["mid"] * 50 + ["late"] * 25
    # equal segments of 10 epochs: 32 16 8 4 2
    assert [p.stride for p in phases[25:75]] == [32] * 10 + [16] * 10 + [8] * 10 + [4] * 10 + [2] * 10
    assert all(p.stride == 32 and p.weights == SPARSE for p in phases[:25])
    assert all(p.stride == 1 and p.weights == DENSE for p in phases[75:])
    assert s.at(50).stride == 8  # the seed's "mid (stride=8)"
    for p in phases:
        assert p.expected_total == EXPECTED_TOTAL[p.name]
    assert s.at(0).expected_total == (0.15, 0.6)
    assert s.at(50).expected_total == (0.08, 0.25)
    assert s.at(99).expected_total == (0.02, 0.08)


@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 33, 100, 101, 1000])
def test_invariants(total):
    s = kf.TrainingSchedule(total)
    phases = list(s)
    assert len(phases) == total == len(s)
    assert phases[0].name == "early"
    if total >= 2:
        assert phases[-1].name == "late"
    # phases are contiguous and in order
    order = {"early": 0, "mid": 1, "late": 2}
    assert [order[p.name] for p in phases] == sorted(order[p.name] for p in phases)
    # quarter sizes: within one epoch of total / 4
    assert abs(s.n_early - total / 4) <= 0.75 and abs(s.n_late - total / 4) <= 0.75 or total < 2
    # stride never increases, is a power of two, mid strides in [2, 32]
    strides = [p.stride for p in phases]
    assert strides == sorted(strides, reverse=True)
    assert all(x & (x - 1) == 0 for x in strides)
    assert all(2 <= p.stride <= 32 for p in phases if p.name == "mid")
    # weights: the temporal weight never decreases, perceptual never increases, all valid LossWeights
    temporal = [p.weights.temporal for p in phases]
    perceptual = [p.weights.perceptual for p in phases]
    assert temporal == sorted(temporal)
    assert perceptual == sorted(perceptual, reverse=True)


def test_mid_weights_ramp_linearly():
    s = kf.TrainingSchedule(100)
    for epoch in range(25, 75):
        t = (epoch - 25) / 50
        w = s.at(epoch).weights
        for got, a, b in zip(w.as_tuple(), SPARSE.as_tuple(), DENSE.as_tuple()):
            assert got == pytest.approx(a + (b - a) * t, abs=1e-12)
    assert s.at(25).weights == SPARSE
    assert s.at(74).weights.temporal == pytest.approx(0.1 + 0.2 * 49 / 50)


def test_mid_equal_segments_when_divisible():
    s = kf.TrainingSchedule(20)  # 5 / 10 / 5: two epochs per stride
    assert [s.at(e).stride for e in range(5, 15)] == [32, 32, 16, 16, 8, 8, 4, 4, 2, 2]


def test_custom_presets_and_from_base():
    sparse = kf.LossWeights(mse=2.0)
    dense = kf.LossWeights(mse=3.0)
    s = kf.TrainingSchedule(4, sparse=sparse, dense=dense)
    assert s.at(0).weights == sparse and s.at(3).weights == dense
    assert s.at(2).weights.mse == pytest.approx(2.5)

    assert kf.TrainingSchedule.from_base(DEFAULT, 4).at(0).weights == SPARSE
    base = kf.LossWeights(temporal=0.4, smoothing=0.0)  # temporal doubled, smoothing off
    s = kf.TrainingSchedule.from_base(base, total_epochs=8)
    assert s.at(0).weights.temporal == pytest.approx(0.2)
    assert s.at(7).weights.temporal == pytest.approx(0.6)
    assert all(p.weights.smoothing == 0.0 for p in s)
    assert s.at(7).weights.perceptual == pytest.approx(DENSE.perceptual)


@pytest.mark.parametrize("bad, exc, word", [
    (0, ValueError, "total_epochs"), (-3, ValueError, "total_epochs"), (2.0, TypeError, "total_epochs"),
    (True, TypeError, "total_epochs"), ("10", TypeError, "total_epochs"),
])
def test_bad_total(bad, exc, word):
    with pytest.raises(exc, match=word):
        kf.TrainingSchedule(bad)


@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (10, ValueError), (1.0, TypeError), (None, TypeError)])
def test_bad_epoch(bad, exc):
    with pytest.raises(exc, match="epoch"):
        kf.TrainingSchedule(10).at(bad)


def test_bad_presets():
    with pytest.raises(TypeError, match="sparse"):
        kf.TrainingSchedule(4, sparse={"mse_weight": 1.0})
    with pytest.raises(TypeError, match="dense"):
        kf.TrainingSchedule(4, dense=None)
    with pytest.raises(TypeError, match="base"):
        kf.TrainingSchedule.from_base({"mse_weight": 1.0}, 4)
