"""koemorph_fused.blendshapes: layouts, names, patterns, presets, and the loss with named groups."""

import contextlib
import doctest
from pathlib import Path

import pytest
import torch

import koemorph_fused as kf
from koemorph_fused import blendshapes as bs

# The header of a Live Link Face CSV export, as the app writes it (PascalCase,
# 52 blend shapes, then 9 head and eye rotations).
LIVE_LINK_FACE_HEADER = (
    "Timecode,BlendShapeCount,EyeBlinkLeft,EyeLookDownLeft,EyeLookInLeft,EyeLookOutLeft,EyeLookUpLeft,"
    "EyeSquintLeft,EyeWideLeft,EyeBlinkRight,EyeLookDownRight,EyeLookInRight,EyeLookOutRight,EyeLookUpRight,"
    "EyeSquintRight,EyeWideRight,JawForward,JawRight,JawLeft,JawOpen,MouthClose,MouthFunnel,MouthPucker,"
    "MouthRight,MouthLeft,MouthSmileLeft,MouthSmileRight,MouthFrownLeft,MouthFrownRight,MouthDimpleLeft,"
    "MouthDimpleRight,MouthStretchLeft,MouthStretchRight,MouthRollLower,MouthRollUpper,MouthShrugLower,"
    "MouthShrugUpper,MouthPressLeft,MouthPressRight,MouthLowerDownLeft,MouthLowerDownRight,MouthUpperUpLeft,"
    "MouthUpperUpRight,BrowDownLeft,BrowDownRight,BrowInnerUp,BrowOuterUpLeft,BrowOuterUpRight,CheekPuff,"
    "CheekSquintLeft,CheekSquintRight,NoseSneerLeft,NoseSneerRight,TongueOut,HeadYaw,HeadPitch,HeadRoll,"
    "LeftEyeYaw,LeftEyePitch,LeftEyeRoll,RightEyeYaw,RightEyePitch,RightEyeRoll"
).split(",")


