"""The Python SDK: connect to a kernel, submit and follow jobs, read the bus.

::

    import llmos

    client = llmos.connect()                  # the kernel of $LLMOS_STATE_DIR or the default
    job = client.submit("diag.echo", params={"data": {"x": 1}})
    print(job.result())                       # waits; raises JobFailed / JobCancelled
    for event in job.events():                # history, then live until the job ends
        print(event.seq, event.topic, event.body)

A :class:`Client` owns ZeroMQ sockets, so use it from one thread (make one per thread).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from llmos.completion import Completion
from llmos.errors import (
    JobCancelled,
    JobFailed,
    JobRejected,
    KernelError,
    KernelUnavailable,
    LlmosError,
    MessageTooLarge,
    ProtocolError,
    ServiceError,
    ValidationError,
    error_from_reply,
)
from llmos.paths import pid_alive, read_kernel_info, resolve_state_dir
from llmos.protocol import (
    END_STATES,
    MAX_FRAME_BYTES,
    AcctRequest,
    CancelRequest,
    DevicesRequest,
    ErrorReply,
    Event,
    JobRequest,
    JobsRequest,
    PluginsRequest,
    ReplayRequest,
    ServiceCancel,
    ServiceRequest,
    ServicesRequest,
    ShutdownRequest,
    StatusRequest,
    StreamHeadsRequest,
    SubmitRequest,
    decode_control,
    encode_body,
    encode_control,
    event_from_item,
    stream_of,
    unpackb,
)


@dataclass(frozen=True)
class JobInfo:
    """A job's record as the kernel keeps it."""

    id: int
    kind: str
    state: str
    params: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_retries: int = 0
    timeout: float | None = None
    reason: str | None = None
    exit_code: int | None = None
    attempts: int = 0
    result: Any = None
    placement: dict[str, Any] | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    worker_pid: int | None = None
    progress: dict[str, Any] | None = None  # a running job's last progress event body
    usage: dict[str, Any] | None = None  # a running job's last measured usage
    preemptible: bool = False  # may be stopped for a job of higher priority, then resumed
    preemptions: int = 0  # how many of its tries were preempted

    @property
    def ended(self) -> bool:
        """True once the job is succeeded, failed or cancelled."""
        return self.state in END_STATES

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobInfo:
        """Build from the kernel's map, ignoring keys a newer kernel may add."""
        known = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """A plain map, as ``llmos job --json`` prints it."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Job:
    """A handle on one job of a kernel."""

    def __init__(self, client: Client, job_id: int, info: JobInfo | None = None) -> None:
        self.client = client
        self.id = int(job_id)
        self._info = info

    def __repr__(self) -> str:
        return f"<Job {self.id} {self._info.kind + ' ' + self._info.state if self._info else ''}>".replace(" >", ">")

    def info(self) -> JobInfo:
        """The job's current record."""
        self._info = self.client._job_info(self.id)
        return self._info

    def wait(self, timeout: float | None = None) -> JobInfo:
        """Block until the job ends (or ``timeout`` seconds pass: TimeoutError); return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.info()
            if info.ended:
                return info
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"job {self.id} is still {info.state} after {timeout}s")
            for _ in self.events(since=0, follow=True, timeout=left, _states_only=True):
                pass

    def artifacts(self, kind: str | None = None) -> list[dict[str, Any]]:
        """What the job published (``job.<id>.artifact`` events), oldest first: maps with ``path``,
        ``kind``, ``meta`` and the event's ``seq``; only those of ``kind`` if given."""
        out = []
        for event in self.client.events(f"job.{self.id}.artifact"):
            if event.type == "job.artifact" and (kind is None or event.body.get("kind") == kind):
                out.append({**event.body, "seq": event.seq})
        return out

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job and return its result; JobFailed or JobCancelled if it did not succeed."""
        info = self.wait(timeout)
        if info.state == "failed":
            raise JobFailed(f"job {self.id} ({info.kind}) failed: {info.reason}", job_id=self.id, reason=info.reason, exit_code=info.exit_code)
        if info.state == "cancelled":
            raise JobCancelled(f"job {self.id} ({info.kind}) was cancelled: {info.reason}", job_id=self.id, reason=info.reason)
        return info.result

    def cancel(self, reason: str = "cancelled by user") -> JobInfo:
        """Ask the kernel to cancel the job; returns the record right after the request."""
        reply = self.client.request(CancelRequest(id=self.id, reason=reason))
        self._info = JobInfo.from_dict(reply.job)
        return self._info

    def events(self, since: int = 0, follow: bool = True, timeout: float | None = None, *, _states_only: bool = False) -> Iterator[Event]:
        """The job's events from the journal (seq above ``since``); with ``follow``, then live
        until the job has ended and its last event was delivered."""
        prefix = f"job.{self.id}.state" if _states_only else f"job.{self.id}."
        stream = _EventStream(self.client, prefix, since, timeout)
        try:
            for event in stream.history():
                yield event
                if _is_end(event):
                    return
            if not follow:
                return
            if self.info().ended:
                # It ended before ``since``, or just now: catch up once and stop.
                for event in stream.history_after():
                    yield event
                return
            for event in stream.live():
                yield event
                if _is_end(event):
                    return
        finally:
            stream.close()

    def logs(self, follow: bool = True, since: int = 0) -> Iterator[Event]:
        """The job's ``job.log`` events (see :meth:`events`)."""
        for event in self.events(since=since, follow=follow):
            if event.type == "job.log":
                yield event


