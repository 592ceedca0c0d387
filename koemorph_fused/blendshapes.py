"""The 52 ARKit blend-shape names, the column orders data comes in, and
column groups selected by name.

ARKit itself has no column order: ``ARFaceAnchor.blendShapes`` is a
dictionary keyed by ``ARFaceAnchor.BlendShapeLocation``. An order appears
only when someone writes the values into a row, and the common ones differ:

``"arkit"``
    The order of Apple's ``ARFaceAnchor.BlendShapeLocation`` reference page,
    which lists the locations by face region: left eye (7), right eye (7),
    mouth and jaw (27, ``jawForward, jawLeft, jawRight, jawOpen, mouthClose,
    mouthFunnel, mouthPucker, mouthLeft, mouthRight, ...``), eyebrows, cheeks
    and nose (10), tongue (1). Most code that stores "the ARKit 52" as a list
    uses this order.
``"koemorph"``
    The order of the original KoeMorph code: the ``ARKIT_BLENDSHAPES`` list in
    its ``src/model/dual_stream_attention.py``, which names the model's 52
    output columns. It is the ``"arkit"`` order, name for name.
``"live_link_face"``
    The column order of the CSV files that Epic's Live Link Face app exports
    (``Timecode,BlendShapeCount,EyeBlinkLeft,...,TongueOut,HeadYaw,...``,
    52 blend shapes followed by 9 head and eye rotations); the values it
    streams live (Live Link) come in the ``"arkit"`` order instead (see
    docs/blendshapes.md). The regions come in the
    ARKit order, but two pairs are swapped: ``JawRight, JawLeft`` (columns
    15, 16) and ``MouthRight, MouthLeft`` (21, 22). The CSV spells the names
    in PascalCase (``EyeBlinkLeft``); names here match case-insensitively.
    KoeMorph's own ``scripts/convert_livelink_data.py`` writes its training
    data in this order, so data converted with it is ``"live_link_face"``
    data even though the KoeMorph model names its columns in the ``"arkit"``
    order.
``"live_link_face_61"``
    All 61 data columns of a Live Link Face CSV: the 52 blend shapes of
    ``"live_link_face"`` followed by the 9 head and eye rotations
    (``headYaw, headPitch, headRoll, leftEyeYaw, leftEyePitch, leftEyeRoll,
    rightEyeYaw, rightEyePitch, rightEyeRoll``), for models that predict them
    too.
``"alphabetical"``
    ``sorted()`` of the names: what iterating over the sorted keys of ARKit's
    dictionary gives.

A *layout* argument is one of these names, or the data's own column names
(a sequence of strings, e.g. a CSV header without its ``Timecode`` and
``BlendShapeCount`` columns), for data in any other order. A layout names
every column of the data, in order: the loss refuses a layout whose length
differs from the data's ``C`` (saying both numbers, and saying so when the
names look like a Live Link Face CSV header, whose ``Timecode`` and
``BlendShapeCount`` are not data columns).

:func:`read_live_link_face_csv` reads a Live Link Face CSV export into a
``(T, 52)`` tensor (or ``(T, 61)``, or any layout's columns) and its
timecodes; :func:`reorder` moves a tensor's columns from one layout to
another.

Names match case-insensitively, and ARKit's raw string values with an
``_L`` / ``_R`` suffix (``eyeBlink_L``) match the ``...Left`` / ``...Right``
names. Patterns are :mod:`fnmatch` globs (``*``, ``?``, ``[abc]``) matched
the same way; a pattern that is also the exact name of a column (a custom
layout's ``jaw?`` or ``bs[0]``) selects that column only.

The seed's perceptual groups are *positional*, not named: mouth = columns
12..21 and expression = columns 0..9 whatever the data's order
(:data:`~koemorph_fused.MOUTH_INDICES`, :data:`~koemorph_fused.EXPRESSION_INDICES`,
still the default). :func:`seed_default_names` says which blend shapes they
hit in a layout; in the ARKit order the "mouth" group is
``eyeSquintRight, eyeWideRight, jawForward, jawLeft, jawRight, jawOpen,
mouthClose, mouthFunnel, mouthPucker, mouthLeft`` and the "expression" group
the first ten eye columns.

>>> indices("jaw*", layout="arkit")
(14, 15, 16, 17)
>>> indices("jawLeft", "JawRight", layout="live_link_face")
(15, 16)
>>> names(range(12, 16), layout="arkit")
('eyeSquintRight', 'eyeWideRight', 'jawForward', 'jawLeft')
>>> preset("semantic", layout="arkit").mouth_indices[:3]
(14, 15, 16)
"""

