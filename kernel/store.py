"""SQLite state: the job table and the event journal (WAL, one transaction per loop turn)."""

from __future__ import annotations

import contextlib
import heapq
import json
import sqlite3
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.protocol import STREAM_KINDS

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
    worker_create_time REAL,
    preemptible INTEGER NOT NULL DEFAULT 0,
    preemptions INTEGER NOT NULL DEFAULT 0
);
DROP INDEX IF EXISTS jobs_state;
CREATE INDEX IF NOT EXISTS jobs_state_id ON jobs(state, id);
-- The event journal: one row per stream and kernel turn (what one PUB message carries), holding
-- the stamped msgpack items back to back and their end offsets (uint32, little-endian). Batches of
-- different streams interleave in seq; ``meta.journal_max_span`` bounds last_seq - first_seq.
CREATE TABLE IF NOT EXISTS journal (
    first_seq INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    last_stream_seq INTEGER NOT NULL,
    n INTEGER NOT NULL,
    items BLOB NOT NULL,
    ends BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_stream ON journal(stream, first_seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Where the journal stood when: (seq, time) about once a minute, so that retention can say which
-- rows are older than a duration.
CREATE TABLE IF NOT EXISTS journal_marks (seq INTEGER PRIMARY KEY, ts REAL NOT NULL);
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
    preemptible: bool = False
    preemptions: int = 0  # tries that ended because the scheduler preempted them
    # runtime only
    worker_id: str | None = field(default=None, repr=False)
    cancel_reason: str | None = field(default=None, repr=False)
    end_state_on_stop: str | None = field(default=None, repr=False)
    stop_stage: int = field(default=0, repr=False)  # a supervisor.StopStage
    stop_at: float | None = field(default=None, repr=False)
    deadline: float | None = field(default=None, repr=False)
    progress: dict[str, Any] | None = field(default=None, repr=False)  # its last job.progress body
    usage: dict[str, Any] | None = field(default=None, repr=False)  # what the monitor measured last
    peak_gpu_memory: int | None = field(default=None, repr=False)  # the most GPU memory it was seen using

    PUBLIC = (
        "id", "kind", "state", "params", "resources", "priority", "max_retries", "timeout", "reason",
        "exit_code", "attempts", "result", "placement", "submitted_at", "started_at", "ended_at", "worker_pid",
        "preemptible", "preemptions",
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
    "worker_create_time", "preemptible", "preemptions",
)


def _job_filter(state: str | None, without: Sequence[str], before: int | None) -> tuple[str, tuple[Any, ...]]:
    """A WHERE clause (and its arguments) for a job listing; the (state, id) index serves it."""
    terms: list[str] = []
    args: list[Any] = []
    if state:
        terms.append("state=?")
        args.append(state)
    if before is not None:
        terms.append("id<?")
        args.append(before)
    if without:
        terms.append(f"kind NOT IN ({', '.join('?' * len(without))})")
        args.extend(without)
    return (" WHERE " + " AND ".join(terms) if terms else ""), tuple(args)


def _from_row(row: sqlite3.Row) -> JobRecord:
    data = {k: row[k] for k in _ROW_FIELDS}
    data["preemptible"] = bool(data["preemptible"])
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
        row = self.db.execute("SELECT value FROM meta WHERE key='journal_max_span'").fetchone()
        self.max_span = int(row[0]) if row else 0
        self._migrate_events_table()
        self._add_missing_columns()

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # a commit the disk refuses was already reported
            self.commit()
        self.db.close()

    def keep_writes(self) -> None:
        """From now on, keep each transaction's writes until it commits (see :meth:`rollback`);
        and write nothing to the database file before a commit (no cache spill), so that a full
        disk fails the commit rather than a statement in the middle of the kernel's work."""
        self.db.execute("PRAGMA cache_spill=OFF")
        self.db = _Recorded(self.db)  # type: ignore[assignment]

    # -- transactions: one per kernel loop turn --

    def begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True
            if isinstance(self.db, _Recorded):
                self.db.writes = []

    def commit(self) -> None:
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False
            if isinstance(self.db, _Recorded):
                self.db.writes = None

    def rollback(self) -> list[tuple[str, Any, bool]]:
        """Give up the transaction (after a commit the disk refused); returns its writes other
        than the journal's rows, to be written again by :meth:`redo`."""
        db = self.db
        writes = db.writes or [] if isinstance(db, _Recorded) else []
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        self._in_tx = False
        if isinstance(db, _Recorded):
            db.writes = None
        return writes

    def redo(self, writes: list[tuple[str, Any, bool]]) -> None:
        """Write again, in a new transaction, what :meth:`rollback` gave up."""
        self.begin()
        for sql, params, many in writes:
            (self.db.executemany if many else self.db.execute)(sql, params)

    def fit_wal(self, disk_bytes: int) -> None:
        """Keep the write-ahead log small beside a small disk: checkpoint after at most a
        twentieth of the disk (SQLite's default is 1,000 pages, 4 MiB) and truncate the file back
        after a checkpoint, so that the committed pages a checkpoint must copy always fit in the
        room the storage reserve gives back."""
        pages = max(16, min(1000, disk_bytes // 4096 // 20))
        self.db.execute(f"PRAGMA wal_autocheckpoint={pages}")
        self.db.execute(f"PRAGMA journal_size_limit={pages * 4096 * 2}")

    def free_wal(self) -> str:
        """Checkpoint and truncate the write-ahead log: what a refused commit left in it is free
        space again (best effort). Says how it went."""
        try:
            busy, frames, done = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            return f"{type(exc).__name__}: {exc}"
        return "truncated" if not busy else f"busy ({done} of {frames} frames checkpointed)"

    # -- jobs --

    def insert_job(self, job: JobRecord) -> int:
        self.begin()
        cur = self.db.execute(
            "INSERT INTO jobs (kind, params, resources, priority, max_retries, timeout, state, submitted_at, queued_at, preemptible)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.kind, json.dumps(job.params), json.dumps(job.resources), job.priority, job.max_retries, job.timeout, job.state, job.submitted_at, job.queued_at, int(job.preemptible)),
        )
        return int(cur.lastrowid or 0)

    def update_job(self, job: JobRecord) -> None:
        self.begin()
        self.db.execute(
            "UPDATE jobs SET state=?, reason=?, exit_code=?, attempts=?, result=?, placement=?, queued_at=?,"
            " started_at=?, ended_at=?, worker_pid=?, worker_create_time=?, preemptions=? WHERE id=?",
            (
                job.state, job.reason, job.exit_code, job.attempts,
                None if job.result is None else json.dumps(job.result),
                None if job.placement is None else json.dumps(job.placement),
                job.queued_at, job.started_at, job.ended_at, job.worker_pid, job.worker_create_time, job.preemptions, job.id,
            ),
        )

    def get_job(self, job_id: int) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _from_row(row) if row else None

    def list_jobs(self, state: str | None = None, limit: int = 1000, *, before: int | None = None, without: Sequence[str] = ()) -> list[JobRecord]:
        """The newest ``limit`` jobs with an id below ``before`` (in ``state``, of no kind in
        ``without``), oldest first."""
        where, args = _job_filter(state, without, before)
        rows = self.db.execute(f"SELECT * FROM (SELECT * FROM jobs{where} ORDER BY id DESC LIMIT ?) ORDER BY id", (*args, limit))
        return [_from_row(r) for r in rows]

    def count_matching(self, state: str | None = None, *, before: int | None = None, without: Sequence[str] = ()) -> int:
        """How many jobs :meth:`list_jobs` could list with these filters, on every page."""
        where, args = _job_filter(state, without, before)
        return int(self.db.execute(f"SELECT COUNT(*) FROM jobs{where}", args).fetchone()[0])

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
        row = self.db.execute(
            "SELECT MAX(last_seq) FROM journal WHERE first_seq >= (SELECT MAX(first_seq) FROM journal) - ?", (self.max_span,)
        ).fetchone()
        mark = self.db.execute("SELECT MAX(seq) FROM journal_marks").fetchone()  # rows past retention are gone, not their numbers
        return max(int(row[0] or 0), int(mark[0] or 0))

    def last_stream_seq(self, stream: str) -> int:
        row = self.db.execute("SELECT last_stream_seq FROM journal WHERE stream=? ORDER BY first_seq DESC LIMIT 1", (stream,)).fetchone()
        return int(row[0]) if row else 0

    def append_batch(self, stream: str, items: Sequence[bytes]) -> None:
        """Journal one stream's stamped items (consecutive in stream_seq, rising in seq) as one row."""
        if not items:
            return
        first, last = seq_of(items[0]), seq_of(items[-1])
        ends = array("I")
        end = 0
        for item in items:
            end += len(item)
            ends.append(end)
        if sys.byteorder != "little":
            ends.byteswap()
        self.begin()
        db = self.db.raw if isinstance(self.db, _Recorded) else self.db  # the journal's rows are not kept for redo: the journal has them
        db.execute(
            "INSERT INTO journal (first_seq, last_seq, stream, last_stream_seq, n, items, ends) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (first, last, stream, stream_seq_of(items[-1]), len(items), b"".join(items), ends.tobytes()),
        )
        if last - first > self.max_span:
            self.max_span = last - first
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('journal_max_span', ?)", (str(self.max_span),))

    def replay(self, prefix: str, since: int, until: int | None, limit: int) -> list[tuple[int, bytes]]:
        """(seq, packed item) of events with seq in (since, until] whose topic starts with prefix,
        in seq order, at most ``limit``."""
        until = until if until is not None else (1 << 62)
        low = since - self.max_span  # no batch starting at or below this holds a seq above since
        parts = prefix.split(".")
        if len(parts) >= 3 and parts[0] in STREAM_KINDS and parts[1]:
            # The prefix names one stream: use the (stream, first_seq) index.
            rows = self.db.execute(
                "SELECT first_seq, items, ends FROM journal WHERE stream=? AND first_seq>? AND first_seq<=? ORDER BY first_seq",
                (parts[0] + "." + parts[1], low, until),
            )
        else:
            rows = self.db.execute("SELECT first_seq, items, ends FROM journal WHERE first_seq>? AND first_seq<=? ORDER BY first_seq", (low, until))
        want = prefix.encode()
        out: list[tuple[int, bytes]] = []
        heap: list[tuple[int, bytes]] = []  # batches of different streams interleave: merge by seq
        for first, blob, ends in rows:
            while heap and heap[0][0] < first:  # every later batch starts after it: final
                out.append(heapq.heappop(heap))
                if len(out) >= limit:
                    return out
            for item in _split(blob, ends):
                seq = seq_of(item)
                if since < seq <= until and (not want or topic_of(item).startswith(want)):
                    heapq.heappush(heap, (seq, item))
        while heap and len(out) < limit:
            out.append(heapq.heappop(heap))
        return out

    def stream_heads(self, prefix: str, since: int) -> dict[str, tuple[int, int]]:
        """stream -> (stream_seq, seq) of its newest event, for the streams a subscription to
        ``prefix`` sees that have events above ``since``."""
        rows = self.db.execute(
            "SELECT stream, MAX(last_stream_seq), MAX(last_seq) FROM journal WHERE first_seq > ? GROUP BY stream HAVING MAX(last_seq) > ?",
            (since - self.max_span, since),
        )
        return {
            stream: (int(sseq), int(seq))
            for stream, sseq, seq in rows
            if (stream + ".").startswith(prefix) or prefix.startswith(stream + ".")
        }

    # -- retention --

    def mark(self, seq: int, ts: float) -> None:
        self.begin()
        self.db.execute("INSERT OR REPLACE INTO journal_marks (seq, ts) VALUES (?, ?)", (seq, ts))

    def seq_at(self, ts: float) -> int:
        """The last journal seq known to be older than ``ts`` (0: none)."""
        row = self.db.execute("SELECT MAX(seq) FROM journal_marks WHERE ts <= ?", (ts,)).fetchone()
        return int(row[0] or 0)

    def drop_sample_rows(self, until_seq: int, sample_topics: tuple[bytes, ...], limit: int = 20_000) -> tuple[int, int]:
        """Delete journal rows up to ``until_seq`` that hold only samples: the rows of ``device.*``
        streams, and rows of job streams whose every item's topic ends with one of
        ``sample_topics`` (``.usage``). Returns (rows, events) deleted."""
        self.begin()
        rows = events = 0
        device = self.db.execute("SELECT COUNT(*), COALESCE(SUM(n), 0) FROM journal WHERE stream LIKE 'device.%' AND last_seq <= ?", (until_seq,)).fetchone()
        self.db.execute("DELETE FROM journal WHERE stream LIKE 'device.%' AND last_seq <= ?", (until_seq,))
        rows, events = int(device[0]), int(device[1])
        doomed = []
        for first, n, blob, ends in self.db.execute(
            "SELECT first_seq, n, items, ends FROM journal WHERE stream LIKE 'job.%' AND last_seq <= ? AND n <= 16 LIMIT ?", (until_seq, limit)
        ):
            if all(topic_of(item).endswith(sample_topics) for item in _split(blob, ends)):
                doomed.append((first,))
                events += n
        self.db.executemany("DELETE FROM journal WHERE first_seq = ?", doomed)
        return rows + len(doomed), events

    def drop_streams(self, streams: Sequence[str]) -> int:
        """Delete every journal row of ``streams`` (ended jobs past retention); events deleted."""
        if not streams:
            return 0
        self.begin()
        total = 0
        for stream in streams:
            row = self.db.execute("SELECT COALESCE(SUM(n), 0) FROM journal WHERE stream = ?", (stream,)).fetchone()
            total += int(row[0])
            self.db.execute("DELETE FROM journal WHERE stream = ?", (stream,))
        return total

    def jobs_ended_before(self, ts: float, limit: int = 1000) -> list[int]:
        """Ended jobs (ended before ``ts``) retention has not seen yet, oldest first; they are
        marked seen (``meta.retention_job``: the highest id done)."""
        row = self.db.execute("SELECT value FROM meta WHERE key='retention_job'").fetchone()
        done = int(row[0]) if row else 0
        ids = [int(r[0]) for r in self.db.execute(
            "SELECT id FROM jobs WHERE id > ? AND ended_at IS NOT NULL AND ended_at < ? AND state IN ('succeeded', 'failed', 'cancelled') ORDER BY id LIMIT ?",
            (done, ts, limit))]
        if ids:
            self.begin()
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('retention_job', ?)", (str(ids[-1]),))
        return ids

    def count_events(self) -> int:
        row = self.db.execute("SELECT SUM(n) FROM journal").fetchone()
        return int(row[0] or 0)

    def _add_missing_columns(self) -> None:
        """Columns added to the job table after a state dir was made."""
        have = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        for name in ("preemptible", "preemptions"):
            if name not in have:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0")

    def _migrate_events_table(self) -> None:
        """State dirs of llmos before the batched journal had one row per event: move them over."""
        if self.db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='events'").fetchone() is None:
            return
        self.begin()
        for stream, seq, item in self.db.execute("SELECT stream, seq, item FROM events ORDER BY seq").fetchall():
            if not self.db.execute("SELECT 1 FROM journal WHERE first_seq=?", (seq,)).fetchone():
                self.append_batch(stream, [item])
        self.db.execute("DROP TABLE events")
        self.commit()


_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class _Recorded:
    """The store's connection as the kernel's components use it: inside a transaction, each
    write is also kept (its SQL and parameters) until the commit, so a turn whose commit the disk
    refuses can be rolled back and written again without its workers' events."""

    __slots__ = ("raw", "writes")

    def __init__(self, raw: sqlite3.Connection) -> None:
        self.raw = raw
        self.writes: list[tuple[str, Any, bool]] | None = None

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if self.writes is not None and sql.lstrip().upper().startswith(_WRITES):
            self.writes.append((sql, params, False))
        return self.raw.execute(sql, params)

    def executemany(self, sql: str, seq: Any) -> sqlite3.Cursor:
        rows = list(seq)
        if self.writes is not None:
            self.writes.append((sql, rows, True))
        return self.raw.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def seq_of(item: bytes) -> int:
    """The global seq of a stamped item (see ``llmos.protocol.stamp``: it ends in two uint64s)."""
    return int.from_bytes(item[-17:-9], "big")


def stream_seq_of(item: bytes) -> int:
    return int.from_bytes(item[-8:], "big")


def topic_of(item: bytes) -> bytes:
    """The topic of a packed ``[topic, ...]`` item, read off its first element."""
    head = item[1]
    if 0xA0 <= head <= 0xBF:
        return item[2 : 2 + head - 0xA0]
    if head == 0xD9:
        return item[3 : 3 + item[2]]
    if head == 0xDA:
        return item[4 : 4 + int.from_bytes(item[2:4], "big")]
    return b""


def _split(blob: bytes, ends: bytes) -> Iterator[bytes]:
    offsets = array("I")
    offsets.frombytes(ends)
    if sys.byteorder != "little":
        offsets.byteswap()
    start = 0
    view = memoryview(blob)
    for end in offsets:
        yield bytes(view[start:end])
        start = end


__all__ = ["JobRecord", "Store"]
