"""The README and the docs are executable truth.

* Every ```python block of README.md and docs/*.md runs as written: each in a
  fresh namespace, from the repository root, in this process (a block that
  fails shows its own file and line numbers in the traceback).
* Every shell block runs the project's programs (``koemorph-fused``,
  ``pytest``, ``python``, ``pip``) from ``.venv/bin/`` (or after one
  ``source .venv/bin/activate``), because that is where ``.ci/setup`` puts
  them and nothing on a fresh machine puts them on PATH.
* Every ``koemorph-fused`` command line in a shell block is accepted by the
  command's own argument parser, every script or config file it names exists,
  and every relative link points at a file (and heading) that exists.
* The README keeps its two top commands, mentions ``koemorph-fused check``
  (``--device cuda`` for GPU users) and links the contract, design and
  performance pages.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```([\w+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
#: Programs that live in the virtual environment .ci/setup makes.
VENV_PROGRAMS = {"koemorph-fused", "pytest", "python", "python3", "pip", "pip3"}
ACTIVATION = re.compile(r"^\s*(?:source|\.)\s+\.venv/bin/activate\s*(?:#.*)?$", re.M)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def fenced_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(first line of the block's content, language, content) of every fenced block."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]


def blocks_of(langs: set[str]) -> list[tuple[Path, int, str]]:
    return [(doc, line, code) for doc in DOCS for line, lang, code in fenced_blocks(doc) if lang in langs]


def label(doc: Path, line: int) -> str:
    return f"{doc.relative_to(ROOT)}:{line}"


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block, as word lists (comments,
    line continuations and ``&&``/``||``/``;``/``|`` handled)."""
    code = code.replace("\\\n", " ")
    commands: list[list[str]] = []
    for line in code.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token and set(token) <= set("&|;()<>"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
        if current:
            commands.append(current)
    return commands


def program_and_args(words: list[str]) -> tuple[str, list[str]]:
    """Skips leading ``VAR=value`` assignments."""
    i = 0
    while i < len(words) and ASSIGNMENT.match(words[i]):
        i += 1
    return (words[i], words[i + 1:]) if i < len(words) else ("", [])


PYTHON_BLOCKS = blocks_of({"python", "py"})
SHELL_BLOCKS = blocks_of(SHELL_LANGS)


def test_the_docs_have_blocks_to_check():
    """Guards the extraction itself: the README has both kinds of block."""
    assert any(doc == README for doc, _, _ in PYTHON_BLOCKS)
    assert any(doc == README for doc, _, _ in SHELL_BLOCKS)


@pytest.mark.parametrize("doc,line,code", PYTHON_BLOCKS, ids=[label(d, n) for d, n, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_written(doc, line, code, monkeypatch):
    monkeypatch.chdir(ROOT)
    # Leading newlines make the traceback's line numbers the file's.
    compiled = compile("\n" * (line - 1) + code, str(doc.relative_to(ROOT)), "exec")
    exec(compiled, {"__name__": "__doc_block__"})


@pytest.mark.parametrize("doc,line,code", SHELL_BLOCKS, ids=[label(d, n) for d, n, _ in SHELL_BLOCKS])
def test_shell_block_runs_project_programs_from_the_venv(doc, line, code):
    text = doc.read_text(encoding="utf-8")
    activated_before = any(
        m.start() < text.index(code) for m in ACTIVATION.finditer(text)
    )
    bare = []
    for words in shell_commands(code):
        program, _ = program_and_args(words)
        if ACTIVATION.match(" ".join(words)):
            activated_before = True
            continue
        name = program.rsplit("/", 1)[-1]
        if name in VENV_PROGRAMS and program != f".venv/bin/{name}" and not activated_before:
            bare.append(" ".join(words))
    assert not bare, (
        f"{label(doc, line)}: run the project's programs as .venv/bin/PROGRAM (or after "
        f"`source .venv/bin/activate`): {bare}"
    )


def koemorph_fused_command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for doc, line, code in SHELL_BLOCKS:
        for words in shell_commands(code):
            program, args = program_and_args(words)
            if program.endswith("koemorph-fused"):
                found.append((label(doc, line), args))
            elif program.rsplit("/", 1)[-1].startswith("python") and args[:2] == ["-m", "koemorph_fused"]:
                found.append((label(doc, line), args[2:]))
    return found


KF_COMMANDS = koemorph_fused_command_lines()


@pytest.mark.parametrize("where,args", KF_COMMANDS, ids=[f"{w} {' '.join(a)}" for w, a in KF_COMMANDS])
def test_koemorph_fused_command_lines_parse(where, args, capsys):
    from koemorph_fused.cli import build_parser

    try:
        build_parser().parse_args(args)
    except SystemExit as e:  # --help exits 0; a usage error exits 2
        assert e.code == 0, f"{where}: `koemorph-fused {' '.join(args)}` is rejected: {capsys.readouterr().err}"


def test_files_named_in_shell_commands_exist():
    missing = []
    for doc, line, code in SHELL_BLOCKS:
        for words in shell_commands(code):
            program, args = program_and_args(words)
            named = []
            if program.rsplit("/", 1)[-1] in {"bash", "sh", "python", "python3"} and args and \
                    not args[0].startswith("-"):
                named.append(args[0])  # the script
            named += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
            if program.endswith("pytest") or args[:2] == ["-m", "pytest"]:
                named += [a for a in args if not a.startswith("-") and "/" in a]
            missing += [f"{label(doc, line)}: {p}" for p in named if not (ROOT / p).exists()]
    assert not missing, missing


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_relative_links_point_at_existing_files_and_headings():
    broken = []
    for doc in DOCS:
        text = FENCE.sub("", doc.read_text(encoding="utf-8"))
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, fragment = target.partition("#")
            path = (doc.parent / path_part).resolve() if path_part else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and path.suffix == ".md" and fragment not in anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_layout_table_names_existing_paths():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Layout"):]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "README's Layout table is missing"
    missing = []
    for row in rows:
        first_cell = row.split("|")[1]
        names = re.findall(r"`([^`]+)`", first_cell)
        base = ""
        for name in names:
            # `koemorph_fused/schedule.py`, `monitor.py`: later names share the first one's folder.
            if "/" in name:
                base = name.rsplit("/", 1)[0] if not name.endswith("/") else name.rstrip("/")
                path = name
            else:
                path = f"{base}/{name}" if base else name
            if not list(ROOT.glob(path.rstrip("/"))):
                missing.append(path)
    assert not missing, f"README's Layout table names paths that do not exist: {missing}"


def test_readme_top_commands_and_pointers():
    text = README.read_text(encoding="utf-8")
    first_line, _, first_block = fenced_blocks(README)[0]
    lines = [line.strip() for line in first_block.splitlines()]
    assert lines[0].startswith("bash .ci/setup && .venv/bin/koemorph-fused demo ") and "# main job" in lines[0]
    assert lines[1].startswith("bash .ci/setup && .venv/bin/python -m pytest -q ") and lines[1].endswith("# tests")
    assert ".venv/bin/koemorph-fused check --device cuda" in text
    assert re.search(r"\.venv/bin/koemorph-fused check(?! --device)", text), "README never shows a plain check"
    for page in ("docs/spec.md", "docs/design.md", "docs/performance.md"):
        assert f"]({page})" in text, f"README does not link {page}"
    status = text[text.index("## Status"):]
    status = status[: status.index("\n## ", 1)]
    assert "CUDA" in status and "never run on a GPU" in status


def test_shell_command_parser_sees_operators_and_comments():
    """The helper the venv rule relies on."""
    commands = shell_commands("A=1 bash .ci/setup && .venv/bin/python -m pytest -q   # tests\n"
                              "koemorph-fused bench --quick \\\n    --json x.json; pytest bench/ | tee log\n")
    assert commands == [["A=1", "bash", ".ci/setup"], [".venv/bin/python", "-m", "pytest", "-q"],
                        ["koemorph-fused", "bench", "--quick", "--json", "x.json"], ["pytest", "bench/"],
                        ["tee", "log"]]
    assert program_and_args(commands[0]) == ("bash", [".ci/setup"])
