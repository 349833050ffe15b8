"""The worker process: runs one job for the kernel, then exits.

``python -m llmos.kernel.worker --worker-id W ...`` starts one worker directly (``spawn``).
``python -m llmos.kernel.worker --zygote ...`` starts the zygote: a fresh interpreter that imports
llmos and the plugins once, holds no ZeroMQ context and no threads, and forks a worker for each
line ``spawn <worker-id> <log-path>`` on its stdin. It forks twice so that the worker is
re-parented to the kernel (a child subreaper), which then reaps it with ``waitpid``.

A worker's bus thread owns both sockets (one socket, one thread): a DEALER for ready, heartbeats,
assignments and cancels; a PUSH to the kernel's ingest socket for the job's events and, last,
its ``worker.job_done`` — on the same socket, so the kernel sees every event before the end.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import logging
import os
import queue
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import msgpack
import structlog
import zmq

from llmos.context import JobContext
from llmos.errors import JobCancelled
from llmos.kernel.logs import configure_logging
from llmos.kernel.plugins import Registry, call_broadcast, load_plugins
from llmos.keys import ClientKey, apply_client_key, load_client_key
from llmos.plugin import resolve_runner
from llmos.protocol import (
    ITEM_TS_KEY,
    JobDone,
    RankExited,
    RankStart,
    RankStop,
    ServiceCall,
    ServiceCancel,
    WorkerAssign,
    WorkerCancel,
    WorkerExit,
    WorkerHeartbeat,
    WorkerReady,
    decode_control,
    encode_body,
    encode_control,
    event_header,
    item_head,
    pack_item,
    packb,
    storable_problem,
)

log = structlog.get_logger(__name__)

_MAX_BATCH = 256
_ITEM_PACKER = msgpack.Packer(use_bin_type=True, autoreset=True)

_MAX_BATCH_BYTES = 1 << 20  # a frame holds at most about this much (plus one item)
_MAX_ITEM_BYTES = 8 << 20  # an event larger than this is replaced by an error record


class _Terminated(BaseException):
    """Raised in the runner's thread by SIGTERM: the kernel is stopping this job."""


