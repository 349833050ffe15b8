"""Ingest: the hot path. Workers push their events in batches; each item is checked (a packed
[topic, header, body] from a worker running a job, on that job's stream, of a type a worker may
send, with a valid body) and the good ones go to the journal, which numbers them.

A job's end (``worker.job_done``) is not an event to journal: it is handed to the kernel, after
the items before it are journaled, so the job's state event follows its last log line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog

from llmos.errors import ProtocolError
from llmos.kernel.bus import NOBLOCK, Bus, count_bad_frame
from llmos.kernel.journal import Journal
from llmos.kernel.store import JobRecord
from llmos.kernel.supervisor import WorkerProc
from llmos.protocol import (
    ITEM_HEAD,
    JobDone,
    check_event_header,
    decode_body,
    unpackb,
    validate_body,
)

log = structlog.get_logger("llmos.kernel")

__all__ = ["Ingest"]

#: Event types only the kernel sends (besides every ``kernel.*`` and ``worker.*`` type).
KERNEL_ONLY_TYPES = frozenset({"job.state"})

OnJobDone = Callable[[WorkerProc, JobRecord, JobDone], None]


class Ingest:
    def __init__(
        self, bus: Bus, journal: Journal, workers: Mapping[str, WorkerProc], jobs: Mapping[int, JobRecord], on_job_done: OnJobDone, stats: dict[str, int],
        *, on_artifact: Callable[[int, Any], None] | None = None, max_bytes: int = 8 << 20,
    ) -> None:
        self.bus, self.journal, self.workers, self.jobs = bus, journal, workers, jobs
        self.on_job_done = on_job_done
        self.on_artifact = on_artifact  # a job announced an artifact (the registry records checkpoints)
        self.stats = stats
        self.more = False  # the last drain stopped at its budget: come back at once
        # The most frame bytes one turn takes in: one turn is one commit, and on a small disk a
        # commit must fit in the room the storage reserve gives back (Storage.turn_bytes).
        self.max_bytes = max_bytes
        self._fast_checks: dict[str, Callable[[Any], bool]] = {}

    @property
    def backlog(self) -> bool:
        """Whether events wait to be read (a dead worker's last frames, say)."""
        return self.more or self.bus.readable(self.bus.ingest)

    def drain(self, budget: int = 4096) -> None:
        """Read frames up to ``budget`` items (and ``max_bytes``), so replies and publication
        never wait behind a flood."""
        self.more = False
        sock, readable = self.bus.ingest, self.bus.readable
        room = self.max_bytes
        while budget > 0 and room > 0:
            if not readable(sock):
                return
            frame = sock.recv(NOBLOCK)
            room -= len(frame)
            try:
                items = unpackb(frame)
                if type(items) is not list:
                    raise ProtocolError("an ingest frame is an array of packed [topic, header, body] items")
                budget -= len(items)
                self.batch(items)
            except Exception as exc:  # never let one frame take the kernel down
                count_bad_frame(self.stats, "ingest", exc)
                budget -= 1
        self.more = True

    def batch(self, items: list[Any]) -> None:
        """Check one frame's items and journal the good ones, a run per sender at a time.

        A frame normally comes from one worker on a handful of topics: the sender's lookup and each
        topic's check are done once per run, and the run is journaled in one call."""
        workers, jobs, fast_ok, journal = self.workers, self.jobs, self._fast_checks, self.journal
        sender_now: Any = None  # the sender of the current run
        worker: WorkerProc | None = None
        job_id = 0
        stream = ""
        run: list[bytes] = []  # the current run's accepted items
        topics: set[str] = set()  # topics already checked in this run
        for raw in items:
            try:
                if type(raw) is not bytes or raw[:1] != ITEM_HEAD:
                    raise ProtocolError("an ingest item is a bin holding a packed [topic, header, body] (a 3-element fixarray)")
                item = unpackb(raw)
                if type(item) is not list or len(item) != 3:
                    raise ProtocolError("an ingest item is [topic, header, body]")
                topic_name, header, body = item
                check_event_header(header)
                sender = header["sender"]
                if sender != sender_now:
                    journal.extend(stream, run)
                    run, sender_now = [], None
                    topics.clear()
                    worker = workers.get(sender)
                    if worker is None or worker.job_id is None or not worker.assigned:
                        raise ProtocolError(f"event from {sender!r}, which is not a worker running a job")
                    job_id = worker.job_id
                    stream = f"job.{job_id}"
                    sender_now = sender
                if type(topic_name) is not str or topic_name not in topics:
                    _check_topic(topic_name, stream, sender)
                    topics.add(topic_name)
                type_name = header["type"]
                check = fast_ok.get(type_name)
                if check is None or not check(body):
                    if type_name == "worker.job_done":
                        journal.extend(stream, run)  # what the job said before its end comes first
                        run, sender_now = [], None  # the worker's state changes: look it up again
                        job = jobs.get(job_id)
                        if job is not None and worker is not None:
                            self.on_job_done(worker, job, decode_body(type_name, body))
                        continue
                    if type_name in KERNEL_ONLY_TYPES or type_name.startswith(("kernel.", "worker.")):
                        raise ProtocolError(f"worker {sender} may not send {type_name} events; only the kernel does")
                    validate_body(type_name, body)  # raises the precise error (or fills the cache)
                    fast_ok[type_name] = _fast_check_for(type_name)
                if type_name == "job.progress":
                    running = jobs.get(job_id)
                    if running is not None:
                        running.progress = body  # for `llmos top` and job records
                elif type_name == "job.artifact" and self.on_artifact is not None:
                    self.on_artifact(job_id, body)
                run.append(raw)
            except ProtocolError as exc:
                count_bad_frame(self.stats, "ingest", exc)
            except Exception as exc:
                log.exception("ingest_item_failed", error=f"{type(exc).__name__}: {exc}")
        journal.extend(stream, run)


def _check_topic(topic_name: Any, stream: str, sender: str) -> None:
    """A worker sends on its job's stream only: ``job.<id>.<name>``."""
    if (
        type(topic_name) is not str
        or not (topic_name.startswith(stream) and topic_name[len(stream) : len(stream) + 1] == ".")
        or topic_name.count(".") != 2
        or topic_name.endswith(".")
    ):
        raise ProtocolError(f"worker {sender} may only send events on {stream}.<name>, not {topic_name!r}")


def _fast_check_for(type_name: str) -> Callable[[Any], bool]:
    """The registry's quick validity check for a message type (see llmos.protocol)."""
    from llmos.protocol.registry import _fast_check, spec_for

    return _fast_check(spec_for(type_name))
