"""The Python SDK: connect to a kernel, submit and follow jobs, read the bus.

::

    import llmos

    client = llmos.connect()                  # the kernel of $LLMOS_STATE_DIR or the default
    job = client.submit("diag.echo", params={"data": {"x": 1}})
    print(job.result())                       # waits; raises JobFailed / JobCancelled
    for event in job.events():                # history, then live until the job ends
        print(event.seq, event.topic, event.body)

One :class:`Client` may be shared by any number of threads: requests, job waits, event streams
and service streams at once, each getting its own replies (see :mod:`llmos.connection`). For
asyncio, :class:`llmos.AsyncClient <llmos.aio.AsyncClient>` does the same from an event loop.
The client is split by what it does: this module is the API, :mod:`llmos.connection` the shared
socket, :mod:`llmos.events` the event streams, :mod:`llmos.job` job records and handles.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq

from llmos.completion import Completion
from llmos.connection import Connection, ForkedClient, _Timeout
from llmos.errors import (
    ConfigError,
    JobRejected,
    KernelUnavailable,
    ServiceError,
    ValidationError,
    error_from_reply,
)
from llmos.events import EventStream, whole_stream
from llmos.job import Job, JobInfo, JobList, result_of
from llmos.paths import pid_alive, read_kernel_info, resolve_state_dir
from llmos.pipeline import Pipeline
from llmos.protocol import (
    AcctRequest,
    ArtifactsRequest,
    DevicesRequest,
    ErrorReply,
    Event,
    JobRequest,
    JobsRequest,
    PipelineRequest,
    PipelinesRequest,
    PipelineSubmit,
    PluginsRequest,
    ReplayRequest,
    ServiceCancel,
    ServiceRequest,
    ServicesRequest,
    ShutdownRequest,
    StatusRequest,
    SubmitRequest,
    encode_body,
    event_from_item,
    stream_of,
)


class Client:
    """A connection to one kernel, found through its state directory's ``kernel.json``; safe to
    share between threads."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *, timeout: float = 30.0, key: Any = None) -> None:
        """``state_dir`` finds a local kernel; a ``tcp://HOST:PORT`` URL (its control endpoint)
        reaches a remote one over CurveZMQ with ``key`` (a key file from ``llmos keys add``, or
        its JSON). Without either, ``$LLMOS_KERNEL`` and ``$LLMOS_KEY`` are used when set."""
        self.timeout = timeout
        target = state_dir if state_dir is not None else os.environ.get("LLMOS_KERNEL") or None
        self.remote = isinstance(target, str) and target.startswith("tcp://")
        if self.remote:
            self._connect_remote(str(target), key if key is not None else os.environ.get("LLMOS_KEY"))
            return
        self.state_dir: Path = resolve_state_dir(target)
        self.kernel = read_kernel_info(self.state_dir)
        self.endpoints = {"control": self.kernel["control"], "events": self.kernel["events"]}
        self.key = None
        self._conn = Connection(self.kernel, self.state_dir)
        self._ctx = self._conn.ctx  # event streams open their SUB sockets on it

    def _connect_remote(self, url: str, key: Any) -> None:
        from llmos.keys import load_client_key

        host, _, port = url[len("tcp://"):].rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"kernel address {url!r}: expected tcp://HOST:PORT (the kernel's control_tcp endpoint, see `llmos status`)")
        if key is None:
            raise ConfigError(f"connecting to {url} over TCP needs a key: key=PATH (or $LLMOS_KEY, or --key), a key file made by `llmos keys add NAME` on the kernel's machine")
        self.key = load_client_key(key)
        self.kernel = {"control": url, "pid": None, "key": self.key, "timeout": self.timeout}
        self._conn = Connection(self.kernel, Path(url))
        self._ctx = self._conn.ctx
        try:
            info = encode_body(self.request(StatusRequest()))
        except BaseException:
            self._conn.close()
            raise
        events = str(info.get("endpoints", {}).get("events_tcp", ""))
        if not events.startswith("tcp://"):
            self._conn.close()
            raise ConfigError(f"the kernel at {url} publishes no TCP events endpoint")
        # The kernel may have bound a wildcard address: reach its events port where its control answered.
        self.endpoints = {"control": url, "events": f"tcp://{host}:{events.rpartition(':')[2]}"}
        self.state_dir = Path(str(info.get("state_dir", url)))
        self.kernel.update(pid=None, version=info.get("version"), state_dir=str(self.state_dir), **self.endpoints)

    def secure(self, sock: Any) -> None:
        """Make a new socket of this client (an event stream's SUB) speak CURVE when it is remote."""
        if self.key is not None:
            from llmos.keys import apply_client_key

            apply_client_key(sock, self.key)

    # -- plumbing --

    def close(self) -> None:
        """Close the sockets (idempotent); an embedded kernel (``connect(embedded=True)``) stops."""
        self._conn.close()
        embedded = getattr(self, "_embedded", None)
        if embedded is not None:
            self._embedded = None
            embedded.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @property
    def connection(self) -> Connection:
        """The shared connection core (for :class:`~llmos.aio.AsyncClient` and tools)."""
        return self._conn

    def request(self, msg: Any, timeout: float | None = None) -> Any:
        """Send one control request and return the decoded reply; error replies are raised."""
        reply = self._conn.request(msg, self.timeout if timeout is None else timeout)
        if isinstance(reply, ErrorReply):
            raise error_from_reply(reply.ename, reply.evalue, reply.code, reply.context)
        return reply

    def _check_alive(self) -> None:
        self._conn._check_alive()

    # -- jobs --

    def submit(
        self,
        kind: str,
        params: dict[str, Any] | None = None,
        resources: dict[str, Any] | None = None,
        priority: int = 0,
        max_retries: int = 0,
        timeout: float | None = None,
        *,
        coerce: bool = False,
        preemptible: bool | None = None,
    ) -> Job:
        """Queue a job; JobRejected (unknown kind, bad parameters) or ResourceError (never fits).

        Relative values of path parameters (``param(path=True)``) are taken from this process's
        working directory: the kernel makes them absolute, as the job runs in a folder of its own.

        ``preemptible`` (default: the kind's own default) lets the scheduler stop the job for a
        job of higher priority that cannot fit otherwise; it goes back to the queue and starts
        again (a kind that checkpoints, like ``train``, resumes where it stopped)."""
        reply = self.request(submit_request(kind, params, resources, priority, max_retries, timeout, coerce, preemptible))
        info = JobInfo.from_dict(reply.job)
        return Job(self, info.id, info)

    def job(self, job_id: int) -> Job:
        """A handle on an existing job (JobNotFound if there is none)."""
        info = self._job_info(int(job_id))
        return Job(self, info.id, info)

    def _job_info(self, job_id: int) -> JobInfo:
        return JobInfo.from_dict(self.request(JobRequest(id=int(job_id))).job)

    def jobs(self, state: str | None = None, limit: int = 1000, *, before: int | None = None, services: bool = True) -> JobList:
        """The newest ``limit`` job records (below id ``before``: the page before it), oldest
        first, optionally only those in ``state``; without services' jobs if ``services`` is
        false. The list also says how many match in all (``.total``) and where the next page
        back starts (``.before``)."""
        return JobList.from_reply(self.request(JobsRequest(state=state, limit=limit, before=before, services=services)))

    # -- text generation --

    def generate(
        self,
        model: str | os.PathLike[str],
        prompt: str,
        *,
        stream: bool = False,
        timeout: float | None = None,
        resources: dict[str, Any] | None = None,
        **sampling: Any,
    ) -> Completion | Iterator[str]:
        """Complete ``prompt`` with the checkpoint ``model``.

        Returns a :class:`~llmos.completion.Completion`; with ``stream=True``, an iterator of text
        pieces as they are made (the job's ``job.<id>.token`` events). Sampling options are the
        ``generate`` job's parameters: ``max_new_tokens``, ``temperature`` (0 is greedy),
        ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``, ``stop`` (a string or a list of
        them), ``stop_tokens``, and ``dtype`` for a checkpoint (a service has its own). Errors (an
        unknown model, values out of range) are raised before anything runs.

        ``model`` may also name a running service (``llmos serve``): then the request waits as long
        as it is queued or running, unless ``timeout`` bounds the wait for each reply.
        """
        if isinstance(sampling.get("stop"), str):
            sampling["stop"] = [sampling["stop"]]  # one stop string, not a list of its characters
        model = self.resolve_model(model)
        if not Path(model).exists():
            if os.sep in str(model) or str(model).startswith((".", "~")):
                # Written as a path, so meant as one: say it is missing, not that no service has that name.
                raise JobRejected(f"model {model} does not exist (give a checkpoint directory, job:ID, or the name of a running service)", field="model")
            # Not a checkpoint here: a running service of that name (``llmos serve``).
            return self._generate_with_service(str(model), prompt, stream, timeout, sampling)
        params = {"model": str(Path(model).absolute()), "prompts": [prompt], "stream": stream, **sampling}
        job = self.submit("generate", params, resources)
        if stream:
            return self._stream_text(job, timeout)
        result = job.result(timeout)
        return Completion.from_dict(result["completions"][0])

    def resolve_model(self, model: str | os.PathLike[str]) -> str:
        """A model reference as a path: ``job:ID`` is the newest checkpoint artifact that job
        published (``train`` publishes one at every checkpoint); anything else is returned as is.
        JobNotFound if there is no such job, ValidationError if it published no checkpoint."""
        text = os.fspath(model)
        if not text.startswith("job:"):
            return text
        ref = text[4:]
        if not ref.isdigit():
            raise ValidationError(f"a job artifact is named job:ID (a job number), got {text!r}", field="model")
        found = self.job(int(ref)).artifacts("checkpoint")
        if not found:
            raise ValidationError(f"job {ref} published no checkpoint (yet): nothing to use as a model", field="model")
        return str(found[-1]["path"])

    def _generate_with_service(self, service: str, prompt: str, stream: bool, timeout: float | None, sampling: dict[str, Any]) -> Completion | Iterator[str]:
        if "dtype" in sampling:
            raise ValidationError(f"dtype is the service's own: {service!r} runs with the dtype it was started with (llmos serve --dtype)", field="dtype")
        replies = self.call(service, {"prompt": prompt, "sampling": sampling, "stream": stream}, timeout=timeout)
        if stream:
            return (r["text"] for r in replies if "text" in r)
        for reply in replies:
            if "completion" in reply:
                return Completion.from_dict(reply["completion"])
        raise ServiceError(f"service {service!r} ended without a completion", service=service)

    def _stream_text(self, job: Job, timeout: float | None) -> Iterator[str]:
        for event in job.events(follow=True, timeout=timeout):
            if event.type == "generate.text":
                yield event.body["text"]
        info = job.info()
        if not info.ended:
            raise TimeoutError(f"job {job.id} (generate) is still {info.state} after {timeout}s")
        result_of(info)  # JobFailed / JobCancelled

    # -- services --

    def call(self, service: str, body: dict[str, Any] | None = None, *, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Send a request to a running service and yield the bodies of its responses until it is
        done. ServiceUnavailable (no such service), ServiceError (it failed or its replica died),
        KernelUnavailable (the kernel is gone), TimeoutError (``timeout`` given and no response
        for that many seconds: the request is cancelled).

        Without ``timeout`` it waits as long as the request takes, queued or running: the kernel
        answers with an error if the replica dies, and the kernel's own process is checked every
        half second. Other requests, and other streams, may use this client meanwhile."""
        conn = self._conn
        request_id, frames = conn.frames(ServiceRequest(service=service, body=dict(body or {})))
        conn.open(request_id)
        finished = False
        try:
            conn.send(frames)
            while True:
                try:
                    reply = conn.wait(request_id, timeout)
                except _Timeout:
                    conn._check_alive()
                    raise TimeoutError(f"service {service!r} did not answer within {timeout}s") from None
                finished = True  # an error ends the request (the kernel has freed its slot)
                body, done = service_body(reply, service)
                finished = done
                yield body
                if done:
                    return
        finally:
            conn.forget(request_id)
            if not finished and not conn.closed and not conn.forked and conn.dead is None:  # stopped early: free the replica's slot
                with contextlib.suppress(zmq.ZMQError, ForkedClient, KernelUnavailable):
                    conn.send(conn.frames(ServiceCancel(request_id=request_id))[1])

    def acct(self, since: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Accounting of finished jobs (ended after ``since``, epoch seconds): one map per job with
        ``id``, kind, plugin, state, reason, wall_seconds, cpu_seconds, max_rss (bytes), gpu_seconds
        and gpu_memory (None without a GPU), tokens (when the job reported them)."""
        return self.request(AcctRequest(since=since, limit=limit)).jobs

    def services(self) -> list[dict[str, Any]]:
        """Running services with their replicas and the requests in flight."""
        return self.request(ServicesRequest()).services

    # -- the model lifecycle --

    def pipeline(self, spec: dict[str, Any] | str | os.PathLike[str]) -> Pipeline:
        """Run a pipeline: ``spec`` as a dict (the TOML file's tables) or the path of a TOML file.
        Bad files are refused before anything runs, naming the stage and the field."""
        from llmos.pipeline import load_pipeline_file

        cwd = _cwd()
        if not isinstance(spec, dict):
            path = Path(spec)
            spec = load_pipeline_file(path)
            cwd = str(path.absolute().parent)  # the file's relative paths mean what they mean beside it
        reply = self.request(PipelineSubmit(spec=spec, cwd=cwd))
        return Pipeline(self, int(reply.pipeline["id"]), reply.pipeline)

    def get_pipeline(self, pipeline_id: int) -> Pipeline:
        """A handle on pipeline ``pipeline_id`` (ValidationError if there is none)."""
        reply = self.request(PipelineRequest(id=int(pipeline_id)))
        return Pipeline(self, int(pipeline_id), reply.pipeline)

    def pipelines(self, limit: int = 100) -> list[dict[str, Any]]:
        """Pipelines, newest first, with their stages."""
        return self.request(PipelinesRequest(limit=limit)).pipelines

    def artifacts(self, *, all: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
        """Registered artifacts, newest first (``all``: removed ones too): ``id``, ``path``,
        ``kind``, ``job_id``, ``size``, ``created_at``, ``rejected``, ``parents``."""
        return self.request(ArtifactsRequest(action="list", all=all, limit=limit)).artifacts

    def artifact(self, ref: str) -> dict[str, Any]:
        """One artifact (an id, a unique prefix, ``artifact:<id>`` or ``job:<id>``) with its
        provenance and the jobs that used it."""
        return self.request(ArtifactsRequest(action="show", ref=ref)).artifact

    def lineage(self, ref: str) -> dict[str, Any]:
        """The artifact and its ancestors as a tree (``parents`` nested) back to the training data."""
        return self.request(ArtifactsRequest(action="lineage", ref=ref)).artifact

    def remove_artifact(self, ref: str, *, force: bool = False) -> dict[str, Any]:
        """Remove an artifact nothing uses (``force``: even a job's final output)."""
        return self.request(ArtifactsRequest(action="rm", ref=ref, force=force)).artifact

    def gc_artifacts(self, *, dry_run: bool = False) -> list[dict[str, Any]]:
        """Remove the artifacts nothing references; returns them (``dry_run``: only say which)."""
        return self.request(ArtifactsRequest(action="gc", dry_run=dry_run)).artifacts

    # -- the machine --

    def devices(self) -> list[dict[str, Any]]:
        """The device table: CPU and GPUs with capacity, what is reserved and by whom."""
        return self.request(DevicesRequest()).devices

    def plugins(self) -> list[dict[str, Any]]:
        """Loaded plugins, their status and what each registered."""
        return self.request(PluginsRequest()).plugins

    def kinds(self) -> list[dict[str, Any]]:
        """Every job kind with its plugin, schema and default resources."""
        return self.request(PluginsRequest()).kinds

    def status(self) -> dict[str, Any]:
        """The kernel's version, pid, endpoints and counters."""
        return encode_body(self.request(StatusRequest()))

    def shutdown(self) -> None:
        """Stop the kernel and wait until its process is gone."""
        self.request(ShutdownRequest())
        if self.kernel.get("pid") is None:
            return  # a remote kernel: its process is not ours to watch
        pid = int(self.kernel["pid"])
        deadline = time.monotonic() + 30
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- the bus --

    def replay(self, prefix: str = "", since: int = 0, until: int | None = None, limit: int = 1000) -> tuple[list[Event], int, bool]:
        """One page of the journal: (events, the journal's last seq, whether more follow)."""
        reply = self.request(ReplayRequest(prefix=prefix, since=since, until=until, limit=limit))
        return [event_from_item(item) for item in reply.events], reply.last_seq, reply.more

    def events(
        self,
        prefix: str = "",
        since: int = 0,
        follow: bool = False,
        timeout: float | None = None,
        *,
        _stop: threading.Event | None = None,
    ) -> Iterator[Event]:
        """Events whose topic starts with ``prefix`` and whose seq is above ``since``: the journal
        first, then (with ``follow``) live ones, each exactly once and in order per stream.
        ``timeout`` ends a follow after that many seconds with no end in sight."""
        stream = EventStream(self, whole_stream(prefix), since, timeout, stop=_stop)
        try:
            yield from stream.history()
            if follow:
                yield from stream.live()
        finally:
            stream.close()


def connect(state_dir: str | os.PathLike[str] | None = None, *, timeout: float = 30.0, embedded: bool = False, key: Any = None) -> Client:
    """Connect to the kernel of ``state_dir`` (default: ``$LLMOS_STATE_DIR`` or the XDG state dir),
    or to a remote kernel: ``connect("tcp://HOST:PORT", key="alice.key")`` (CurveZMQ; the key file
    from ``llmos keys add alice`` on the kernel's machine).

    Raises :class:`~llmos.errors.KernelUnavailable` naming the state dir and the command to start
    a kernel when none is running there.

    ``embedded=True`` starts a kernel of this process instead (in ``state_dir``, or a temporary
    directory), which stops when the client closes or this process exits: for notebooks and
    scripts that want no daemon.
    """
    if not embedded:
        return Client(state_dir, timeout=timeout, key=key)
    from llmos.embedded import EmbeddedKernel

    kernel = EmbeddedKernel(state_dir).start()
    try:
        client = Client(kernel.state_dir, timeout=timeout)
    except BaseException:
        kernel.stop()
        raise
    client._embedded = kernel
    return client


__all__ = ["Client", "Job", "JobInfo", "Pipeline", "connect", "stream_of"]


def service_body(reply: Any, service: str) -> tuple[dict[str, Any], bool]:
    """(body, done) of one reply to a service request; its error raised (both clients read them so)."""
    if isinstance(reply, ErrorReply):
        raise error_from_reply(reply.ename, reply.evalue, reply.code, reply.context)
    if reply.error:
        raise error_from_reply("ServiceError", reply.error, reply.code or 600, {"service": service})
    return reply.body, bool(reply.done)


def submit_request(kind: str, params: dict[str, Any] | None, resources: dict[str, Any] | None, priority: int, max_retries: int,
                   timeout: float | None, coerce: bool, preemptible: bool | None) -> SubmitRequest:
    """The SubmitRequest :meth:`Client.submit` sends (the event-loop client sends the same)."""
    return SubmitRequest(
        kind=kind,
        params=dict(params or {}),
        resources=dict(resources or {}),
        priority=int(priority),
        max_retries=int(max_retries),
        timeout=None if timeout is None else float(timeout),
        coerce=coerce,
        preemptible=preemptible,
        cwd=_cwd(),  # relative path parameters mean what they mean here
    )


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the working directory was deleted: relative paths mean nothing anyway
        return None