from __future__ import annotations

import csv
import difflib
import fnmatch
import numbers
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

import torch

from .terms import EXPRESSION_INDICES, MOUTH_INDICES

#: The 52 names in the order of Apple's ``ARFaceAnchor.BlendShapeLocation`` reference (see the module docstring).
ARKIT: tuple[str, ...] = (
    # left eye
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft", "eyeSquintLeft",
    "eyeWideLeft",
    # right eye
    "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight", "eyeLookOutRight", "eyeLookUpRight", "eyeSquintRight",
    "eyeWideRight",
    # mouth and jaw
    "jawForward", "jawLeft", "jawRight", "jawOpen", "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft",
    "mouthRight", "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight", "mouthDimpleLeft",
    "mouthDimpleRight", "mouthStretchLeft", "mouthStretchRight", "mouthRollLower", "mouthRollUpper",
    "mouthShrugLower", "mouthShrugUpper", "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft",
    "mouthLowerDownRight", "mouthUpperUpLeft", "mouthUpperUpRight",
    # eyebrows, cheeks and nose
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight", "cheekPuff",
    "cheekSquintLeft", "cheekSquintRight", "noseSneerLeft", "noseSneerRight",
    # tongue
    "tongueOut",
)


def _swap(order: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out = list(order)
    i, j = out.index(a), out.index(b)
    out[i], out[j] = out[j], out[i]
    return tuple(out)


#: The Live Link Face CSV column order (camelCase here; the CSV writes ``EyeBlinkLeft``).
LIVE_LINK_FACE: tuple[str, ...] = _swap(_swap(ARKIT, "jawLeft", "jawRight"), "mouthLeft", "mouthRight")

#: The 9 head and eye rotations a Live Link Face CSV has after its 52 blend shapes (degrees).
LIVE_LINK_FACE_ROTATIONS: tuple[str, ...] = (
    "headYaw", "headPitch", "headRoll", "leftEyeYaw", "leftEyePitch", "leftEyeRoll", "rightEyeYaw",
    "rightEyePitch", "rightEyeRoll",
)

#: All 61 data columns of a Live Link Face CSV: :data:`LIVE_LINK_FACE` and :data:`LIVE_LINK_FACE_ROTATIONS`.
LIVE_LINK_FACE_61: tuple[str, ...] = LIVE_LINK_FACE + LIVE_LINK_FACE_ROTATIONS

#: The header of a Live Link Face CSV export, as the app writes it (PascalCase).
LIVE_LINK_FACE_CSV_HEADER: tuple[str, ...] = ("Timecode", "BlendShapeCount",
                                              *(n[0].upper() + n[1:] for n in LIVE_LINK_FACE_61))

#: The order of the original KoeMorph code's ``ARKIT_BLENDSHAPES`` (identical to :data:`ARKIT`).
KOEMORPH: tuple[str, ...] = ARKIT

#: The names sorted alphabetically.
ALPHABETICAL: tuple[str, ...] = tuple(sorted(ARKIT))

#: The named layouts: layout name -> the 52 names in column order.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "arkit": ARKIT,
    "koemorph": KOEMORPH,
    "live_link_face": LIVE_LINK_FACE,
    "live_link_face_61": LIVE_LINK_FACE_61,
    "alphabetical": ALPHABETICAL,
}

#: Patterns of the semantic groups: the mel stream's jaw and mouth shapes.
SEMANTIC_MOUTH: tuple[str, ...] = ("jaw*", "mouth*")
#: Patterns of the semantic groups: the emotion stream's brow, eye, cheek and nose shapes.
SEMANTIC_EXPRESSION: tuple[str, ...] = ("brow*", "eye*", "cheek*", "nose*")

