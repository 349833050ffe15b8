"""The dashboard's ASGI app: the page (static files of this package) and its API.

``GET /api/overview``  the kernel, nodes and devices, jobs (running, pending, recent), services
``GET /api/jobs/{id}`` one job with its history: metrics, progress, resource use, log tail
``GET /api/pipelines`` and ``/api/pipelines/{id}`` pipelines with their stages (and their jobs)
``GET /api/models``    artifacts with their parents and compression figures (size, perplexity,
                       decode tokens/s, accepted or rejected)
``GET /api/events``    the journal as server-sent events (``id:`` is the event's seq), from
                       ``?since=SEQ`` or the ``Last-Event-ID`` a reconnecting page sends;
                       ``?prefix=job.7.`` for one job's

Every answer comes from the kernel through :class:`llmos.AsyncClient`; nothing is cached here,
so a page that reloads sees what the kernel holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import llmos
from llmos.protocol import ArtifactsRequest, PipelineRequest, PipelinesRequest

COOKIE = "llmos_dashboard_token"
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
HISTORY_MAX = 50_000  # events of one job read for its page at most (the newest kept)
LOG_TAIL = 1000
QUEUE_WAIT = 1.0  # seconds a serve replica has to tell its queue for the overview
KEEPALIVE = 15.0  # seconds between comments on an idle event stream (a gone page is noticed)


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, default=str, separators=(",", ":")), status_code=status, media_type="application/json")


class TokenGuard:
    """Off loopback the dashboard needs its token: in the URL (``?token=``, then kept in a
    cookie so the page's own requests carry it), a cookie, or ``Authorization: token T``;
    compared in constant time."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.token = app, token.encode()

    def _given(self, scope: dict[str, Any]) -> tuple[bytes | None, bool]:
        from urllib.parse import parse_qs

        query = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        if "token" in query:
            return query["token"][0].encode(), True
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value.lower().startswith(b"token "):
                return value[6:].strip(), False
            if name == b"cookie":
                for part in value.split(b";"):
                    key, _, val = part.strip().partition(b"=")
                    if key == COOKIE.encode():
                        return val, False
        return None, False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given, in_url = self._given(scope)
        if given is None or not hmac.compare_digest(given, self.token):
            why = "this dashboard needs its token: open the URL `llmos dashboard` printed (…/?token=…)" if given is None else "wrong token"
            await PlainTextResponse(why, status_code=401)(scope, receive, send)
            return
        if not in_url:
            await self.app(scope, receive, send)
            return

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


class Dashboard:
    def __init__(self, client: llmos.AsyncClient, *, token: str | None = None) -> None:
        self.client = client
        self.token = token

    def app(self) -> Any:
        routes = [
            Route("/", self.index),
            Route("/static/{name}", self.static),
            Route("/api/overview", self.overview),
            Route("/api/jobs", self.jobs),
            Route("/api/jobs/{job_id:int}", self.job),
            Route("/api/pipelines", self.pipelines),
            Route("/api/pipelines/{pipeline_id:int}", self.pipeline),
            Route("/api/models", self.models),
            Route("/api/events", self.events),
        ]

        async def failed(request: Request, exc: Exception) -> Response:
            if isinstance(exc, llmos.JobNotFound | llmos.ValidationError):
                return _json({"error": str(exc)}, 404)
            if isinstance(exc, llmos.KernelUnavailable):
                return _json({"error": str(exc)}, 503)
            return _json({"error": f"{type(exc).__name__}: {exc}"}, 500)

        app = Starlette(routes=routes, exception_handlers={Exception: failed, llmos.LlmosError: failed})
        return TokenGuard(app, self.token) if self.token else app

    # -- the page --

    async def index(self, request: Request) -> Response:
        return await self._file("index.html")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return PlainTextResponse("not found", status_code=404)
        return await self._file(name)

    async def _file(self, name: str) -> Response:
        body = resources.files("llmos.plugins.dashboard").joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    # -- the API --

    async def overview(self, request: Request) -> Response:
        c = self.client
        status, devices, services, jobs = await asyncio.gather(c.status(), c.devices(), c.services(), c.jobs(limit=200))
        kinds = {j.id: j.kind for j in jobs}
        await asyncio.gather(*(self._queue(s, kinds) for s in services))
        active = [j.to_dict() for j in jobs if j.state in ("pending", "running")]
        recent = [j.to_dict() for j in jobs if j.state not in ("pending", "running")][-20:]
        return _json({
            "kernel": {k: status.get(k) for k in ("version", "pid", "started_at", "state_dir", "jobs", "workers", "last_seq", "metrics_url", "storage", "cluster")},
            "devices": devices, "services": services, "jobs": active, "recent": recent, "last_seq": status["last_seq"], "now": time.time(),
        })

    async def _queue(self, service: dict[str, Any], kinds: dict[int, str]) -> None:
        """A ``serve`` service's queue as one of its replicas reports it: sequences decoding and
        requests waiting for a slot (``service["queue"]``); other services have none."""
        if not service["replicas"]:
            return
        job_id = service["replicas"][0]["job_id"]
        kind = kinds.get(job_id)
        if kind is None:
            with contextlib.suppress(llmos.LlmosError):
                kind = (await (await self.client.job(job_id)).info()).kind
        if kind != "serve":
            return
        with contextlib.suppress(llmos.LlmosError, TimeoutError):
            async with asyncio.timeout(QUEUE_WAIT):
                async for info in self.client.call(service["name"], {"op": "info"}):
                    service["queue"] = {"running": info.get("running", 0), "waiting": info.get("waiting", 0), "max_seqs": info.get("max_seqs")}
                    break

    async def jobs(self, request: Request) -> Response:
        limit = _int(request.query_params.get("limit"), 200, 1, 10_000)
        return _json({"jobs": [j.to_dict() for j in await self.client.jobs(limit=limit)]})

    async def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = await self.client.job(job_id)
        info = await job.info()
        history = await self._history(f"job.{job_id}.")
        out: dict[str, Any] = {"job": info.to_dict(), "metrics": {}, "progress": [], "usage": [], "logs": [], "states": []}
        last = 0
        for e in history:
            last = max(last, e.seq)
            kind = e.topic.rsplit(".", 1)[-1]
            if kind == "metric":
                out["metrics"].setdefault(e.body["name"], []).append([e.body.get("step"), e.body["value"], e.ts])
            elif kind == "progress":
                out["progress"].append([e.body.get("step"), e.ts, e.body.get("fields") or {}])
            elif kind == "usage":
                out["usage"].append([e.ts, e.body.get("cpu_percent"), e.body.get("rss"), e.body.get("gpu_memory")])
            elif kind == "log":
                out["logs"].append([e.seq, e.ts, e.body.get("level"), e.body.get("event"), e.body.get("fields") or {}])
            elif kind == "state":
                out["states"].append([e.ts, e.body.get("state"), e.body.get("reason")])
        out["logs"] = out["logs"][-LOG_TAIL:]
        out["last_seq"] = last or (await self.client.status())["last_seq"]
        return _json(out)

    async def _history(self, prefix: str) -> list[Any]:
        events: list[Any] = []
        since = 0
        while True:
            page, _last, more = await self.client.replay(prefix, since=since, limit=10_000)
            events.extend(page)
            if len(events) > HISTORY_MAX:
                events = events[-HISTORY_MAX:]
            if not more or not page:
                return events
            since = page[-1].seq

    async def pipelines(self, request: Request) -> Response:
        return _json({"pipelines": (await self.client.request(PipelinesRequest(limit=100))).pipelines})

    async def pipeline(self, request: Request) -> Response:
        record = (await self.client.request(PipelineRequest(id=request.path_params["pipeline_id"]))).pipeline
        jobs = {}
        for stage in record.get("stages", []):
            if stage.get("job_id") is not None:
                with contextlib.suppress(llmos.LlmosError):
                    jobs[str(stage["job_id"])] = (await (await self.client.job(int(stage["job_id"]))).info()).to_dict()
        return _json({"pipeline": record, "jobs": jobs})

    async def models(self, request: Request) -> Response:
        """Artifacts with their parents and the figures compression measured: ``after`` from
        each compressed model's own report, ``before`` for the model it came from."""
        arts = (await self.client.request(ArtifactsRequest(action="list", all=False, limit=1000))).artifacts
        figures: dict[str, dict[str, Any]] = {}
        by_job: dict[int, dict[str, Any]] = {}
        for art in arts:
            job_id = art.get("job_id")
            if job_id is None or job_id in by_job:
                continue
            with contextlib.suppress(llmos.LlmosError):
                by_job[job_id] = (await (await self.client.job(int(job_id))).info()).to_dict()
        for art in arts:
            job = by_job.get(art.get("job_id") or -1) or {}
            art["job_state"] = job.get("state")
            art["variant"] = _variant(job.get("kind"), job.get("params") or {})
            report = (job.get("result") or {}).get("report") if isinstance(job.get("result"), dict) else None
            if not isinstance(report, dict):
                continue
            figures[art["id"]] = {**_figures(report.get("after") or {}), "accepted": report.get("accepted"), "ppl_increase": report.get("ppl_increase")}
            for parent in art.get("parents", []):
                figures.setdefault(parent, {**_figures(report.get("before") or {}), "accepted": True, "source": True})
        for art in arts:
            art["figures"] = figures.get(art["id"])
        return _json({"models": arts})

    async def events(self, request: Request) -> Response:
        since = _int(request.headers.get("last-event-id") or request.query_params.get("since"), 0, 0, 1 << 62)
        prefix = request.query_params.get("prefix", "")
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=10_000)

        async def pump() -> None:
            try:
                async for event in self.client.events(prefix, since=since, follow=True):
                    await queue.put(event)
            except Exception as exc:  # the kernel went away: the page reconnects later
                await queue.put(exc)
            await queue.put(None)

        async def stream() -> Any:
            task = asyncio.create_task(pump())
            try:
                yield b"retry: 1000\n\n"
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), KEEPALIVE)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    if item is None or isinstance(item, Exception):
                        return
                    data = {"seq": item.seq, "stream_seq": item.stream_seq, "topic": item.topic, "type": item.type, "ts": item.ts, "body": item.body}
                    yield f"id: {item.seq}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n".encode()
            finally:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _figures(f: dict[str, Any]) -> dict[str, Any]:
    tps = f.get("tokens_per_s") or {}
    return {"bytes": f.get("bytes"), "ppl": f.get("ppl"), "tokens_per_s": tps.get("batch_1") if isinstance(tps, dict) else None}


def _variant(kind: str | None, params: dict[str, Any]) -> str:
    """What a compression job made, in a few words: ``int4 gptq``, ``30% structured``."""
    if kind == "quantize" and params.get("scheme"):
        return " ".join(str(v) for v in (params["scheme"], params.get("method")) if v and v != "rtn")
    if kind == "prune" and isinstance(params.get("sparsity"), int | float):
        return f"{params['sparsity']:.0%} {params.get('method') or ''}".strip()
    return ""


def _int(text: str | None, default: int, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(text))) if text not in (None, "") else default
    except ValueError:
        return default


__all__ = ["Dashboard", "TokenGuard"]
