"""The bus: the kernel's three sockets, the checks on their endpoints, and the turn's outbox.

- ``control`` (ROUTER): requests from clients and workers, and every reply; messages the kernel
  starts (an assignment, a cancel, a routed service call) go the same way.
- ``ingest`` (PULL): workers' events, batched.
- ``events`` (PUB): the journaled events, one message per stream and turn.

Nothing is sent while a turn runs. Replies wait in the outbox and events in the journal; at the
end of the turn the kernel commits, then :meth:`Bus.publish` sends the events and
:meth:`Bus.send_replies` the replies, so nothing is announced before it is durable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
import zmq

from llmos.errors import ConfigError, KernelError, LlmosError
from llmos.kernel.keys import ZAP_DOMAIN
from llmos.protocol import MAX_FRAME_BYTES, ErrorReply, encode_control, pack_array

log = structlog.get_logger("llmos.kernel")

__all__ = ["Bus", "check_endpoint", "count_bad_frame", "is_loopback_host"]

NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_HARD_FRAME_LIMIT = 4 * MAX_FRAME_BYTES  # beyond this libzmq drops the peer; below it we answer MessageTooLarge
_PUB_CHUNK = 1000  # events per PUB message (and per journal row)


class Bus:
    """The sockets and the outbox. One owner: the kernel's loop thread."""

    def __init__(self, endpoints: Mapping[str, str], *, pub_hwm: int, curve: tuple[str, Any] | None = None) -> None:
        """``endpoints`` maps ``control``, ``events`` and ``ingest`` (and optionally
        ``control_tcp``, ``events_tcp``, ``ingest_tcp``: the same sockets also on TCP) to URLs.
        ``curve`` is (the kernel's secret key, a start function for the ZAP authenticator taking
        the context): with it every TCP endpoint is a CURVE server whose clients the
        authenticator admits. A TCP port 0 binds any free port; :attr:`endpoints` holds the
        ports bound."""
        for url in endpoints.values():
            check_endpoint(url, curve=curve is not None)
        self.endpoints = dict(endpoints)
        self.zctx = zmq.Context()
        self.guard: Any = None
        if curve is not None and any(url.startswith("tcp://") for url in self.endpoints.values()):
            if not zmq.has("curve"):
                raise ConfigError("this libzmq has no CURVE support (zmq.has('curve') is False): TCP endpoints cannot be authenticated; install pyzmq's wheel, which bundles libsodium")
            self.guard = curve[1](self.zctx)  # before any bind: a CURVE handshake without ZAP admits any key
        self.control = self._socket(zmq.ROUTER, rcvhwm=100_000, sndhwm=100_000)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.ingest = self._socket(zmq.PULL, rcvhwm=100_000)
        self.pub = self._socket(zmq.PUB, sndhwm=pub_hwm)
        for sock, name in ((self.control, "control"), (self.ingest, "ingest"), (self.pub, "events")):
            # Local endpoints first: the security options set below apply only to what is bound after.
            urls = [(key, url) for key, url in self.endpoints.items() if key in (name, f"{name}_tcp")]
            urls.sort(key=lambda item: item[1].startswith("tcp://"))
            for key, url in urls:
                if url.startswith("tcp://") and curve is not None:
                    sock.setsockopt(zmq.CURVE_SERVER, 1)
                    sock.setsockopt(zmq.CURVE_SECRETKEY, curve[0].encode())
                    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
                self.endpoints[key] = _bind(sock, name, url)
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.ingest, zmq.POLLIN)
        self._outbox: list[tuple[bytes, list[bytes]]] = []

    def _socket(self, kind: int, *, rcvhwm: int | None = None, sndhwm: int | None = None) -> zmq.Socket[bytes]:
        sock = self.zctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind != zmq.PUB:
            sock.setsockopt(zmq.MAXMSGSIZE, _HARD_FRAME_LIMIT)
        if rcvhwm is not None:
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
        if sndhwm is not None:
            sock.setsockopt(zmq.SNDHWM, sndhwm)
        return sock

    # -- the outbox --

    def send(self, identity: bytes, msg: Any, parent_id: str | None = None) -> None:
        """Queue ``msg`` for the peer ``identity`` (a reply when ``parent_id`` names the request)."""
        self._outbox.append((identity, encode_control(msg, "kernel", parent_id=parent_id)))

    def send_frames(self, identity: bytes, frames: list[bytes]) -> None:
        """Queue frames already encoded (a replay reply)."""
        self._outbox.append((identity, frames))

    def send_error(self, identity: bytes, exc: BaseException, parent_id: str | None) -> None:
        """Answer a request with ``exc``: an llmos error as itself, anything else as an internal error."""
        if isinstance(exc, LlmosError):
            context = {k: v for k, v in exc.context.items() if isinstance(v, str | int | float | bool | type(None))}
            msg = ErrorReply(ename=type(exc).__name__, evalue=str(exc), code=exc.code, context=context)
        else:
            msg = ErrorReply(ename="KernelError", evalue=f"internal error: {type(exc).__name__}: {exc}", code=KernelError.code)
        self.send(identity, msg, parent_id)

    @property
    def has_outgoing(self) -> bool:
        return bool(self._outbox)

    def send_replies(self) -> list[bytes]:
        """Send the outbox; returns the peers that turned out to be gone (ROUTER_MANDATORY)."""
        if not self._outbox:
            return []
        out, self._outbox = self._outbox, []
        gone: list[bytes] = []
        send = self.control.send_multipart
        for identity, frames in out:
            try:
                send([identity, *frames], NOBLOCK)
            except zmq.ZMQError as exc:
                # The peer is gone or not keeping up: a reply is never worth blocking the kernel.
                if exc.errno == zmq.EHOSTUNREACH:
                    gone.append(identity)
        return gone

    def publish(self, streams: Mapping[str, list[bytes]]) -> None:
        """One PUB message per stream and turn (in chunks), topic ``"<stream>."``: SUB prefixes of
        whole streams ("job.7.", "job.", "") match it; the SDK filters finer prefixes itself."""
        for stream, items in streams.items():
            topic_frame = (stream + ".").encode()
            for i in range(0, len(items), _PUB_CHUNK):
                chunk = items[i : i + _PUB_CHUNK]
                try:
                    self.pub.send_multipart([topic_frame, pack_array(chunk, len(chunk))], NOBLOCK)
                except zmq.Again:
                    pass  # subscribers refill from the journal

    # -- reading --

    def readable(self, sock: zmq.Socket[bytes]) -> bool:
        """Whether ``sock`` holds a message now (asking is cheaper than an exception per drain)."""
        return bool(sock.getsockopt(_EVENTS) & _POLLIN)

    def close(self) -> None:
        for sock in (self.control, self.ingest, self.pub):
            sock.close(0)
        if self.guard is not None:
            self.guard.stop()
        self.zctx.term()
        for url in self.endpoints.values():
            if url.startswith("ipc://"):
                try:
                    os.unlink(url[len("ipc://"):])
                except OSError:
                    pass