class Bus:
    """The worker's bus thread: owns the sockets; other threads hand it events through a deque."""

    def __init__(self, worker_id: str, control: str, ingest: str, kernel_pid: int, heartbeat: float) -> None:
        self.worker_id = worker_id
        self.kernel_pid = kernel_pid
        self.heartbeat = heartbeat
        self.job_id: int | None = None
        self.assignments: queue.Queue[WorkerAssign | None] = queue.Queue()
        self.cancel_event = threading.Event()
        self.cancel_reason: str | None = None
        self._outbox: collections.deque[tuple[str, str, dict[str, Any], float]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._wake_pending = False
        self._closing = False
        self._counter = 0
        self._heads: dict[tuple[str, str], bytes] = {}  # (suffix, type) -> packed item start, per job
        self.ctx: JobContext | None = None
        self.calls: queue.Queue[ServiceCall] = queue.Queue()
        self.cancelled_calls: set[str] = set()
        self.rank_exits: dict[tuple[int, int], RankExited] = {}  # ranks started through the kernel that ended
        self._control_out: collections.deque[Any] = collections.deque()
        self._ctx = zmq.Context()
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.IDENTITY, worker_id.encode())
        self._dealer.setsockopt(zmq.LINGER, 2000)
        key = worker_key()
        if key is not None:
            apply_client_key(self._dealer, key)
        self._dealer.connect(control)
        self._push = self._ctx.socket(zmq.PUSH)
        if key is not None:
            apply_client_key(self._push, key)
        self._push.setsockopt(zmq.SNDHWM, 0)
        # Exit only once the kernel has every event (a minute at most if the kernel is gone).
        self._push.setsockopt(zmq.LINGER, 60_000)
        self._push.connect(ingest)
        self._thread = threading.Thread(target=self._loop, name="llmos-bus", daemon=True)

    def start(self) -> None:
        self._send_control(WorkerReady(worker_id=self.worker_id, pid=os.getpid()))
        self._thread.start()

    # -- called from any thread --

    def emit(self, suffix: str, type_name: str, body: dict[str, Any]) -> None:
        """Queue an event on ``job.<id>.<suffix>``."""
        self._outbox.append((suffix, type_name, body, time.time()))
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def send_control(self, msg: Any) -> None:
        """Queue a control message (service registration, responses) for the bus thread."""
        self._control_out.append(msg)
        self.emit_wake()

    def start_rank(self, job_id: int, rank: int, argv: list[str], env: dict[str, str], log: str) -> RemoteRank:
        """Have the kernel start a rank of this job on the node its rank plan gave it."""
        self.rank_exits.pop((job_id, rank), None)
        self.send_control(RankStart(job_id=job_id, rank=rank, argv=list(argv), env=dict(env), log=log))
        return RemoteRank(self, job_id, rank)

    def close(self, timeout: float = 10.0) -> None:
        """Send everything queued, then stop the thread and close the sockets (waiting for delivery)."""
        self._closing = True
        self.emit_wake()
        self._thread.join(timeout)

    def emit_wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # -- the thread --

    def _send_control(self, msg: Any) -> None:
        self._dealer.send_multipart(encode_control(msg, self.worker_id))

    def _flush(self) -> None:
        outbox = self._outbox
        sender = self.worker_id
        heads = self._heads
        pack = _ITEM_PACKER.pack
        while outbox:
            items: list[bytes] = []
            size = 0
            while outbox and len(items) < _MAX_BATCH and size < _MAX_BATCH_BYTES:
                suffix, type_name, body, ts = outbox.popleft()
                self._counter += 1
                # [topic, header, body] packed by hand around the parts that never change.
                head = heads.get((suffix, type_name))
                if head is None:
                    head = heads[(suffix, type_name)] = item_head(f"job.{self.job_id}.{suffix}", type_name, sender)
                try:
                    item = head + pack(f"{sender}-{self._counter}") + ITEM_TS_KEY + pack(ts) + pack(body)
                except Exception as exc:  # an unencodable value must not stop the bus thread
                    item = self._replacement(f"job.{self.job_id}.{suffix}", self._header(type_name, ts), type_name, f"could not be encoded: {type(exc).__name__}: {exc}")
                if len(item) > _MAX_ITEM_BYTES:
                    item = self._replacement(f"job.{self.job_id}.{suffix}", self._header(type_name, ts), type_name, f"was {len(item)} bytes; at most {_MAX_ITEM_BYTES} go on the bus")
                items.append(item)
                size += len(item)
            self._push.send(packb(items))

    def _header(self, type_name: str, ts: float) -> dict[str, Any]:
        return event_header(type_name, f"{self.worker_id}-{self._counter}", ts, self.worker_id)

    @staticmethod
    def _replacement(topic_name: str, header: dict[str, Any], type_name: str, why: str) -> bytes:
        """A log record in place of an event that cannot travel (so the loss is visible)."""
        header = dict(header, type="job.log")
        topic_name = topic_name.rsplit(".", 1)[0] + ".log"
        body = {"level": "error", "event": "event_dropped", "logger": "llmos.worker", "fields": {"type": type_name, "why": why[:500]}}
        return pack_item(topic_name, header, body)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_beat = time.monotonic() + self.heartbeat  # WorkerReady was the first sign of life
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self._send_control(WorkerHeartbeat(worker_id=self.worker_id, job_id=self.job_id))
                next_beat = now + self.heartbeat
                if os.getppid() != self.kernel_pid:
                    # The kernel is gone: nobody will collect this job. Leave with the process group.
                    os.killpg(os.getpgrp(), signal.SIGKILL)
            events = dict(poller.poll(max(1, int((next_beat - now) * 1000))))
            if self._wake_r in events:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                self._wake_pending = False
                # Control first: a service's last replies ("is stopping") reach the kernel before
                # the job's end, which would otherwise fail those requests as "replica stopped".
                while self._control_out:
                    self._send_control(self._control_out.popleft())
                self._flush()
            if self._dealer in events:
                while True:
                    try:
                        frames = self._dealer.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_control(frames)
            if self._closing:
                self._flush()
                self._push.close()  # LINGER waits for delivery
                self._dealer.close()
                self._ctx.term()
                return

    def _on_control(self, frames: list[bytes]) -> None:
        try:
            _, msg = decode_control(frames)
        except Exception as exc:
            log.warning("bad_control_message", error=str(exc))
            return
        if isinstance(msg, WorkerAssign):
            self.job_id = msg.job_id
            self._heads.clear()
            self.assignments.put(msg)
        elif isinstance(msg, WorkerCancel):
            if msg.job_id == self.job_id:
                self.cancel_reason = msg.reason
                if self.ctx is not None:
                    self.ctx.cancel_reason = msg.reason
                self.cancel_event.set()
        elif isinstance(msg, WorkerExit):
            self.assignments.put(None)
        elif isinstance(msg, ServiceCall):
            self.calls.put(msg)
        elif isinstance(msg, ServiceCancel):
            self.cancelled_calls.add(msg.request_id)
        elif isinstance(msg, RankExited):
            self.rank_exits[(msg.job_id, msg.rank)] = msg


