"""Control requests: decode a ROUTER message into a :class:`Request`, find its handler in the
table, send back what it returns, or the error it raised.

A handler takes the request and returns the reply, or ``None`` when it answers later or not at
all (a routed service call, a held submit); whatever answers later keeps the request, which carries
the caller's identity and the request id its reply must name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from llmos.errors import LlmosError, ProtocolError
from llmos.kernel.bus import NOBLOCK, Bus, count_bad_frame
from llmos.protocol import check_header, decode_body, unpackb

log = structlog.get_logger("llmos.kernel")

__all__ = ["Control", "Handler", "Request"]


@dataclass(slots=True, frozen=True)
class Request:
    """One control message: who sent it, the id its reply names, and the decoded body."""

    identity: bytes
    parent_id: str | None
    msg: Any

    @property
    def sender(self) -> str:
        return self.identity.decode(errors="replace")


Handler = Callable[[Request], Any]


class Control:
    """The control socket's reader and dispatcher."""

    def __init__(self, bus: Bus, stats: dict[str, int]) -> None:
        self.bus = bus
        self.stats = stats
        self.handlers: dict[type, Handler] = {}

    def route(self, table: dict[type, Handler]) -> None:
        """Add handlers, a message type each; a type has one handler."""
        taken = table.keys() & self.handlers.keys()
        if taken:
            raise ValueError(f"two handlers for {sorted(t.__name__ for t in taken)}")
        self.handlers.update(table)

    def answer(self, req: Request, reply: Any) -> None:
        self.bus.send(req.identity, reply, req.parent_id)

    def fail(self, req: Request, exc: BaseException) -> None:
        self.bus.send_error(req.identity, exc, req.parent_id)

    def drain(self, limit: int = 1000) -> None:
        """Handle what the socket holds, up to ``limit`` messages this turn."""
        sock, readable = self.bus.control, self.bus.readable
        for _ in range(limit):
            if not readable(sock):
                return
            self.handle(sock.recv_multipart(NOBLOCK))

    def handle(self, frames: list[bytes]) -> None:
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
            handler = self.handlers.get(type(msg))
            if handler is None:
                raise ProtocolError(f"{header['type']} is not a request the kernel answers")
            reply = handler(Request(identity, parent_id, msg))
            if reply is not None:
                self.bus.send(identity, reply, parent_id)
        except LlmosError as exc:
            if isinstance(exc, ProtocolError):
                self.stats["bad_requests"] += 1
                count_bad_frame(self.stats, "control", exc)
            self.bus.send_error(identity, exc, parent_id)
        except Exception as exc:
            log.exception("request_failed", error=str(exc))
            self.bus.send_error(identity, exc, parent_id)