#: Names of the presets :func:`preset` knows.
PRESETS: tuple[str, ...] = ("seed", "semantic")

Layout = Union[str, Sequence[str]]
_GLOB = re.compile(r"[*?\[]")


class Groups(NamedTuple):
    """The two column groups of the perceptual term, as the loss takes them:
    ``kf.FusedKoeMorphLoss(**groups._asdict())``."""

    mouth_indices: tuple
    expression_indices: tuple


def _key(name: str) -> str:
    """The matching key of a name or pattern: case-folded, ``_L``/``_R`` -> ``left``/``right``."""
    key = name.casefold()
    if key.endswith("_l"):
        key = key[:-2] + "left"
    elif key.endswith("_r"):
        key = key[:-2] + "right"
    return key


def _index(columns: Sequence[str]) -> dict[str, int]:
    """Matching key -> column number (in column order); duplicate keys are an error."""
    index: dict[str, int] = {}
    for i, c in enumerate(columns):
        j = index.setdefault(_key(c), i)
        if j != i:
            raise ValueError(f"layout: columns {j} ({columns[j]!r}) and {i} ({c!r}) have the same name")
    return index


#: Key -> column number of each named layout (computed once, at import).
_LAYOUT_INDEX: dict[str, dict[str, int]] = {name: _index(order) for name, order in LAYOUTS.items()}


def _layout_names(layout: Any) -> tuple[str, tuple[str, ...], dict[str, int]]:
    """(description for messages, column names, key -> column number) of a layout argument."""
    if isinstance(layout, str):
        name = layout if layout in LAYOUTS else layout.casefold().replace("-", "_")
        order = LAYOUTS.get(name)
        if order is None:
            close = difflib.get_close_matches(layout.casefold(), LAYOUTS, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown layout {layout!r}{hint}; known layouts: {', '.join(LAYOUTS)}, or pass "
                             "the data's column names (a sequence of strings)")
        return f"layout {layout!r}", order, _LAYOUT_INDEX[name]
    if isinstance(layout, Sequence) and not isinstance(layout, (bytes, bytearray)):
        columns = tuple(layout)
        if not columns:
            raise ValueError("layout: a sequence of column names must not be empty")
        bad = [c for c in columns if not isinstance(c, str)]
        if bad:
            raise TypeError(f"layout: column names must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        return f"the given {len(columns)}-column layout", columns, _index(columns)
    raise TypeError(f"layout must be one of {', '.join(map(repr, LAYOUTS))} or a sequence of column names, "
                    f"got {type(layout).__name__}")


def layout(name: Layout) -> tuple[str, ...]:
    """The column names of a layout, in column order.

    >>> layout("live_link_face")[14:18]
    ('jawForward', 'jawRight', 'jawLeft', 'jawOpen')
    """
    return _layout_names(name)[1]


def _suggest(pattern: str, columns: tuple[str, ...]) -> str:
    """'; closest: a, b' for a pattern or name that matched nothing ('' when nothing is close)."""
    prefixes = {}
    for c in columns:
        m = re.match(r"[A-Za-z][a-z]*", c)
        if m:
            prefixes.setdefault(m.group(0).casefold() + "*", m.group(0) + "*")
    candidates = {_key(c): c for c in columns}
    if _GLOB.search(pattern):
        candidates.update(prefixes)
    close = difflib.get_close_matches(_key(pattern), list(candidates), n=3, cutoff=0.6)
    return f"; closest: {', '.join(candidates[k] for k in close)}" if close else ""


def _match(patterns: tuple[Any, ...], layout_arg: Any, argument: str) -> tuple[int, ...]:
    where, columns, index = _layout_names(layout_arg)
    selected: set[int] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{argument}: names and patterns must be strings, got {type(pattern).__name__} "
                            f"{pattern!r}")
        pat = _key(pattern)
        glob = _GLOB.search(pat) is not None
        if pat in index:  # an exact name wins, even one that looks like a glob ("jaw?", "bs[0]")
            hits = [index[pat]]
        elif glob:
            match = re.compile(fnmatch.translate(pat)).match
            hits = [i for k, i in index.items() if match(k)]
        else:
            hits = []
        if not hits:
            what = "pattern" if glob else "name"
            raise ValueError(f"{argument}: {what} {pattern!r} matches no column of {where}"
                             f"{_suggest(pattern, columns)}")
        selected.update(hits)
    return tuple(sorted(selected))