class Client:
    """A connection to one kernel, found through its state directory's ``kernel.json``."""

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *, timeout: float = 30.0) -> None:
        self.state_dir: Path = resolve_state_dir(state_dir)
        self.timeout = timeout
        self.kernel = read_kernel_info(self.state_dir)
        self.endpoints = {"control": self.kernel["control"], "events": self.kernel["events"]}
        self._ctx = zmq.Context()
        self._sock = self._dealer()
        self._sender = f"client-{os.getpid()}-{os.urandom(3).hex()}"
        # Open service requests -> their replies that arrived while something else was reading
        # the socket (another request, another stream): kept until their own reader asks.
        self._held: dict[str, collections.deque[Any]] = {}

    def _dealer(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.kernel["control"])
        return sock

    # -- plumbing --

    def close(self) -> None:
        """Close the sockets (idempotent)."""
        if not self._ctx.closed:
            self._sock.close(0)
            self._ctx.destroy(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def request(self, msg: Any, timeout: float | None = None) -> Any:
        """Send one control request and return the decoded reply; error replies are raised."""
        timeout = self.timeout if timeout is None else timeout
        try:
            frames = encode_control(msg, self._sender)
        except (OverflowError, TypeError, ValueError) as exc:
            raise ValidationError(f"cannot send {type(msg).__name__}: {exc} (values must be JSON-like, integers within 64 bits)") from None
        if sum(map(len, frames)) > MAX_FRAME_BYTES:
            raise MessageTooLarge(f"{type(msg).__name__} is {sum(map(len, frames))} bytes; the bus carries at most {MAX_FRAME_BYTES}")
        msg_id = unpackb(frames[0])["id"]
        self._sock.send_multipart(frames)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(min(left, 0.5) * 1000) + 1):
                if left <= 0:
                    self._check_alive()
                    if not self._held:
                        # A late reply would confuse the next request: start over on a fresh
                        # socket (not while service requests are open: their replies come here).
                        self._sock.close(0)
                        self._sock = self._dealer()
                    raise KernelError(f"the kernel did not answer within {timeout}s", endpoint=self.kernel["control"])
                if not self._sock.poll(0):
                    self._check_alive()
                    continue
            parent_id, reply = self._recv()
            if parent_id != msg_id:
                continue  # kept for its open service request, or a reply to one that timed out
            if isinstance(reply, ErrorReply):
                raise error_from_reply(reply.ename, reply.evalue, reply.code, reply.context)
            return reply

    def _recv(self) -> tuple[str | None, Any]:
        """One reply off the socket: (its parent id, the message). A reply to another open
        service request is kept for it (see :meth:`call`)."""
        try:
            header, reply = decode_control(self._sock.recv_multipart())
        except ProtocolError as exc:
            raise KernelError(f"undecodable reply from the kernel: {exc}") from exc
        parent_id = header.get("parent_id")
        if parent_id in self._held:
            self._held[parent_id].append(reply)
        return parent_id, reply

    def _check_alive(self) -> None:
        if not pid_alive(int(self.kernel["pid"])):
            raise KernelUnavailable(
                f"the kernel for state dir {self.state_dir} (pid {self.kernel['pid']}) is gone; "
                f"start one with: llmos boot --state-dir {self.state_dir}",
                state_dir=str(self.state_dir),
                endpoint=self.kernel["control"],
            )

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
        reply = self.request(
            SubmitRequest(
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
        )
        info = JobInfo.from_dict(reply.job)
        return Job(self, info.id, info)

    def job(self, job_id: int) -> Job:
        """A handle on an existing job (JobNotFound if there is none)."""
        info = self._job_info(int(job_id))
        return Job(self, info.id, info)

    def _job_info(self, job_id: int) -> JobInfo:
        return JobInfo.from_dict(self.request(JobRequest(id=int(job_id))).job)

    def jobs(self, state: str | None = None, limit: int = 1000) -> list[JobInfo]:
        """Job records, oldest first, optionally only those in ``state``."""
        reply = self.request(JobsRequest(state=state, limit=limit))
        return [JobInfo.from_dict(j) for j in reply.jobs]

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
        if info.state == "failed":
            raise JobFailed(f"job {job.id} (generate) failed: {info.reason}", job_id=job.id, reason=info.reason, exit_code=info.exit_code)
        if info.state == "cancelled":
            raise JobCancelled(f"job {job.id} (generate) was cancelled: {info.reason}", job_id=job.id, reason=info.reason)
        if not info.ended:
            raise TimeoutError(f"job {job.id} (generate) is still {info.state} after {timeout}s")

    # -- services --

    def call(self, service: str, body: dict[str, Any] | None = None, *, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Send a request to a running service and yield the bodies of its responses until it is
        done. ServiceUnavailable (no such service), ServiceError (it failed or its replica died),
        KernelUnavailable (the kernel is gone), TimeoutError (``timeout`` given and no response
        for that many seconds: the request is cancelled).

        Without ``timeout`` it waits as long as the request takes, queued or running: the kernel
        answers with an error if the replica dies, and the kernel's own process is checked every
        half second. Other requests, and other streams, may use this client meanwhile."""
        frames = encode_control(ServiceRequest(service=service, body=dict(body or {})), self._sender)
        request_id = unpackb(frames[0])["id"]
        held = self._held[request_id] = collections.deque()
        finished = False
        try:
            self._sock.send_multipart(frames)
            while True:
                reply = held.popleft() if held else self._next_reply(held, service, timeout)
                if isinstance(reply, ErrorReply):
                    finished = True
                    raise error_from_reply(reply.ename, reply.evalue, reply.code, reply.context)
                if reply.error:
                    finished = True
                    raise error_from_reply("ServiceError", reply.error, reply.code or 600, {"service": service})
                yield reply.body
                if reply.done:
                    finished = True
                    return
        finally:
            del self._held[request_id]
            if not finished and not self._ctx.closed:  # the caller stopped early: free the replica's slot
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.send_multipart(encode_control(ServiceCancel(request_id=request_id), self._sender), zmq.NOBLOCK)

    def _next_reply(self, held: collections.deque[Any], service: str, timeout: float | None) -> Any:
        """Read the socket until ``held`` (one open request's) has a reply; replies to other open
        requests are held for them meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not held:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                self._check_alive()
                raise TimeoutError(f"service {service!r} did not answer within {timeout}s")
            if self._sock.poll(int(wait * 1000) + 1):
                self._recv()
            else:
                self._check_alive()
        return held.popleft()

    def acct(self, since: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Accounting of finished jobs (ended after ``since``, epoch seconds): one map per job with
        ``id``, kind, plugin, state, reason, wall_seconds, cpu_seconds, max_rss (bytes), gpu_seconds
        and gpu_memory (None without a GPU), tokens (when the job reported them)."""
        return self.request(AcctRequest(since=since, limit=limit)).jobs

    def services(self) -> list[dict[str, Any]]:
        """Running services with their replicas and the requests in flight."""
        return self.request(ServicesRequest()).services

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
    ) -> Iterator[Event]:
        """Events whose topic starts with ``prefix`` and whose seq is above ``since``: the journal
        first, then (with ``follow``) live ones, each exactly once and in order per stream.
        ``timeout`` ends a follow after that many seconds with no end in sight."""
        stream = _EventStream(self, _whole_stream(prefix), since, timeout)
        try:
            yield from stream.history()
            if follow:
                yield from stream.live()
        finally:
            stream.close()


def _is_end(event: Event) -> bool:
    return event.type == "job.state" and event.body.get("state") in END_STATES


def _whole_stream(prefix: str) -> str:
    """``job.1`` means the stream job.1, not job.10 too."""
    parts = prefix.split(".")
    if len(parts) == 2 and parts[0] in ("job", "device", "service", "worker") and parts[1]:
        return prefix + "."
    return prefix


def _sub_prefix(prefix: str) -> str:
    """What to subscribe to so that every event of each stream the prefix touches arrives:
    ``job.5.log`` -> ``job.5.`` (gap detection needs the whole stream)."""
    parts = prefix.split(".")
    if len(parts) >= 3 and parts[0] in ("job", "device", "service", "worker"):
        return ".".join(parts[:2]) + "."
    if len(parts) >= 2 and parts[0] not in ("job", "device", "service", "worker"):
        return parts[0] + "."
    if len(parts) == 1 and parts[0] and parts[0] not in ("job", "device", "service", "worker"):
        return parts[0] + "."  # "kernel" is the stream "kernel" (PUB topics end with a dot)
    return prefix


class _EventStream:
    """Replay, then live, with no loss and no repeats.

    It subscribes before replaying, so nothing falls between the two once the subscription is in
    effect. Each stream's ``stream_seq`` must grow by one: a repeat is dropped, a gap (PUB drops at
    its high-water mark) is filled from the journal. A message lost with nothing after it on its
    stream (dropped, or published before the subscription reached the kernel) leaves no gap to
    see: every ``CHECK`` seconds the stream asks the kernel for the newest event of each stream
    it follows, and catches up any it is behind on: at once when the bus is quiet, else when it
    is still behind at the next check (by then anything that was in flight has arrived).
    ``complete`` is the seq up to which delivery is verified, where those checks start.
    """

    CHECK = 0.5

    def __init__(self, client: Client, prefix: str, since: int, timeout: float | None) -> None:
        self.client = client
        self.prefix = prefix
        self.sub_prefix = _sub_prefix(prefix)
        self.since = since
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.known: dict[str, tuple[int, int]] = {}  # stream -> (stream_seq, seq) last delivered
        self.high = since
        self.complete = since  # every wanted event up to this seq has been delivered
        self._replayed_to = since  # last_seq of the last replay page
        self._behind: dict[str, list[int]] = {}  # streams behind at the last busy check
        self._behind_last: int | None = None  # that check's last_seq
        self.sub = client._ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.sub.connect(client.endpoints["events"])
        self.sub.setsockopt(zmq.SUBSCRIBE, self.sub_prefix.encode())

    def close(self) -> None:
        self.sub.close(0)

    def _accept(self, event: Event) -> Event | None:
        """Record ``event`` as delivered; return it if the caller's prefix wants it."""
        self.known[event.stream] = (event.stream_seq, event.seq)
        if event.seq > self.high:
            self.high = event.seq
        return event if event.topic.startswith(self.prefix) else None

    def _replay_all(self, prefix: str, since: int, until: int | None = None) -> Iterator[Event]:
        while True:
            events, last_seq, more = self.client.replay(prefix, since=since, until=until, limit=1000)
            self._replayed_to = last_seq
            yield from events
            if not events or not more:
                return
            since = events[-1].seq

    def history(self) -> Iterator[Event]:
        for event in self._replay_all(self.sub_prefix, self.since):
            if self._accept(event) is not None:
                yield event
        self.complete = max(self.complete, self._replayed_to)

    def history_after(self) -> Iterator[Event]:
        """What was journaled since the history (or the last live event) was read."""
        for event in self._replay_all(self.sub_prefix, self.high):
            yield from self._live_one(event)

    def _fill(self, stream: str, after_seq: int, before: Event) -> Iterator[Event]:
        for event in self._replay_all(stream + ".", after_seq, before.seq - 1):
            fresh = event.stream == stream and event.stream_seq > self.known.get(stream, (0, 0))[0]
            if fresh and self._accept(event) is not None:
                yield event

    def _live_one(self, event: Event) -> Iterator[Event]:
        stream = event.stream
        last = self.known.get(stream)
        if last is not None and event.stream_seq <= last[0]:
            return  # already delivered (seen in the replay)
        if (last is None and event.stream_seq > 1) or (last is not None and event.stream_seq > last[0] + 1):
            yield from self._fill(stream, last[1] if last else self.since, event)
        if self._accept(event) is not None:
            yield event

    def _behind_on(self, stream: str, head: list[int]) -> bool:
        return self.known.get(stream, (0, 0))[0] < head[0]

    def _catch_up(self, stream: str, until: int) -> Iterator[Event]:
        """Deliver ``stream``'s events up to seq ``until`` that were not delivered yet."""
        last = self.known.get(stream)
        for event in self._replay_all(stream + ".", last[1] if last else self.since, until):
            fresh = event.stream == stream and event.stream_seq > self.known.get(stream, (0, 0))[0]
            if fresh and self._accept(event) is not None:
                yield event

    def _check(self, idle: bool) -> Iterator[Event]:
        """Ask for every followed stream's newest event; catch up where behind (see the class)."""
        reply = self.client.request(StreamHeadsRequest(prefix=self.sub_prefix, since=self.complete))
        heads: dict[str, list[int]] = reply.heads
        if idle:
            for stream, head in heads.items():
                if self._behind_on(stream, head):
                    yield from self._catch_up(stream, head[1])
            self.complete = max(self.complete, reply.last_seq)
            self._behind, self._behind_last = {}, None
            return
        for stream, head in self._behind.items():
            if self._behind_on(stream, head):
                yield from self._catch_up(stream, head[1])
        if self._behind_last is not None:
            self.complete = max(self.complete, self._behind_last)
        self._behind = {stream: head for stream, head in heads.items() if self._behind_on(stream, head)}
        self._behind_last = reply.last_seq

    def live(self) -> Iterator[Event]:
        known, prefix = self.known, self.prefix
        next_check = time.monotonic() + self.CHECK
        while True:
            now = time.monotonic()
            wait = max(0.0, next_check - now)
            if self.deadline is not None:
                left = self.deadline - now
                if left <= 0:
                    return
                wait = min(wait, left)
            if self.sub.poll(int(wait * 1000) + 1):
                while True:
                    try:
                        frames = self.sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    stream, events = _decode_pub(frames)
                    for event in events:
                        last = known.get(stream)
                        if last is not None and event.stream_seq == last[0] + 1:
                            # The common case, inline: the next event of a stream we follow.
                            known[stream] = (event.stream_seq, event.seq)
                            if event.seq > self.high:
                                self.high = event.seq
                            if event.topic.startswith(prefix):
                                yield event
                        else:
                            yield from self._live_one(event)
                if time.monotonic() >= next_check:
                    yield from self._check(idle=False)
                    next_check = time.monotonic() + self.CHECK
            elif time.monotonic() >= next_check:
                yield from self._check(idle=True)  # quiet: make sure nothing was dropped on the way
                next_check = time.monotonic() + self.CHECK


def _decode_pub(frames: list[bytes]) -> tuple[str, list[Event]]:
    """(stream, events) of one PUB message: the kernel sends one stream's events per message,
    under the topic ``<stream>.``; anything else is dropped."""
    if len(frames) != 2 or not frames[0].endswith(b"."):
        return "", []
    # Up to 1,000 events of maps: with the collector on, their allocation alone triggers
    # collections of everything the caller holds (msgpack's own advice for large messages).
    collecting = gc.isenabled()
    gc.disable()
    try:
        topic = frames[0].decode()
        events = [event_from_item(item) for item in unpackb(frames[1])]
    except (LlmosError, UnicodeDecodeError):
        return "", []
    finally:
        if collecting:
            gc.enable()
    if topic.count(".") > 2 or not all([event.topic.startswith(topic) for event in events]):
        return "", []
    return topic[:-1], events


def connect(state_dir: str | os.PathLike[str] | None = None, *, timeout: float = 30.0) -> Client:
    """Connect to the kernel of ``state_dir`` (default: ``$LLMOS_STATE_DIR`` or the XDG state dir).

    Raises :class:`~llmos.errors.KernelUnavailable` naming the state dir and the command to start
    a kernel when none is running there.
    """
    return Client(state_dir, timeout=timeout)


__all__ = ["Client", "Job", "JobInfo", "connect", "stream_of"]


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # the working directory was deleted: relative paths mean nothing anyway
        return None
