"""Messages of services: a worker registers a name, clients call it through the kernel, replicas answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmos.protocol.registry import message


@message("service.register")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceRegister:
    """Worker to kernel: this worker answers requests to service ``name`` (one replica of it).
    ``version`` says what it serves (a model's path): replicas of one name must serve the same."""

    worker_id: str
    name: str
    version: str = ""


@message("service.request")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceRequest:
    """Client to kernel: a request for service ``service``; replies come back as service.response
    messages whose parent_id is this message's id, the last one with ``done``."""

    service: str
    body: dict[str, Any] = field(default_factory=dict)


@message("service.call")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceCall:
    """Kernel to a replica: a request to answer (``request_id`` ties its responses to the caller)."""

    request_id: str
    body: dict[str, Any]


@message("service.response")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceResponse:
    """A replica's answer, or one piece of it; ``done`` ends it. ``error`` (with ``code``) fails it."""

    request_id: str
    body: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    error: str | None = None
    code: int | None = None


@message("service.responses")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceResponses:
    """Several answers or pieces in one message: what a replica's step produced for its whole
    batch (replica to kernel), and the part of it for one caller (kernel to that caller). Each
    item is a service.response's fields as a map (``request_id``, ``body``, ``done``, ``error``,
    ``code``); items are read in order."""

    responses: list[dict[str, Any]]


@message("service.cancel")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceCancel:
    """Client to kernel (and kernel to replica): the caller no longer wants this request."""

    request_id: str


@message("kernel.services_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServicesRequest:
    """Ask which services are running."""


@message("kernel.services_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServicesReply:
    """Each service: its name, its replicas (worker, job) and the requests in flight."""

    status: str = "ok"
    services: list[dict[str, Any]]
