"""What the benchmark scripts share for reporting: progress lines, quantiles, verdicts, the CPU's
name, and writing one script's section of ``docs/benchmarks.md``.

Run as ``python benchmarks/<script>.py``, which puts this folder on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"


def say(*parts: object) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(*parts, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values`` by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def timed(label: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` between a progress line naming it and one saying how long it took."""
    say(f"- {label} ...")
    t0 = time.perf_counter()
    out = fn()
    say(f"  done in {time.perf_counter() - t0:.1f} s")
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "**FAIL**"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def write_doc(title: str, section: str) -> None:
    """Put ``section`` (which starts with the heading ``title``) in place of that heading's section
    of docs/benchmarks.md, or at its end; the other scripts' sections stay as they are."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nEach section is written by the script it names; run it again to refresh it.\n"
    pattern = re.compile(rf"^{re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text.rstrip("\n") + "\n")


def write_table(title: str, intro: str, header: tuple[str, ...], rows: list[tuple[str, ...]], *, write: bool = True) -> str:
    """A section of ``title``, an ``intro`` line and a table of ``rows`` under ``header``: printed,
    and put in docs/benchmarks.md unless ``write`` is false. Returns the section."""
    lines = [title, "", intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    section = "\n".join(lines) + "\n"
    print(section)
    if write:
        write_doc(title, section)
    return section
