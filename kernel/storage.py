"""The state dir's disk: how much room is left, and what the kernel does when there is none.

A write the disk refuses (no space, a quota, an I/O error) never takes the kernel down. The
kernel's store keeps each turn's writes until they commit (``Store.keep_writes``); when a commit
is refused, the turn is rolled back and written again without its workers' events (the kernel's
own events are small and kept), with the room that the reserve file (``storage.reserve``, made at
boot) gives back. From then on the storage is *full*: submits and workers' events are refused
with "state dir <path> is full: N bytes free", and each job whose events could not be stored is
stopped as failed with that reason. Once a second the kernel looks at the free space again; when
there is room for the reserve again it is remade and everything goes on by itself.

Below ``[storage] low_space`` free (a size, or a percentage of the filesystem) the storage is
*low*: a warning, nothing refused. Every change is a ``kernel.storage`` event and a log line;
``llmos status`` shows the free space.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from llmos.errors import ConfigError, StorageFull
from llmos.protocol import StorageChanged
from llmos.units import parse_share

log = structlog.get_logger("llmos.kernel")

__all__ = ["Storage", "is_storage_error"]

RESERVE_FILE = "storage.reserve"
_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
_SQLITE = ("disk is full", "disk i/o error", "database or disk is full", "readonly database", "unable to open database file")
CHECK_EVERY = 1.0  # seconds between looks at the free space


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk refused a write (rather than a bug in the kernel)."""
    if isinstance(exc, OSError):
        return exc.errno in _ERRNOS
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
            return True
        return any(text in str(exc).lower() for text in _SQLITE)
    return False


def _threshold(text: str, total: int, name: str) -> int:
    """``"64MiB"`` or ``"5%"`` (of the filesystem) in bytes."""
    try:
        return parse_share(text, total)
    except (ValueError, TypeError):
        raise ConfigError(f"storage.{name} {text!r}: expected a size (\"64MiB\") or a share of the disk (\"5%\")", value=text) from None


class Storage:
    """The free space of the state dir's filesystem and the storage state: ok, low or full."""

    def __init__(self, state_dir: Path, settings: dict[str, Any], emit: Callable[[str, Any], None]) -> None:
        self.path = state_dir
        self.emit = emit
        self.state = "ok"
        self.reason: str | None = None  # what the disk said when it refused
        self.since: float | None = None  # when it became full
        self.free, self.total = self._measure()
        self.low_space = _threshold(settings.get("low_space", "5%"), self.total, "low_space")
        # The reserve gives back room for the writes that record the refusal; on a small disk it
        # is a tenth of it at most.
        self.reserve_size = min(_threshold(settings.get("reserve", "4MiB"), self.total, "reserve"), self.total // 10)
        # One turn's events (one commit) are at most a quarter of the reserve: what a refused
        # commit leaves to checkpoint, and the write that records the refusal, fit in its room.
        # With no reserve (reserve = 0) nothing bounds it but the flood limit.
        self.turn_bytes = max(16 << 10, min(8 << 20, self.reserve_size // 4)) if self.reserve_size > 0 else 8 << 20
        self._next_check = 0.0
        self._reserve = state_dir / RESERVE_FILE

    @property
    def full(self) -> bool:
        return self.state == "full"

    def _measure(self) -> tuple[int, int]:
        try:
            st = os.statvfs(self.path)
        except OSError:
            return 0, 0
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def boot(self) -> None:
        """Make the reserve, and say at once when the disk is already low."""
        self.make_reserve()
        self.free, self.total = self._measure()
        if self.free < self.low_space:
            self._change("low", None)

    def make_reserve(self) -> bool:
        """Hold ``reserve_size`` bytes in the reserve file (True when it is there)."""
        if self.reserve_size <= 0:
            return True
        try:
            if self._reserve.exists() and self._reserve.stat().st_size >= self.reserve_size:
                return True
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_size)
            finally:
                os.close(fd)
            return True
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve.unlink()
            return False

    def release_reserve(self) -> None:
        with contextlib.suppress(OSError):
            self._reserve.unlink()

    def refusal(self) -> str:
        """What a refused submit or event is told."""
        self.free, self.total = self._measure()
        return f"state dir {self.path} is full: {self.free:,} bytes free ({self.reason or 'the disk refused a write'}); free space there and llmos goes on by itself"

    def refuse_submit(self) -> None:
        if self.full:
            raise StorageFull(self.refusal(), state_dir=str(self.path), free=self.free)

    def refused(self, exc: BaseException) -> None:
        """A write was refused: give back the reserve's room and become full."""
        self.release_reserve()
        self.reason = f"{type(exc).__name__}: {exc}"
        if not self.full:
            self.since = time.time()
            self._change("full", self.reason)

    def tick(self, now: float) -> None:
        """Once a second: look at the free space; leave full when the reserve fits again."""
        if now < self._next_check:
            return
        self._next_check = now + CHECK_EVERY
        self.free, self.total = self._measure()
        if self.full:
            if self.free >= 2 * self.reserve_size and self.make_reserve():
                self.free, self.total = self._measure()
                self._change("low" if self.free < self.low_space else "ok", None)
            return
        if self.free < min(64 << 10, self.reserve_size // 4):
            # No room left, though no write of the kernel's failed yet (a worker's may have): refuse now.
            self.reason = f"{self.free:,} bytes left on the disk"
            self.since = time.time()
            self._change("full", self.reason)
            return
        state = "low" if self.free < self.low_space else "ok"
        if state != self.state:
            self._change(state, None)

    def _change(self, state: str, reason: str | None) -> None:
        before, self.state = self.state, state
        if state != "full":
            self.reason, self.since = None, None
        else:
            self.reason = reason
        self.free, self.total = self._measure()
        self.emit("kernel.storage", StorageChanged(state=state, path=str(self.path), free=self.free, total=self.total, reason=reason))
        level = log.warning if state != "ok" else log.info
        level("storage_changed", state=state, before=before, free=self.free, total=self.total, reason=reason, low_space=self.low_space)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state, "path": str(self.path), "free": self.free, "total": self.total, "low_space": self.low_space,
            "reason": self.reason, "since": self.since,
        }

