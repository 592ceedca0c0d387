"""The repository is self-contained: no file refers to a path outside it.

A user who clones the repository gets nothing beside it, so a link or a
comment pointing at a folder next to the checkout (where the project's
semantic contract once lived) leads nowhere; the contract is ``docs/spec.md``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Spelled in pieces so that this file does not match itself.
OUTSIDE_REFERENCES = ("../" + "shared", "shared/" + "SPEC", "SPEC" + ".md")
#: What a source tree holds besides its own files, when git cannot list them.
NOT_OURS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks"}


def project_files() -> list[Path]:
    """Tracked files plus new ones that git does not ignore (a file about to be
    committed counts); without git, every file outside build and cache folders."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout
        return [ROOT / name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]
    return [
        p for p in ROOT.rglob("*")
        if p.is_file() and not NOT_OURS.intersection(p.relative_to(ROOT).parts) and p.suffix not in {".so", ".o", ".pyc"}
    ]


def references_outside(data: bytes) -> list[tuple[int, str]]:
    hits = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if any(ref in line for ref in OUTSIDE_REFERENCES):
            hits.append((number, line.strip()))
    return hits


def test_no_file_refers_to_a_path_outside_the_repository():
    files = project_files()
    assert any(p.name == "README.md" for p in files), "found no project files to check"
    found = []
    for path in files:
        data = path.read_bytes()
        if b"\0" in data:  # binary (images)
            continue
        found += [f"{path.relative_to(ROOT)}:{n}: {line}" for n, line in references_outside(data)]
    assert not found, "references to a path outside the repository (use docs/spec.md):\n" + "\n".join(found)


def test_the_check_recognises_each_form():
    text = b"see ../" + b"shared/notes.txt\n// Notation (shared/" + b"SP" + b"EC.md)\nx\n[contract](SP" + b"EC.md)\n"
    assert [n for n, _ in references_outside(text)] == [1, 2, 4]
    assert references_outside(b"docs/spec.md, docs/design.md\n") == []


def test_the_contract_is_in_the_repository():
    spec = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
    for section in ("## Terms", "## Gradients", "## The continuity mask", "## Dtypes", "## Public API", "## Errors"):
        assert section in spec, f"docs/spec.md lacks {section!r}"
