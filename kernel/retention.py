"""Retention: what the kernel forgets on its own, so a state dir does not grow without end.

``[retention]`` says how long things are kept:

- ``samples``: the monitor's measurements (``device.*`` streams and the rows of a job's stream
  that hold only ``job.<id>.usage`` samples). After two idle hours these are most of a journal.
- ``ended_jobs``: for jobs ended longer ago, the rest of their journal stream and their folder
  ``jobs/<id>/``. A folder that holds a registered artifact is kept (``llmos artifacts gc``
  decides about those); the job's row stays, so ``llmos jobs`` and ``llmos acct`` still list it.

A pass runs at boot and every ``interval`` seconds; each pass removes a bounded amount, journals a
``kernel.retention`` event with what it removed and logs it. Sequence numbers are never reused.
Durations come from ``journal_marks``: the kernel notes where the journal stood once a minute.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from llmos.errors import ConfigError
from llmos.kernel.store import Store
from llmos.protocol import RetentionDone

log = structlog.get_logger("llmos.kernel")

__all__ = ["Retention", "parse_duration"]

MARK_EVERY = 60.0  # seconds between journal marks
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: Any, name: str) -> float | None:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"45s"`` or a number of seconds; ``""`` or 0: keep forever (None)."""
    if text in ("", None, 0, "0"):
        return None
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text) if text > 0 else None
    value = str(text).strip().lower()
    try:
        if value[-1] in _UNITS:
            seconds = float(value[:-1]) * _UNITS[value[-1]]
        else:
            seconds = float(value)
    except (ValueError, IndexError):
        raise ConfigError(f"retention.{name} {text!r}: expected a duration like 30d, 12h or 90m (empty: keep forever)", value=text) from None
    if seconds <= 0:
        raise ConfigError(f"retention.{name} {text!r}: a duration must be above 0 (empty: keep forever)", value=text)
    return seconds


class Retention:
    def __init__(self, store: Store, state_dir: Path, settings: dict[str, Any], emit: Callable[[str, Any], None],
                 seq: Callable[[], int], keep_folder: Callable[[int, Path], bool]) -> None:
        self.store, self.state_dir, self.emit, self.seq = store, state_dir, emit, seq
        self.keep_folder = keep_folder  # (job id, its folder) -> whether something in it must stay
        self.samples = parse_duration(settings.get("samples", "1d"), "samples")
        self.ended_jobs = parse_duration(settings.get("ended_jobs", "30d"), "ended_jobs")
        self.interval = float(settings.get("interval", 3600.0))
        if self.interval <= 0:
            raise ConfigError(f"retention.interval must be above 0 seconds, got {self.interval:g}")
        self.mark_every = min(MARK_EVERY, self.interval)  # marks at least as fine as the passes
        self._next_mark = 0.0
        self._next_pass = 0.0  # the first pass: at the first turn after boot

    def tick(self, now: float) -> None:
        if now >= self._next_mark:
            self._next_mark = now + self.mark_every
            self.store.mark(self.seq(), time.time())
        if now >= self._next_pass:
            self._next_pass = now + self.interval
            self.run()

    def run(self) -> dict[str, int]:
        """One pass; what it removed."""
        wall = time.time()
        done = {"sample_rows": 0, "sample_events": 0, "job_streams": 0, "job_events": 0, "job_folders": 0, "folder_bytes": 0}
        if self.samples is not None:
            until = self.store.seq_at(wall - self.samples)
            if until:
                done["sample_rows"], done["sample_events"] = self.store.drop_sample_rows(until, (b".usage",))
        if self.ended_jobs is not None:
            ended = self.store.jobs_ended_before(wall - self.ended_jobs)
            streams = [f"job.{job_id}" for job_id in ended]
            done["job_events"] = self.store.drop_streams(streams)
            done["job_streams"] = len(streams) if done["job_events"] else 0
            for job_id in ended:
                folder = self.state_dir / "jobs" / str(job_id)
                if folder.is_dir() and not self.keep_folder(job_id, folder):
                    done["folder_bytes"] += _size(folder)
                    shutil.rmtree(folder, ignore_errors=True)
                    done["job_folders"] += 1
        if any(done.values()):
            self.emit("kernel.retention", RetentionDone(**done))
            log.info("retention", **done)
        return done


def _size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total