class RemoteRank:
    """A rank the kernel started on another node, as much of ``subprocess.Popen`` as a runner uses
    to watch its ranks: ``poll()``, ``wait(timeout)``, ``kill()``, ``returncode``."""

    def __init__(self, bus: Bus, job_id: int, rank: int) -> None:
        self.bus, self.job_id, self.rank = bus, job_id, rank
        self.returncode: int | None = None
        self.reason: str | None = None

    def poll(self) -> int | None:
        done = self.bus.rank_exits.get((self.job_id, self.rank))
        if done is not None and self.returncode is None:
            self.returncode = done.code if done.code is not None else -signal.SIGKILL
            self.reason = done.reason
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"rank {self.rank}", timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            self.bus.send_control(RankStop(job_id=self.job_id, rank=self.rank))


def worker_key() -> ClientKey | None:
    """The CURVE key a remote worker reaches the kernel's TCP endpoints with (``LLMOS_WORKER_KEY``,
    set by the kernel's cluster backend), or None for a local worker on ipc."""
    text = os.environ.pop("LLMOS_WORKER_KEY", "")
    return load_client_key(json.loads(text)) if text else None


class _BusLogHandler(logging.Handler):
    """Standard-library log records of the job's libraries, forwarded as job.log events."""

    def __init__(self, bus: Bus) -> None:
        super().__init__(logging.WARNING)
        self.bus = bus

    def emit(self, record: logging.LogRecord) -> None:
        if self.bus.job_id is None:
            return
        try:
            self.bus.emit("log", "job.log", {"level": record.levelname.lower(), "event": record.getMessage(), "logger": record.name, "fields": {}})
        except Exception:
            pass




def check_inputs(inputs: dict[str, Any]) -> str | None:
    """None if every input artifact's files still hash to its id, else what is wrong."""
    from llmos.artifacts import tree_hash

    for name, art in inputs.items():
        try:
            digest = tree_hash(art["path"])[0]
        except FileNotFoundError:
            return f"input {name}: artifact {art['id'][:12]} is missing: {art['path']} is gone"
        if digest != art["id"]:
            return f"input {name}: artifact {art['id'][:12]} was altered: {art['path']} now hashes to {digest[:12]}; it is not used"
    return None


