"""Stream a build's output into a log file and show its progress in a few lines.

    pip install -v ... 2>&1 | python .ci/build_progress.py --log build/build.log

Every input line goes to the log. On the terminal: the ``koemorph_fused:``
lines (what is built and why, once each), one line per finished compile step
(ninja's ``[n/m]`` status with the elapsed time and the source file instead of
the whole compiler command), the link step, compiler errors, and a "still
compiling" line when nothing has finished for a while. ptxas' register reports
stay in the log (.ci/ptxas_report.awk summarises them).
"""

from __future__ import annotations

import argparse
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import IO

_NINJA = re.compile(r"^\s*\[(\d+)/(\d+)\]\s+(.*)$")
_SOURCE = re.compile(r"(?:^|\s)-c\s+(\S+\.(?:cpp|cc|cxx|c|cu))(?:\s|$)")
_LINK = re.compile(r"^\s*\S*(?:g\+\+|c\+\+|gcc|clang\+\+)\s.*-shared\s.*-o\s+(\S+\.so)\b")
_ERROR = re.compile(r"(?:^|\s)(?:fatal )?error:|^\s*ERROR:|Error compiling objects")


def clock(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` past an hour)."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _short_path(path: str) -> str:
    """``csrc/...`` for a source under csrc/, else the file name."""
    parts = Path(path).parts
    return "/".join(parts[parts.index("csrc"):]) if "csrc" in parts else Path(path).name


def compact(line: str) -> str | None:
    """What the terminal shows for one line of build output (without the
    elapsed time), or None to keep it in the log only."""
    text = line.strip()
    if text.startswith("koemorph_fused:"):
        return text
    ninja = _NINJA.match(line)
    if ninja:
        done, total, command = ninja.groups()
        source = _SOURCE.search(command)
        what = _short_path(source.group(1)) if source else command.split()[0] if command else ""
        return f"[{done}/{total}] {what}"
    link = _LINK.match(line)
    if link:
        return f"linking {Path(link.group(1)).name}"
    if _ERROR.search(text):
        return text
    return None


def run(source: IO[str], out: IO[str], log: IO[str], heartbeat: float, offset: float = 0.0) -> None:
    """Copy ``source`` to ``log`` and its :func:`compact` form to ``out`` until
    ``source`` ends; every ``heartbeat`` seconds without a progress line, say
    how long it has been. Times shown count from ``offset`` seconds ago."""
    last_shown = time.monotonic()
    start = last_shown - offset
    seen: set[str] = set()
    lines: queue.Queue[str | None] = queue.Queue()

    def reader() -> None:
        for line in source:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    while True:
        now = time.monotonic()
        try:
            line = lines.get(timeout=max(0.05, last_shown + heartbeat - now))
        except queue.Empty:
            last_shown = time.monotonic()
            out.write(f"{clock(last_shown - start):>7}  ... still building\n")
            out.flush()
            continue
        if line is None:
            break
        log.write(line)
        log.flush()
        shown = compact(line)
        if shown is None or (shown.startswith("koemorph_fused:") and shown in seen):
            continue  # pip runs setup.py more than once: say what it builds once
        seen.add(shown)
        last_shown = time.monotonic()
        out.write(f"{clock(last_shown - start):>7}  {shown}\n")
        out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, required=True, help="file that receives every line (overwritten)")
    parser.add_argument(
        "--heartbeat", type=float, default=60.0,
        help="seconds without progress after which a 'still building' line is shown (default 60)",
    )
    parser.add_argument(
        "--offset", type=float, default=0.0,
        help="seconds already spent before this build (the times shown count from then)",
    )
    args = parser.parse_args(argv)
    if not args.heartbeat > 0:
        parser.error("--heartbeat must be a positive number of seconds")
    if not args.offset >= 0:
        parser.error("--offset must be a number of seconds >= 0")
    args.log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdin.reconfigure(errors="replace")  # a compiler may print bytes that are not UTF-8
    with args.log.open("w", encoding="utf-8") as log:
        run(sys.stdin, sys.stdout, log, args.heartbeat, args.offset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
