"""JobContext: the whole world of a runner.

The worker builds one per job and hands it to the runner's ``setup``, ``run`` and ``teardown``.
Everything a runner says goes onto the bus through it, as events on the job's stream
(``job.<id>.progress``, ``job.<id>.log``, ...), in the order it was said.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmos.errors import LlmosError
from llmos.protocol import JobArtifact, JobMetric, encode_body, type_name_of, validate_body

Emit = Callable[[str, str, dict[str, Any]], None]  # (topic suffix, type name, body)

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50, "exception": 40}


class _BusSink:
    """The structlog "logger" at the end of a runner's chain: every record becomes a job.log event."""

    def __init__(self, emit: Emit, name: str | None) -> None:
        self._emit = emit
        self._name = name

    def _record(self, event_dict: dict[str, Any]) -> None:
        level = event_dict.pop("level", "info")
        event = event_dict.pop("event", "")
        plain = _PLAIN
        for k, v in event_dict.items():  # most records hold only plain values: keep the dict
            t = type(v)
            if (t not in plain and (t is not int or not -_I64 <= v < _U64)) or type(k) is not str:
                event_dict = {str(k): _plain(v) for k, v in event_dict.items()}
                break
        self._emit("log", "job.log", {"level": level if type(level) is str else str(level), "event": event if type(event) is str else str(event), "logger": self._name, "fields": event_dict})

    # structlog calls the method named after the level: found on the class, not via __getattr__.
    debug = info = warning = warn = error = critical = exception = fatal = msg = log = _record

    def __getattr__(self, name: str) -> Callable[[dict[str, Any]], None]:
        return self._record


