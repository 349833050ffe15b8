"""Services: the router that carries calls to a service's replicas and their answers back (the
Majordomo pattern), and the policy that restarts a crashed service or quarantines it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from llmos.errors import ProtocolError, ServiceError, ServiceUnavailable, ValidationError
from llmos.kernel.bus import Bus
from llmos.kernel.control import Handler, Request
from llmos.kernel.store import JobRecord
from llmos.kernel.supervisor import WorkerProc
from llmos.protocol import (
    ServiceCall,
    ServiceCancel,
    ServiceQuarantined,
    ServiceRegister,
    ServiceRequest,
    ServiceResponse,
    ServiceResponses,
    ServicesReply,
    ServicesRequest,
)

log = structlog.get_logger("llmos.kernel")

__all__ = ["RestartPolicy", "ServiceRouter"]


@dataclass(slots=True)
class Call:
    caller: bytes  # the client's identity
    worker: str  # the replica's worker id
    service: str


class ServiceRouter:
    """Which workers answer for which service names, and the calls in flight between them."""

    def __init__(self, bus: Bus, workers: Mapping[str, WorkerProc], on_register: Callable[[WorkerProc, str], None] | None = None,
                 on_refused: Callable[[WorkerProc, str], None] | None = None) -> None:
        self.bus = bus
        self.workers = workers
        self.on_register = on_register  # a replica answers now (a pipeline's service stage is serving)
        self.on_refused = on_refused  # a replica that may not join its name (it serves something else): its job ends
        self.versions: dict[str, str] = {}  # replica worker id -> what it serves
        self.replicas: dict[str, list[str]] = {}  # name -> replica worker ids
        self.calls: dict[str, Call] = {}  # request id -> the call

    def handlers(self) -> dict[type, Handler]:
        return {
            ServiceRegister: self.register,
            ServiceRequest: self.request,
            ServiceResponse: self.response,
            ServiceResponses: self.responses,
            ServiceCancel: self.cancel,
            ServicesRequest: self.list,
        }

    def _alive(self, name: str) -> list[str]:
        workers = self.workers
        return [w for w in self.replicas.get(name, []) if w in workers and workers[w].alive]

    def register(self, req: Request) -> None:
        msg: ServiceRegister = req.msg
        worker = self.workers.get(msg.worker_id)
        if worker is None or req.identity != msg.worker_id.encode() or worker.job_id is None:
            raise ProtocolError(f"service.register from {msg.worker_id!r}, which is not a worker running a job")
        if not msg.name or " " in msg.name:
            raise ValidationError(f"service name {msg.name!r} must be non-empty without spaces")
        others = {self.versions.get(w, "") for w in self._alive(msg.name) if w != worker.id}
        if msg.version and others and others != {msg.version}:
            serving = ", ".join(sorted(v or "?" for v in others))
            jobs = ", ".join(str(self.workers[w].job_id) for w in self._alive(msg.name))
            why = (f"service {msg.name!r} already serves {serving} (jobs {jobs}); a replica of {msg.version} may not join it: "
                   f"stop those first (llmos cancel), serve under another name, or use llmos serve --replace")
            if self.on_refused is not None:
                self.on_refused(worker, why)
            raise ValidationError(why, field="name")
        if msg.version:
            self.versions[worker.id] = msg.version
        replicas = self.replicas.setdefault(msg.name, [])
        if worker.id not in replicas:
            replicas.append(worker.id)
        worker.services.add(msg.name)
        if self.on_register is not None:
            self.on_register(worker, msg.name)
        log.info("service_registered", service=msg.name, worker=worker.id, job_id=worker.job_id, replicas=len(replicas))

    def request(self, req: Request) -> None:
        """Route a call to the replica with the fewest calls in flight; it answers the caller."""
        msg: ServiceRequest = req.msg
        replicas = self._alive(msg.service)
        if not replicas:
            running = ", ".join(sorted(n for n, r in self.replicas.items() if r)) or "none"
            raise ServiceUnavailable(f"no service named {msg.service!r} is running (running services: {running})", service=msg.service)
        load = dict.fromkeys(replicas, 0)
        for call in self.calls.values():
            if call.worker in load:
                load[call.worker] += 1
        worker_id = min(replicas, key=load.__getitem__)
        request_id = req.parent_id or ""
        self.calls[request_id] = Call(req.identity, worker_id, msg.service)
        self.bus.send(worker_id.encode(), ServiceCall(request_id=request_id, body=msg.body))

    def response(self, req: Request) -> None:
        msg: ServiceResponse = req.msg
        call = self.calls.get(msg.request_id)
        if call is None or call.worker.encode() != req.identity:
            return  # the caller cancelled or is gone
        if msg.done or msg.error:
            del self.calls[msg.request_id]
        self.bus.send(call.caller, msg, msg.request_id)

    def responses(self, req: Request) -> None:
        """A replica's step for its whole batch: each caller gets its own items in one message
        (a single item as a plain service.response)."""
        msg: ServiceResponses = req.msg
        by_caller: dict[bytes, list[dict[str, Any]]] = {}
        calls = self.calls
        if not all(_response_item(item) for item in msg.responses):  # checked whole first: nothing half-routed
            raise ProtocolError("each item of service.responses is a map of request_id (str), body (map), done (bool), error (str or nil), code (int or nil)")
        for item in msg.responses:
            call = calls.get(item["request_id"])
            if call is None or call.worker.encode() != req.identity:
                continue  # the caller cancelled or is gone
            if item.get("done") or item.get("error"):
                del calls[item["request_id"]]
            by_caller.setdefault(call.caller, []).append(item)
        for caller, items in by_caller.items():
            if len(items) == 1:
                item = items[0]
                one = ServiceResponse(request_id=item["request_id"], body=item.get("body") or {}, done=bool(item.get("done")), error=item.get("error"),
                                      code=item.get("code"))
                self.bus.send(caller, one, one.request_id)
            else:
                self.bus.send(caller, ServiceResponses(responses=items))

    def cancel(self, req: Request) -> None:
        msg: ServiceCancel = req.msg
        call = self.calls.get(msg.request_id)
        if call is not None and call.caller == req.identity:
            del self.calls[msg.request_id]
            self.bus.send(call.worker.encode(), msg)

    def list(self, req: Request) -> ServicesReply:
        out = []
        for name in sorted(self.replicas):
            alive = self._alive(name)
            if alive:
                out.append({
                    "name": name,
                    "replicas": [{"worker": w, "job_id": self.workers[w].job_id, "pid": self.workers[w].pid, "version": self.versions.get(w, ""),
                                  "node": self.workers[w].node} for w in alive],
                    "in_flight": sum(1 for c in self.calls.values() if c.service == name),
                })
        return ServicesReply(services=out)

    def caller_gone(self, identity: bytes) -> None:
        """A caller disconnected mid-stream: cancel its calls so the replicas free their slots."""
        for request_id, call in list(self.calls.items()):
            if call.caller == identity:
                del self.calls[request_id]
                self.bus.send(call.worker.encode(), ServiceCancel(request_id=request_id))

    def drop_replica(self, worker: WorkerProc, why: str, *, stopping: bool = False) -> None:
        """A replica is gone: its calls in flight fail at their callers, never hang.

        ``stopping``: its job was stopped on request. The runner answers what it holds with "is
        stopping", but those answers travel on the control socket and the job's end on the event
        socket, so the end may be read first; the kernel then says the same thing for it."""
        for name in worker.services:
            if worker.id in self.replicas.get(name, []):
                self.replicas[name].remove(worker.id)
        worker.services.clear()
        self.versions.pop(worker.id, None)
        for request_id, call in list(self.calls.items()):
            if call.worker == worker.id:
                del self.calls[request_id]
                error = f"service {call.service!r} is stopping" if stopping else f"service {call.service!r}: its replica stopped ({why})"
                self.bus.send(call.caller, ServiceResponse(request_id=request_id, done=True, error=error, code=ServiceError.code), request_id)


_ITEM_KEYS = frozenset({"request_id", "body", "done", "error", "code"})


def _response_item(item: Any) -> bool:
    """Whether one item of a service.responses batch has the fields of a service.response."""
    return (type(item) is dict and type(item.get("request_id")) is str and item.keys() <= _ITEM_KEYS
            and type(item.get("body", {})) is dict and type(item.get("done", False)) is bool
            and type(item.get("error")) in (str, type(None)) and type(item.get("code")) in (int, type(None)))


@dataclass(slots=True)
class Restart:
    due: float  # time.monotonic()
    kind: str
    params: dict[str, Any]
    resources: dict[str, Any]


class RestartPolicy:
    """A service's job that fails is started again after a backoff (1, 2, 4... s, capped), until
    it fails more than ``max_restarts`` times within ``restart_window`` seconds.

    Then: an ``autostart`` service is the kind itself, and its crashes quarantine the kind (it may
    not be submitted until plugins are reloaded). A service people start with parameters (``serve
    MODEL``) is counted per instance: one bad model stops being restarted without taking the kind
    from everyone else."""

    def __init__(self, settings: Mapping[str, Any], emit: Callable[[str, Any], None]) -> None:
        self.max_restarts = int(settings["max_restarts"])
        self.window = float(settings["restart_window"])
        self.backoff_max = float(settings["restart_backoff_max"])
        self.emit = emit
        self.quarantined: dict[str, str] = {}  # kind -> why
        self._crashes: dict[str, list[float]] = {}
        self.restarts: list[Restart] = []

    def reset(self) -> None:
        """Plugins were reloaded: every service gets a fresh start."""
        self.quarantined.clear()
        self._crashes.clear()

    def kinds_restarting(self) -> set[str]:
        return {r.kind for r in self.restarts}

    def failed(self, job: JobRecord, plugin: str, *, autostart: bool) -> bool:
        """Count a failure of the service ``job``; schedule its restart or give it up. Returns
        True when this quarantined the kind (the registry must refuse it)."""
        now = time.monotonic()
        key = job.kind if autostart else f"{job.kind} {json.dumps(job.params, sort_keys=True, default=str)}"
        crashes = [t for t in self._crashes.get(key, []) if now - t <= self.window] + [now]
        self._crashes[key] = crashes
        if len(crashes) > self.max_restarts:
            info = ServiceQuarantined(
                service=job.kind, plugin=plugin, crashes=len(crashes), window=self.window, reason=job.reason or "", job_id=None if autostart else job.id
            )
            if not autostart:
                self._crashes.pop(key, None)  # a later submit of the same instance starts afresh
                self.emit("kernel.service_quarantined", info)
                log.warning("service_instance_given_up", service=job.kind, job_id=job.id, crashes=len(crashes))
                return False
            self.quarantined[job.kind] = f"service {job.kind!r} failed {len(crashes)} times in {self.window:g}s (last: {job.reason}); reload plugins to try again"
            self.emit("kernel.service_quarantined", info)
            log.warning("service_quarantined", service=job.kind, crashes=len(crashes))
            return True
        delay = min(self.backoff_max, 2.0 ** (len(crashes) - 1))
        self.restarts.append(Restart(now + delay, job.kind, job.params, job.resources))
        log.info("service_restart_scheduled", service=job.kind, delay=delay, crashes=len(crashes))
        return False

    def due(self, now: float) -> list[Restart]:
        """The restarts whose time has come (taken off the list), not of quarantined kinds."""
        if not self.restarts:
            return []
        due = [r for r in self.restarts if r.due <= now]
        if due:
            self.restarts = [r for r in self.restarts if r.due > now]
        return [r for r in due if r.kind not in self.quarantined]
