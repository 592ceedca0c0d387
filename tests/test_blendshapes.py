"""koemorph_fused.blendshapes: layouts, names, patterns, presets, and the loss with named groups."""

import doctest

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


@pytest.mark.parametrize("name", list(bs.LAYOUTS))
def test_every_layout_is_a_permutation_of_the_52_names(name):
    order = bs.layout(name)
    assert len(order) == 52 and sorted(order) == sorted(bs.ARKIT) and len(set(order)) == 52


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
    # positional groups ignore the layout (a valid one), and a named group still
    # has to fit the data: a 52-name layout on 20 columns is an index error
    with pytest.raises(ValueError, match="mouth_indices holds index 40"):
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