def _to_record(logger: Any, method: str, event_dict: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "exc_info" in event_dict:
        import structlog.processors

        event_dict = structlog.processors.format_exc_info(logger, method, event_dict)
    event_dict.setdefault("level", "error" if method == "exception" else method)
    return (event_dict,), {}


_PLAIN = frozenset({str, float, bool, type(None)})  # kept as they are; ints are checked for range
_I64, _U64 = 2**63, 2**64


def _plain(value: Any) -> Any:
    """Values that msgpack and JSON both carry; anything else becomes its repr."""
    if value is None or isinstance(value, bool | float | str):
        return value
    if isinstance(value, int):
        return value if -_I64 <= value < _U64 else str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def make_bus_logger(emit: Emit, name: str | None = None, level: str = "debug") -> Any:
    """A structlog logger whose records travel as ``job.log`` events (about 3 us a record)."""
    import structlog  # here, not at import: clients and the command line never log to the bus

    bound_class = structlog.make_filtering_bound_logger(_LEVELS.get(level, 10))
    return bound_class(_BusSink(emit, name), [_to_record], {})


class JobContext:
    """What a runner sees of the world: its parameters, devices, directory and the bus.

    Attributes: ``job_id``, ``kind``, ``params`` (the schema dataclass), ``attempt`` (1 on the
    first try), ``resources`` (what was reserved), ``placement`` (which devices), ``gpus`` (the
    GPU indices, also in ``CUDA_VISIBLE_DEVICES``), ``workdir`` (a directory of its own in the
    state dir), ``log`` (a structlog logger whose records become ``job.<id>.log`` events).
    A job of a kind with ``ranks`` also has ``distributed`` (the kernel's plan: ``world_size``,
    ``master_addr``, ``master_port`` and each rank's ``gpus`` and ``cpus``; None for other jobs),
    ``rank`` (0 in the job's worker) and ``world_size``.
    """

    def __init__(
        self,
        *,
        job_id: int,
        kind: str,
        params: Any,
        attempt: int,
        resources: dict[str, Any],
        placement: dict[str, Any],
        workdir: Path,
        emit: Emit,
        cancel_event: threading.Event | None = None,
        rank: int = 0,
    ) -> None:
        self.job_id = job_id
        self.kind = kind
        self.params = params
        self.attempt = attempt
        self.resources = dict(resources)
        self.placement = dict(placement)
        self.gpus: list[int] = [int(g["index"]) for g in placement.get("gpus", [])]
        self.distributed: dict[str, Any] | None = placement.get("distributed")
        self.rank = rank
        self.world_size = int(self.distributed["world_size"]) if self.distributed else 1
        self.workdir = Path(workdir)
        self._emit = emit
        self._cancel = cancel_event or threading.Event()
        self.cancel_reason: str | None = None
        self.log = make_bus_logger(emit, name=kind)
        self._model_loader: Callable[[str, Any, Any], Any] | None = None
        self._services: Any = None
        self._held: list[dict[str, Any]] | None = None  # responses held by responding_together()

    # -- the other ranks of a gang --

    def start_rank(self, rank: int, argv: list[str], env: dict[str, str], log: Path) -> Any:
        """Start rank ``rank`` of this gang job: ``python ARGV...`` with ``env`` on top of this
        process's environment, its output in ``log``. Where the kernel's rank plan put the rank on
        another node of a cluster, the kernel starts it there (its own ``CUDA_VISIBLE_DEVICES`` and
        threads); else it is a child of this worker. Returns what ``subprocess.Popen`` would (a
        handle with ``poll()``, ``wait(timeout)``, ``kill()`` and ``returncode`` for a remote rank)."""
        import subprocess
        import sys

        ranks = (self.distributed or {}).get("ranks") or []
        here = ranks[0].get("node") if ranks else None
        there = ranks[rank].get("node") if 0 <= rank < len(ranks) else None
        if there is not None and there != here and self._services is not None and hasattr(self._services, "start_rank"):
            return self._services.start_rank(self.job_id, rank, argv, env, str(log))
        with open(log, "wb") as out:
            return subprocess.Popen([sys.executable, *argv], env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    # -- what the runner reports --

    def progress(self, step: float, total: float | None = None, message: str | None = None, **fields: Any) -> None:
        """Report progress: ``step`` of ``total`` with an optional message and numbers (loss, tokens/s)."""
        if isinstance(step, bool) or not isinstance(step, int | float):
            raise TypeError(f"progress step must be a number, got {step!r}")
        body = {"step": step, "total": total, "message": message, "fields": {k: _plain(v) for k, v in fields.items()} if fields else {}}
        validate_body("job.progress", body)  # a wrong type fails here, in the runner, not silently in the kernel
        self._emit("progress", "job.progress", body)

    def metric(self, name: str, value: float, step: int | None = None) -> None:
        """Record one named number, optionally at a step."""
        body = _body(JobMetric(name=name, value=float(value), step=step))
        validate_body("job.metric", body)
        self._emit("metric", "job.metric", body)

    def artifact(self, path: str | Path, kind: str = "file", **meta: Any) -> None:
        """Announce a file or directory the job produced. A ``checkpoint`` (a model directory) is
        registered by the kernel as an artifact: its content hash, size and ``llmos.json`` go with
        the announcement (``llmos artifacts``)."""
        meta = {k: _plain(v) for k, v in meta.items()}
        if kind == "checkpoint" and Path(path).exists():
            from llmos.artifacts import describe

            meta.update(describe(path))
        body = JobArtifact(path=str(Path(path).resolve()), kind=kind, meta=meta)
        self._emit("artifact", "job.artifact", _body(body))

    def emit(self, suffix: str, msg: Any) -> None:
        """Send any registered message type as an event on ``job.<id>.<suffix>``."""
        if not suffix or "." in suffix:
            raise ValueError(f"topic suffix {suffix!r} must be one non-empty part without '.'")
        type_name, body = type_name_of(msg), _body(msg)
        validate_body(type_name, body)
        self._emit(suffix, type_name, body)

    # -- services: answer requests routed by the kernel --

    def register_service(self, name: str, version: str = "") -> None:
        """Answer requests to service ``name`` (``client.call(name, ...)``) from this job, one replica of it. ``version`` names
        what this replica serves (a model's path): the kernel refuses a replica whose version
        differs from the running replicas' of the same name, and ends its job saying why."""
        from llmos.protocol import ServiceRegister

        self._bus().send_control(ServiceRegister(worker_id=self._services.worker_id, name=name, version=version))

    def next_request(self, timeout: float | None = None) -> Any:
        """The next :class:`~llmos.protocol.ServiceCall` (``request_id``, ``body``), or None after ``timeout``."""
        import queue

        try:
            return self._bus().calls.get(timeout=timeout)
        except queue.Empty:
            return None

    def respond(self, request_id: str, body: dict[str, Any] | None = None, *, done: bool = True, error: str | None = None, code: int | None = None) -> None:
        """Send (a piece of) the answer to a request; ``done`` ends it, ``error`` fails it."""
        from llmos.protocol import ServiceResponse

        if self._held is not None:
            self._held.append({"request_id": request_id, "body": body or {}, "done": done, "error": error, "code": code})
            return
        self._bus().send_control(ServiceResponse(request_id=request_id, body=body or {}, done=done, error=error, code=code))

    @contextlib.contextmanager
    def responding_together(self) -> Iterator[None]:
        """Hold what :meth:`respond` sends inside the block and send it as one message when the
        block ends (the kernel hands each caller its part in one message): a batching service's
        step answers all its sequences with one wake-up of the kernel and of each caller, not one
        per sequence. Nested blocks join the outer one."""
        from llmos.protocol import ServiceResponses

        if self._held is not None:
            yield
            return
        self._held = held = []
        try:
            yield
        finally:
            self._held = None
            if len(held) == 1:
                self.respond(**held[0])
            elif held:
                self._bus().send_control(ServiceResponses(responses=held))

    def request_cancelled(self, request_id: str) -> bool:
        """True once the caller of ``request_id`` went away (stop working on it)."""
        return request_id in self._bus().cancelled_calls

    def send_to_kernel(self, msg: Any) -> None:
        """Send a control message to the kernel (the kernel decides whether this job may)."""
        self._bus().send_control(msg)

    def _bus(self) -> Any:
        if self._services is None:
            raise LlmosError("this context is not connected to a kernel")
        return self._services

    # -- models --

    def load_model(self, path: str | Path, device: Any = None, dtype: Any = None) -> Any:
        """Load a model through the plugins' ``llmos_load_model`` hook (the first that knows its format)."""
        if self._model_loader is None:
            raise LlmosError("no model loader in this context")
        model = self._model_loader(str(path), device, dtype)
        if model is None:
            raise LlmosError(f"no plugin can load a model from {path}")
        return model

    # -- cancellation --

    @property
    def cancelled(self) -> bool:
        """True once the kernel asked this job to stop; long loops should check it and return."""
        return self._cancel.is_set()

    @property
    def preempted(self) -> bool:
        """True when the stop asked for is a preemption: save what resuming needs, then return;
        the job is queued again and its next attempt (same ``workdir``) should resume."""
        return self.cancelled and (self.cancel_reason or "").startswith("preempted")

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early if the job is cancelled; returns ``cancelled``."""
        return self._cancel.wait(timeout)

    def sleep(self, seconds: float) -> bool:
        """Like :func:`time.sleep` but returns early (True) when cancelled."""
        deadline = time.monotonic() + max(0.0, seconds)
        while not self._cancel.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._cancel.wait(min(left, 0.5))
        return True


_body = encode_body


__all__ = ["JobContext", "make_bus_logger"]
