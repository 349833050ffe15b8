"""SQLite state: the job table and the event journal (WAL, one transaction per loop turn)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    resources TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL DEFAULT 0,
    timeout REAL,
    state TEXT NOT NULL,
    reason TEXT,
    exit_code INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    placement TEXT,
    submitted_at REAL NOT NULL,
    queued_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    worker_pid INTEGER,
    worker_create_time REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    stream_seq INTEGER NOT NULL,
    topic TEXT NOT NULL,
    item BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_stream ON events(stream, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS attempts (
    job_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    started_at REAL,
    ended_at REAL,
    cpu_seconds REAL,
    max_rss INTEGER,
    gpu_seconds REAL,
    gpu_memory INTEGER,
    PRIMARY KEY (job_id, attempt)
);
"""

_JSON_COLUMNS = ("params", "resources", "result", "placement")


@dataclass
class JobRecord:
    """A job row, plus what only the running kernel knows about it."""

    id: int
    kind: str
    params: dict[str, Any]
    resources: dict[str, Any]
    priority: int
    max_retries: int
    timeout: float | None
    state: str
    submitted_at: float
    queued_at: float
    reason: str | None = None
    exit_code: int | None = None
    attempts: int = 0
    result: Any = None
    placement: dict[str, Any] | None = None
    started_at: float | None = None
    ended_at: float | None = None
    worker_pid: int | None = None
    worker_create_time: float | None = None
    # runtime only
    worker_id: str | None = field(default=None, repr=False)
    cancel_reason: str | None = field(default=None, repr=False)
    end_state_on_stop: str | None = field(default=None, repr=False)
    stop_stage: int = field(default=0, repr=False)  # 0 none, 1 asked, 2 SIGTERM, 3 SIGKILL
    stop_at: float | None = field(default=None, repr=False)
    deadline: float | None = field(default=None, repr=False)
    progress: dict[str, Any] | None = field(default=None, repr=False)  # its last job.progress body
    usage: dict[str, Any] | None = field(default=None, repr=False)  # what the monitor measured last
    peak_gpu_memory: int | None = field(default=None, repr=False)  # the most GPU memory it was seen using

    PUBLIC = (
        "id", "kind", "state", "params", "resources", "priority", "max_retries", "timeout", "reason",
        "exit_code", "attempts", "result", "placement", "submitted_at", "started_at", "ended_at", "worker_pid",
    )

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.PUBLIC}
        if self.state == "running":
            out["progress"] = self.progress
            out["usage"] = self.usage
        return out


_ROW_FIELDS = (
    "id", "kind", "params", "resources", "priority", "max_retries", "timeout", "state", "reason", "exit_code",
    "attempts", "result", "placement", "submitted_at", "queued_at", "started_at", "ended_at", "worker_pid",
    "worker_create_time",
)


def _from_row(row: sqlite3.Row) -> JobRecord:
    data = {k: row[k] for k in _ROW_FIELDS}
    for key in _JSON_COLUMNS:
        data[key] = json.loads(data[key]) if data[key] is not None else None
    return JobRecord(**data)


