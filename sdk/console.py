"""Showing a job's events to a person: a progress line that updates in place on a terminal,
plain lines when the output is piped (``llmos submit --follow``, ``llmos logs -f``, ``llmos train``)."""

from __future__ import annotations

import sys
from typing import Any, TextIO


def progress_text(body: dict[str, Any], width: int = 24) -> str:
    """``[=====>      ] step 40/100  loss 3.2100  1,234 tok/s  ETA 12s  message``"""
    step, total = body.get("step", 0), body.get("total")
    f = body.get("fields") or {}
    parts = [f"step {step:g}/{total:g}" if total else f"step {step:g}"]
    if "loss" in f:
        parts.append(f"loss {f['loss']:.4f}")
    if "lr" in f:
        parts.append(f"lr {f['lr']:.2e}")
    if "tokens_per_s" in f:
        parts.append(f"{f['tokens_per_s']:,.0f} tok/s")
    if "eta_s" in f:
        parts.append(f"ETA {f['eta_s']:.0f}s")
    for key, value in f.items():
        if key not in ("loss", "lr", "tokens_per_s", "eta_s"):
            parts.append(f"{key}={value}")
    if body.get("message"):
        parts.append(str(body["message"]))
    bar = ""
    if total:
        done = int(width * max(0.0, min(1.0, step / total)))
        bar = "[" + "=" * done + (">" if done < width else "") + " " * max(0, width - done - 1) + "] "
    return bar + "  ".join(parts)


class ProgressPrinter:
    """Prints lines; progress lines overwrite each other on a terminal."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._open = False  # a progress line is on screen without its newline

    def progress(self, body: dict[str, Any]) -> None:
        text = progress_text(body)
        if self.tty:
            self.stream.write("\r" + text.ljust(100)[:200])
            self._open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
            self.stream.flush()


__all__ = ["ProgressPrinter", "progress_text"]