def indices(*patterns: str, layout: Layout) -> tuple[int, ...]:
    """Column numbers of the blend shapes that the names or glob patterns select
    in ``layout``, ascending, each column once.

    Args:
        *patterns: names (``"jawOpen"``, ``"JawOpen"``, ``"eyeBlink_L"``) or
            :mod:`fnmatch` patterns (``"mouth*"``, ``"eye*Left"``), matched
            case-insensitively.
        layout: ``"arkit"``, ``"koemorph"``, ``"live_link_face"``,
            ``"alphabetical"``, or the data's column names.

    Raises:
        ValueError: an unknown layout, or a name or pattern that matches no
            column (the message suggests the closest names).
        TypeError: a pattern that is not a string.

    >>> indices("mouthLeft", "mouthRight", layout="live_link_face")
    (21, 22)
    """
    return _match(patterns, layout, "indices")


def names(columns: Any, layout: Layout) -> tuple[str, ...]:
    """The names of the given column numbers in ``layout`` (negative numbers
    count from the end).

    >>> names([17, -1], layout="arkit")
    ('jawOpen', 'tongueOut')
    """
    where, order, _ = _layout_names(layout)
    out = []
    for i in columns:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"column numbers must be ints, got {type(i).__name__} {i!r}")
        if not -len(order) <= i < len(order):
            raise ValueError(f"column {i} is outside {where} ({len(order)} columns)")
        out.append(order[int(i)])
    return tuple(out)


def resolve(spec: Any, layout: Optional[Layout] = None, *, argument: str = "indices") -> Any:
    """What the loss does with a ``mouth_indices`` / ``expression_indices``
    argument before validating it: names and patterns become column numbers.

    * A string, or a list or tuple that starts with a string: names or
      patterns, resolved in ``layout`` with :func:`indices` (a set: each
      column once, ascending). ``layout`` is then required.
    * Anything else (ints, a range, an integer tensor) is positional and is
      returned unchanged, for the loss's own index checks (which reject a
      string later in a list of ints).

    Raises:
        ValueError: names without a layout, or see :func:`indices`.
        TypeError: a list that mixes names and column numbers.
    """
    if layout is not None:
        _layout_names(layout)  # a misspelt layout is an error even where numbers make it unneeded
    if isinstance(spec, str):
        patterns: tuple[Any, ...] = (spec,)
    elif isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], str):
        patterns = tuple(spec)
        mixed = [item for item in patterns if not isinstance(item, str)]
        if mixed:
            raise TypeError(f"{argument} mixes names and {type(mixed[0]).__name__} {mixed[0]!r}; give either "
                            "column numbers or blend-shape names/patterns")
    else:
        return spec
    if layout is None:
        raise ValueError(f"{argument} holds names {list(patterns)!r}: say which column order the data has "
                         f"with layout= (one of {', '.join(map(repr, LAYOUTS))}, or the data's column names)")
    return _match(patterns, layout, argument)


def preset(name: str, layout: Optional[Layout] = None) -> Groups:
    """The column groups of a preset, as column numbers.

    * ``"seed"``: the seed's positional groups, mouth = columns 12..21 and
      expression = 0..9 in any layout (the loss's default).
    * ``"semantic"``: mouth = jaw and mouth shapes (:data:`SEMANTIC_MOUTH`),
      expression = brow, eye, cheek and nose shapes
      (:data:`SEMANTIC_EXPRESSION`), found by name in ``layout`` (required).
      ``tongueOut`` is in neither (KoeMorph's dual-stream model routes it to
      the mouth stream: add ``"tongueOut"`` to the mouth patterns for that).

    >>> preset("semantic", layout="live_link_face").expression_indices[-4:]
    (47, 48, 49, 50)
    """
    if name == "seed":
        resolve(MOUTH_INDICES, layout)  # checks a given layout
        return Groups(MOUTH_INDICES, EXPRESSION_INDICES)
    if name == "semantic":
        if layout is None:
            raise ValueError("preset 'semantic' selects by name: give layout=")
        return Groups(_match(SEMANTIC_MOUTH, layout, "mouth_indices"),
                      _match(SEMANTIC_EXPRESSION, layout, "expression_indices"))
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")