def run_job(bus: Bus, registry: Registry, assign: WorkerAssign) -> JobDone:
    """Run one assignment to its end and say how it ended (never raises)."""
    os.environ.update(assign.env)
    workdir = Path(assign.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # relative paths a runner writes land in its own directory
    entry = registry.kinds.get(assign.kind)
    if entry is None:
        return JobDone(job_id=assign.job_id, attempt=assign.attempt, outcome="failed", error=f"job kind {assign.kind!r} is not registered in this worker")
    try:
        params = entry.spec.params(**assign.params)
    except Exception as exc:
        return JobDone(job_id=assign.job_id, attempt=assign.attempt, outcome="failed", error=f"bad parameters: {exc}")
    problem = check_inputs(assign.inputs)
    if problem:
        return JobDone(job_id=assign.job_id, attempt=assign.attempt, outcome="failed", error=problem)
    ctx = JobContext(
        job_id=assign.job_id,
        kind=assign.kind,
        params=params,
        attempt=assign.attempt,
        resources=assign.resources,
        placement=assign.placement,
        workdir=workdir,
        emit=bus.emit,
        cancel_event=bus.cancel_event,
    )
    ctx.cancel_reason = bus.cancel_reason
    ctx._services = bus
    ctx._model_loader = lambda path, device, dtype: registry.pm.hook.llmos_load_model(path=path, device=device, dtype=dtype)
    bus.ctx = ctx
    outcome, error, tb, result = "succeeded", None, None, None
    runner = None
    call_broadcast(registry, "llmos_job_starting", ctx=ctx)
    try:
        runner = resolve_runner(entry.spec.runner)()
        if hasattr(runner, "setup"):
            runner.setup(ctx)
        result = runner.run(ctx)
    except (_Terminated, JobCancelled, KeyboardInterrupt):
        outcome = "cancelled"
    except BaseException as exc:
        if bus.cancel_event.is_set():
            outcome = "cancelled"
        else:
            outcome, error, tb = "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()
    finally:
        if runner is not None and hasattr(runner, "teardown"):
            try:
                runner.teardown(ctx)
            except BaseException as exc:
                if outcome == "succeeded":
                    outcome, error, tb = "failed", f"teardown raised {type(exc).__name__}: {exc}", traceback.format_exc()
    if outcome == "succeeded" and bus.cancel_event.is_set():
        outcome = "cancelled"
    if outcome == "succeeded":
        problem = storable_problem(result)
        if problem:
            outcome, error, result = "failed", f"the runner's result cannot be stored: {problem}", None
    else:
        result = None
    if error:
        ctx.log.error("runner_failed", error=error, traceback=tb)
    call_broadcast(registry, "llmos_job_finished", ctx=ctx, outcome=outcome, error=error)
    return JobDone(job_id=assign.job_id, attempt=assign.attempt, outcome=outcome, result=result, error=error, traceback=tb)


def worker_main(args: argparse.Namespace, registry: Registry | None = None) -> int:
    random.seed()
    if registry is None:  # else forked from the zygote, which configured logging and loaded plugins
        configure_logging(json_lines=True, level=args.log_level)
        registry = load_plugins()
    bus = Bus(args.worker_id, args.control, args.ingest, args.kernel_pid, args.heartbeat)

    def on_term(signum: int, frame: Any) -> None:
        bus.cancel_event.set()
        if bus.job_id is None:
            os._exit(0)
        raise _Terminated()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger().addHandler(_BusLogHandler(bus))
    bus.start()
    assign = bus.assignments.get()
    if assign is None:
        bus.close()
        return 0
    log.info("job_assigned", job_id=assign.job_id, kind=assign.kind, attempt=assign.attempt)
    try:
        done = run_job(bus, registry, assign)
    except _Terminated:
        done = JobDone(job_id=assign.job_id, attempt=assign.attempt, outcome="cancelled")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    bus.emit("done", "worker.job_done", encode_body(done))
    bus.close()
    log.info("job_done", job_id=assign.job_id, outcome=done.outcome)
    return 0


def zygote_main(args: argparse.Namespace) -> int:
    """Fork workers on request; never touches ZeroMQ, never starts a thread."""
    configure_logging(json_lines=True, level=args.log_level)  # once, for every worker it forks
    registry = load_plugins()
    # What the zygote imported is shared with every worker, copy-on-write: keep the collector from
    # writing to those objects in the children (a collection touches every object it tracks, and
    # each page it touches is copied). Workers collect only what they make themselves.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    os.write(1, b"ready\n")
    while True:
        line = stdin.readline()
        if not line:
            return 0
        parts = line.decode().split()
        if len(parts) < 3 or parts[0] != "spawn":
            continue
        _, worker_id, log_path = line.decode().rstrip("\n").split(" ", 2)
        pid = os.fork()
        if pid == 0:
            try:
                middle = os.getpid()
                grandchild = os.fork()
                if grandchild == 0:
                    _become_worker(args, worker_id, log_path, registry, middle)
                os.write(1, f"{worker_id} {grandchild}\n".encode())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def _become_worker(args: argparse.Namespace, worker_id: str, log_path: str, registry: Registry, middle: int) -> None:
    code = 1
    try:
        # Wait until the short-lived middle process has exited and we belong to the kernel.
        deadline = time.monotonic() + 5
        while os.getppid() == middle and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.setsid()
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the zygote's buffered stdin must not be read here
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        args.worker_id = worker_id
        code = worker_main(args, registry)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llmos.kernel.worker", description="An llmos worker (started by the kernel).")
    parser.add_argument("--zygote", action="store_true", help="fork workers on request instead of running one")
    parser.add_argument("--worker-id", default="")
    parser.add_argument("--control", required=True)
    parser.add_argument("--ingest", required=True)
    parser.add_argument("--kernel-pid", type=int, required=True)
    parser.add_argument("--heartbeat", type=float, default=0.25)
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.zygote:
        return zygote_main(args)
    if not args.worker_id:
        print("--worker-id is required", file=sys.stderr)
        return 2
    if os.getpgrp() != os.getpid():
        os.setsid()
    return worker_main(args)


if __name__ == "__main__":
    sys.exit(main())