def _bind(sock: zmq.Socket[bytes], name: str, url: str) -> str:
    """Bind ``url``; returns the endpoint bound (a TCP port 0 becomes the port chosen)."""
    if url.startswith("tcp://") and url.endswith(":0"):
        url = url[:-2] + ":*"
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
    if url.startswith("tcp://"):
        url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return url


def is_loopback_host(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def check_endpoint(url: str, *, curve: bool = False) -> None:
    """ConfigError unless ``url`` is an endpoint this kernel may bind."""
    if url.startswith("ipc://") or url.startswith("inproc://"):
        path = url.split("://", 1)[1]
        if url.startswith("ipc://") and len(path) > 107:
            raise ConfigError(f"ipc socket path is too long ({len(path)} bytes, the limit is 107): {path}", endpoint=url)
        return
    if url.startswith("tcp://"):
        host, _, port = url[len("tcp://"):].rpartition(":")
        if not host or not (port.isdigit() or port == "*"):
            raise ConfigError(f"endpoint {url!r}: expected tcp://HOST:PORT", endpoint=url)
        if not curve and not is_loopback_host(host.strip("[]")):
            raise ConfigError(
                f"refusing to bind {url}: a TCP endpoint on a non-loopback address needs CurveZMQ (set [kernel] curve = true, the default)",
                endpoint=url,
            )
        return
    raise ConfigError(f"endpoint {url!r} must start with ipc://, tcp:// or inproc://", endpoint=url)


def count_bad_frame(stats: dict[str, int], where: str, exc: BaseException) -> None:
    """Count a frame the kernel refused; log the first hundred, then every thousandth."""
    stats["bad_frames"] += 1
    n = stats["bad_frames"]
    if n <= 100 or n % 1000 == 0:
        log.warning("bad_frame", socket=where, error=f"{type(exc).__name__}: {exc}", count=n)