def seed_default_names(layout: Layout) -> Groups:
    """Which blend shapes the seed's positional default groups (mouth = columns
    12..21, expression = 0..9) hit in ``layout``, as names.

    >>> seed_default_names("arkit").mouth_indices[-4:]
    ('mouthClose', 'mouthFunnel', 'mouthPucker', 'mouthLeft')
    """
    return Groups(names(MOUTH_INDICES, layout), names(EXPRESSION_INDICES, layout))


# Keys of the Live Link Face CSV header's columns that are not blend shapes.
_LIVE_LINK_FACE_EXTRAS = frozenset(_key(n) for n in ("Timecode", "BlendShapeCount", *LIVE_LINK_FACE_ROTATIONS))


def check_width(layout: Optional[Layout], pred: Any, argument: str = "layout") -> None:
    """A layout names every column of the data: raise if ``layout`` (when
    given) has another number of names than ``pred``'s last dimension.

    The message says both numbers and, when the layout holds names of a Live
    Link Face CSV header that are not blend shapes (``Timecode``,
    ``BlendShapeCount``, head and eye rotations) or a 52-name layout meets 61
    columns, how to name a Live Link Face CSV's columns. ``pred`` that is not
    a tensor with a last dimension is left for the loss's own checks.

    >>> check_width("live_link_face_61", torch.zeros(2, 61))
    """
    shape = getattr(pred, "shape", None)
    if layout is None or shape is None or len(shape) == 0:
        return
    where, columns, _ = _layout_names(layout)
    cols = int(shape[-1])
    if len(columns) == cols:
        return
    extras = [c for c in columns if _key(c) in _LIVE_LINK_FACE_EXTRAS]
    hint = ""
    if extras or (len(columns) == len(LIVE_LINK_FACE) and cols == len(LIVE_LINK_FACE_61)):
        named = f" ({', '.join(extras[:3])}{', ...' if len(extras) > 3 else ''})" if extras else ""
        hint = (f"; this looks like a Live Link Face CSV's columns{named}: its Timecode and BlendShapeCount "
                "are not data columns, layout='live_link_face' names its 52 blend shapes and "
                "layout='live_link_face_61' all 61 data columns (blend shapes, then head and eye rotations); "
                "kf.blendshapes.read_live_link_face_csv reads such a file")
    raise ValueError(f"{argument}: {where} names {len(columns)} columns, but the data has C = {cols} "
                     f"(pred's last dimension); a layout names every column, in order{hint}")


class LiveLinkFaceTake(NamedTuple):
    """What :func:`read_live_link_face_csv` returns.

    Attributes:
        values: ``(T, C)`` tensor, the frames in the columns of ``names``.
        timecodes: the ``Timecode`` cell of each frame, as the app wrote it
            (``HH:MM:SS:FF.mmm``: hours, minutes, seconds, frame and the
            fraction of a frame).
        names: the column names of ``values`` (the layout's).
    """

    values: torch.Tensor
    timecodes: tuple[str, ...]
    names: tuple[str, ...]


