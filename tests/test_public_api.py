"""docs/spec.md describes the public API that the package has.

* The "Public API" table lists every name of ``koemorph_fused.__all__``, once,
  and nothing else (each backticked name in its first column counts).
* Every signature block of the spec (a ```text block that calls ``kf.NAME(``)
  shows the parameters of ``NAME``'s real signature, in order.
* The loss modules have explicit signatures (help() shows their keywords,
  not ``*args, **kwargs``).
"""

from __future__ import annotations

import inspect
import pydoc
import re
from pathlib import Path

import pytest
import torch

import koemorph_fused as kf

SPEC = Path(__file__).resolve().parents[1] / "docs" / "spec.md"
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/spec.md has no '## {heading}' section"
    return match.group(1)


def api_table_names(text: str) -> list[str]:
    """The backticked names in the first column of the section's first table."""
    names: list[str] = []
    rows: list[str] = []
    for line in section(text, "Public API").splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:  # the first table ended
            break
    assert len(rows) > 2, "the Public API section has no table"
    for row in rows[2:]:  # after the header and the |---| line
        first_cell = row.split("|")[1]
        names += re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", first_cell)
    return names


def call_arguments(block: str, name: str) -> list[str]:
    """Parameter names of the first ``kf.NAME(...)`` call in a signature block:
    ``x=default`` and bare ``x`` at the top level of the parentheses; ``*``
    (keyword-only marker) is dropped."""
    code = re.sub(r"#[^\n]*", "", block)
    start = code.index(f"kf.{name}(") + len(f"kf.{name}(")
    depth, current, parts = 0, "", []
    for ch in code[start:]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    names = []
    for part in parts:
        part = part.strip()
        if not part or part == "*":
            continue
        names.append(re.match(r"\**([A-Za-z_][A-Za-z0-9_]*)", part).group(1))
    return names


def signature_blocks(text: str) -> list[tuple[str, str]]:
    """(name, block) of every ```text block that calls a public ``kf.NAME(``."""
    found = []
    for lang, block in FENCE.findall(text):
        if lang != "text":
            continue
        match = re.search(r"\bkf\.([A-Za-z_][A-Za-z0-9_]*)\(", block)
        if match and match.group(1) in kf.__all__ and callable(getattr(kf, match.group(1))):
            found.append((match.group(1), block))
    return found


def test_api_table_equals_all():
    names = api_table_names(SPEC.read_text(encoding="utf-8"))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"listed more than once in the Public API table: {duplicates}"
    assert sorted(names) == sorted(kf.__all__), (
        f"missing from the table: {sorted(set(kf.__all__) - set(names))}; "
        f"in the table but not in __all__: {sorted(set(names) - set(kf.__all__))}"
    )


def test_every_name_in_all_exists():
    assert len(set(kf.__all__)) == len(kf.__all__)
    for name in kf.__all__:
        assert hasattr(kf, name), name


def test_table_parser_sees_every_row():
    """The parser itself: a table row with two names gives both."""
    text = ("## Public API\n\n| name | what |\n|---|---|\n| `a`, `B_2` | x `not_this` |\n| `c` | y |\n\n"
            "### a\n\n| `not_a_name` | z |\n## Next\n| `nor_this` |\n")
    assert api_table_names(text) == ["a", "B_2", "c"]


def test_spec_has_signature_blocks():
    names = {name for name, _ in signature_blocks(SPEC.read_text(encoding="utf-8"))}
    assert {"temporal_loss", "FusedKoeMorphLoss"} <= names


@pytest.mark.parametrize("name, block", signature_blocks(SPEC.read_text(encoding="utf-8")),
                         ids=lambda v: v if isinstance(v, str) and "\n" not in v else "")
def test_documented_signature_matches_code(name, block):
    documented = call_arguments(block, name)
    real = [p.name for p in inspect.signature(getattr(kf, name)).parameters.values()]
    assert documented == real, f"docs/spec.md shows kf.{name}({', '.join(documented)}); the code has {real}"


def test_signatures_show_layout():
    text = SPEC.read_text(encoding="utf-8")
    for name in ("temporal_loss", "FusedKoeMorphLoss"):
        assert "layout" in dict(signature_blocks(text))[name], name


@pytest.mark.parametrize("module", [kf.FusedKoeMorphLoss, kf.reference.KoeMorphTemporalLoss])
def test_loss_modules_have_explicit_signatures(module):
    params = inspect.signature(module).parameters.values()
    kinds = {p.kind for p in params}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds and inspect.Parameter.VAR_KEYWORD not in kinds
    assert [p.name for p in params] == [*(f"{term}_weight" for term in kf.TERM_NAMES),
                                        "mouth_indices", "expression_indices", "layout"]
    text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    # help() shows the constructor as NAME(mse_weight: ... = 1.0, ..., layout: ... = None)
    line = next(l for l in text.splitlines() if f"{module.__name__}(mse_weight" in l)
    for keyword in ("mse_weight", "smoothing_weight", "mouth_indices", "expression_indices", "layout"):
        assert re.search(rf"\b{keyword}\b[^,]*=", line), (keyword, line)
    assert "*args" not in line and "**kwargs" not in line


def test_module_keywords_reach_the_loss():
    """The explicit signature passes every keyword through (the same numbers
    as the function with the same arguments)."""
    pred, target = torch.rand(3, 52), torch.rand(3, 52)
    loss_fn = kf.FusedKoeMorphLoss(0.5, 0.2, 0.3, 0.4, 0.6, mouth_indices=["jaw*"],
                                   expression_indices=["brow*"], layout="arkit")
    out = kf.temporal_loss(pred, target, weights=kf.LossWeights(0.5, 0.2, 0.3, 0.4, 0.6),
                           mouth_indices=["jaw*"], expression_indices=["brow*"], layout="arkit")
    torch.testing.assert_close(loss_fn(pred, target), out.total)
