"""``llmos api``: start the OpenAI-compatible gateway (the ``api`` service) and print its URL."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import click

import llmos


def _digest(key: str | None) -> str | None:
    if not key:
        return None
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def parse_http(value: str) -> tuple[str, int]:
    """``[HOST:]PORT`` as (host, port); host 127.0.0.1 when left out."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"expected [HOST:]PORT with PORT 0-65535, got {value!r}", param_hint="--http")
    return host or "127.0.0.1", int(port)


def start_gateway(client: llmos.Client, host: str, port: int, api_key: str | None, name: str | None = None, wait_s: float = 60,
                  max_body: int | None = None) -> dict[str, Any]:
    """Where the gateway on ``host:port`` listens: one already running there, else a new ``api``
    service started and waited for (ClickException if it fails first, saying why)."""
    key = _digest(api_key)
    for job in client.jobs(state="running"):
        if job.kind == "api" and job.params.get("host") == host and job.params.get("port") == port and port != 0:
            if job.params.get("api_key_sha256") != key:
                raise click.ClickException(f"a gateway already listens on {host}:{port} (job {job.id}) with a different API key; stop it with llmos cancel {job.id}")
            return where_listening(client, job.params.get("name", "api"), job.id)
    taken = {s["name"] for s in client.services()}
    if name is None:
        name = "api" if "api" not in taken else f"api-{port}"
    elif name in taken:
        raise click.ClickException(f"a service named {name!r} is already running; choose another with --name")
    params: dict[str, Any] = {"host": host, "port": port, "name": name}
    if key:
        params["api_key_sha256"] = key
    if max_body is not None:
        params["max_body"] = max_body
    return start_service(client, "api", params, name, wait_s, "the gateway")


def start_service(client: llmos.Client, kind: str, params: dict[str, Any], name: str, wait_s: float, what: str) -> dict[str, Any]:
    """Submit the HTTP service ``kind``, wait until its replica registers ``name``, and return
    where it listens (ClickException saying why if it ends first or takes longer than ``wait_s``;
    then it is cancelled)."""
    job = client.submit(kind, params)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            entry = next((s for s in client.services() if s["name"] == name), None)
            if entry and any(r["job_id"] == job.id for r in entry["replicas"]):
                return where_listening(client, name, job.id)
            info = job.info()
            if info.ended:
                raise click.ClickException(f"{what} did not start: job {info.id} {info.state}: {info.reason}")
            if time.monotonic() > deadline:
                raise click.ClickException(f"{what} did not start within {wait_s:g}s (job {job.id}: llmos logs {job.id})")
            time.sleep(0.05)
    except BaseException:
        with contextlib.suppress(llmos.LlmosError):
            if not job.info().ended:
                job.cancel(f"llmos {kind}: {what} did not come up")
        raise


def where_listening(client: llmos.Client, name: str, job_id: int) -> dict[str, Any]:
    """Where the HTTP service ``name`` listens (every call to one answers with it)."""
    for reply in client.call(name, {"op": "info"}, timeout=10):
        return {**reply, "service": name, "job_id": job_id}
    raise click.ClickException(f"service {name!r} did not say where it listens")


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on; any but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="The TCP port (0: any free one).")
@click.option("--api-key", default=None, envvar="LLMOS_API_KEY", show_envvar=True, help="Clients must send 'Authorization: Bearer KEY'.")
@click.option("--name", default=None, help="The gateway's service name (default: api, or api-PORT when api is taken).")
@click.option("--max-body", type=click.IntRange(1024, 1 << 30), default=None, help="The largest request body in bytes (default 8 MiB).")
@click.option("--timeout", "wait_s", type=float, default=60, show_default=True, help="Seconds to wait for the gateway to listen.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="The kernel's state directory.")
@click.option("--json", "as_json", is_flag=True, help="Print where it listens as JSON.")
def api_command(host: str, port: int, api_key: str | None, name: str | None, max_body: int | None, wait_s: float, state_dir: Path | None, as_json: bool) -> None:
    """Start an OpenAI-compatible HTTP API in front of the served models.

    The model name in a request is a service name from `llmos serve` (GET /v1/models lists
    them). Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /tokenize,
    /detokenize, /tokenizer_info, /health, /version, /metrics. It runs as a service (`llmos
    services` lists it); stop it with `llmos cancel JOB`. See docs/api.md."""
    from llmos.plugins.api import is_loopback

    if not is_loopback(host) and not api_key:
        raise click.ClickException(f"listening on {host} (not a loopback address) needs an API key: give --api-key KEY or set LLMOS_API_KEY")
    try:
        with llmos.connect(state_dir or os.environ.get("LLMOS_STATE_DIR") or None) as client:
            where = start_gateway(client, host, port, api_key, name, wait_s, max_body)
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(where))
    else:
        click.echo(f"OpenAI-compatible API at {where['url']}/v1 (service {where['service']!r}, job {where['job_id']}); "
                   f"try: curl {where['url']}/v1/models ; stop it with: llmos cancel {where['job_id']}")