def read_live_link_face_csv(
    path: Union[str, os.PathLike], layout: Layout = "live_link_face", *, dtype: torch.dtype = torch.float32
) -> LiveLinkFaceTake:
    """A Live Link Face CSV export as a tensor in the columns of ``layout``.

    The app writes a header ``Timecode,BlendShapeCount,EyeBlinkLeft,...,
    TongueOut,HeadYaw,...,RightEyeRoll`` (:data:`LIVE_LINK_FACE_CSV_HEADER`)
    and one row per frame. Columns are found by name, so any layout works:
    ``"live_link_face"`` (the default) gives the file's 52 blend shapes as
    they are, ``"arkit"`` the same values in the ARKit order,
    ``"live_link_face_61"`` the rotations too.

    >>> take = read_live_link_face_csv(path, "arkit")  # doctest: +SKIP
    >>> take.values.shape, take.timecodes[0]  # doctest: +SKIP
    (torch.Size([812, 52]), '14:03:52:28.207')

    Raises:
        OSError: the file cannot be read (naming it).
        ValueError: not a Live Link Face CSV (its first columns are not
            ``Timecode,BlendShapeCount``), a column of the layout missing
            from it, a row with another number of cells, a cell that is not
            a number (naming the file, line and column).
    """
    name = os.fspath(path)
    _, wanted, _ = _layout_names(layout)
    try:
        with open(name, newline="", encoding="utf-8-sig") as f:
            lines = list(csv.reader(f))
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not a Live Link Face CSV (not UTF-8 text)") from None
    except OSError as e:
        raise type(e)(e.errno, f"cannot read Live Link Face CSV {name!r}: {e.strerror}") from e
    if not lines or [c.strip().casefold() for c in lines[0][:2]] != ["timecode", "blendshapecount"]:
        got = ",".join(lines[0])[:60] if lines else "an empty file"
        raise ValueError(f"{name}: not a Live Link Face CSV (expected a header starting with "
                         f"Timecode,BlendShapeCount, got {got!r})")
    header = [c.strip() for c in lines[0]]
    try:
        index = _index(header[2:])
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    missing = [n for n in wanted if _key(n) not in index]
    if missing:
        raise ValueError(f"{name}: no column for {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''} "
                         f"of the layout ({len(missing)} of {len(wanted)} missing)")
    picks = [2 + index[_key(n)] for n in wanted]
    timecodes, rows = [], []
    for number, cells in enumerate(lines[1:], start=2):
        if not cells:
            continue
        if len(cells) != len(header):
            raise ValueError(f"{name}:{number}: expected {len(header)} cells like the header, got {len(cells)}")
        try:
            rows.append([float(cells[i]) for i in picks])
        except ValueError:
            bad = next(i for i in picks if not _is_number(cells[i]))
            raise ValueError(f"{name}:{number}: column {header[bad]}: {cells[bad]!r} is not a number") from None
        timecodes.append(cells[0])
    values = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(wanted)).to(dtype)
    return LiveLinkFaceTake(values, tuple(timecodes), tuple(wanted))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def permutation(source: Layout, target: Layout) -> tuple[int, ...]:
    """For each column of ``target``, its column number in ``source``:
    ``values[..., permutation(source, target)]`` is ``values`` in the
    ``target`` order.

    >>> permutation("arkit", "live_link_face")[14:18]
    (14, 16, 15, 17)

    Raises:
        ValueError: a name of ``target`` that ``source`` does not have.
    """
    _, columns, _ = _layout_names(target)
    where, _, index = _layout_names(source)
    missing = [n for n in columns if _key(n) not in index]
    if missing:
        raise ValueError(f"target: {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''} not in "
                         f"{where} ({len(missing)} names missing)")
    return tuple(index[_key(n)] for n in columns)


def reorder(values: torch.Tensor, source: Layout, target: Layout) -> torch.Tensor:
    """``values`` (``(..., C)`` in the ``source`` layout) with its columns in
    the ``target`` layout (a new tensor; differentiable). ``target`` may name
    fewer columns (``"live_link_face_61"`` -> ``"arkit"`` drops the rotations).

    >>> x = torch.arange(52.0)
    >>> reorder(x, "live_link_face", "arkit")[14:18].tolist()
    [14.0, 16.0, 15.0, 17.0]
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    check_width(source, values, argument="source")
    index = torch.tensor(permutation(source, target), dtype=torch.long, device=values.device)
    return values.index_select(-1, index)


__all__ = [
    "ALPHABETICAL", "ARKIT", "Groups", "KOEMORPH", "LAYOUTS", "LIVE_LINK_FACE", "LIVE_LINK_FACE_61",
    "LIVE_LINK_FACE_CSV_HEADER", "LIVE_LINK_FACE_ROTATIONS", "LiveLinkFaceTake", "PRESETS", "SEMANTIC_EXPRESSION",
    "SEMANTIC_MOUTH", "check_width", "indices", "layout", "names", "permutation", "preset",
    "read_live_link_face_csv", "reorder", "resolve", "seed_default_names",
]
