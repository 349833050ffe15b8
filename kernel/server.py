"""The kernel process: the wiring of its components and the loop that drives them.

One thread, one poll loop. Each turn: read what arrived (signals, the zygote, reaped children,
control requests, then workers' events), act on timers (stop stages, timeouts, heartbeats,
service restarts), schedule, then commit the turn's writes in one SQLite transaction, and only
then publish its events and send its replies — so nothing is announced before it is durable.

Who owns what (docs/architecture.md draws it):

=============== ==========================================================================
``statedir``    the lock, the runtime dir, kernel.json
``bus``         the sockets, endpoint checks, the outbox and its flush
``journal``     sequence numbers, write-then-publish, replay, stream heads
``control``     requests: the handler table and error replies
``ingest``      workers' events: checked, then journaled
``jobs``        the job table; ``transition()``, the only place a state changes; retries
``scheduler``   a pure ``plan()`` over the queue and the device table
``services``    the service router and the restart/quarantine policy
``supervisor``  workers: the launcher, the pool, reaping, heartbeats, stop stages
``usage``       accounting and the live measurements a monitor reports
``limits``      memory: a cgroup per job's worker, the monitor's RSS check, the node guard
``metrics``     the Prometheus exporter, fed a snapshot by the loop
=============== ==========================================================================

What stays here is what needs several of them at once: a job's start and end.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import signal
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
    JobRejected,
    KernelError,
    LlmosError,
    ProtocolError,
    ValidationError,
)
from llmos.kernel import scheduler
from llmos.kernel.artifacts import Artifacts
from llmos.kernel.bus import Bus, check_endpoint
from llmos.kernel.cluster import Cluster, ClusterTable, ray_host
from llmos.kernel.control import Control, Request
from llmos.kernel.devices import DeviceTable, GpuProbe, parse_fake_gpus
from llmos.kernel.ingest import Ingest
from llmos.kernel.jobs import JobTable
from llmos.kernel.journal import Journal
from llmos.kernel.keys import KeyGuard, KeyStore
from llmos.kernel.limits import Limits
from llmos.kernel.metrics import DeviceView, Exporter, Snapshot
from llmos.kernel.pipelines import Pipelines
from llmos.kernel.plugins import Registry, load_plugins, ranks_of
from llmos.kernel.retention import Retention
from llmos.kernel.services import RestartPolicy, ServiceRouter
from llmos.kernel.statedb import open_store
from llmos.kernel.statedir import (
    KernelLocked,
    StateDir,
    holder_pid,
    make_private_dir,
    runtime_dir_for,
)
from llmos.kernel.storage import Storage, is_storage_error
from llmos.kernel.store import JobRecord
from llmos.kernel.supervisor import (
    STAGE_SIGNAL,
    Launcher,
    Pool,
    StopStage,
    WorkerProc,
    assignment,
    become_subreaper,
    describe_status,
    kill_orphan,
    reap,
    signal_name,
)
from llmos.kernel.usage import Usage
from llmos.params import schema_of
from llmos.paths import free_port
from llmos.plugin import Resources
from llmos.protocol import (
    ARTIFACT_ACTIONS,
    END_STATES,
    JOB_STATES,
    ArtifactsReply,
    ArtifactsRequest,
    CancelRequest,
    DevicesReply,
    DevicesRequest,
    JobDone,
    JobReply,
    JobRequest,
    JobsReply,
    JobsRequest,
    KernelStarted,
    KernelStopping,
    OkReply,
    PipelineReply,
    PipelineRequest,
    PipelinesReply,
    PipelinesRequest,
    PipelineSubmit,
    PluginsChanged,
    PluginsReloadReply,
    PluginsReloadRequest,
    PluginsReply,
    PluginsRequest,
    RankExited,
    RankStart,
    RankStop,
    ReplayRequest,
    ShutdownRequest,
    StatusReply,
    StatusRequest,
    StreamHeadsReply,
    StreamHeadsRequest,
    SubmitRequest,
    WorkerCancel,
    encode_body,
    replay_reply_frames,
    storable_problem,
)
from llmos.units import parse_size

log = structlog.get_logger("llmos.kernel")


class Kernel:
    """The llmos kernel: its components, wired together, and the loop."""

    def __init__(self, settings: Settings, state_dir: Path) -> None:
        self.settings = settings
        self.policy = scheduler.Policy.from_settings(settings)
        self.state_dir = state_dir
        self.statedir = StateDir(state_dir)
        self.started_at = time.time()
        self.stopping: str | None = None
        self.stats = {"events_journaled": 0, "bad_frames": 0, "requests": 0, "bad_requests": 0, "jobs_started": 0, "turn_errors": 0, "schedule_passes": 0}
        self._schedule_needed = True
        self._preempting: dict[int, int] = {}  # job being preempted -> the job it makes room for
        self._signals: list[int] = []
        self._sigchld = False
        self._next_reap = 0.0
        #: GPU submits that only the probe can answer (fit or never fit), answered when it ends.
        self._held_submits: list[Request] = []
        self._no_restart: set[int] = set()  # service jobs that must not be started again when they fail
        self._requeued: dict[int, str] = {}  # pending job -> why it went back to the queue (a retry, a preemption)
        self._probe: GpuProbe | None = None

    # ------------------------------------------------------------------ boot

    def boot(self) -> None:
        """Take the state dir, open the store, build and wire the components, recover what the
        previous kernel left, start the autostart services; then say where the bus is."""
        self.statedir.take()
        method = self._endpoints()
        self.store = open_store(self.state_dir)  # refuses damaged state in one line: what is wrong, what to do
        self.store.keep_writes()  # before anything holds its connection: a refused commit can be written again
        self.journal = Journal(self.store)
        self.storage = Storage(self.state_dir, self.settings["storage"], self.emit)
        self.store.fit_wal(self.storage.total)
        self._unsaved: list[Any] | None = None  # writes the disk refused, waiting for room (with the journal's kernel events)
        self._next_save = 0.0
        self.jobs = JobTable(self.store, self.emit)
        self.artifacts = Artifacts(self.store, self.state_dir)
        self.retention = Retention(self.store, self.state_dir, self.settings["retention"], self.emit, lambda: self.journal.seq,
                                   lambda job_id, folder: self.artifacts.holds_live(folder))
        self.registry: Registry = self._load_registry()
        self.devices: DeviceTable | ClusterTable = self._device_table()
        self.keys = KeyStore(self.state_dir)
        curve = (self.keys.kernel_pair()[1], lambda zctx: KeyGuard(zctx, self.keys)) if self.curve else None
        self.bus = Bus(self.endpoints, pub_hwm=int(self.settings["kernel"]["pub_hwm"]), curve=curve)
        self.endpoints = self.bus.endpoints  # TCP ports chosen at bind
        if self.bus.guard is not None:
            self.endpoints["curve_public"] = self.keys.kernel_pair()[0]
        self._install_signals()
        self._wire(method)
        self._start_exporter()
        for orphan in self.jobs.recover():
            kill_orphan(orphan)
        self.pipelines.recover()
        if not self.devices.probing:
            self._fail_never_fitting()
        self._autostart_services()
        self.storage.boot()
        self.emit("kernel.started", KernelStarted(version=__version__, pid=os.getpid()))
        self._flush_out()
        self.statedir.write_kernel_file({"pid": os.getpid(), "version": __version__, "state_dir": str(self.state_dir), "started_at": self.started_at, **self.endpoints})
        log.info("kernel_ready", pid=os.getpid(), state_dir=str(self.state_dir), **self.endpoints, workers=self.launcher.method)

    def _endpoints(self) -> str:
        """The runtime dir and the three endpoints, checked; returns the worker start method."""
        ks = self.settings["kernel"]
        self.runtime_dir = runtime_dir_for(self.state_dir, ks["runtime_dir"])
        make_private_dir(self.runtime_dir)
        self.endpoints = {
            "control": ks["control_endpoint"] or f"ipc://{self.runtime_dir}/control",
            "events": ks["events_endpoint"] or f"ipc://{self.runtime_dir}/events",
            "ingest": ks["ingest_endpoint"] or f"ipc://{self.runtime_dir}/ingest",
        }
        listen = str(ks["listen"]).strip()
        if listen:
            host, _, port = listen.rpartition(":")
            if not host or not port.isdigit() or int(port) > 65533:
                raise ConfigError(f"kernel.listen {listen!r}: expected HOST:PORT (PORT 0 for any free ports)", value=listen)
            for i, name in enumerate(("control", "events", "ingest")):
                self.endpoints[f"{name}_tcp"] = f"tcp://{host}:{int(port) + i if int(port) else 0}"
        self.backend = str(self.settings["cluster"]["backend"])
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"cluster.backend must be 'local' or 'ray', got {self.backend!r}", value=self.backend)
        if self.backend == "ray" and not listen:
            # Remote workers reach the bus over TCP: listen where the cluster can reach us.
            host = ray_host(str(self.settings["cluster"]["address"]))
            for name in ("control", "events", "ingest"):
                self.endpoints[f"{name}_tcp"] = f"tcp://{host}:0"
        self.curve = bool(ks["curve"])
        if self.backend == "ray" and not self.curve:
            raise ConfigError("cluster.backend 'ray' needs kernel.curve = true: remote workers authenticate with the kernel's keys")
        if self.backend == "ray" and importlib.util.find_spec("ray") is None:
            raise ConfigError("cluster.backend 'ray' (llmos boot --ray) needs Ray in this environment: pip install 'llmos[ray]'")
        for url in self.endpoints.values():
            check_endpoint(url, curve=self.curve)
        method = self.settings["workers"]["start_method"]
        if method not in ("zygote", "spawn"):
            raise ConfigError(f"workers.start_method must be 'zygote' or 'spawn', got {method!r}")
        return method

    def _device_table(self) -> DeviceTable | ClusterTable:
        if self.backend == "ray":
            return ClusterTable()  # filled from the cluster's nodes, each probed on its node
        ds = self.settings["devices"]
        cores = float(ds["cpus"]) or float(psutil.cpu_count() or 1)
        ram = parse_size(ds["memory"]) if ds["memory"] else psutil.virtual_memory().total
        devices = DeviceTable(cores, ram, parse_fake_gpus(ds["fake_gpus"]))
        if ds["probe_gpus"]:
            devices.probing = True
            self._probe = GpuProbe()
        return devices

    def _wire(self, method: str) -> None:
        """The components, and the control handler table they make up."""
        ks, ws = self.settings["kernel"], self.settings["workers"]
        if (method == "zygote" and not become_subreaper()) or self.backend == "ray":
            method = "spawn"  # on a cluster, Ray starts every worker; no zygote here
        self.launcher = Launcher(
            method=method, control=self.endpoints["control"], ingest=self.endpoints["ingest"], heartbeat=float(ws["heartbeat_interval"]),
            log_level=ks["log_level"], worker_dir=self.state_dir / "workers",
        )
        self.pool = Pool(self.launcher, {**ws, "pool_size": 0} if self.backend == "ray" else ws, self.bus, self._worker_ready)
        self.cluster: Cluster | None = None
        self._cluster_fd: int | None = None
        if isinstance(self.devices, ClusterTable):
            self.cluster = Cluster(
                str(self.settings["cluster"]["address"]), self.devices, self.pool, control=self.endpoints["control_tcp"],
                ingest=self.endpoints["ingest_tcp"], key=self.keys.workers_key(), heartbeat=float(ws["heartbeat_interval"]),
                log_level=ks["log_level"], state_dir=self.state_dir, emit=self.emit, changed=self._cluster_changed,
                exited=lambda worker: self.usage.account(worker), rank_exited=self._rank_exited,
            )
            self._watch_cluster()
        self.router = ServiceRouter(self.bus, self.pool.workers, on_register=lambda worker, name: self.pipelines.job_serving(worker.job_id),
                                    on_refused=self._replica_refused)
        self.restarts = RestartPolicy(self.settings["services"], self.emit)
        self.limits = Limits(self.settings["limits"], self.jobs, self.pool.workers, self.emit, self._kill_job)
        self.usage = Usage(
            self.store, self.devices, self.jobs, self.pool.workers, lambda: self.registry, self.emit, self._stop_job,
            float(self.settings["monitor"]["gpu_overuse_stop"]), on_usage=self.limits.measured,
        )
        self.ingest = Ingest(self.bus, self.journal, self.pool.workers, self.jobs, self._on_job_done, self.stats,
                             on_artifact=self._on_artifact, max_bytes=self.storage.turn_bytes)
        self.pipelines = Pipelines(
            self.store, self.artifacts, self.emit, self._submit_stage, lambda job_id, why: self._stop_job(self.jobs.find(job_id), why, "cancelled"),
            self.jobs.find, lambda: self.registry,
        )
        self.control = Control(self.bus, self.stats)
        self.control.route({
            SubmitRequest: self._on_submit,
            JobRequest: lambda req: JobReply(job=self.jobs.find(req.msg.id).to_dict()),
            JobsRequest: self._on_jobs,
            CancelRequest: self._on_cancel,
            DevicesRequest: lambda req: DevicesReply(devices=self.devices.to_list()),
            PluginsRequest: lambda req: PluginsReply(plugins=self.registry.describe_plugins(), kinds=self.registry.describe_kinds()),
            StatusRequest: self._on_status,
            ReplayRequest: self._on_replay,
            StreamHeadsRequest: self._on_stream_heads,
            PluginsReloadRequest: lambda req: self.reload_plugins(),
            ShutdownRequest: self._on_shutdown,
            ArtifactsRequest: self._on_artifacts,
            PipelineSubmit: self._on_pipeline_submit,
            PipelineRequest: self._on_pipeline,
            PipelinesRequest: lambda req: PipelinesReply(pipelines=self.pipelines.list(max(1, min(req.msg.limit, 10_000)))),
        })
        self.control.route({RankStart: self._on_rank_start, RankStop: self._on_rank_stop})
        self.control.route(self.pool.handlers())
        self.control.route(self.router.handlers())
        self.control.route(self.usage.handlers())

    def _replica_refused(self, worker: WorkerProc, why: str) -> None:
        """A replica that serves something else than its name's running replicas: its job fails
        with the reason, and is not restarted (it would be refused again)."""
        job = self.jobs.get(worker.job_id) if worker.job_id is not None else None
        if job is not None and job.state == "running":
            self._no_restart.add(job.id)
            self._stop_job(job, why, "failed")

    def _cluster_changed(self) -> None:
        self._schedule_needed = True

    def _rank_job(self, req: Request, job_id: int) -> tuple[WorkerProc, JobRecord]:
        """The worker asking about a rank of its own job, and that job (ProtocolError otherwise)."""
        worker = self.pool.workers.get(req.identity.decode(errors="replace"))
        job = self.jobs.get(job_id)
        if worker is None or job is None or worker.job_id != job_id or job.state != "running":
            raise ProtocolError(f"rank requests come only from the worker running job {job_id}")
        return worker, job

    def _on_rank_start(self, req: Request) -> None:
        """Rank 0 of a gang asks for a rank the plan put on another node (a refusal reaches it
        as that rank's end, so it never waits for a rank that will not come)."""
        msg: RankStart = req.msg
        worker, job = self._rank_job(req, msg.job_id)
        plan = (job.placement or {}).get("distributed") or {}
        if self.cluster is None or not 0 < msg.rank < len(plan.get("ranks", [])) or not plan["ranks"][msg.rank].get("node"):
            why = f"job {job.id} has no rank {msg.rank} on another node to start"
            self.bus.send(req.identity, RankExited(job_id=job.id, rank=msg.rank, code=None, reason=why))
            raise ValidationError(why, field="rank")
        log_path = msg.log or str(self.state_dir / "jobs" / str(job.id) / f"rank{msg.rank}.log")
        self.cluster.launch_rank(worker, job.id, msg.rank, plan, msg.argv, msg.env, log_path)

    def _on_rank_stop(self, req: Request) -> None:
        msg: RankStop = req.msg
        self._rank_job(req, msg.job_id)
        if self.cluster is not None:
            self.cluster.stop_ranks(msg.job_id, msg.rank)

    def _rank_exited(self, host: Any, code: int | None, reason: str | None) -> None:
        """A remote rank ended: its worker hears of it; a rank whose node is lost takes its gang
        with it (all ranks fail together, and retry together)."""
        self.bus.send(host.worker.encode(), RankExited(job_id=host.job_id, rank=host.rank, code=code, reason=reason))
        job = self.jobs.get(host.job_id)
        if reason and job is not None and job.state == "running" and not job.stop_stage:
            self._stop_job(job, f"{reason} (rank {host.rank} of the gang ran there)", "failed")

    def _watch_cluster(self) -> None:
        """Poll the Ray agent's reports (its pipe changes when it is started again)."""
        fd = self.cluster.fd if self.cluster is not None else None
        if fd != self._cluster_fd:
            if self._cluster_fd is not None:
                with contextlib.suppress(KeyError):
                    self.bus.poller.unregister(self._cluster_fd)
            if fd is not None:
                self.bus.poller.register(fd, zmq.POLLIN)
            self._cluster_fd = fd

    def _load_registry(self) -> Registry:
        from llmos.kernel.cli.common import BUILTIN_COMMANDS
        from llmos.kernel.plugins import collect_commands, disabled_plugins

        registry = load_plugins(disabled=disabled_plugins(self.state_dir))
        collect_commands(registry, set(BUILTIN_COMMANDS))  # so `plugins list` shows them
        return registry

    def _start_exporter(self) -> None:
        self.exporter = Exporter(self._snapshot)
        self.bus.poller.register(self.exporter.wake_r, zmq.POLLIN)
        address = self.settings["monitor"]["exporter"]
        if not address:
            return
        try:
            self.exporter.start(address)
        except ConfigError as exc:
            if not self.settings["monitor"]["exporter_optional"]:
                raise
            log.warning("exporter_not_started", error=str(exc))

    def _snapshot(self) -> Snapshot:
        return Snapshot(
            jobs=self.jobs.counts(),
            queue_depth=len(self.jobs.of_state("pending")),
            events_journaled=self.journal.journaled,
            workers_alive=self.pool.counts()["alive"],
            devices=tuple(DeviceView(d.id, d.kind, d.memory_total, d.memory_reserved, d.share_reserved, dict(d.used)) for d in self.devices.devices),
            running=tuple((j.id, j.kind, dict(j.usage)) for j in self.jobs.of_state("running") if j.usage),
        )

    def _install_signals(self) -> None:
        self._sig_r, self._sig_w = os.pipe()
        os.set_blocking(self._sig_r, False)
        os.set_blocking(self._sig_w, False)
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.bus.poller.register(self._sig_r, zmq.POLLIN)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGCHLD:
            self._sigchld = True
        self._signals.append(signum)

    def _probe_done(self, gpus: list[dict[str, Any]], source: str) -> None:
        self._probe = None
        self.devices.add_probed(gpus, source)
        log.info("devices_probed", source=source, gpus=len(gpus))
        self._schedule_needed = True
        self._fail_never_fitting()
        held, self._held_submits = self._held_submits, []
        for req in held:
            try:
                self.control.answer(req, self._on_submit(req))
            except Exception as exc:
                self.control.fail(req, exc)

    def _fail_never_fitting(self) -> None:
        """Pending jobs that can never fit on this machine fail rather than wait forever (and
        block the queue): after a restart on a smaller machine, or once the GPU probe is done."""
        for job in self.jobs.of_state("pending"):
            why = self.devices.never_fits(Resources(**job.resources), self._ranks_of(job))
            if why:
                self._end_job(job, "failed", f"the request can never fit: {why}", None, retry=False)

    # ------------------------------------------------------------------ events and replies

    def emit(self, topic: str, msg: Any, sender: str = "kernel") -> None:
        """Journal (and, after the commit, publish) an event the kernel makes."""
        self.journal.emit(topic, msg, sender)

    def _flush_out(self) -> None:
        """Commit, then publish the turn's events and send its replies."""
        streams = self._commit()
        self.stats["events_journaled"] = self.journal.journaled
        if streams:
            self.bus.publish(streams)
        for identity in self.bus.send_replies():
            self.router.caller_gone(identity)  # its cancels go out next turn

    def _commit(self) -> dict[str, list[bytes]]:
        """The turn's commit; its events, to publish. A commit the disk refuses costs the turn's
        workers' events, never the kernel (kernel/storage.py)."""
        if self._unsaved is not None:  # earlier writes wait for room: this turn's join them, in order
            self._unsaved += self.store.rollback()
            return self._save_again(force=False)
        try:
            streams = self.journal.end_turn()
            self.store.commit()
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            self._refused(exc)
            return self._save_again(force=True)
        self.journal.committed()
        return streams

    def _refused(self, exc: BaseException) -> None:
        """The disk refused a commit: roll the turn back, become full (the reserve's room is
        given back), keep its writes and the kernel's own events for the next try, and stop the
        jobs whose events were dropped."""
        self._unsaved = self.store.rollback()
        dropped = self.journal.rollback()
        self.storage.refused(exc)
        self.journal.refusing = True
        wal = self.store.free_wal()
        log.warning("storage_refused", error=f"{type(exc).__name__}: {exc}", dropped_streams=len(dropped), free=self.storage.free, wal=wal)
        self._refuse_streams(dropped)
        self._unsaved += self.store.rollback()  # the stops' writes, after the turn's

    def _save_again(self, *, force: bool) -> dict[str, list[bytes]]:
        """Write what waits for room (once a second unless ``force``); its events, to publish."""
        now = time.monotonic()
        if self._unsaved is None or (not force and now < self._next_save):
            return {}
        self._next_save = now + 1.0
        try:
            self.store.redo(self._unsaved)
            self.journal.rewrite()
            streams = self.journal.end_turn()
            self.store.commit()
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            self.store.rollback()
            self.store.free_wal()
            self._refuse_streams(self.journal.rollback())
            self._unsaved += self.store.rollback()
            self.storage.refused(exc)
            return {}
        self._unsaved = None
        self.journal.committed()
        log.info("storage_saved", events=sum(len(v) for v in streams.values()))
        return streams

    def _refuse_streams(self, streams: set[str]) -> None:
        """Jobs whose events could not be stored are stopped as failed, saying why."""
        for stream in sorted(streams):
            kind, _, ident = stream.partition(".")
            job = self.jobs.get(int(ident)) if kind == "job" and ident.isdigit() else None
            if job is not None and job.state == "running":
                self.journal.barred.add(stream)  # until the job ends, even once there is room again
                if not job.stop_stage:
                    self._stop_job(job, f"its events could not be stored: {self.storage.refusal()}", "failed")

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
                    self.stats["turn_errors"] += 1
                    log.exception("turn_failed", error=f"{type(exc).__name__}: {exc}")
                    try:
                        self._flush_out()
                    except Exception:
                        log.exception("flush_after_error_failed")
        finally:
            self._shutdown()

    def _turn(self) -> None:
        busy = self.journal.has_pending or self.bus.has_outgoing or self._schedule_needed or self.ingest.more
        # Timers (stop stages, timeouts, heartbeats) are checked at least every 100 ms.
        ready = dict(self.bus.poller.poll(0 if busy else 100))
        if self._sig_r in ready:
            self._drain_signals()
        now = time.monotonic()
        zygote = self.pool.zygote_fd
        if self._sigchld or now >= self._next_reap:
            # SIGCHLD (or the once-a-second safety net): read the zygote's pid reports first, so a
            # worker's pid is known when it is reaped.
            self._sigchld = False
            self._next_reap = now + 1.0
            if zygote is not None:
                self.pool.read_zygote()
            self._reap()
        elif zygote is not None and zygote in ready:
            self.pool.read_zygote()
        # Control before events: a worker sends its control messages (a service's last replies)
        # before its job's end, and the end must not overtake them.
        if self.bus.control in ready:
            self.control.drain()
        if self.bus.ingest in ready or self.ingest.more:
            self.ingest.drain()
            if self.journal.refused:  # the disk is full: the jobs whose events were refused stop
                refused, self.journal.refused = self.journal.refused, set()
                self._refuse_streams(refused)
        if self.cluster is not None and self._cluster_fd is not None and self._cluster_fd in ready:
            self.cluster.read()
            self._watch_cluster()
        self._timers(now)
        if self._probe is not None:
            result = self._probe.result()
            if result is not None:
                self._probe_done(*result)
        if self._schedule_needed:
            self._schedule_needed = False
            self._schedule()
        self._flush_out()
        if self.exporter.wake_r in ready:
            self.exporter.serve_snapshot()

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

    # ------------------------------------------------------------------ requests

    def _on_submit(self, req: Request) -> JobReply | None:
        msg: SubmitRequest = req.msg
        options = {"priority": msg.priority, "max_retries": msg.max_retries, "timeout": msg.timeout, "preemptible": msg.preemptible}
        job = self._submit(msg.kind, msg.params, msg.resources, options, msg.cwd, coerce=msg.coerce, hold=req)
        return None if job is None else JobReply(job=job.to_dict())

    def _submit_stage(self, kind: str, params: dict[str, Any], resources: dict[str, Any], options: dict[str, Any], cwd: str | None) -> JobRecord:
        """A pipeline stage's job, checked as a user's submit is (JobRejected says why not)."""
        job = self._submit(kind, params, resources, options, cwd)
        assert job is not None  # only a user's request is held for the GPU probe
        return job

    def _submit(self, kind: str, params: dict[str, Any], resources: dict[str, Any], options: dict[str, Any], cwd: str | None, *,
                coerce: bool = False, hold: Request | None = None) -> JobRecord | None:
        """Check and create a job: artifact references resolved, the kind's schema and check, the
        options, whether it can ever fit. With ``hold``, a GPU request the probe must answer waits
        for it (None is returned; the request is answered later)."""
        if self.stopping:
            raise KernelError("the kernel is shutting down")
        self.storage.refuse_submit()
        params, inputs = self.artifacts.resolve_inputs(kind, params)
        entry, params, res = self.registry.validate(kind, params, resources, coerce=coerce, cwd=cwd)
        priority, max_retries, timeout = int(options.get("priority") or 0), int(options.get("max_retries") or 0), options.get("timeout")
        _check_options(kind, params, timeout, max_retries, priority)
        if self.devices.needs_probe(res):
            if hold is not None:
                # Whether this can ever fit depends on GPUs the probe has not reported yet: answer
                # when it has, so a request that never fits is refused at submit, not failed later.
                self._held_submits.append(hold)
                return None
        else:
            self.devices.check(res, ranks_of(entry.spec, params))
        asked = options.get("preemptible")
        preemptible = bool(getattr(entry.spec, "preemptible", False)) if asked is None else bool(asked)
        if preemptible and entry.service:
            if asked:
                raise JobRejected(f"{kind} is a service: services cannot be preempted", field="preemptible")
            preemptible = False
        job = self._create_job(kind, params, res, priority=priority, max_retries=max_retries, timeout=timeout, preemptible=preemptible)
        self.artifacts.record_inputs(job.id, inputs)
        return job

    def _on_artifact(self, job_id: int, body: dict[str, Any]) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            self.artifacts.register(job_id, job.kind, body)

    def _on_artifacts(self, req: Request) -> ArtifactsReply:
        msg: ArtifactsRequest = req.msg
        if msg.action not in ARTIFACT_ACTIONS:
            raise ValidationError(f"unknown artifacts action {msg.action!r}; expected one of {', '.join(ARTIFACT_ACTIONS)}", field="action")
        if msg.action == "list":
            return ArtifactsReply(artifacts=self.artifacts.list(max(1, min(msg.limit, 100_000)), include_removed=msg.all))
        active = set(self.jobs)
        if msg.action == "gc":
            return ArtifactsReply(artifacts=self.artifacts.gc(active, dry_run=msg.dry_run))
        if not msg.ref:
            raise ValidationError(f"artifacts {msg.action} needs an artifact: an id, a unique prefix, artifact:<id> or job:<id>", field="ref")
        if msg.action == "show":
            return ArtifactsReply(artifact=self.artifacts.show(msg.ref))
        if msg.action == "lineage":
            return ArtifactsReply(artifact=self.artifacts.lineage(msg.ref))
        return ArtifactsReply(artifact=self.artifacts.remove(msg.ref, active, force=msg.force))

    def _on_pipeline(self, req: Request) -> PipelineReply:
        msg: PipelineRequest = req.msg
        actions = {"show": self.pipelines.show, "cancel": self.pipelines.cancel, "resume": self.pipelines.resume}
        if msg.action not in actions:
            raise ValidationError(f"unknown pipeline action {msg.action!r}; expected one of {', '.join(actions)}", field="action")
        return PipelineReply(pipeline=actions[msg.action](msg.id))

    def _create_job(self, kind: str, params: dict[str, Any], res: Resources, **options: Any) -> JobRecord:
        job = self.jobs.create(kind, params, res.to_dict(), **options)
        self._schedule_needed = True
        log.info("job_submitted", job_id=job.id, kind=job.kind)
        return job

    def _on_jobs(self, req: Request) -> JobsReply:
        msg: JobsRequest = req.msg
        if msg.state is not None and msg.state not in JOB_STATES:
            raise ValidationError(f"unknown job state {msg.state!r}; expected one of {', '.join(JOB_STATES)}", field="state")
        if msg.before is not None and msg.before < 1:
            raise ValidationError(f"before {msg.before}: expected a job id (1 or more)", field="before")
        limit = max(1, min(msg.limit, 100_000))
        without = () if msg.services else tuple(sorted(name for name, entry in self.registry.kinds.items() if entry.service))
        rows = self.store.list_jobs(msg.state, limit, before=msg.before, without=without)
        total = self.store.count_matching(msg.state, without=without)
        if not rows:
            older = 0
        elif msg.before is None:  # the newest page: everything else is older
            older = total - len(rows)
        else:
            older = self.store.count_matching(msg.state, before=rows[0].id, without=without)
        latest = self.jobs.latest
        return JobsReply(jobs=[latest(j).to_dict() for j in rows], total=total, older=older)

    def _on_cancel(self, req: Request) -> JobReply:
        msg: CancelRequest = req.msg
        job = self.jobs.find(msg.id)
        if job.state not in END_STATES:
            self._stop_job(job, msg.reason or "cancelled by user", "cancelled")
        return JobReply(job=job.to_dict())

    def _on_status(self, req: Request) -> StatusReply:
        return StatusReply(
            version=__version__,
            pid=os.getpid(),
            started_at=self.started_at,
            state_dir=str(self.state_dir),
            endpoints=dict(self.endpoints),
            jobs=self.jobs.counts(),
            workers=self.pool.counts(),
            last_seq=self.journal.seq,
            metrics_url=self.exporter.url,
            stats=dict(self.stats, events_journaled=self.journal.journaled, gpus_probing=int(self.devices.probing), zygote=int(self.launcher.zygote is not None)),
            cluster=self.cluster.to_dict() if self.cluster is not None else None,
            storage={**self.storage.to_dict(), "refused_events": self.journal.refused_events},
        )

    def _on_pipeline_submit(self, req: Request) -> PipelineReply:
        self.storage.refuse_submit()
        return PipelineReply(pipeline=self.pipelines.create(req.msg.spec, req.msg.cwd).to_dict())

    def _on_replay(self, req: Request) -> None:
        msg: ReplayRequest = req.msg
        items, more = self.journal.replay(msg.prefix, msg.since, msg.until, max(1, min(msg.limit, 10_000)))
        self.bus.send_frames(req.identity, replay_reply_frames(req.parent_id, self.journal.seq, more, items))

    def _on_stream_heads(self, req: Request) -> StreamHeadsReply:
        msg: StreamHeadsRequest = req.msg
        return StreamHeadsReply(heads=self.journal.stream_heads(msg.prefix, msg.since), last_seq=self.journal.seq)

    def _on_shutdown(self, req: Request) -> OkReply:
        self.stopping = "shutdown requested"
        return OkReply()

    def reload_plugins(self) -> PluginsReloadReply:
        """Load the plugin set again; running jobs keep theirs, new workers get the new one."""
        import importlib

        importlib.invalidate_caches()
        old = self.registry
        self.registry = self._load_registry()
        self.restarts.reset()
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
        self.pool.new_generation()  # workers forked from the old zygote hold the old plugins
        self.emit("kernel.plugins_changed", change)
        self._schedule_needed = True
        self._autostart_services()
        log.info("plugins_reloaded", **encode_body(change))
        return PluginsReloadReply(plugins=self.registry.describe_plugins(), **encode_body(change))

    # ------------------------------------------------------------------ services

    def _quarantine(self) -> None:
        """Kinds of quarantined services may not be submitted; plugin records say so."""
        quarantined = self.restarts.quarantined
        self.registry.unavailable.update(quarantined)
        for name, why in quarantined.items():
            entry = self.registry.kinds.get(name)
            record = self.registry.plugins.get(entry.plugin) if entry else None
            if record is not None:
                record.status = "quarantined"
                record.error = why

    def _service_failed(self, job: JobRecord) -> None:
        entry = self.registry.kinds.get(job.kind)
        if entry is None or not entry.service or self.stopping or job.id in self._no_restart:
            self._no_restart.discard(job.id)
            return
        if self.restarts.failed(job, entry.plugin, autostart=bool(getattr(entry.spec, "autostart", False))):
            self._quarantine()

    def _autostart_services(self) -> None:
        """Start every service that registered with ``autostart`` and is not already queued or
        running (or switched off in its config section, or quarantined)."""
        active = {j.kind for j in self.jobs.values()} | self.restarts.kinds_restarting()
        for name, entry in sorted(self.registry.kinds.items()):
            if not (entry.service and getattr(entry.spec, "autostart", False)) or name in active or name in self.restarts.quarantined:
                continue
            section = getattr(entry.spec, "config", None)
            settings = dict(self.settings.get(section) or {}) if section else {}
            if settings.get("autostart", True) is False:
                continue
            try:
                names = {f.name for f in schema_of(entry.spec.params)} if entry.spec.params is not None else set()
                _, params, res = self.registry.validate(name, {k: v for k, v in settings.items() if k in names}, {})
                self.devices.check(res)
            except LlmosError as exc:
                log.warning("service_not_started", service=name, error=str(exc))
                continue
            self._create_job(name, params, res, priority=1000)

    # ------------------------------------------------------------------ starting jobs

    def _schedule(self) -> None:
        """Start what fits, stop what must make room (the plan is :func:`scheduler.plan`'s); keep
        enough workers coming.

        A job is only ever given to a worker that is ready, so a slow worker start never holds a
        job hostage while another worker sits idle. On a Ray cluster a job's worker is started
        for it, on its node, once it is placed (at most ``max_starting`` starting at once).
        """
        pending = self.jobs.of_state("pending")
        self.stats["schedule_passes"] += 1
        if not pending:
            if self.cluster is None:
                self.pool.keep()
            return
        if self.cluster is None:
            ready = self.pool.idle()
            slots = len(ready)
        else:
            slots = max(0, int(self.settings["workers"]["max_starting"]) - self.cluster.starting())
        plan = scheduler.plan(pending, self.jobs.of_state("running"), self.devices, slots, self.policy, time.time(), self._preempting, ranks=self._ranks_of)
        self._note_waiting(plan.waiting)
        for job, placement in plan.starts:
            if self.cluster is None:
                worker = ready.pop(0)
            else:
                whole = placement.get("cpu", {})
                worker = self.cluster.launch(placement, float(whole.get("cores", 0)), int(whole.get("memory", 0)), self._ranks_of(job))
            self._start(job, placement, worker)
        for victim, job in plan.preemptions:
            self._preempting[victim.id] = job.id
            log.info("job_preempting", job_id=victim.id, for_job=job.id, priority=victim.priority, for_priority=job.priority)
            self._stop_job(victim, f"preempted by job {job.id} (priority {job.priority})", "preempted")
        if self.cluster is None:
            self.pool.keep(extra=plan.waiting_for_worker)

    def _note_waiting(self, waiting: dict[int, str]) -> None:
        """A pending job says why it waits (``llmos jobs``, ``llmos job``, ``top``, the SDK's
        ``JobInfo.reason``); a change of reason is journaled as a ``job.<id>.state`` event."""
        for job_id, why in waiting.items():
            job = self.jobs.get(job_id)
            if job is None or job.state != "pending":
                continue
            back = self._requeued.get(job_id)  # why it came back to the queue stays in front
            reason = f"{back}; {why}" if back else why
            if job.reason != reason:
                job.reason = reason
                if why != scheduler.WAITING_FOR_WORKER:  # a wait of milliseconds: no event for it
                    self.jobs.emit_state(job)

    def _ranks_of(self, job: JobRecord) -> int:
        entry = self.registry.kinds.get(job.kind)
        return ranks_of(entry.spec, job.params) if entry is not None else 1

    def _start(self, job: JobRecord, placement: dict[str, Any], worker: WorkerProc) -> None:
        """Reserve devices and bind a worker: the try begins (the job is running from here)."""
        self.devices.reserve(job.id, placement)
        self._requeued.pop(job.id, None)
        ranks = self._ranks_of(job)
        if ranks > 1:
            placement = {**placement, "distributed": self._rank_plan(placement, ranks)}
        worker.job_id = job.id
        self.stats["jobs_started"] += 1
        self.jobs.transition(
            job, "running", None, persist=not worker.ready,  # a ready worker's _assign stores the row with its pid
            placement=placement, exit_code=None, attempts=job.attempts + 1, started_at=time.time(), stop_stage=StopStage.NONE, stop_at=None,
            cancel_reason=None, end_state_on_stop=None, deadline=time.monotonic() + job.timeout if job.timeout else None, worker_id=worker.id,
        )
        if worker.ready:
            self._assign(worker)

    def _rank_plan(self, placement: dict[str, Any], n: int) -> dict[str, Any]:
        """A gang job's rank plan, meeting at a free TCP port on this machine that no other
        running job was handed."""
        taken = {j.placement["distributed"]["master_port"] for j in self.jobs.of_state("running") if j.placement and "distributed" in j.placement}
        port = free_port()
        while port in taken:
            port = free_port()
        if isinstance(self.devices, ClusterTable):
            # Rank 0's node is the rendezvous (its address as Ray knows it; the port is a guess
            # there that is free here: on one loopback cluster, the same machine).
            address = self.devices.info.get(placement["node"], {}).get("address") or "127.0.0.1"
            return scheduler.rank_plan(placement, n, port, address)
        return scheduler.rank_plan(placement, n, port)

    def _worker_ready(self, worker: WorkerProc) -> None:
        if worker.job_id is not None:
            self._assign(worker)
        else:
            self._schedule_needed = True

    def _assign(self, worker: WorkerProc) -> None:
        """Hand a bound job to its (now ready) worker."""
        job = self.jobs.get(worker.job_id) if worker.job_id is not None else None
        if job is None or job.state != "running" or worker.assigned:
            return
        worker.attempt = (job.id, job.attempts, job.started_at or time.time())
        # A remote worker's pid is its node's: never one a restarted kernel may kill here.
        job.worker_pid = worker.pid if worker.node is None else None
        try:
            job.worker_create_time = psutil.Process(worker.pid).create_time() if job.worker_pid else None
        except psutil.Error:
            job.worker_create_time = None
        worker.assigned = True
        self.store.update_job(job)
        self.limits.job_started(job, worker)  # its memory group, before the job's code runs
        self.bus.send(worker.id.encode(), assignment(job, self.state_dir, self.artifacts.inputs_of(job.id)))
        log.info("job_started", job_id=job.id, worker=worker.id, pid=worker.pid, attempt=job.attempts, node=worker.node)

    # ------------------------------------------------------------------ ending jobs

    def _stop_job(self, job: JobRecord, reason: str, end_state: str) -> None:
        """Cancel, preempt or time out a job: at once if it is not running yet, else ask, then
        signal (the stages of :class:`StopStage`, moved on by :meth:`_timers`)."""
        worker = self.pool.workers.get(job.worker_id) if job.worker_id else None
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
        job.stop_stage = StopStage.ASKED
        job.stop_at = time.monotonic() + float(self.settings["workers"]["cancel_grace"])
        self.bus.send(worker.id.encode(), WorkerCancel(job_id=job.id, reason=reason))
        log.info("job_stopping", job_id=job.id, reason=reason)

    def _kill_job(self, job: JobRecord, reason: str) -> None:
        """End a running job at once, failed with ``reason``: SIGKILL to its process group, no grace
        (for memory: a job over its share would only take more while it winds down)."""
        worker = self.pool.workers.get(job.worker_id) if job.worker_id else None
        if job.state != "running" or worker is None or not worker.assigned:
            self._stop_job(job, reason, "failed")
            return
        if job.stop_stage >= StopStage.KILLED:
            return
        worker.end_reason = reason  # the reap ends the job with it (its exit status says only SIGKILL)
        job.stop_stage, job.stop_at = StopStage.KILLED, None
        worker.signal_group(signal.SIGKILL)
        log.info("job_killed", job_id=job.id, reason=reason)

    def _on_job_done(self, worker: WorkerProc, job: JobRecord, done: JobDone) -> None:
        worker.done_at = time.monotonic()
        stopped = job.end_state_on_stop is not None  # read before _end_job, which may start a retry
        problem = storable_problem(done.result) if done.outcome == "succeeded" else None
        if problem and not stopped:
            self._end_job(job, "failed", f"the runner's result cannot be stored: {problem}", 1)
        elif done.outcome == "succeeded" and not stopped:
            job.result = done.result
            self._end_job(job, "succeeded", "succeeded", 0)
        elif stopped:
            # Stopped on request; a timeout ends like the timeout command's 124.
            code = 124 if job.end_state_on_stop == "failed" else 0
            self._end_job(job, job.end_state_on_stop or "cancelled", job.cancel_reason or "cancelled", code, retry=job.end_state_on_stop == "failed")
        elif done.outcome == "cancelled":
            self._end_job(job, "cancelled", "cancelled by the runner", 0, retry=False)
        else:
            self._end_job(job, "failed", done.error or "the runner failed", 1)
        if worker.services:
            self.router.drop_replica(worker, "its job ended", stopping=stopped)
        worker.job_id = None
        if worker.exited is None:
            # Its job is over; the process exits by itself. Make sure it does.
            worker.done_at = worker.done_at or time.monotonic()

    def _end_job(self, job: JobRecord, state: str, reason: str, exit_code: int | None, *, retry: bool = True) -> None:
        """A try ended: account it, free its devices and worker, then let the job table retry,
        requeue or end the job."""
        worker = self.pool.workers.get(job.worker_id) if job.worker_id else None
        self.usage.try_ended(worker, job, time.time())
        self.devices.release(job.id)
        if self.cluster is not None:
            self.cluster.stop_ranks(job.id)  # a gang's ranks on other nodes go with it
        if worker is not None and worker.job_id == job.id:
            worker.job_id = None
        job.worker_id = None
        job.stop_stage, job.stop_at, job.deadline = StopStage.NONE, None, None
        self._preempting.pop(job.id, None)
        self._schedule_needed = True
        if not self.jobs.settle(job, state, reason, exit_code, retry=retry):
            self._requeued[job.id] = job.reason or reason
            log.info("job_requeued", job_id=job.id, attempts=job.attempts, preemptions=job.preemptions, reason=job.reason)
            return
        self._requeued.pop(job.id, None)
        if job.started_at and job.ended_at:
            self.exporter.durations.labels(job.kind, state).observe(max(0.0, job.ended_at - job.started_at))
        if state == "failed":
            self._service_failed(job)
        self.pipelines.job_ended(job)
        self.journal.forget(f"job.{job.id}")  # the stream is complete
        log.info("job_ended", job_id=job.id, state=state, reason=reason, exit_code=exit_code, attempts=job.attempts)

    def _reap(self) -> None:
        for pid, status, usage in reap():
            if self._probe is not None and pid == self._probe.pid:
                self._probe.reaped(status)
                continue
            if self.cluster is not None and pid == self.cluster.pid:
                self.cluster.reaped(status)
                continue
            zygote = self.launcher.zygote
            if zygote is not None and pid == zygote.pid:
                zygote.returncode = os.waitstatus_to_exitcode(status)
                continue
            worker = self.pool.exited(pid, status)
            if worker is None:
                continue  # an adopted grandchild of some worker
            worker.rusage = usage
            self.limits.worker_exited(worker)
            self._schedule_needed = True
            if worker.services:
                job = self.jobs.get(worker.job_id) if worker.job_id is not None else None
                self.router.drop_replica(worker, describe_status(status)[0], stopping=job is not None and job.end_state_on_stop is not None)
            if worker.job_id is not None and not worker.assigned:
                # Died before it got its job: that try failed.
                job = self.jobs.get(worker.job_id)
                worker.job_id = None
                if job is not None and job.state == "running":
                    reason, code = describe_status(status)
                    self._end_job(job, "failed", f"worker failed to start ({reason}); see {worker.log_path}", code)
            self.usage.account(worker)

    def _timers(self, now: float) -> None:
        self.storage.tick(now)
        if not self.storage.full:
            self.retention.tick(now)
        if self.journal.refusing and not self.storage.full and self._unsaved is None:
            self.journal.refusing = False
        elif self.storage.full and not self.journal.refusing:
            self.journal.refusing = True  # no room seen before any write failed: workers' events are refused too
        if self.cluster is not None:
            self.cluster.timers(now)
            self._watch_cluster()
        for restart in self.restarts.due(now):
            if restart.kind in self.registry.kinds:
                self._create_job(restart.kind, restart.params, Resources(**restart.resources), priority=1000)
        for worker in self.pool.check(now, lambda: self.ingest.backlog):
            self._worker_died(worker)
        self.limits.tick(now)
        ws = self.settings["workers"]
        for job in self.jobs.of_state("running"):
            if job.deadline is not None and now >= job.deadline and not job.stop_stage:
                self._stop_job(job, f"timeout after {job.timeout:g}s", "failed")
            if job.stop_stage and job.stop_at is not None and now >= job.stop_at and job.stop_stage < StopStage.KILLED:
                worker = self.pool.workers.get(job.worker_id) if job.worker_id else None
                if worker is None:
                    continue
                stage = StopStage(job.stop_stage).next()
                worker.signal_group(STAGE_SIGNAL[stage])
                job.stop_stage, job.stop_at = stage, (now + float(ws["kill_grace"]) if stage < StopStage.KILLED else None)

    def _worker_died(self, worker: WorkerProc) -> None:
        job = self.jobs.get(worker.job_id) if worker.job_id is not None else None
        worker.job_id = None
        exceeded = self.limits.verdict(worker)  # its memory group's OOM killer acted
        if job is None:
            return
        status = worker.exited if worker.exited is not None and worker.exited >= 0 else 9
        reason, code = describe_status(status)
        if exceeded:
            reason = exceeded
        elif worker.end_reason:
            reason = worker.end_reason  # "node <id> lost": the exit status says nothing
        elif worker.lost and worker.node is not None and worker.node in getattr(self.devices, "suspect", ()):
            reason = f"node {worker.node} lost (its worker stopped answering; Ray had not declared the node dead yet)"
        elif worker.lost:
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
        for job in self.jobs.of_state("running"):
            entry = self.registry.kinds.get(job.kind)
            if entry is not None and entry.service:
                try:
                    self._end_job(job, "cancelled", reason, None, retry=False)
                except Exception:
                    log.exception("service_end_failed", job_id=job.id)
        with contextlib.suppress(Exception):
            self.store.commit()

    def _shutdown(self) -> None:
        reason = self.stopping or "kernel loop ended"
        log.info("kernel_stopping", reason=reason)
        for req in self._held_submits:
            self.control.fail(req, KernelError(f"the kernel is shutting down ({reason}); the job was not submitted"))
        self._held_submits = []
        self._end_services("kernel shut down")
        try:
            self.emit("kernel.stopping", KernelStopping(reason=reason))
            self._next_save = 0.0  # writes waiting for room get a last try
            self._flush_out()
        except Exception:
            log.exception("shutdown_flush_failed")
        if self._unsaved:
            log.warning("storage_unsaved_at_shutdown", writes=len(self._unsaved), storage=self.storage.refusal())
        self.pool.stop_all()
        if getattr(self, "limits", None) is not None:
            self.limits.close()
        if getattr(self, "cluster", None) is not None:
            self.cluster.close()
        if self._probe is not None:
            self._probe.kill()
        if getattr(self, "exporter", None) is not None:
            self.exporter.stop()
        try:
            self.store.close()
        except Exception:
            log.exception("store_close_failed")
        self.statedir.remove_kernel_file()
        self.bus.close()
        self.statedir.release()
        log.info("kernel_stopped")


def _check_options(kind: str, params: dict[str, Any], timeout: float | None, max_retries: int, priority: int) -> None:
    problem = storable_problem(params)
    if problem:
        raise JobRejected(f"{kind}: parameters cannot be stored: {problem}", kind=kind)
    if timeout is not None and not (timeout > 0):
        raise JobRejected(f"timeout must be a number of seconds above 0, got {timeout}", field="timeout")
    if not 0 <= max_retries <= 1000:
        raise JobRejected(f"max_retries must be between 0 and 1000, got {max_retries}", field="max_retries")
    if not -1_000_000 <= priority <= 1_000_000:
        raise JobRejected(f"priority must be between -1000000 and 1000000, got {priority}", field="priority")


__all__ = ["Kernel", "KernelLocked", "holder_pid", "runtime_dir_for"]
