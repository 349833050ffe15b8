"""api: an OpenAI-compatible HTTP API in front of llmos's ``serve`` services.

``llmos api`` starts the ``api`` service: a worker that runs an ASGI app (Starlette on uvicorn)
and forwards every request to the ``serve`` service named by the request's ``model``, through the
kernel (:class:`llmos.AsyncClient`), so replicas, queues, cancellation and accounting stay the
kernel's. ``llmos serve MODEL --http PORT`` starts one beside the model. See docs/api.md.

This module stays light (no web framework): the kernel imports it to validate parameters.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from dataclasses import dataclass

import llmos
from llmos import Resources, ServiceKind, param

LLMOS_API = ">=1,<2"
NEEDS = ("starlette", "uvicorn", "jinja2")


@dataclass(frozen=True)
class ApiParams:
    host: str = param("127.0.0.1", help="The address to listen on; any but a loopback address needs api_key_sha256.")
    port: int = param(8000, ge=0, le=65535, help="The TCP port (0: any free one; the service's info says which).")
    api_key_sha256: str | None = param(None, help="The SHA-256 (hex) of the API key clients must send as 'Authorization: Bearer KEY' "
                                            "(llmos api --api-key or LLMOS_API_KEY computes it; the key itself is never stored).")
    name: str = param("api", help="The service name the gateway registers (llmos services lists it).")
    max_body: int = param(8 << 20, ge=1024, le=1 << 30, help="The largest request body accepted, in bytes (past it: 413).")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_api(p: ApiParams) -> None:
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"the api service needs {', '.join(missing)}: pip install 'llmos[api]'")
    if p.api_key_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", p.api_key_sha256):
        raise ValueError("api_key_sha256 must be 64 lowercase hex digits (the SHA-256 of the key)")
    if not is_loopback(p.host) and p.api_key_sha256 is None:
        raise ValueError(f"listening on {p.host} (not a loopback address) needs an API key: give --api-key KEY or set LLMOS_API_KEY")
    if not p.name or " " in p.name:
        raise ValueError(f"name {p.name!r} must be non-empty without spaces")


@llmos.hookimpl
def llmos_register_services(register) -> None:  # type: ignore[no-untyped-def]
    register(ServiceKind("api", runner="llmos.plugins.api.runner:ApiRunner", params=ApiParams, resources=Resources(cpus=0), check=check_api,
                         help="An OpenAI-compatible HTTP API (completions, chat, models, tokenize, metrics) in front of the serve services."))


@llmos.hookimpl
def llmos_register_commands(register) -> None:  # type: ignore[no-untyped-def]
    from llmos.plugins.api.cli import api_command

    register(api_command)