class Store:
    """The kernel's SQLite database. Only the kernel process opens it for writing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._in_tx = False

    def close(self) -> None:
        self.commit()
        self.db.close()

    # -- transactions: one per kernel loop turn --

    def begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False

    # -- jobs --

    def insert_job(self, job: JobRecord) -> int:
        self.begin()
        cur = self.db.execute(
            "INSERT INTO jobs (kind, params, resources, priority, max_retries, timeout, state, submitted_at, queued_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.kind, json.dumps(job.params), json.dumps(job.resources), job.priority, job.max_retries, job.timeout, job.state, job.submitted_at, job.queued_at),
        )
        return int(cur.lastrowid or 0)

    def update_job(self, job: JobRecord) -> None:
        self.begin()
        self.db.execute(
            "UPDATE jobs SET state=?, reason=?, exit_code=?, attempts=?, result=?, placement=?, queued_at=?,"
            " started_at=?, ended_at=?, worker_pid=?, worker_create_time=? WHERE id=?",
            (
                job.state, job.reason, job.exit_code, job.attempts,
                None if job.result is None else json.dumps(job.result),
                None if job.placement is None else json.dumps(job.placement),
                job.queued_at, job.started_at, job.ended_at, job.worker_pid, job.worker_create_time, job.id,
            ),
        )

    def get_job(self, job_id: int) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _from_row(row) if row else None

    def list_jobs(self, state: str | None = None, limit: int = 1000) -> list[JobRecord]:
        if state:
            rows = self.db.execute("SELECT * FROM (SELECT * FROM jobs WHERE state=? ORDER BY id DESC LIMIT ?) ORDER BY id", (state, limit))
        else:
            rows = self.db.execute("SELECT * FROM (SELECT * FROM jobs ORDER BY id DESC LIMIT ?) ORDER BY id", (limit,))
        return [_from_row(r) for r in rows]

    def unfinished_jobs(self) -> list[JobRecord]:
        rows = self.db.execute("SELECT * FROM jobs WHERE state IN ('pending', 'running') ORDER BY id")
        return [_from_row(r) for r in rows]

    def count_jobs(self) -> dict[str, int]:
        return {row[0]: row[1] for row in self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}

    # -- accounting: one row per attempt, summed per job --

    def record_attempt(self, job_id: int, attempt: int, started_at: float | None, ended_at: float, cpu_seconds: float | None, max_rss: int | None, gpu_seconds: float, gpu_memory: int) -> None:
        self.begin()
        self.db.execute(
            "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (job_id, attempt, started_at, ended_at, cpu_seconds, max_rss, gpu_seconds, gpu_memory),
        )

    def accounting(self, since: float | None, limit: int) -> list[dict[str, Any]]:
        """Finished jobs (ended after ``since``) with their summed usage, oldest first."""
        rows = self.db.execute(
            "SELECT j.id, j.kind, j.state, j.reason, j.attempts, j.submitted_at, j.started_at, j.ended_at, j.result, j.resources,"
            " SUM(a.cpu_seconds), MAX(a.max_rss), SUM(a.gpu_seconds), MAX(a.gpu_memory), SUM(a.ended_at - a.started_at)"
            " FROM jobs j LEFT JOIN attempts a ON a.job_id = j.id"
            " WHERE j.state IN ('succeeded', 'failed', 'cancelled') AND j.ended_at >= ?"
            " GROUP BY j.id ORDER BY j.ended_at DESC LIMIT ?",
            (since or 0.0, limit),
        ).fetchall()
        out = []
        for r in reversed(rows):
            result = json.loads(r[8]) if r[8] else None
            tokens = result.get("tokens") if isinstance(result, dict) and isinstance(result.get("tokens"), int) else None
            resources = json.loads(r[9])
            out.append({
                "id": r[0], "kind": r[1], "state": r[2], "reason": r[3], "attempts": r[4],
                "submitted_at": r[5], "started_at": r[6], "ended_at": r[7],
                "wall_seconds": (r[7] - r[6]) if r[6] and r[7] else 0.0,
                "run_seconds": r[14] or 0.0,
                "cpu_seconds": r[10], "max_rss": r[11],
                "gpu_seconds": r[12] if resources.get("gpus") else None,
                "gpu_memory": r[13] if resources.get("gpus") else None,
                "tokens": tokens,
                "reserved": resources,
            })
        return out

    # -- the journal --

    def last_seq(self) -> int:
        row = self.db.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)

    def last_stream_seq(self, stream: str) -> int:
        row = self.db.execute("SELECT stream_seq FROM events WHERE stream=? ORDER BY seq DESC LIMIT 1", (stream,)).fetchone()
        return int(row[0]) if row else 0

    def append_events(self, rows: Iterable[tuple[int, str, int, str, bytes]]) -> None:
        """Journal (seq, stream, stream_seq, topic, item) rows; item is the stamped msgpack event."""
        self.begin()
        self.db.executemany("INSERT INTO events (seq, stream, stream_seq, topic, item) VALUES (?, ?, ?, ?, ?)", rows)

    def replay(self, prefix: str, since: int, until: int | None, limit: int) -> list[tuple[int, bytes]]:
        """(seq, packed item) of events with seq in (since, until] whose topic starts with prefix."""
        until = until if until is not None else (1 << 62)
        parts = prefix.split(".")
        if len(parts) >= 3 and parts[0] in ("job", "device", "service", "worker") and parts[1]:
            # The prefix names one stream: use the (stream, seq) index.
            stream = parts[0] + "." + parts[1]
            rows = self.db.execute(
                "SELECT seq, item FROM events WHERE stream=? AND seq>? AND seq<=? AND substr(topic, 1, ?)=? ORDER BY seq LIMIT ?",
                (stream, since, until, len(prefix), prefix, limit),
            )
            return [(seq, item) for seq, item in rows]
        if prefix:
            rows = self.db.execute(
                "SELECT seq, item FROM events WHERE seq>? AND seq<=? AND substr(topic, 1, ?)=? ORDER BY seq LIMIT ?",
                (since, until, len(prefix), prefix, limit),
            )
        else:
            rows = self.db.execute("SELECT seq, item FROM events WHERE seq>? AND seq<=? ORDER BY seq LIMIT ?", (since, until, limit))
        return [(seq, item) for seq, item in rows]

    def count_events(self) -> int:
        row = self.db.execute("SELECT COUNT(*) FROM events").fetchone()
        return int(row[0])


__all__ = ["JobRecord", "Store"]
