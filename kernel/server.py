"""The kernel process: one thread, one poll loop over the bus sockets, signals and timers.

Each loop turn: read what arrived (signals, the zygote, reaped children, ingest events, control
requests), act on timers (cancel stages, timeouts, heartbeats), schedule, then commit the turn's
writes in one SQLite transaction, and only then publish its events and send its replies — so
nothing is announced before it is durable.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import structlog
import zmq

from llmos import __version__
from llmos.config import Settings
from llmos.errors import (
    ConfigError,
    JobNotFound,
    JobRejected,
    KernelError,
    LlmosError,
    ProtocolError,
    ValidationError,
)
from llmos.kernel import jobs as job_states
from llmos.kernel import scheduler
from llmos.kernel.devices import DeviceTable, parse_fake_gpus
from llmos.kernel.plugins import Registry, load_plugins, ranks_of
from llmos.kernel.statedir import (
    KernelLocked,
    StateDir,
    holder_pid,
    make_private_dir,
    runtime_dir_for,
)
from llmos.kernel.store import JobRecord, Store
from llmos.kernel.supervisor import (
    Launcher,
    WorkerProc,
    become_subreaper,
    describe_status,
    signal_name,
)
from llmos.params import schema_of
from llmos.paths import free_port
from llmos.plugin import Resources
from llmos.protocol import (
    END_STATES,
    ITEM_HEAD,
    JOB_STATES,
    MAX_FRAME_BYTES,
    STAMPED_HEAD,
    AcctReply,
    AcctRequest,
    CancelRequest,
    DeviceMetrics,
    DevicesReply,
    DevicesRequest,
    ErrorReply,
    JobDone,
    JobLog,
    JobReply,
    JobRequest,
    JobsReply,
    JobsRequest,
    JobStateChanged,
    JobUsage,
    KernelStarted,
    KernelStopping,
    OkReply,
    PluginsChanged,
    PluginsReloadReply,
    PluginsReloadRequest,
    PluginsReply,
    PluginsRequest,
    ReplayRequest,
    ServiceCall,
    ServiceCancel,
    ServiceQuarantined,
    ServiceRegister,
    ServiceRequest,
    ServiceResponse,
    ServicesReply,
    ServicesRequest,
    ShutdownRequest,
    StatusReply,
    StatusRequest,
    StreamHeadsReply,
    StreamHeadsRequest,
    SubmitRequest,
    UsageReport,
    WorkerAssign,
    WorkerCancel,
    WorkerExit,
    WorkerHeartbeat,
    WorkerReady,
    check_event_header,
    check_header,
    decode_body,
    encode_body,
    encode_control,
    make_header,
    pack_array,
    pack_item,
    replay_reply_frames,
    stamp,
    stamp_tail,
    storable_problem,
    stream_of,
    type_name_of,
    unpackb,
    validate_body,
)
from llmos.units import parse_size

log = structlog.get_logger("llmos.kernel")

_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_HARD_FRAME_LIMIT = 4 * MAX_FRAME_BYTES  # beyond this libzmq drops the peer; below it we answer MessageTooLarge


class Kernel:
    """The llmos kernel: bus, journal, device table, scheduler and supervisor in one loop."""

    def __init__(self, settings: Settings, state_dir: Path) -> None:
        self.settings = settings
        self.policy = scheduler.Policy.from_settings(settings)
        self.state_dir = state_dir
        self.started_at = time.time()
        self.stopping: str | None = None
        self.stats = {"events_journaled": 0, "bad_frames": 0, "requests": 0, "bad_requests": 0, "jobs_started": 0}
        self.jobs: dict[int, JobRecord] = {}  # pending and running, in memory
        self.workers: dict[str, WorkerProc] = {}
        self.worker_by_pid: dict[int, WorkerProc] = {}
        self._out_control: list[tuple[bytes, list[bytes]]] = []
        self._out_events: dict[str, list[bytes]] = {}  # stream -> stamped items, in order
        self._stream_seq: dict[str, int] = {}
        self._preempting: dict[int, int] = {}  # job being preempted -> the job it makes room for
        self._journaled: dict[str, int] = {}  # stream -> events of this turn already journaled
        self._schedule_needed = True
        self._ingest_more = False
        self._sigchld = False
        self._next_reap = 0.0
        self._fast_checks: dict[str, Any] = {}
        self.generation = 0
        self._service_crashes: dict[str, list[float]] = {}
        #: GPU submits that only the probe can answer (fit or never fit), answered when it ends.
        self._held_submits: list[tuple[bytes, SubmitRequest, str | None]] = []
        self._service_restarts: list[tuple[float, str, dict[str, Any], dict[str, Any]]] = []
        self.quarantined: dict[str, str] = {}
        self.services: dict[str, list[str]] = {}  # name -> replica worker ids
        self.calls: dict[str, tuple[bytes, str, str]] = {}  # request id -> (caller, worker, service)
        self._signals: list[int] = []
        self.statedir = StateDir(state_dir)
        self._probe: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ boot

    def boot(self) -> None:
        self.statedir.take()
        ks = self.settings["kernel"]
        self.runtime_dir = runtime_dir_for(self.state_dir, ks["runtime_dir"])
        make_private_dir(self.runtime_dir)
        self.endpoints = {
            "control": ks["control_endpoint"] or f"ipc://{self.runtime_dir}/control",
            "events": ks["events_endpoint"] or f"ipc://{self.runtime_dir}/events",
            "ingest": ks["ingest_endpoint"] or f"ipc://{self.runtime_dir}/ingest",
        }
        for url in self.endpoints.values():
            _check_endpoint(url)
        self.store = Store(self.state_dir / "llmos.db")
        self.seq = self.store.last_seq()
        self._ended_counts = {k: v for k, v in self.store.count_jobs().items() if k in END_STATES}
        self.registry: Registry = self._load_registry()
        ds = self.settings["devices"]
        cores = float(ds["cpus"]) or float(psutil.cpu_count() or 1)
        ram = parse_size(ds["memory"]) if ds["memory"] else psutil.virtual_memory().total
        self.devices = DeviceTable(cores, ram, parse_fake_gpus(ds["fake_gpus"]))
        if ds["probe_gpus"]:
            self._start_probe()
        self._open_sockets()
        self._install_signals()
        ws = self.settings["workers"]
        method = ws["start_method"]
        if method not in ("zygote", "spawn"):
            raise ConfigError(f"workers.start_method must be 'zygote' or 'spawn', got {method!r}")
        if method == "zygote" and not become_subreaper():
            method = "spawn"
        self.launcher = Launcher(
            method=method,
            control=self.endpoints["control"],
            ingest=self.endpoints["ingest"],
            heartbeat=float(ws["heartbeat_interval"]),
            log_level=ks["log_level"],
            worker_dir=self.state_dir / "workers",
        )
        if self.launcher.zygote_fd is not None:
            self.poller.register(self.launcher.zygote_fd, zmq.POLLIN)
        self._start_exporter()
        self._recover()
        self._autostart_services()
        self.emit("kernel.started", KernelStarted(version=__version__, pid=os.getpid()))
        self.store.commit()
        self._flush_out()
        self._write_kernel_file()
        log.info("kernel_ready", pid=os.getpid(), state_dir=str(self.state_dir), **self.endpoints, workers=method)

    def _load_registry(self) -> Registry:
        from llmos.kernel.cliutil import BUILTIN_COMMANDS
        from llmos.kernel.plugins import collect_commands

        registry = load_plugins(disabled=self._disabled_plugins())
        collect_commands(registry, set(BUILTIN_COMMANDS))  # so `plugins list` shows them
        return registry

    def _start_exporter(self) -> None:
        from llmos.kernel.metrics import Exporter

        self.exporter = Exporter(self)
        address = self.settings["monitor"]["exporter"]
        if not address:
            return
        try:
            self.exporter.start(address)
        except ConfigError as exc:
            if not self.settings["monitor"]["exporter_optional"]:
                raise
            log.warning("exporter_not_started", error=str(exc))

    def _disabled_plugins(self) -> list[str]:
        from llmos.kernel.plugins import disabled_plugins

        return disabled_plugins(self.state_dir)

    def _open_sockets(self) -> None:
        self.zctx = zmq.Context()
        self.control = self.zctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control.setsockopt(zmq.MAXMSGSIZE, _HARD_FRAME_LIMIT)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.SNDHWM, 100_000)
        self.control.setsockopt(zmq.RCVHWM, 100_000)
        self.ingest = self.zctx.socket(zmq.PULL)
        self.ingest.setsockopt(zmq.MAXMSGSIZE, _HARD_FRAME_LIMIT)
        self.ingest.setsockopt(zmq.RCVHWM, 100_000)
        self.ingest.setsockopt(zmq.LINGER, 0)
        self.pub = self.zctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, int(self.settings["kernel"]["pub_hwm"]))
        self.pub.setsockopt(zmq.LINGER, 0)
        for sock, name in ((self.control, "control"), (self.ingest, "ingest"), (self.pub, "events")):
            url = self.endpoints[name]
            if url.startswith("ipc://"):
                path = Path(url[len("ipc://"):])
                if path.exists():
                    path.unlink()  # a stale socket from a kernel that died; we hold the lock
            try:
                sock.bind(url)
            except zmq.ZMQError as exc:
                raise ConfigError(f"cannot bind the {name} endpoint {url}: {exc}", endpoint=url) from None
            if url.startswith("ipc://"):
                os.chmod(url[len("ipc://"):], 0o600)
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.ingest, zmq.POLLIN)

    def _install_signals(self) -> None:
        self._sig_r, self._sig_w = os.pipe()
        os.set_blocking(self._sig_r, False)
        os.set_blocking(self._sig_w, False)
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.poller.register(self._sig_r, zmq.POLLIN)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGCHLD:
            self._sigchld = True
        self._signals.append(signum)

    def _start_probe(self) -> None:
        self.devices.probing = True
        self._probe = subprocess.Popen(
            [sys.executable, "-m", "llmos.kernel.probe"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            # GPU indices in PCI bus order, NVML's order: the same numbers in CUDA_VISIBLE_DEVICES.
            env=dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID"),
        )
        self._probe_deadline = time.monotonic() + 60

    def _check_probe(self) -> None:
        proc = self._probe
        if proc is None or (proc.poll() is None and time.monotonic() < self._probe_deadline):
            return
        self._probe = None
        if proc.returncode is None:
            proc.kill()
        try:
            out = proc.stdout.read() if proc.stdout else b""
            result = json.loads(out or b"{}")
            gpus = result.get("gpus", [])
            source = result.get("source", "none")
            gpus = [g for g in gpus if isinstance(g, dict) and isinstance(g.get("index"), int)]
        except Exception:
            gpus, source = [], "none"
        self.devices.add_probed(gpus, source)
        log.info("devices_probed", source=source, gpus=len(gpus))
        self._schedule_needed = True
        self._fail_never_fitting()
        held, self._held_submits = self._held_submits, []
        for identity, msg, parent_id in held:
            try:
                self.reply(identity, self._on_submit(identity, msg), parent_id)
            except Exception as exc:
                self.reply_error(identity, exc, parent_id)

    def _fail_never_fitting(self) -> None:
        """Pending jobs that can never fit on this machine fail rather than wait forever (and
        block the queue): after a restart on a smaller machine, or once the GPU probe is done."""
        for job in list(self.jobs.values()):
            if job.state == "pending":
                why = self.devices.never_fits(Resources(**job.resources))
                if why:
                    self._end_job(job, "failed", f"the request can never fit: {why}", None, retry=False)

    def _write_kernel_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "version": __version__,
            "state_dir": str(self.state_dir),
            "started_at": self.started_at,
            **self.endpoints,
        }
        self.statedir.write_kernel_file(info)

    def _recover(self) -> None:
        """Jobs the previous kernel left unfinished: pending ones wait again; running ones died with it."""
        for job in self.store.unfinished_jobs():
            if job.state == "running":
                self._kill_orphan(job)
                job.placement = None
                if job.attempts - job.preemptions <= job.max_retries:
                    self.jobs[job.id] = job
                    self._transition(job, "pending", "kernel restarted; retrying", queued_at=time.time())
                else:
                    self.jobs[job.id] = job
                    self._end_job(job, "failed", "kernel restarted", None)
            else:
                self.jobs[job.id] = job
        if not self.devices.probing:
            self._fail_never_fitting()
        self.store.commit()

    def _account(self, worker: WorkerProc | None) -> None:
        """Record a try's usage once both its end and its worker's exit are known."""
        if worker is None or worker.attempt is None or len(worker.attempt) < 6 or worker.rusage is None:
            return
        job_id, attempt, started, ended, gpu_share, gpu_memory = worker.attempt  # type: ignore[misc]
        usage = worker.rusage
        cpu = usage.ru_utime + usage.ru_stime
        self.store.record_attempt(job_id, attempt, started, ended, cpu, usage.ru_maxrss * 1024, gpu_share * max(0.0, ended - started), gpu_memory)
        worker.attempt = None

    def _on_usage_report(self, identity: bytes, msg: UsageReport) -> None:
        worker = self.workers.get(identity.decode(errors="replace"))
        job = self.jobs.get(worker.job_id) if worker and worker.job_id is not None else None
        entry = self.registry.kinds.get(job.kind) if job is not None else None
        if entry is None or not getattr(entry.spec, "reports_usage", False):
            raise ProtocolError("usage reports come only from a service registered with reports_usage=True")
        self.devices.cpu.used = {k: v for k, v in msg.node.items() if isinstance(v, int | float)}
        self.emit("device.cpu.metrics", DeviceMetrics(used=self.devices.cpu.used))
        by_index = {g.index: g for g in self.devices.gpus if not g.fake}
        for sample in msg.gpus:
            dev = by_index.get(sample.get("index"))
            if dev is not None:
                dev.used = {k: v for k, v in sample.items() if k != "index" and isinstance(v, int | float)}
                self.emit(f"device.{dev.id}.metrics", DeviceMetrics(used=dev.used))
        factor = float(self.settings["monitor"]["gpu_overuse_stop"])
        for key, usage in msg.jobs.items():
            running = self.jobs.get(int(key)) if key.isdigit() else None
            if running is None or running.state != "running":
                continue  # it ended since the sample: skipped, not an error
            body = JobUsage(
                cpu_percent=float(usage.get("cpu_percent", 0.0)), rss=int(usage.get("rss", 0)),
                processes=int(usage.get("processes", 0)), gpu_memory=usage.get("gpu_memory"),
            )
            running.usage = encode_body(body)
            if body.gpu_memory is not None:
                running.peak_gpu_memory = max(running.peak_gpu_memory or 0, int(body.gpu_memory))
            self.emit(f"job.{running.id}.usage", body)
            self._check_gpu_overuse(running, body, factor)
        return None

    def _check_gpu_overuse(self, job: JobRecord, usage: JobUsage, factor: float) -> None:
        reserved = sum(g["memory"] for g in (job.placement or {}).get("gpus", []))
        if usage.gpu_memory is None or usage.gpu_memory <= reserved:
            return
        from llmos.units import format_size

        what = f"job {job.id} uses {format_size(usage.gpu_memory)} of GPU memory; it reserved {format_size(reserved)}"
        log.warning("gpu_memory_overuse", job_id=job.id, used=usage.gpu_memory, reserved=reserved)
        self.emit(f"job.{job.id}.log", JobLog(level="warning", event="gpu_memory_overuse", logger="llmos.kernel", fields={"used": usage.gpu_memory, "reserved": reserved}))
        if factor > 0 and usage.gpu_memory > reserved * factor:
            self._stop_job(job, f"stopped: {what}", "failed")

    def _on_acct(self, identity: bytes, msg: AcctRequest) -> AcctReply:
        rows = self.store.accounting(msg.since, max(1, min(msg.limit, 100_000)))
        for row in rows:
            entry = self.registry.kinds.get(row["kind"])
            row["plugin"] = entry.plugin if entry else None
        return AcctReply(jobs=rows)

    def _kill_orphan(self, job: JobRecord) -> None:
        if not job.worker_pid:
            return
        try:
            proc = psutil.Process(job.worker_pid)
            if job.worker_create_time and abs(proc.create_time() - job.worker_create_time) > 1:
                return  # the pid was reused by an unrelated process
            os.killpg(job.worker_pid, signal.SIGKILL)
            log.info("orphan_killed", job_id=job.id, pid=job.worker_pid)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass

    # ------------------------------------------------------------------ events

    def emit(self, topic_name: str, msg: Any, sender: str = "kernel") -> None:
        """Journal and (after the commit) publish an event made by the kernel."""
        self._journal(topic_name, pack_item(topic_name, make_header(type_name_of(msg), sender), encode_body(msg)))

    def _journal(self, topic_name: str, item: bytes) -> None:
        """Stamp a packed [topic, header, body] with seq and stream_seq; queue it for the journal and PUB."""
        stream = stream_of(topic_name)
        last = self._stream_seq.get(stream)
        if last is None:
            last = self.store.last_stream_seq(stream)
        self.seq += 1
        last += 1
        self._stream_seq[stream] = last
        stamped = stamp(item, self.seq, last)
        out = self._out_events.get(stream)
        if out is None:
            self._out_events[stream] = [stamped]
        else:
            out.append(stamped)
        self.stats["events_journaled"] += 1

    def _transition(self, job: JobRecord, state: str, reason: str | None, *, persist: bool = True, **fields: Any) -> None:
        """The only place a job's state changes (:func:`llmos.kernel.jobs.transition`): then the row is
        stored (unless the caller stores it right after) and the state event journaled."""
        job_states.transition(job, state, reason, **fields)
        if persist:
            self.store.update_job(job)
        self.emit_state(job)

    def emit_state(self, job: JobRecord) -> None:
        self.emit(
            f"job.{job.id}.state",
            JobStateChanged(state=job.state, reason=job.reason, exit_code=job.exit_code, attempts=job.attempts, placement=job.placement),
        )

    def _write_journal(self) -> None:
        """Journal this turn's events not written yet: one row per stream (and 1,000 events), the
        same items one PUB message carries. A replay in mid-turn writes them early."""
        done, append = self._journaled, self.store.append_batch
        for stream, items in self._out_events.items():
            start = done.get(stream, 0)
            if start < len(items):
                for i in range(start, len(items), 1000):
                    append(stream, items[i : i + 1000])
                done[stream] = len(items)

    def _flush_out(self) -> None:
        """Commit, then publish the turn's events and send its replies."""
        streams = self._out_events
        if streams:
            self._write_journal()
            self._journaled = {}
            self._out_events = {}
        self.store.commit()
        if streams:
            # One PUB message per stream and turn, topic "<stream>.": SUB prefixes of whole streams
            # ("job.7.", "job.", "") match it; the SDK filters finer prefixes itself.
            for stream, items in streams.items():
                topic_frame = (stream + ".").encode()
                for i in range(0, len(items), 1000):
                    chunk = items[i : i + 1000]
                    try:
                        self.pub.send_multipart([topic_frame, pack_array(chunk, len(chunk))], _NOBLOCK)
                    except zmq.Again:
                        pass  # subscribers refill from the journal
        if self._out_control:
            out, self._out_control = self._out_control, []
            for identity, frames in out:
                try:
                    self.control.send_multipart([identity, *frames], _NOBLOCK)
                except zmq.ZMQError as exc:
                    # The peer is gone or not keeping up: a reply is never worth blocking the kernel.
                    if exc.errno == zmq.EHOSTUNREACH and self.calls:
                        self._caller_gone(identity)

    def reply(self, identity: bytes, msg: Any, parent_id: str | None) -> None:
        self._out_control.append((identity, encode_control(msg, "kernel", parent_id=parent_id)))

    def reply_error(self, identity: bytes, exc: BaseException, parent_id: str | None) -> None:
        if isinstance(exc, LlmosError):
            context = {k: v for k, v in exc.context.items() if isinstance(v, str | int | float | bool | type(None))}
            msg = ErrorReply(ename=type(exc).__name__, evalue=str(exc), code=exc.code, context=context)
        else:
            msg = ErrorReply(ename="KernelError", evalue=f"internal error: {type(exc).__name__}: {exc}", code=KernelError.code)
        self.reply(identity, msg, parent_id)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        self.boot()
        # What boot made (modules, plugins, settings) lives as long as the kernel: move it out of
        # the collector's sight, and collect young objects less often. The loop makes few cycles
        # but many short-lived maps (one per event), each of which would count toward a collection.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        try:
            while self.stopping is None:
                try:
                    self._turn()
                except Exception as exc:
                    # A bug must cost one turn, never the kernel (and every job with it).
                    self.stats["turn_errors"] = self.stats.get("turn_errors", 0) + 1
                    log.exception("turn_failed", error=f"{type(exc).__name__}: {exc}")
                    try:
                        self._flush_out()
                    except Exception:
                        log.exception("flush_after_error_failed")
        finally:
            self._shutdown()

    def _turn(self) -> None:
        timeout = self._next_timer_ms()
        ready = dict(self.poller.poll(timeout))
        if self._sig_r in ready:
            self._drain_signals()
        now = time.monotonic()
        if self._sigchld or now >= self._next_reap:
            # SIGCHLD (or the once-a-second safety net): read the zygote's pid reports first, so a
            # worker's pid is known when it is reaped.
            self._sigchld = False
            self._next_reap = now + 1.0
            if self.launcher.zygote_fd is not None:
                self._read_zygote()
            self._reap()
        elif self.launcher.zygote_fd is not None and self.launcher.zygote_fd in ready:
            self._read_zygote()
        # Control before events: a worker sends its control messages (a service's last replies)
        # before its job's end, and the end must not overtake them.
        if self.control in ready:
            self._drain_control()
        if self.ingest in ready or self._ingest_more:
            self._ingest_more = False
            self._drain_ingest()
        self._timers()
        if self._probe is not None:
            self._check_probe()
        if self._schedule_needed:
            self._schedule_needed = False
            self._schedule()
        self._flush_out()

    def _next_timer_ms(self) -> int:
        if self._out_events or self._out_control or self._schedule_needed or self._ingest_more:
            return 0
        return 100  # timers (cancel stages, timeouts, heartbeats) are checked at least every 100 ms

    def _drain_signals(self) -> None:
        try:
            while os.read(self._sig_r, 4096):
                pass
        except BlockingIOError:
            pass
        signals, self._signals = self._signals, []
        for sig in signals:
            if sig == signal.SIGCHLD:
                self._sigchld = True
            if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self.stopping = f"signal {signal.Signals(sig).name}"

    def _read_zygote(self) -> None:
        was = self.launcher.zygote_fd
        for worker_id, pid in self.launcher.read_zygote():
            proc = self.workers.get(worker_id)
            if proc is not None:
                proc.pid = pid
                self.worker_by_pid[pid] = proc
        if self.launcher.zygote_fd is None and was is not None:
            self.poller.unregister(was)

    # ------------------------------------------------------------------ ingest (worker events)

    def _drain_ingest(self) -> None:
        # Bounded per turn, so replies and publication never wait behind a flood.
        budget = 4096
        sock = self.ingest
        while budget > 0:
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                return
            frame = sock.recv(_NOBLOCK)
            try:
                items = unpackb(frame)
                if type(items) is not list:
                    raise ProtocolError("an ingest frame is an array of packed [topic, header, body] items")
                budget -= len(items)
                self._ingest_batch(items)
            except Exception as exc:  # never let one frame take the kernel down
                self._bad_frame("ingest", exc)
                budget -= 1
        self._ingest_more = True  # come back at once for the rest

    def _ingest_batch(self, items: list[Any]) -> None:
        """Validate, stamp and queue a worker's events: the hot path, so written out flat.

        A frame's items normally all come from one worker on a handful of topics: the sender's
        lookup, its stream's counters and queue, and each topic's checks are taken once and kept
        in locals while the sender stays the same (written back before anything else may emit)."""
        workers, jobs, known, out = self.workers, self.jobs, self._stream_seq, self._out_events
        fast_ok, bad, journaled = self._fast_checks, 0, 0
        tail = stamp_tail
        last_sender: Any = None
        job_id = 0
        stream = ""
        last = 0  # the stream's stream_seq, while last_sender is set
        queue: list[bytes] = []
        seq = self.seq
        topics: set[str] = set()  # topics already checked in this frame (for the current sender)
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
                if sender != last_sender:
                    if last_sender is not None:
                        known[stream] = last
                    last_sender = None
                    topics.clear()
                    worker = workers.get(sender)
                    if worker is None or worker.job_id is None or not worker.assigned:
                        raise ProtocolError(f"event from {sender!r}, which is not a worker running a job")
                    job_id = worker.job_id
                    stream = f"job.{job_id}"
                    cached = known.get(stream)
                    last = self.store.last_stream_seq(stream) if cached is None else cached
                    queue = out.setdefault(stream, [])
                    last_sender = sender
                if type(topic_name) is not str or topic_name not in topics:
                    if type(topic_name) is not str or not (topic_name.startswith(stream) and topic_name[len(stream) : len(stream) + 1] == "."):
                        raise ProtocolError(f"worker {sender} may only send events on {stream}.<name>, not {topic_name!r}")
                    if topic_name.count(".") != 2 or topic_name.endswith("."):
                        raise ProtocolError(f"worker {sender} may only send events on {stream}.<name>, not {topic_name!r}")
                    topics.add(topic_name)
                type_name = header["type"]
                check = fast_ok.get(type_name)
                if check is None or not check(body):
                    if type_name == "worker.job_done":
                        job = jobs.get(job_id)
                        if job is not None:
                            # Ending the job emits on its stream: hand the counters back first.
                            known[stream], self.seq = last, seq
                            self._on_job_done(worker, job, decode_body(type_name, body))
                            seq = self.seq
                        last_sender = None  # the worker's state changed: look it up again
                        continue
                    if type_name in _KERNEL_ONLY_TYPES or type_name.startswith(("kernel.", "worker.")):
                        raise ProtocolError(f"worker {sender} may not send {type_name} events; only the kernel does")
                    validate_body(type_name, body)  # raises the precise error (or fills the cache)
                    fast_ok[type_name] = _fast_check_for(type_name)
                if type_name == "job.progress":
                    running = jobs.get(job_id)
                    if running is not None:
                        running.progress = body  # for `llmos top` and job records
                # _journal and stamp, inlined.
                seq += 1
                last += 1
                queue.append(STAMPED_HEAD + raw[1:] + tail(seq, last))
                journaled += 1
            except ProtocolError as exc:
                bad += 1
                self._bad_frame("ingest", exc)
            except Exception as exc:
                bad += 1
                log.exception("ingest_item_failed", error=f"{type(exc).__name__}: {exc}")
        if last_sender is not None:
            known[stream] = last
        self.seq = seq
        self.stats["events_journaled"] += journaled

    def _bad_frame(self, where: str, exc: BaseException) -> None:
        self.stats["bad_frames"] += 1
        if self.stats["bad_frames"] <= 100 or self.stats["bad_frames"] % 1000 == 0:
            log.warning("bad_frame", socket=where, error=f"{type(exc).__name__}: {exc}", count=self.stats["bad_frames"])

    # ------------------------------------------------------------------ control requests

    def _drain_control(self) -> None:
        sock = self.control
        for _ in range(1000):
            # Ask before reading: an exception per drained socket costs more than the request.
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                return
            self._on_control(sock.recv_multipart(_NOBLOCK))

    def _on_control(self, frames: list[bytes]) -> None:
        identity = frames[0]
        parent_id = None
        self.stats["requests"] += 1
        try:
            if len(frames) != 3:
                raise ProtocolError(f"a control message has 2 frames (header, body), got {len(frames) - 1}")
            header = unpackb(frames[1])
            if type(header) is dict and type(header.get("id")) is str:
                parent_id = header["id"]
            check_header(header)
            msg = decode_body(header["type"], unpackb(frames[2]))
            handler = self._handlers.get(type(msg))
            self._current_parent = parent_id
            if handler is None:
                raise ProtocolError(f"{header['type']} is not a request the kernel answers")
            answer = handler(self, identity, msg)
            if answer is not None:
                self.reply(identity, answer, parent_id)
        except LlmosError as exc:
            if isinstance(exc, ProtocolError):
                self.stats["bad_requests"] += 1
                self._bad_frame("control", exc)
            self.reply_error(identity, exc, parent_id)
        except Exception as exc:
            log.exception("request_failed", error=str(exc))
            self.reply_error(identity, exc, parent_id)

    # -- worker messages --

    def _on_worker_ready(self, identity: bytes, msg: WorkerReady) -> None:
        proc = self.workers.get(msg.worker_id)
        if proc is None or identity != msg.worker_id.encode():
            # Unknown (from a previous kernel, or a stranger): tell it to leave.
            self._out_control.append((identity, encode_control(WorkerExit(), "kernel")))
            return None
        proc.ready = True
        proc.last_seen = time.monotonic()
        if proc.pid is None:
            proc.pid = msg.pid
            self.worker_by_pid[msg.pid] = proc
        if proc.generation != self.generation and proc.job_id is None:
            proc.assigned = True  # started before a plugin reload: let it go
            self._out_control.append((identity, encode_control(WorkerExit(), "kernel")))
            self._schedule_needed = True
            return None
        if proc.job_id is not None:
            self._assign(proc)
        else:
            self._schedule_needed = True
        return None

    def _on_heartbeat(self, identity: bytes, msg: WorkerHeartbeat) -> None:
        proc = self.workers.get(msg.worker_id)
        if proc is None or identity != msg.worker_id.encode():
            raise ProtocolError(f"heartbeat from {msg.worker_id!r}, which is not a worker of this kernel")
        proc.last_seen = time.monotonic()
        return None

    # -- client requests --

    def _on_submit(self, identity: bytes, msg: SubmitRequest) -> JobReply:
        if self.stopping:
            raise KernelError("the kernel is shutting down")
        entry, params, res = self.registry.validate(msg.kind, msg.params, msg.resources, coerce=msg.coerce, cwd=msg.cwd)
        problem = storable_problem(params)
        if problem:
            raise JobRejected(f"{msg.kind}: parameters cannot be stored: {problem}", kind=msg.kind)
        if msg.timeout is not None and not (msg.timeout > 0):
            raise JobRejected(f"timeout must be a number of seconds above 0, got {msg.timeout}", field="timeout")
        if not 0 <= msg.max_retries <= 1000:
            raise JobRejected(f"max_retries must be between 0 and 1000, got {msg.max_retries}", field="max_retries")
        if not -1_000_000 <= msg.priority <= 1_000_000:
            raise JobRejected(f"priority must be between -1000000 and 1000000, got {msg.priority}", field="priority")
        if self.devices.needs_probe(res):
            # Whether this can ever fit depends on GPUs the probe has not reported yet: answer
            # when it has, so a request that never fits is refused at submit, not failed later.
            self._held_submits.append((identity, msg, self._current_parent))
            return None
        self.devices.check(res)
        preemptible = bool(getattr(entry.spec, "preemptible", False)) if msg.preemptible is None else msg.preemptible
        if preemptible and entry.service:
            raise JobRejected(f"{msg.kind} is a service: services cannot be preempted", field="preemptible")
        job = self._create_job(msg.kind, params, res, priority=msg.priority, max_retries=msg.max_retries, timeout=msg.timeout, preemptible=preemptible)
        return JobReply(job=job.to_dict())

    def _create_job(
        self, kind: str, params: dict[str, Any], res: Resources, *, priority: int = 0, max_retries: int = 0, timeout: float | None = None, preemptible: bool = False
    ) -> JobRecord:
        now = time.time()
        job = JobRecord(
            id=0,
            kind=kind,
            params=params,
            resources=res.to_dict(),
            priority=priority,
            max_retries=max_retries,
            timeout=timeout,
            state="pending",
            submitted_at=now,
            queued_at=now,
            preemptible=preemptible,
        )
        job.id = self.store.insert_job(job)
        self.jobs[job.id] = job
        self.emit_state(job)
        self._schedule_needed = True
        log.info("job_submitted", job_id=job.id, kind=job.kind)
        return job

    def _service_failed(self, job: JobRecord) -> None:
        """A service's job failed: start it again after a backoff, or quarantine it."""
        entry = self.registry.kinds.get(job.kind)
        if entry is None or not entry.service or self.stopping:
            return
        ss = self.settings["services"]
        now = time.monotonic()
        window = float(ss["restart_window"])
        # An autostart service is the kind itself: its crashes quarantine the kind. A service people
        # start with parameters (serve MODEL) is counted per instance: one bad model stops being
        # restarted without taking the kind from everyone else.
        per_kind = bool(getattr(entry.spec, "autostart", False))
        key = job.kind if per_kind else f"{job.kind} {json.dumps(job.params, sort_keys=True, default=str)}"
        crashes = [t for t in self._service_crashes.get(key, []) if now - t <= window] + [now]
        self._service_crashes[key] = crashes
        if len(crashes) > int(ss["max_restarts"]) and not per_kind:
            self._service_crashes.pop(key, None)  # a later submit of the same instance starts afresh
            self.emit(
                "kernel.service_quarantined",
                ServiceQuarantined(service=job.kind, plugin=entry.plugin, crashes=len(crashes), window=window, reason=job.reason or "", job_id=job.id),
            )
            log.warning("service_instance_given_up", service=job.kind, job_id=job.id, crashes=len(crashes))
            return
        if len(crashes) > int(ss["max_restarts"]):
            why = f"service {job.kind!r} failed {len(crashes)} times in {window:g}s (last: {job.reason}); reload plugins to try again"
            self.quarantined[job.kind] = why
            self._apply_unavailable()
            self.emit(
                "kernel.service_quarantined",
                ServiceQuarantined(service=job.kind, plugin=entry.plugin, crashes=len(crashes), window=window, reason=job.reason or ""),
            )
            log.warning("service_quarantined", service=job.kind, crashes=len(crashes))
            return
        delay = min(float(ss["restart_backoff_max"]), 2.0 ** (len(crashes) - 1))
        self._service_restarts.append((now + delay, job.kind, job.params, job.resources))
        log.info("service_restart_scheduled", service=job.kind, delay=delay, crashes=len(crashes))

    def _restart_services(self, now: float) -> None:
        due = [r for r in self._service_restarts if r[0] <= now]
        if not due:
            return
        self._service_restarts = [r for r in self._service_restarts if r[0] > now]
        for _, kind, params, resources in due:
            if kind in self.quarantined or kind not in self.registry.kinds:
                continue
            self._create_job(kind, params, Resources(**resources), priority=1000)

    def _autostart_services(self) -> None:
        """Start every ``autostart`` service that is not already queued or running."""
        active = {j.kind for j in self.jobs.values()} | {r[1] for r in self._service_restarts}
        for name, entry in sorted(self.registry.kinds.items()):
            if not (entry.service and getattr(entry.spec, "autostart", False)) or name in active or name in self.quarantined:
                continue
            section = getattr(entry.spec, "config", None)
            settings = dict(self.settings.get(section) or {}) if section else {}
            if settings.get("autostart", True) is False:
                continue  # switched off in its config section
            try:
                names = {f.name for f in schema_of(entry.spec.params)} if entry.spec.params is not None else set()
                defaults = {k: v for k, v in settings.items() if k in names}
                _, params, res = self.registry.validate(name, defaults, {})
                self.devices.check(res)
            except LlmosError as exc:
                log.warning("service_not_started", service=name, error=str(exc))
                continue
            self._create_job(name, params, res, priority=1000)

    def _get_job(self, job_id: int) -> JobRecord:
        if not 0 < job_id < 2**63:
            raise JobNotFound(f"no job with id {job_id}", job_id=job_id)
        job = self.jobs.get(job_id) or self.store.get_job(job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id}", job_id=job_id)
        return job

    def _on_job(self, identity: bytes, msg: JobRequest) -> JobReply:
        return JobReply(job=self._get_job(msg.id).to_dict())  # (an active job comes from memory)

    def _on_jobs(self, identity: bytes, msg: JobsRequest) -> JobsReply:
        if msg.state is not None and msg.state not in JOB_STATES:
            raise ValidationError(f"unknown job state {msg.state!r}; expected one of {', '.join(JOB_STATES)}", field="state")
        limit = max(1, min(msg.limit, 100_000))
        # Running jobs come from memory: their records carry the last progress and measured usage.
        return JobsReply(jobs=[self.jobs.get(j.id, j).to_dict() for j in self.store.list_jobs(msg.state, limit)])

    def _on_cancel(self, identity: bytes, msg: CancelRequest) -> JobReply:
        job = self._get_job(msg.id)
        if job.state in END_STATES:
            return JobReply(job=job.to_dict())
        self._stop_job(job, msg.reason or "cancelled by user", "cancelled")
        return JobReply(job=job.to_dict())

    def _on_devices(self, identity: bytes, msg: DevicesRequest) -> DevicesReply:
        return DevicesReply(devices=self.devices.to_list())

    def _on_plugins(self, identity: bytes, msg: PluginsRequest) -> PluginsReply:
        return PluginsReply(plugins=self.registry.describe_plugins(), kinds=self.registry.describe_kinds())

    def _on_status(self, identity: bytes, msg: StatusRequest) -> StatusReply:
        counts = {state: 0 for state in JOB_STATES}
        counts.update(self._ended_counts)
        for job in self.jobs.values():
            counts[job.state] += 1
        alive = [w for w in self.workers.values() if w.alive]
        return StatusReply(
            version=__version__,
            pid=os.getpid(),
            started_at=self.started_at,
            state_dir=str(self.state_dir),
            endpoints=dict(self.endpoints),
            jobs=counts,
            workers={
                "alive": len(alive),
                "idle": sum(1 for w in alive if w.ready and w.job_id is None and not w.assigned),
                "busy": sum(1 for w in alive if w.job_id is not None),
            },
            last_seq=self.seq,
            metrics_url=self.exporter.url,
            stats=dict(self.stats, gpus_probing=int(self.devices.probing), zygote=int(self.launcher.zygote is not None)),
        )

    def _on_replay(self, identity: bytes, msg: ReplayRequest) -> None:
        limit = max(1, min(msg.limit, 10_000))
        self._write_journal()  # events of this turn are not in the database yet
        rows = self.store.replay(msg.prefix, max(0, msg.since), msg.until, limit)
        more = len(rows) == limit
        self._out_control.append((identity, replay_reply_frames(self._current_parent, self.seq, more, [item for _, item in rows])))
        return None

    def _on_stream_heads(self, identity: bytes, msg: StreamHeadsRequest) -> StreamHeadsReply:
        self._write_journal()  # events of this turn are not in the database yet
        heads = self.store.stream_heads(msg.prefix, max(0, msg.since))
        return StreamHeadsReply(heads={stream: [sseq, seq] for stream, (sseq, seq) in heads.items()}, last_seq=self.seq)

    def _on_plugins_reload(self, identity: bytes, msg: PluginsReloadRequest) -> PluginsReloadReply:
        return self.reload_plugins()

    def reload_plugins(self) -> PluginsReloadReply:
        """Load the plugin set again; running jobs keep theirs, new workers get the new one."""
        import importlib

        importlib.invalidate_caches()
        old = self.registry
        self.registry = self._load_registry()
        self.quarantined.clear()
        self._service_crashes.clear()
        self._apply_unavailable()
        # A plugin that worked and now does not: its kinds are refused with its error, not "unknown".
        for name, record in self.registry.plugins.items():
            before = old.plugins.get(name)
            if record.status not in ("ok", "disabled") and before is not None and before.status == "ok":
                for kind in before.kinds + before.services:
                    self.registry.unavailable.setdefault(kind, f"its plugin {name!r} is {record.status}: {record.error}")
        ok_before = {n for n, r in old.plugins.items() if r.status == "ok"}
        ok_after = {n for n, r in self.registry.plugins.items() if r.status == "ok"}
        change = PluginsChanged(
            added=sorted(ok_after - ok_before),
            removed=sorted(ok_before - ok_after),
            kinds_added=sorted(self.registry.kinds.keys() - old.kinds.keys()),
            kinds_removed=sorted(old.kinds.keys() - self.registry.kinds.keys()),
        )
        # Workers forked from the old zygote hold the old plugins: retire the idle ones.
        self.generation += 1
        for worker in self.workers.values():
            if worker.alive and worker.job_id is None and not worker.assigned and worker.ready:
                self._out_control.append((worker.id.encode(), encode_control(WorkerExit(), "kernel")))
                worker.assigned = True  # never hand it a job
        was = self.launcher.zygote_fd
        self.launcher.restart_zygote()
        if was is not None:
            self.poller.unregister(was)
        if self.launcher.zygote_fd is not None:
            self.poller.register(self.launcher.zygote_fd, zmq.POLLIN)
        self.emit("kernel.plugins_changed", change)
        self._schedule_needed = True
        self._autostart_services()
        log.info("plugins_reloaded", **encode_body(change))
        return PluginsReloadReply(plugins=self.registry.describe_plugins(), **encode_body(change))

    def _apply_unavailable(self) -> None:
        """Kinds of quarantined services may not be submitted; plugin records say so."""
        self.registry.unavailable.update(self.quarantined)
        for name in self.quarantined:
            entry = self.registry.kinds.get(name)
            record = self.registry.plugins.get(entry.plugin) if entry else None
            if record is not None:
                record.status = "quarantined"
                record.error = self.quarantined[name]

    # -- services: requests routed to a replica, replies routed back (the Majordomo pattern) --

    def _on_service_register(self, identity: bytes, msg: ServiceRegister) -> None:
        worker = self.workers.get(msg.worker_id)
        if worker is None or identity != msg.worker_id.encode() or worker.job_id is None:
            raise ProtocolError(f"service.register from {msg.worker_id!r}, which is not a worker running a job")
        if not msg.name or " " in msg.name:
            raise ValidationError(f"service name {msg.name!r} must be non-empty without spaces")
        replicas = self.services.setdefault(msg.name, [])
        if worker.id not in replicas:
            replicas.append(worker.id)
        worker.services.add(msg.name)
        log.info("service_registered", service=msg.name, worker=worker.id, job_id=worker.job_id, replicas=len(replicas))
        return None

    def _on_service_request(self, identity: bytes, msg: ServiceRequest) -> None:
        from llmos.errors import ServiceUnavailable

        replicas = [w for w in self.services.get(msg.service, []) if w in self.workers and self.workers[w].alive]
        if not replicas:
            running = ", ".join(sorted(n for n, r in self.services.items() if r)) or "none"
            raise ServiceUnavailable(f"no service named {msg.service!r} is running (running services: {running})", service=msg.service)
        load = {w: 0 for w in replicas}
        for _, w, _ in self.calls.values():
            if w in load:
                load[w] += 1
        worker_id = min(replicas, key=lambda w: load[w])
        request_id = self._current_parent or ""
        self.calls[request_id] = (identity, worker_id, msg.service)
        self._out_control.append((worker_id.encode(), encode_control(ServiceCall(request_id=request_id, body=msg.body), "kernel")))
        return None

    def _on_service_response(self, identity: bytes, msg: ServiceResponse) -> None:
        call = self.calls.get(msg.request_id)
        if call is None or call[1].encode() != identity:
            return None  # the caller cancelled or is gone
        caller = call[0]
        if msg.done or msg.error:
            del self.calls[msg.request_id]
        self._out_control.append((caller, encode_control(msg, "kernel", parent_id=msg.request_id)))
        return None

    def _on_service_cancel(self, identity: bytes, msg: ServiceCancel) -> None:
        call = self.calls.get(msg.request_id)
        if call is not None and call[0] == identity:
            del self.calls[msg.request_id]
            self._out_control.append((call[1].encode(), encode_control(msg, "kernel")))
        return None

    def _caller_gone(self, identity: bytes) -> None:
        """A caller disconnected mid-stream: cancel its requests so the replicas free their slots."""
        for request_id, (caller, worker_id, _service) in list(self.calls.items()):
            if caller == identity:
                del self.calls[request_id]
                self._out_control.append((worker_id.encode(), encode_control(ServiceCancel(request_id=request_id), "kernel")))

    def _on_services(self, identity: bytes, msg: ServicesRequest) -> ServicesReply:
        out = []
        for name, replicas in sorted(self.services.items()):
            alive = [w for w in replicas if w in self.workers and self.workers[w].alive]
            if not alive:
                continue
            out.append({
                "name": name,
                "replicas": [{"worker": w, "job_id": self.workers[w].job_id, "pid": self.workers[w].pid} for w in alive],
                "in_flight": sum(1 for _, w, s in self.calls.values() if s == name),
            })
        return ServicesReply(services=out)

    def _drop_replica(self, worker: WorkerProc, why: str, *, stopping: bool = False) -> None:
        """A replica is gone: its requests in flight fail at their callers, never hang.

        ``stopping``: its job was stopped on request. The runner answers what it holds with "is
        stopping", but those answers travel on the control socket and the job's end on the event
        socket, so the end may be read first; the kernel then says the same thing for it."""
        from llmos.errors import ServiceError

        for name in worker.services:
            if worker.id in self.services.get(name, []):
                self.services[name].remove(worker.id)
        worker.services.clear()
        for request_id, (caller, w, service) in list(self.calls.items()):
            if w == worker.id:
                del self.calls[request_id]
                error = f"service {service!r} is stopping" if stopping else f"service {service!r}: its replica stopped ({why})"
                err = ServiceResponse(request_id=request_id, done=True, error=error, code=ServiceError.code)
                self._out_control.append((caller, encode_control(err, "kernel", parent_id=request_id)))

    def _on_shutdown(self, identity: bytes, msg: ShutdownRequest) -> OkReply:
        self.stopping = "shutdown requested"
        return OkReply()

    _handlers: dict[type, Any] = {
        WorkerReady: _on_worker_ready,
        WorkerHeartbeat: _on_heartbeat,
        SubmitRequest: _on_submit,
        JobRequest: _on_job,
        JobsRequest: _on_jobs,
        CancelRequest: _on_cancel,
        DevicesRequest: _on_devices,
        PluginsRequest: _on_plugins,
        StatusRequest: _on_status,
        ReplayRequest: _on_replay,
        StreamHeadsRequest: _on_stream_heads,
        PluginsReloadRequest: _on_plugins_reload,
        ServiceRegister: _on_service_register,
        ServiceRequest: _on_service_request,
        ServiceResponse: _on_service_response,
        ServiceCancel: _on_service_cancel,
        ServicesRequest: _on_services,
        AcctRequest: _on_acct,
        UsageReport: _on_usage_report,
        ShutdownRequest: _on_shutdown,
    }
    _current_parent: str | None = None

    # ------------------------------------------------------------------ scheduling

    def _schedule(self) -> None:
        """Start what fits, stop what must make room (the plan is :func:`scheduler.plan`'s); keep
        enough workers coming.

        A job is only ever given to a worker that is ready, so a slow worker start never holds a
        job hostage while another worker sits idle.
        """
        pending = [j for j in self.jobs.values() if j.state == "pending"]
        if not pending:
            self._keep_pool()
            return
        gen = self.generation
        ready = [w for w in self.workers.values() if w.alive and w.ready and w.job_id is None and not w.assigned and w.generation == gen]
        running = [j for j in self.jobs.values() if j.state == "running"]
        plan = scheduler.plan(pending, running, self.devices, len(ready), self.policy, time.time(), self._preempting)
        for job, placement in plan.starts:
            self._start(job, placement, ready.pop(0))
        for victim, job in plan.preemptions:
            self._preempting[victim.id] = job.id
            log.info("job_preempting", job_id=victim.id, for_job=job.id, priority=victim.priority, for_priority=job.priority)
            self._stop_job(victim, f"preempted by job {job.id} (priority {job.priority})", "preempted")
        self._keep_pool(extra=plan.waiting_for_worker)

    def _spawn(self) -> WorkerProc:
        proc = self.launcher.start()
        proc.generation = self.generation
        self.workers[proc.id] = proc
        if proc.pid is not None:
            self.worker_by_pid[proc.pid] = proc
        return proc

    def _keep_pool(self, extra: int = 0) -> None:
        """Keep ``pool_size`` spare workers, plus one for each job that fits but has none, with at
        most ``max_starting`` starting at once (a burst of jobs must not fork-bomb the machine)."""
        ws = self.settings["workers"]
        spare = starting = alive = 0
        for w in self.workers.values():
            if w.alive:
                alive += 1
                if not w.ready:
                    starting += 1
                if w.job_id is None and not w.assigned and w.generation == self.generation:
                    spare += 1
        want = int(ws["pool_size"]) + extra
        while spare < want and starting < int(ws["max_starting"]) and alive < int(ws["max_workers"]) and self.launcher.can_start():
            self._spawn()
            spare += 1
            starting += 1
            alive += 1

    def _start(self, job: JobRecord, placement: dict[str, Any], worker: WorkerProc) -> None:
        """Reserve devices and bind a worker: the try begins (the job is running from here)."""
        self.devices.reserve(job.id, placement)
        entry = self.registry.kinds.get(job.kind)
        ranks = ranks_of(entry.spec, job.params) if entry is not None else 1
        if ranks > 1:
            placement = {**placement, "distributed": self._rank_plan(placement, ranks)}
        worker.job_id = job.id
        self.stats["jobs_started"] += 1
        self._transition(
            job, "running", None, persist=not worker.ready,  # a ready worker's _assign stores the row with its pid
            placement=placement, exit_code=None, attempts=job.attempts + 1, started_at=time.time(), stop_stage=0, stop_at=None,
            cancel_reason=None, end_state_on_stop=None, deadline=time.monotonic() + job.timeout if job.timeout else None, worker_id=worker.id,
        )
        if worker.ready:
            self._assign(worker)

    def _rank_plan(self, placement: dict[str, Any], n: int) -> dict[str, Any]:
        """A gang job's rank plan, meeting at a free TCP port on this machine that no other
        running job was handed."""
        taken = {
            j.placement["distributed"]["master_port"]
            for j in self.jobs.values()
            if j.state == "running" and j.placement and "distributed" in j.placement
        }
        port = free_port()
        while port in taken:
            port = free_port()
        return scheduler.rank_plan(placement, n, port)

    def _assign(self, worker: WorkerProc) -> None:
        """Hand a bound job to its (now ready) worker."""
        job = self.jobs.get(worker.job_id) if worker.job_id is not None else None
        if job is None or job.state != "running" or worker.assigned:
            return
        worker.attempt = (job.id, job.attempts, job.started_at or time.time())
        job.worker_pid = worker.pid
        try:
            job.worker_create_time = psutil.Process(worker.pid).create_time() if worker.pid else None
        except psutil.Error:
            job.worker_create_time = None
        worker.assigned = True
        self.store.update_job(job)
        gpus = job.placement.get("gpus", []) if job.placement else []
        cpus = float(job.resources.get("cpus", 0))
        env = {
            # The probe numbered the GPUs in PCI bus order (NVML's); CUDA's default order is
            # fastest first, which on a machine of mixed GPUs would hand the job another GPU.
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(str(g["index"]) for g in gpus if not g.get("fake")),
            "LLMOS_JOB_ID": str(job.id),
            "LLMOS_ATTEMPT": str(job.attempts),
            "LLMOS_GPUS": ",".join(g["id"] for g in gpus),
            "LLMOS_STATE_DIR": str(self.state_dir),
        }
        if gpus:
            env["LLMOS_GPU_MEMORY"] = str(min(int(g["memory"]) for g in gpus))
        plan = (job.placement or {}).get("distributed")
        if plan:
            # torch.distributed's own names: rank 0 is this worker; it starts the other ranks.
            n = str(plan["world_size"])
            env.update(MASTER_ADDR=plan["master_addr"], MASTER_PORT=str(plan["master_port"]), WORLD_SIZE=n, LOCAL_WORLD_SIZE=n, RANK="0", LOCAL_RANK="0")
        if cpus >= 1:
            env["OMP_NUM_THREADS"] = str(int(cpus))
        assign = WorkerAssign(
            job_id=job.id,
            kind=job.kind,
            params=job.params,
            attempt=job.attempts,
            resources=job.resources,
            placement=job.placement or {},
            workdir=str(self.state_dir / "jobs" / str(job.id)),
            env=env,
        )
        self._out_control.append((worker.id.encode(), encode_control(assign, "kernel")))
        log.info("job_started", job_id=job.id, worker=worker.id, pid=worker.pid, attempt=job.attempts)

    # ------------------------------------------------------------------ job ends

    def _stop_job(self, job: JobRecord, reason: str, end_state: str) -> None:
        """Cancel or time out a job: at once if it is not running yet, else ask, then signal."""
        worker = self.workers.get(job.worker_id) if job.worker_id else None
        if job.state == "pending" or worker is None or not worker.assigned:
            if worker is not None:
                worker.job_id = None  # the worker is still starting: keep it for the pool
                job.worker_id = None
            job.end_state_on_stop = end_state
            self._end_job(job, end_state, reason, None, retry=False)
            return
        if job.stop_stage:
            return
        job.cancel_reason = reason
        job.end_state_on_stop = end_state
        job.stop_stage = 1
        job.stop_at = time.monotonic() + float(self.settings["workers"]["cancel_grace"])
        self._out_control.append((worker.id.encode(), encode_control(WorkerCancel(job_id=job.id, reason=reason), "kernel")))
        log.info("job_stopping", job_id=job.id, reason=reason)

    def _on_job_done(self, worker: WorkerProc, job: JobRecord, done: JobDone) -> None:
        worker.done_at = time.monotonic()
        stopped = job.end_state_on_stop is not None  # before _end_job, which may start a retry
        problem = storable_problem(done.result) if done.outcome == "succeeded" else None
        if problem and job.end_state_on_stop is None:
            self._end_job(job, "failed", f"the runner's result cannot be stored: {problem}", 1)
        elif done.outcome == "succeeded" and job.end_state_on_stop is None:
            job.result = done.result
            self._end_job(job, "succeeded", "succeeded", 0)
        elif job.end_state_on_stop is not None:
            # Stopped on request; a timeout ends like the timeout command's 124.
            code = 124 if job.end_state_on_stop == "failed" else 0
            self._end_job(job, job.end_state_on_stop, job.cancel_reason or "cancelled", code, retry=job.end_state_on_stop == "failed")
        elif done.outcome == "cancelled":
            self._end_job(job, "cancelled", "cancelled by the runner", 0, retry=False)
        else:
            self._end_job(job, "failed", done.error or "the runner failed", 1)
        self._release_worker(worker, stopped=stopped)

    def _release_worker(self, worker: WorkerProc, *, stopped: bool = False) -> None:
        if worker.services:
            self._drop_replica(worker, "its job ended", stopping=stopped)
        worker.job_id = None
        if worker.exited is None:
            # Its job is over; the process exits by itself. Make sure it does.
            worker.done_at = worker.done_at or time.monotonic()

    def _end_job(self, job: JobRecord, state: str, reason: str, exit_code: int | None, *, retry: bool = True) -> None:
        worker = self.workers.get(job.worker_id) if job.worker_id else None
        if worker is not None and worker.attempt and worker.attempt[0] == job.id:
            # What the try held, for accounting (its CPU and memory come when the worker is reaped).
            gpus = (job.placement or {}).get("gpus", [])
            # Peak GPU memory: as measured by the monitor where it could (NVML), else what was reserved.
            gpu_memory = job.peak_gpu_memory if job.peak_gpu_memory is not None else max((g["memory"] for g in gpus), default=0)
            worker.attempt = (*worker.attempt[:3], time.time(), sum(g["share"] for g in gpus), gpu_memory)  # type: ignore[assignment]
            self._account(worker)
        self.devices.release(job.id)
        if worker is not None and worker.job_id == job.id:
            worker.job_id = None
        job.worker_id = None
        job.stop_stage, job.stop_at, job.deadline = 0, None, None
        self._preempting.pop(job.id, None)
        if state == "preempted":
            # Back to the queue, keeping its place (queued_at) so it ages; no retry is spent.
            self._transition(job, "pending", f"{reason}; queued to start again", preemptions=job.preemptions + 1, exit_code=exit_code,
                             placement=None, end_state_on_stop=None)
            log.info("job_preempted", job_id=job.id, attempts=job.attempts, preemptions=job.preemptions)
        elif state == "failed" and retry and job.attempts - job.preemptions <= job.max_retries and job.attempts > 0:
            self._transition(job, "pending", f"retrying after: {reason}", exit_code=exit_code, placement=None, queued_at=time.time(),
                             end_state_on_stop=None)
            log.info("job_retrying", job_id=job.id, attempts=job.attempts, reason=reason)
        else:
            self._transition(job, state, reason, exit_code=exit_code)
            self.jobs.pop(job.id, None)
            self._ended_counts[state] = self._ended_counts.get(state, 0) + 1
            if job.started_at:
                self.exporter.durations.labels(job.kind, state).observe(max(0.0, job.ended_at - job.started_at))
            if state == "failed" and reason != "kernel restarted":
                self._service_failed(job)
            # The stream is complete: forget its counter (a later event would look it up again).
            self._stream_seq.pop(f"job.{job.id}", None)
            log.info("job_ended", job_id=job.id, state=state, reason=reason, exit_code=exit_code, attempts=job.attempts)
        self._schedule_needed = True

    # ------------------------------------------------------------------ reaping and timers

    def _reap(self, quiet: bool = False) -> None:
        """Collect every exited child; ``quiet`` (at shutdown) only notes the workers' ends."""
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if not quiet:
                worker = self.worker_by_pid.get(pid)
                if worker is not None:
                    worker.rusage = usage
                self._on_exit(pid, status)
                self._account(worker)
                continue
            worker = self.worker_by_pid.pop(pid, None)
            if worker is not None:
                worker.exited = status
                _kill_group(pid)

    def _on_exit(self, pid: int, status: int) -> None:
        if self._probe is not None and pid == self._probe.pid:
            self._probe.returncode = os.waitstatus_to_exitcode(status)
            return
        zygote = self.launcher.zygote
        if zygote is not None and pid == zygote.pid:
            zygote.returncode = os.waitstatus_to_exitcode(status)
            return
        worker = self.worker_by_pid.pop(pid, None)
        if worker is None:
            return  # an adopted grandchild of some worker
        worker.exited = status
        worker.exited_at = time.monotonic()
        _kill_group(pid)
        if worker.services:
            job = self.jobs.get(worker.job_id) if worker.job_id is not None else None
            self._drop_replica(worker, describe_status(status)[0], stopping=job is not None and job.end_state_on_stop is not None)
        if worker.job_id is not None and not worker.assigned:
            # Died before it got its job: that try failed.
            job = self.jobs.get(worker.job_id)
            worker.job_id = None
            if job is not None and job.state == "running":
                reason, code = describe_status(status)
                self._end_job(job, "failed", f"worker failed to start ({reason}); see {worker.log_path}", code)
        self._schedule_needed = True

    def _timers(self) -> None:
        now = time.monotonic()
        if self._service_restarts:
            self._restart_services(now)
        ws = self.settings["workers"]
        hb_timeout = float(ws["heartbeat_timeout"])
        for worker in list(self.workers.values()):
            if worker.exited is not None:
                if worker.job_id is not None:
                    # Reaped while running its job. Its last frames (its job_done among them) may
                    # still be queued on the ingest socket: end the job only once that is drained.
                    waited = now - (worker.exited_at or now)
                    backlog = self._ingest_more or bool(self.ingest.get(zmq.EVENTS) & zmq.POLLIN)
                    if (waited >= 0.2 and not backlog) or waited >= 30:
                        self._worker_died(worker)
                elif worker.exited_at is not None and now - worker.exited_at > 1.0:
                    del self.workers[worker.id]
                continue
            if worker.done_at is not None and worker.job_id is None and now - worker.done_at > float(ws["kill_grace"]):
                worker.signal_group(signal.SIGKILL)
                worker.done_at = now
            if worker.pid is not None and now - worker.last_seen > hb_timeout and worker.done_at is None:
                log.warning("worker_heartbeat_lost", worker=worker.id, pid=worker.pid, job_id=worker.job_id)
                worker.signal_group(signal.SIGKILL)
                worker.last_seen = now  # signal once; the reap finishes the story
                worker.lost = True
            if worker.pid is None and now - worker.spawned_at > 30:
                log.warning("worker_never_started", worker=worker.id)
                worker.exited = -1
                worker.exited_at = now
        for job in list(self.jobs.values()):
            if job.state != "running":
                continue
            if job.deadline is not None and now >= job.deadline and not job.stop_stage:
                self._stop_job(job, f"timeout after {job.timeout:g}s", "failed")
            if job.stop_stage and job.stop_at is not None and now >= job.stop_at:
                worker = self.workers.get(job.worker_id) if job.worker_id else None
                if worker is None:
                    continue
                if job.stop_stage == 1:
                    worker.signal_group(signal.SIGTERM)
                    job.stop_stage, job.stop_at = 2, now + float(ws["kill_grace"])
                elif job.stop_stage == 2:
                    worker.signal_group(signal.SIGKILL)
                    job.stop_stage, job.stop_at = 3, None

    def _worker_died(self, worker: WorkerProc) -> None:
        job = self.jobs.get(worker.job_id) if worker.job_id is not None else None
        worker.job_id = None
        if job is None:
            return
        status = worker.exited if worker.exited is not None and worker.exited >= 0 else 9
        reason, code = describe_status(status)
        if worker.lost:
            reason = f"worker lost its heartbeat and was killed ({reason})"
        if job.end_state_on_stop is not None:
            how = f" (stopped with {signal_name(-code)})" if code < 0 else ""
            self._end_job(job, job.end_state_on_stop, f"{job.cancel_reason}{how}", code, retry=job.end_state_on_stop == "failed")
        else:
            self._end_job(job, "failed", reason, code)

    # ------------------------------------------------------------------ shutdown

    def _end_services(self, reason: str) -> None:
        """Running services end as cancelled with ``reason`` (a clean stop is not a crash: the next
        boot must not find them "running" and mark them failed)."""
        for job in list(self.jobs.values()):
            entry = self.registry.kinds.get(job.kind)
            if job.state == "running" and entry is not None and entry.service:
                try:
                    self._end_job(job, "cancelled", reason, None, retry=False)
                except Exception:
                    log.exception("service_end_failed", job_id=job.id)
        with contextlib.suppress(Exception):
            self.store.commit()

    def _shutdown(self) -> None:
        reason = self.stopping or "kernel loop ended"
        log.info("kernel_stopping", reason=reason)
        for identity, _msg, parent_id in self._held_submits:
            self.reply_error(identity, KernelError(f"the kernel is shutting down ({reason}); the job was not submitted"), parent_id)
        self._held_submits = []
        self._end_services("kernel shut down")
        try:
            self.emit("kernel.stopping", KernelStopping(reason=reason))
            self._flush_out()
        except Exception:
            log.exception("shutdown_flush_failed")
        for worker in self.workers.values():
            if worker.alive and worker.pid is not None:
                worker.signal_group(signal.SIGTERM)
        self.launcher.close()
        deadline = time.monotonic() + 3
        while any(w.alive and w.pid for w in self.workers.values()) and time.monotonic() < deadline:
            self._reap(quiet=True)
            time.sleep(0.01)
        for worker in self.workers.values():
            if worker.alive and worker.pid is not None:
                worker.signal_group(signal.SIGKILL)
        self._reap(quiet=True)
        if self._probe is not None and self._probe.poll() is None:
            self._probe.kill()
        if getattr(self, "exporter", None) is not None:
            self.exporter.stop()
        try:
            self.store.close()
        except Exception:
            log.exception("store_close_failed")
        self.statedir.remove_kernel_file()
        for sock in (self.control, self.ingest, self.pub):
            sock.close(0)
        self.zctx.term()
        for url in self.endpoints.values():
            if url.startswith("ipc://"):
                try:
                    os.unlink(url[len("ipc://"):])
                except OSError:
                    pass
        self.statedir.release()
        log.info("kernel_stopped")



_KERNEL_ONLY_TYPES = frozenset({"job.state"})


def _kill_group(pid: int) -> None:
    """SIGKILL a reaped worker's process group: whatever its job left behind goes with it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _fast_check_for(type_name: str) -> Any:
    """The registry's quick validity check for a message type (see llmos.protocol)."""
    from llmos.protocol import _fast_check, spec_for

    return _fast_check(spec_for(type_name))


def _check_endpoint(url: str) -> None:
    if url.startswith("ipc://") or url.startswith("inproc://"):
        path = url.split("://", 1)[1]
        if url.startswith("ipc://") and len(path) > 107:
            raise ConfigError(f"ipc socket path is too long ({len(path)} bytes, the limit is 107): {path}", endpoint=url)
        return
    if url.startswith("tcp://"):
        host = url[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(
                f"refusing to bind {url}: TCP endpoints on a non-loopback address need CurveZMQ authentication, which this kernel does not enable yet",
                endpoint=url,
            )
        return
    raise ConfigError(f"endpoint {url!r} must start with ipc://, tcp:// or inproc://", endpoint=url)


__all__ = ["Kernel", "KernelLocked", "holder_pid", "runtime_dir_for"]
