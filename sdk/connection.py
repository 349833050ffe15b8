"""The connection core the clients share: one DEALER socket to the kernel, used by any number of
threads (and by :class:`~llmos.aio.AsyncClient`'s event loop), each request getting exactly its
own replies.

ZeroMQ sockets must not be used by two threads at once, so the socket has one user at a time:
the *leader*. A thread that waits for a reply becomes the leader when there is none; it sends
what is queued, reads the socket and files every reply in the mailbox of the request it answers
(by the reply's ``parent_id``), and when its own reply has arrived hands the socket on to a
waiting thread (leader/follower, as in ACE's pattern and jupyter_client's threaded channels).
A thread that must send while another leads queues its frames and rings a doorbell (a pipe the
leader polls beside the socket), so nobody waits for the leader's poll to time out.

Why not one I/O thread that owns the socket and resolves futures: each round trip would then
pay two thread hand-offs, where the leader path costs a single-threaded caller one uncontended
lock and a ``poll`` on two handles. ``benchmarks/kernel.py`` run against the single-threaded
client of the commit before this one, same machine, back to back: ``status()`` p50 0.20 ms both
(1.32x of raw DEALER/ROUTER; target 1.5x). The event-loop client does run a pump thread
(:meth:`Connection.pump`), as the leader that never hands over: an event loop must not block in
``poll``.

Every waiter checks the kernel's process at least every ``ALIVE_CHECK`` seconds, so when the
kernel dies all of them raise :class:`~llmos.errors.KernelUnavailable` within a second. A
connection used in a child after ``fork()`` raises instead of sharing the parent's socket.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from llmos.errors import (
    KernelError,
    KernelUnavailable,
    LlmosError,
    MessageTooLarge,
    ProtocolError,
    ValidationError,
)
from llmos.keys import apply_client_key
from llmos.paths import pid_alive
from llmos.protocol import (
    MAX_FRAME_BYTES,
    ServiceResponse,
    ServiceResponses,
    decode_control,
    encode_control,
    unpackb,
)

#: Seconds between checks that the kernel's process still exists, for every waiting thread.
ALIVE_CHECK = 0.5


class ForkedClient(LlmosError):
    """A client made before ``fork()`` was used in the child: make a new one there."""

    code = 202


class Mailbox:
    """The replies to one request, in order; ``notify`` (if given) is called after each is filed
    (by the leader's thread: the event-loop client wakes its loop from it)."""

    __slots__ = ("notify", "replies")

    def __init__(self, notify: Callable[[], None] | None = None) -> None:
        self.replies: collections.deque[Any] = collections.deque()
        self.notify = notify


def _response(item: dict[str, Any]) -> ServiceResponse:
    """One item of a service.responses batch as the service.response it stands for."""
    return ServiceResponse(request_id=item.get("request_id", ""), body=item.get("body") or {}, done=bool(item.get("done")),
                           error=item.get("error"), code=item.get("code"))


class _Timeout(Exception):
    """The deadline passed with no reply (each caller says what that means for it)."""


class Connection:
    """One DEALER to the kernel of ``kernel`` (its ``kernel.json`` map), safe to share."""

    def __init__(self, kernel: dict[str, Any], state_dir: Path) -> None:
        self.kernel = kernel
        self.state_dir = state_dir
        self.endpoint: str = kernel["control"]
        self.sender = f"client-{os.getpid()}-{os.urandom(3).hex()}"
        self._pid = os.getpid()
        self.ctx = zmq.Context()
        self._sock = self.ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.key = kernel.get("key")  # a ClientKey: CURVE to a kernel over TCP
        if self.key is not None:
            apply_client_key(self._sock, self.key)
            self._handshake(float(kernel.get("timeout", 30.0)))
        else:
            self._sock.connect(self.endpoint)
        self._bell_r, self._bell_w = os.pipe()
        os.set_blocking(self._bell_r, False)
        os.set_blocking(self._bell_w, False)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._bell_r, zmq.POLLIN)
        self._cond = threading.Condition()
        self._mail: dict[str, Mailbox] = {}
        self._outbox: collections.deque[list[bytes]] = collections.deque()
        self._leading = False
        self._closed = False
        self._dead: KernelUnavailable | None = None
        self._last_alive = time.monotonic()
        self._loop: Any = None  # the event loop that leads (lead_on), if one does
        self._loop_thread = 0

    def _handshake(self, timeout: float) -> None:
        """Connect over CURVE and wait for the handshake, so that a refused key is told as such
        (ZeroMQ would otherwise retry in silence and every request would only time out)."""
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        monitor = self._sock.get_monitor_socket(events)
        try:
            failure = self._await_handshake(monitor, timeout)
        finally:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            monitor.close(0)
        if failure is not None:
            self._sock.close(0)
            self.ctx.term()
            raise failure

    def _await_handshake(self, monitor: Any, timeout: float) -> KernelUnavailable | None:
        from zmq.utils.monitor import recv_monitor_message

        self._sock.connect(self.endpoint)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(int(left * 1000) + 1):
                break
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return None
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return KernelUnavailable(
                    f"the kernel at {self.endpoint} refused key {self.key.name or self.key.public!r}: it is not on the kernel's allow-list "
                    "(ask its operator for `llmos keys add NAME`, or check that the key was not revoked)",
                    endpoint=self.endpoint,
                )
            if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                return KernelUnavailable(
                    f"the CURVE handshake with {self.endpoint} failed: the key's kernel_public is not this kernel's key, or the endpoint is not an llmos kernel",
                    endpoint=self.endpoint,
                )
        return KernelUnavailable(f"no kernel answered at {self.endpoint} within {timeout:g} s", endpoint=self.endpoint)

    # -- frames --

    def frames(self, msg: Any) -> tuple[str, list[bytes]]:
        """(request id, frames) for one control message; ValidationError / MessageTooLarge."""
        try:
            frames = encode_control(msg, self.sender)
        except (OverflowError, TypeError, ValueError) as exc:
            raise ValidationError(f"cannot send {type(msg).__name__}: {exc} (values must be JSON-like, integers within 64 bits)") from None
        size = sum(map(len, frames))
        if size > MAX_FRAME_BYTES:
            raise MessageTooLarge(f"{type(msg).__name__} is {size} bytes; the bus carries at most {MAX_FRAME_BYTES}")
        return unpackb(frames[0])["id"], frames

    # -- requests --

    def open(self, request_id: str, notify: Callable[[], None] | None = None) -> Mailbox:
        """Start collecting the replies to ``request_id`` (before sending it)."""
        self._usable()
        box = Mailbox(notify)
        with self._cond:
            self._mail[request_id] = box
        return box

    def forget(self, request_id: str) -> None:
        """Stop collecting: later replies to it are dropped."""
        with self._cond:
            self._mail.pop(request_id, None)

    def send(self, frames: list[bytes]) -> None:
        """Queue frames for the kernel and see that they leave now (by the leader, or by this thread)."""
        self._usable()
        if self.on_loop_thread():  # the loop leads and this is its thread: send now
            self._sock.send_multipart(frames)
            self._loop.call_soon(self._on_readable)  # a send can consume the descriptor's edge
            return
        with self._cond:
            self._outbox.append(frames)
            if self._leading:
                self._ring()
                return
            self._leading = True
        try:
            self._flush()
        finally:
            self._release()

    def wait(self, request_id: str, timeout: float | None) -> Any:
        """The next reply to ``request_id``; _Timeout after ``timeout`` seconds (None: no limit),
        KernelUnavailable when the kernel is gone, KernelError when the client is closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            box = self._mail[request_id]
            while True:
                if box.replies:
                    return box.replies.popleft()
                self._usable_locked()
                if not self._leading:
                    self._leading = True
                    break
                wait = ALIVE_CHECK if deadline is None else min(ALIVE_CHECK, deadline - time.monotonic())
                if wait <= 0:
                    raise _Timeout
                if not self._cond.wait(wait):
                    self._check_alive()
        try:
            return self._lead(box, deadline)
        finally:
            self._release()

    def request(self, msg: Any, timeout: float) -> Any:
        """Send one request and return its one reply (ErrorReply included: the caller raises)."""
        request_id, frames = self.frames(msg)
        self.open(request_id)
        try:
            self.send(frames)
            try:
                return self.wait(request_id, timeout)
            except _Timeout:
                self._check_alive()
                raise KernelError(f"the kernel did not answer within {timeout}s", endpoint=self.endpoint) from None
        finally:
            self.forget(request_id)

    # -- the leader --

    def _lead(self, box: Mailbox | None, deadline: float | None) -> Any:
        """Use the socket until ``box`` has a reply (None: until the connection closes)."""
        sock, poller = self._sock, self._poller
        while True:
            if self._closed:
                if box is None:
                    return None
                raise KernelError("this llmos client was closed while waiting", endpoint=self.endpoint)
            self._flush()
            now = time.monotonic()
            if now - self._last_alive >= ALIVE_CHECK:
                self._check_alive()
            wait = ALIVE_CHECK if deadline is None else min(ALIVE_CHECK, deadline - now)
            if wait <= 0:
                raise _Timeout
            ready = dict(poller.poll(int(wait * 1000) + 1))
            if self._bell_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._bell_r, 4096)
            if sock in ready:
                batch = []
                while True:
                    try:
                        batch.append(sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                self._file(batch)
                if box is not None and box.replies:
                    with self._cond:
                        return box.replies.popleft()
            if not ready:
                self._check_alive()

    def _file(self, batch: list[list[bytes]]) -> None:
        notify = []
        with self._cond:
            for frames in batch:
                try:
                    header, reply = decode_control(frames)
                except ProtocolError as exc:  # belongs to nobody we can name: its request times out
                    import structlog  # here, not at import: a command line starts faster without it

                    structlog.get_logger(__name__).warning("client_undecodable_reply", error=str(exc), frames=len(frames))
                    continue
                if isinstance(reply, ServiceResponses):  # pieces of several calls at once: each to its own request
                    for item in reply.responses:
                        self._file_one(item.get("request_id"), _response(item), notify)
                    continue
                self._file_one(header.get("parent_id"), reply, notify)
            self._cond.notify_all()
        for fn in notify:
            fn()

    def _file_one(self, request_id: Any, reply: Any, notify: list[Callable[[], None]]) -> None:
        box = self._mail.get(request_id)
        if box is None:
            return  # a reply to a request that timed out or was given up
        box.replies.append(reply)
        if box.notify is not None and box.notify not in notify:
            notify.append(box.notify)

    def _flush(self) -> None:
        while self._outbox:
            self._sock.send_multipart(self._outbox.popleft())

    def _release(self) -> None:
        with self._cond:
            self._leading = False
            stranded = bool(self._outbox)
            self._cond.notify_all()
        if stranded and not self._closed:
            # Queued while we were handing over: nobody else may be about to lead.
            with self._cond:
                if self._leading:
                    return
                self._leading = True
            try:
                self._flush()
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()

    def _ring(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._bell_w, b"\0")

    def pump(self, stop: threading.Event) -> None:
        """Lead until ``stop`` is set or the connection closes (the event-loop client's thread);
        the kernel's death is filed as an error for every open mailbox."""
        with self._cond:
            while self._leading:
                self._cond.wait(0.05)
            self._leading = True
        try:
            while not stop.is_set() and not self._closed:
                try:
                    self._lead(None, time.monotonic() + ALIVE_CHECK)
                except _Timeout:
                    continue
                except KernelUnavailable:
                    with self._cond:
                        boxes = list(self._mail.values())
                        self._cond.notify_all()
                    for box in boxes:
                        if box.notify is not None:
                            box.notify()
                    return
        finally:
            self._release()

    # -- leading from an event loop --

    def lead_on(self, loop: Any) -> None:
        """Lead from ``loop``'s thread (call it there): the loop reads the socket when it is
        readable and flushes what other threads queue, so a reply wakes no thread but the loop's
        (the event-loop client; a pump thread would wake first, then wake the loop). Until
        :meth:`stop_leading_on`."""
        with self._cond:
            while self._leading:
                self._cond.wait(0.05)
            self._leading = True
        self._loop, self._loop_thread = loop, threading.get_ident()
        loop.add_reader(self._sock.getsockopt(zmq.FD), self._on_readable)
        loop.add_reader(self._bell_r, self._on_readable)
        self._tick = loop.call_later(ALIVE_CHECK, self._on_tick)
        loop.call_soon(self._on_readable)

    def stop_leading_on(self) -> None:
        """Give the socket back (in the loop's thread); threads may lead again."""
        loop = getattr(self, "_loop", None)
        if loop is None:
            return
        self._loop = None
        self._tick.cancel()
        with contextlib.suppress(Exception):  # a closed loop has no readers left to remove
            loop.remove_reader(self._sock.getsockopt(zmq.FD))
            loop.remove_reader(self._bell_r)
        self._release()

    def on_loop_thread(self) -> bool:
        return getattr(self, "_loop", None) is not None and threading.get_ident() == self._loop_thread

    def _on_readable(self) -> None:
        """The socket (or the bell) may be readable: flush, then take every frame waiting. The
        socket's descriptor signals edges, so it is drained until ZMQ_EVENTS says no more."""
        if self._loop is None or self._closed:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._bell_r, 4096)
        sock = self._sock
        self._flush()
        batch = []
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                batch.append(sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        if batch:
            self._file(batch)

    def _on_tick(self) -> None:
        if self._loop is None:
            return
        try:
            self._check_alive()
        except KernelUnavailable:
            self.stop_leading_on()
            with self._cond:
                boxes = list(self._mail.values())
                self._cond.notify_all()
            for box in boxes:
                if box.notify is not None:
                    box.notify()
            return
        self._on_readable()  # an edge is never missed for long
        self._tick = self._loop.call_later(ALIVE_CHECK, self._on_tick)

    # -- health --

    def _check_alive(self) -> None:
        self._last_alive = time.monotonic()
        if self._dead is None and self.kernel.get("pid") is not None and not pid_alive(int(self.kernel["pid"])):
            self._dead = KernelUnavailable(
                f"the kernel for state dir {self.state_dir} (pid {self.kernel['pid']}) is gone; "
                f"start one with: llmos boot --state-dir {self.state_dir}",
                state_dir=str(self.state_dir),
                endpoint=self.endpoint,
            )
        if self._dead is not None:
            raise self._dead

    @property
    def dead(self) -> KernelUnavailable | None:
        """Why the kernel is known to be gone (None while it is not)."""
        return self._dead

    def _usable(self) -> None:
        with self._cond:
            self._usable_locked()

    def _usable_locked(self) -> None:
        if os.getpid() != self._pid:
            raise ForkedClient(
                f"this llmos client was made in process {self._pid} and cannot be used after fork() (this is process {os.getpid()}): "
                "make a new one in the child with llmos.connect()"
            )
        if self._closed:
            raise KernelError("this llmos client is closed", endpoint=self.endpoint)
        if self._dead is not None:
            raise self._dead

    @property
    def forked(self) -> bool:
        """True in a child process of the one that made this connection."""
        return os.getpid() != self._pid

    def close(self) -> None:
        """Close the socket (idempotent); waiting threads get KernelError. In a forked child the
        parent's sockets are left alone (closing them there would disturb the parent's)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._ring()
        if self.forked:
            return
        # The leader (a pump thread, a waiting request) leaves within its poll's wait.
        deadline = time.monotonic() + 2 * ALIVE_CHECK
        with self._cond:
            while self._leading and time.monotonic() < deadline:
                self._cond.wait(0.05)
        self._sock.close(0)
        self.ctx.destroy(0)
        for fd in (self._bell_r, self._bell_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def closed(self) -> bool:
        return self._closed


__all__ = ["ALIVE_CHECK", "Connection", "ForkedClient", "Mailbox"]