def test_module_doctests():
    result = doctest.testmod(bs, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0


@pytest.mark.parametrize("name", [n for n in bs.LAYOUTS if n != "live_link_face_61"])
def test_every_layout_is_a_permutation_of_the_52_names(name):
    order = bs.layout(name)
    assert len(order) == 52 and sorted(order) == sorted(bs.ARKIT) and len(set(order)) == 52


def test_live_link_face_61_names_the_csv_data_columns():
    order = bs.layout("live_link_face_61")
    assert order[:52] == bs.LIVE_LINK_FACE and len(set(order)) == 61
    assert [n.casefold() for n in order] == [h.casefold() for h in LIVE_LINK_FACE_HEADER[2:]]
    assert list(bs.LIVE_LINK_FACE_CSV_HEADER) == LIVE_LINK_FACE_HEADER


def test_layouts_differ_where_documented():
    assert bs.layout("koemorph") == bs.layout("arkit")
    assert bs.layout("alphabetical") == tuple(sorted(bs.ARKIT))
    arkit, llf = bs.layout("arkit"), bs.layout("live_link_face")
    assert [i for i in range(52) if arkit[i] != llf[i]] == [15, 16, 21, 22]
    assert llf[15:17] == ("jawRight", "jawLeft") and llf[21:23] == ("mouthRight", "mouthLeft")
    # Regions in the ARKit order: 7 left eye, 7 right eye, 27 jaw + mouth, 10 brow/cheek/nose, tongue.
    assert all(n.startswith("eye") and n.endswith("Left") for n in arkit[:7])
    assert all(n.startswith("eye") and n.endswith("Right") for n in arkit[7:14])
    assert all(n.startswith(("jaw", "mouth")) for n in arkit[14:41])
    assert all(n.startswith(("brow", "cheek", "nose")) for n in arkit[41:51]) and arkit[51] == "tongueOut"


def test_live_link_face_layout_is_the_csv_header():
    header = LIVE_LINK_FACE_HEADER[2:54]
    assert [h.casefold() for h in header] == [n.casefold() for n in bs.LIVE_LINK_FACE]
    # The header itself (all 61 data columns) works as a layout, with the same column numbers.
    for pattern in ("jaw*", "mouth*", "eye*Left", "tongueOut", "JAWOPEN"):
        assert bs.indices(pattern, layout=LIVE_LINK_FACE_HEADER[2:]) == bs.indices(pattern, layout="live_link_face")
    assert bs.indices("head*", layout=LIVE_LINK_FACE_HEADER[2:]) == (52, 53, 54)


def test_names_match_case_insensitively_and_arkit_raw_values():
    assert bs.indices("EyeBlinkLeft", layout="arkit") == bs.indices("eyeblinkleft", layout="arkit") == (0,)
    assert bs.indices("eyeBlink_L", "eyeBlink_R", layout="arkit") == (0, 7)
    assert bs.indices("mouthSmile_R", layout="live_link_face") == (24,)
    # layout names too: any case, '-' for '_'
    assert bs.indices("jawLeft", layout="Live-Link-Face") == bs.indices("jawLeft", layout="live_link_face") == (16,)


def test_patterns_select_each_column_once_in_column_order():
    assert bs.indices("jaw*", layout="arkit") == (14, 15, 16, 17)
    assert bs.indices("jawOpen", "jaw*", "jaw?pen", layout="arkit") == (14, 15, 16, 17)
    assert bs.indices("mouth*", "jaw*", layout="arkit") == tuple(range(14, 41))
    assert bs.indices("*Left", layout="alphabetical") == tuple(
        i for i, n in enumerate(sorted(bs.ARKIT)) if n.endswith("Left"))
    assert bs.indices("brow[DI]*", layout="arkit") == (41, 42, 43)
    assert bs.indices(layout="arkit") == ()


def test_names_of_columns():
    assert bs.names([17, -1], layout="arkit") == ("jawOpen", "tongueOut")
    assert bs.names(bs.indices("jaw*", layout="live_link_face"), layout="live_link_face") == (
        "jawForward", "jawRight", "jawLeft", "jawOpen")
    with pytest.raises(ValueError, match="column 52 is outside layout 'arkit'"):
        bs.names([52], layout="arkit")
    with pytest.raises(TypeError, match="column numbers must be ints"):
        bs.names(["jawOpen"], layout="arkit")


@pytest.mark.parametrize("call, exc, words", [
    (lambda: bs.indices("jawOpn", layout="arkit"), ValueError, ["name 'jawOpn'", "layout 'arkit'", "jawOpen"]),
    (lambda: bs.indices("EyeBlinkLef", layout="live_link_face"), ValueError, ["eyeBlinkLeft"]),
    (lambda: bs.indices("moth*", layout="arkit"), ValueError, ["pattern 'moth*'", "matches no column", "mouth*"]),
    (lambda: bs.indices("jaw*", layout="arkti"), ValueError, ["unknown layout 'arkti'", "did you mean 'arkit'"]),
    (lambda: bs.indices("jaw*", layout="vicon"), ValueError, ["unknown layout 'vicon'", "live_link_face"]),
    (lambda: bs.indices(17, layout="arkit"), TypeError, ["must be strings", "int"]),
    (lambda: bs.indices("a", layout=["a", "b", "A"]), ValueError, ["columns 0 ('a') and 2 ('A')"]),
    (lambda: bs.indices("a", layout=["eyeBlink_L", "eyeBlinkLeft"]), ValueError, ["same name"]),
    (lambda: bs.indices("a", layout=[]), ValueError, ["must not be empty"]),
    (lambda: bs.indices("a", layout=["a", 1]), TypeError, ["column names must be strings"]),
    (lambda: bs.indices("a", layout=7), TypeError, ["layout must be one of"]),
    (lambda: bs.preset("mouthy", layout="arkit"), ValueError, ["unknown preset 'mouthy'", "semantic"]),
    (lambda: bs.preset("semantic"), ValueError, ["layout="]),
    (lambda: bs.preset("seed", layout="arkti"), ValueError, ["unknown layout"]),
])
def test_bad_names_and_layouts(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_resolve_passes_positional_specs_through_unchanged():
    for spec in ((12, 13), [0, -1], range(3), torch.tensor([1, 2]), (), [], 5, None):
        assert bs.resolve(spec, None) is spec
        assert bs.resolve(spec, "arkit") is spec
    assert bs.resolve("jaw*", "arkit") == (14, 15, 16, 17)
    assert bs.resolve(["jawOpen", "mouthClose"], "arkit") == (17, 18)


def test_resolve_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"mouth_indices holds names \['jaw\*'\].*layout="):
        bs.resolve(["jaw*"], None, argument="mouth_indices")
    with pytest.raises(TypeError, match="expression_indices mixes names and int 3"):
        bs.resolve(["eye*", 3], "arkit", argument="expression_indices")
    with pytest.raises(ValueError, match="mouth_indices: name 'jawOpn'.*closest: jawOpen"):
        bs.resolve("jawOpn", "arkit", argument="mouth_indices")


def test_seed_preset_is_the_positional_default():
    for layout in (None, *bs.LAYOUTS):
        g = bs.preset("seed", layout=layout)
        assert g == (kf.MOUTH_INDICES, kf.EXPRESSION_INDICES)
        assert g.mouth_indices == tuple(range(12, 22)) and g.expression_indices == tuple(range(0, 10))


@pytest.mark.parametrize("layout", list(bs.LAYOUTS))
def test_semantic_preset_by_name_in_every_layout(layout):
    g = bs.preset("semantic", layout=layout)
    mouth = bs.names(g.mouth_indices, layout)
    expression = bs.names(g.expression_indices, layout)
    assert len(mouth) == 27 and all(n.startswith(("jaw", "mouth")) for n in mouth)
    assert len(expression) == 24 and all(n.startswith(("brow", "eye", "cheek", "nose")) for n in expression)
    assert sorted(mouth + expression + ("tongueOut",)) == sorted(bs.ARKIT)
    # The same names in every layout, at that layout's columns.
    assert sorted(mouth) == sorted(bs.names(bs.preset("semantic", layout="arkit").mouth_indices, "arkit"))


def test_seed_default_names_per_layout():
    arkit = bs.seed_default_names("arkit")
    assert arkit.mouth_indices == ("eyeSquintRight", "eyeWideRight", "jawForward", "jawLeft", "jawRight", "jawOpen",
                                   "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft")
    assert arkit.expression_indices == bs.ARKIT[:10]
    assert bs.seed_default_names("koemorph") == arkit
    llf = bs.seed_default_names("live_link_face")
    assert llf.mouth_indices[3:5] == ("jawRight", "jawLeft") and llf.mouth_indices[-1] == "mouthRight"
    assert llf.expression_indices == arkit.expression_indices
    alpha = bs.seed_default_names("alphabetical")
    assert not any(n.startswith(("jaw", "mouth")) for n in alpha.mouth_indices)


# --- the loss with named groups: fused and reference, against explicit column numbers -------------

def _inputs(cols=52, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(6, cols, generator=g, dtype=dtype, requires_grad=True)
    target = torch.rand(6, cols, generator=g, dtype=dtype, requires_grad=True)
    prev = torch.rand(6, cols, generator=g, dtype=dtype)
    raw = torch.rand(6, cols, generator=g, dtype=dtype, requires_grad=True)
    return pred, target, prev, raw


def _value_and_grads(fn, inputs, **kwargs):
    pred, target, prev, raw = (x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
    out = fn(pred, target, prev, raw, **kwargs)
    total = out.total if isinstance(out, kf.LossOutput) else out
    total.backward()
    terms = out.terms if isinstance(out, kf.LossOutput) else None
    return total.detach(), terms, pred.grad, target.grad, raw.grad


NAMED = [
    ("live_link_face", ("jaw*", "mouth*"), ("brow*", "eye*", "cheek*", "nose*")),
    ("arkit", "jawOpen", ["eyeBlink_L", "EyeBlinkRight"]),
    ("alphabetical", ["mouth*Left"], []),
    (LIVE_LINK_FACE_HEADER[2:54], ["JawOpen", "Mouth?lose"], ("Brow*",)),
]


@pytest.mark.parametrize("layout, mouth, expression", NAMED)
@pytest.mark.parametrize("fn", [kf.temporal_loss, kf.reference.temporal_loss], ids=["fused", "reference"])
def test_named_groups_equal_their_column_numbers(fn, layout, mouth, expression):
    inputs = _inputs()
    m_idx = bs.resolve(mouth, layout)
    e_idx = bs.resolve(expression, layout)
    named = _value_and_grads(fn, inputs, mouth_indices=mouth, expression_indices=expression, layout=layout)
    numbered = _value_and_grads(fn, inputs, mouth_indices=m_idx, expression_indices=e_idx)
    for a, b in zip(named, numbered):
        assert torch.equal(a, b)
    # and the group really moved the perceptual term off the default's value
    default = _value_and_grads(fn, inputs)
    assert not torch.equal(named[1][2], default[1][2])


@pytest.mark.parametrize("layout, mouth, expression", NAMED)
def test_fused_and_reference_agree_with_named_groups(layout, mouth, expression):
    inputs = _inputs()
    kw = dict(mouth_indices=mouth, expression_indices=expression, layout=layout)
    fused = _value_and_grads(kf.temporal_loss, inputs, **kw)
    ref = _value_and_grads(kf.reference.temporal_loss, inputs, **kw)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cls", [kf.FusedKoeMorphLoss, kf.reference.KoeMorphTemporalLoss])
def test_modules_take_named_groups(cls):
    inputs = _inputs()
    named = cls(mouth_indices=("jaw*", "mouth*"), expression_indices=("brow*", "eye*", "cheek*", "nose*"),
                layout="live_link_face")
    g = bs.preset("semantic", layout="live_link_face")
    assert (named.mouth_indices, named.expression_indices) == g
    numbered = cls(**g._asdict())
    a = _value_and_grads(lambda *x: named(*x), inputs)
    b = _value_and_grads(lambda *x: numbered(*x), inputs)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)
    assert torch.equal(named.last_terms, numbered.last_terms)


def test_named_groups_with_more_columns_than_blend_shapes():
    # All 61 numeric columns of a Live Link Face CSV: names still find their columns.
    inputs = _inputs(cols=61)
    layout = LIVE_LINK_FACE_HEADER[2:]
    kw = dict(mouth_indices=["Jaw*", "Mouth*"], expression_indices=["*Yaw"], layout=layout)
    fused = _value_and_grads(kf.temporal_loss, inputs, **kw)
    numbered = _value_and_grads(kf.temporal_loss, inputs, mouth_indices=tuple(range(14, 41)),
                                expression_indices=(52, 55, 58))
    for a, b in zip(fused, numbered):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fn", [kf.temporal_loss, kf.reference.temporal_loss], ids=["fused", "reference"])
def test_loss_rejects_bad_names_the_same_way(fn):
    pred, target = torch.rand(2, 52), torch.rand(2, 52)
    with pytest.raises(ValueError, match="mouth_indices holds names"):
        fn(pred, target, mouth_indices=["jaw*"])
    with pytest.raises(ValueError, match="expression_indices: name 'browUp' .*closest: browInnerUp"):
        fn(pred, target, expression_indices=["browUp"], layout="arkit")
    with pytest.raises(ValueError, match="unknown layout 'ARKit2'"):
        fn(pred, target, mouth_indices="jaw*", layout="ARKit2")
    with pytest.raises(TypeError, match="mouth_indices mixes names"):
        fn(pred, target, mouth_indices=["jaw*", 3], layout="arkit")
    with pytest.raises(TypeError, match="mouth_indices must contain ints, got str 'jaw\\*'"):
        fn(pred, target, mouth_indices=[3, "jaw*"], layout="arkit")
    # a layout names every column: a 52-name layout on 20 columns is an error saying both numbers
    with pytest.raises(ValueError, match="layout: layout 'arkit' names 52 columns, but the data has C = 20"):
        fn(torch.rand(2, 20), torch.rand(2, 20), mouth_indices=["mouthUpperUpRight"], layout="arkit")


def test_module_rejects_names_without_layout():
    with pytest.raises(ValueError, match="mouth_indices holds names"):
        kf.FusedKoeMorphLoss(mouth_indices=("jaw*",))
    with pytest.raises(ValueError, match="expression_indices: pattern 'brw\\*'"):
        kf.reference.KoeMorphTemporalLoss(expression_indices=("brw*",), layout="arkit")


@pytest.mark.parametrize("fn", [kf.temporal_loss, kf.reference.temporal_loss], ids=["fused", "reference"])
def test_a_bad_layout_is_an_error_even_with_column_numbers(fn):
    pred, target = torch.rand(4, 52), torch.rand(4, 52)
    with pytest.raises(ValueError, match="unknown layout 'arkti'.*did you mean 'arkit'"):
        fn(pred, target, layout="arkti")
    with pytest.raises(TypeError, match="layout"):
        fn(pred, target, layout=123)
    with pytest.raises(ValueError, match="unknown layout"):
        kf.FusedKoeMorphLoss(layout="nonsense")


def test_module_takes_an_index_tensor_like_the_function():
    pred, target = torch.rand(4, 52), torch.rand(4, 52)
    groups = dict(mouth_indices=torch.arange(12, 22), expression_indices=torch.tensor([0, 0, -1]))
    module = kf.FusedKoeMorphLoss(**groups)
    assert module.mouth_indices == tuple(range(12, 22)) and module.expression_indices == (0, 0, -1)
    assert torch.equal(module(pred, target), kf.temporal_loss(pred, target, **groups).total)
    with pytest.raises(TypeError, match="mouth_indices"):
        kf.FusedKoeMorphLoss(mouth_indices=torch.zeros(2, 2, dtype=torch.long))(pred, target)


# --- Layouts that must fit the data, exact names, masks, Live Link Face CSVs (issue 18) ----------

LOSSES = [kf.temporal_loss, kf.reference.temporal_loss, lambda *a, **k: kf.FusedKoeMorphLoss(
    **{key: v for key, v in k.items() if key != "weights"})(*a), lambda *a, **k: kf.reference.KoeMorphTemporalLoss(
    **{key: v for key, v in k.items() if key != "weights"})(*a)]
LOSS_IDS = ["fused", "reference", "fused-module", "reference-module"]
TAKE = Path(__file__).resolve().parent / "data" / "live_link_face" / "take.csv"


@pytest.mark.parametrize("fn", LOSSES, ids=LOSS_IDS)
def test_the_csv_header_as_layout_is_refused_with_a_live_link_face_hint(fn):
    # The whole header (63 names with Timecode and BlendShapeCount) on 61 data columns would
    # shift every named group by two columns: jawOpen would land on mouthFunnel.
    pred, target = torch.rand(3, 61), torch.rand(3, 61)
    with pytest.raises(ValueError) as info:
        fn(pred, target, mouth_indices=["JawOpen"], layout=LIVE_LINK_FACE_HEADER)
    message = str(info.value)
    for part in ("names 63 columns", "C = 61", "Live Link Face", "Timecode", "live_link_face_61"):
        assert part in message, message
    # The 52-name layout on the 61 columns says the same; numbers or names, the layout must fit.
    with pytest.raises(ValueError, match=r"names 52 columns, but the data has C = 61.*live_link_face_61"):
        fn(pred, target, layout="live_link_face")
    with pytest.raises(ValueError, match=r"names 52 columns, but the data has C = 53(?!.*Live Link)"):
        fn(torch.rand(3, 53), torch.rand(3, 53), layout="arkit")


@pytest.mark.parametrize("fn", LOSSES, ids=LOSS_IDS)
def test_live_link_face_61_groups(fn):
    pred, target = torch.rand(3, 61, dtype=torch.float64), torch.rand(3, 61, dtype=torch.float64)
    named = fn(pred, target, mouth_indices=["jawOpen"], expression_indices=["head*"], layout="live_link_face_61")
    numbered = fn(pred, target, mouth_indices=[17], expression_indices=[52, 53, 54])
    total = named.total if isinstance(named, tuple) else named
    assert torch.equal(total, numbered.total if isinstance(numbered, tuple) else numbered)


def test_exact_names_win_over_globs():
    columns = ["jaw?", "jawA", "jawB", "bs[0]", "bs0", "mouth*", "mouthX"]
    assert bs.indices("jaw?", layout=columns) == (0,)
    assert bs.indices("bs[0]", layout=columns) == (3,)
    assert bs.indices("mouth*", layout=columns) == (5,)
    assert bs.indices("jaw[AB]", layout=columns) == (1, 2)  # no column has that name: a glob
    assert bs.indices("bs?", layout=columns) == (4,)
    pred, target = torch.rand(2, 7, dtype=torch.float64), torch.rand(2, 7, dtype=torch.float64)
    for fn in (kf.temporal_loss, kf.reference.temporal_loss):
        assert torch.equal(fn(pred, target, mouth_indices=["jaw?"], expression_indices=["bs[0]"], layout=columns).terms,
                           fn(pred, target, mouth_indices=[0], expression_indices=[3]).terms)


@pytest.mark.parametrize("fn", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_bool_and_uint8_tensors_are_masks_like_indexing(fn, dtype):
    g = torch.Generator().manual_seed(3)
    pred, target = (torch.rand(4, 52, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.zeros(52, dtype=dtype)
    mask[[12, 14, 40]] = 1
    got = fn(pred, target, mouth_indices=mask, expression_indices=torch.ones(52, dtype=dtype))
    want = fn(pred, target, mouth_indices=[12, 14, 40], expression_indices=list(range(52)))
    got, want = (x.total if isinstance(x, tuple) else x for x in (got, want))
    assert torch.equal(got, want)
    # The perceptual group behaves like F.mse_loss(pred[..., idx], target[..., idx]) with torch's reading of idx.
    terms = kf.reference.temporal_loss(pred, target, mouth_indices=mask, expression_indices=[]).terms
    with pytest.warns(UserWarning) if dtype == torch.uint8 else contextlib.nullcontext():
        direct = torch.nn.functional.mse_loss(pred[..., mask], target[..., mask])
    torch.testing.assert_close(terms[2], direct, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fn", LOSSES, ids=LOSS_IDS)
def test_masks_that_do_not_fit_are_errors(fn):
    pred, target = torch.rand(2, 52), torch.rand(2, 52)
    with pytest.raises(ValueError, match=r"mouth_indices is a torch.bool tensor, a mask.*C = 52 entries, got 10"):
        fn(pred, target, mouth_indices=torch.ones(10, dtype=torch.bool))
    positions = torch.zeros(52, dtype=torch.uint8)
    positions[:3] = torch.tensor([12, 13, 14], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"expression_indices is a uint8 tensor.*holds 12.*torch.long"):
        fn(pred, target, expression_indices=positions)
    with pytest.raises(ValueError, match=r"mouth_indices is a torch.uint8 tensor.*got 3"):
        fn(pred, target, mouth_indices=torch.tensor([12, 13, 14], dtype=torch.uint8))


def test_read_live_link_face_csv():
    lines = TAKE.read_text().splitlines()
    assert lines[0].split(",") == LIVE_LINK_FACE_HEADER
    cells = [line.split(",") for line in lines[1:]]
    take = bs.read_live_link_face_csv(TAKE)
    assert take.values.shape == (len(cells), 52) and take.values.dtype == torch.float32
    assert take.names == bs.LIVE_LINK_FACE
    assert take.timecodes == tuple(c[0] for c in cells) and take.timecodes[0].count(":") == 3
    expected = torch.tensor([[float(v) for v in c[2:54]] for c in cells], dtype=torch.float64)
    assert torch.equal(take.values, expected.float())
    full = bs.read_live_link_face_csv(TAKE, "live_link_face_61", dtype=torch.float64)
    assert torch.equal(full.values, torch.tensor([[float(v) for v in c[2:]] for c in cells], dtype=torch.float64))
    # In the ARKit order jawLeft is where the CSV's JawLeft column is, by name.
    arkit = bs.read_live_link_face_csv(TAKE, "arkit", dtype=torch.float64)
    jaw_left = LIVE_LINK_FACE_HEADER.index("JawLeft")
    assert torch.equal(arkit.values[:, bs.ARKIT.index("jawLeft")], torch.tensor([float(c[jaw_left]) for c in cells],
                                                                               dtype=torch.float64))
    # The take goes straight into the loss with named groups.
    out = kf.temporal_loss(take.values[1:], take.values[1:], take.values[:-1], mouth_indices="jaw*",
                           layout="live_link_face")
    assert out.terms[0] == 0.0 and out.terms[3] > 0


def test_read_live_link_face_csv_crlf_and_bom(tmp_path):
    path = tmp_path / "take.csv"
    path.write_bytes(b"\xef\xbb\xbf" + TAKE.read_bytes().replace(b"\n", b"\r\n"))
    assert torch.equal(bs.read_live_link_face_csv(path).values, bs.read_live_link_face_csv(TAKE).values)


@pytest.mark.parametrize("edit, pattern", [
    (lambda lines: ["Frame," + lines[0]] + lines[1:], r"not a Live Link Face CSV.*Timecode,BlendShapeCount"),
    (lambda lines: [lines[0].replace("JawOpen", "JawOpn")] + lines[1:], r"no column for jawOpen"),
    (lambda lines: lines[:2] + [lines[2].rsplit(",", 1)[0]], r"take\.csv:3: expected 63 cells"),
    (lambda lines: lines[:1] + [lines[1].replace(",61,", ",61,x,", 1).rsplit(",", 1)[0]] + lines[2:],
     r"take\.csv:2: column EyeBlinkLeft: 'x' is not a number"),
])
def test_read_live_link_face_csv_errors(tmp_path, edit, pattern):
    path = tmp_path / "take.csv"
    path.write_text("\n".join(edit(TAKE.read_text().splitlines())) + "\n")
    with pytest.raises(ValueError, match=pattern):
        bs.read_live_link_face_csv(path)


def test_reorder_between_layouts():
    x = torch.rand(3, 52, dtype=torch.float64, requires_grad=True)
    y = bs.reorder(x, "live_link_face", "arkit")
    for i, n in enumerate(bs.ARKIT):
        assert torch.equal(y[:, i], x[:, bs.LIVE_LINK_FACE.index(n)])
    assert torch.equal(bs.reorder(y, "arkit", "live_link_face"), x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    full = torch.rand(2, 61)
    assert torch.equal(bs.reorder(full, "live_link_face_61", "live_link_face"), full[:, :52])
    assert bs.permutation("arkit", "alphabetical") == tuple(bs.ARKIT.index(n) for n in sorted(bs.ARKIT))
    with pytest.raises(ValueError, match="headYaw.*not in layout 'arkit'"):
        bs.permutation("arkit", "live_link_face_61")
    with pytest.raises(ValueError, match="source: layout 'arkit' names 52 columns, but the data has C = 61"):
        bs.reorder(full, "arkit", "alphabetical")
    with pytest.raises(TypeError, match="values must be a torch.Tensor"):
        bs.reorder([1.0], "arkit", "arkit")
