"""The ``api`` service's runner: binds the socket (a port in use fails the job at once, saying
so), serves the gateway's app with uvicorn on an event loop in a thread of its own, registers
the service once it listens, and answers service calls with where it listens."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import llmos


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; OSError says plainly when the port is taken."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP named outright: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it every keep-alive response after the first waits 40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        why = "is in use" if exc.errno == 98 else f"cannot be bound: {exc.strerror}"
        raise OSError(exc.errno, f"port {port} on {host} {why}; choose another with --port") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def loop_factory() -> Any:
    """uvloop's event loop where it is installed (the ``api`` extra installs it, with httptools,
    which uvicorn then parses HTTP with): less of the gateway's time per streamed piece; else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class HttpServiceRunner(llmos.Runner):
    """A service that is an ASGI app: binds ``host:port`` at setup, serves :meth:`app` with
    uvicorn on an event loop in a thread of its own (with an :class:`llmos.AsyncClient` made in
    that loop), registers the service ``params.name`` once it listens, and answers every call
    with where it listens (:meth:`where`). The api gateway and the dashboard are two."""

    what = "HTTP server"

    def setup(self, ctx: llmos.JobContext) -> None:
        p = ctx.params
        self.sock = bind(p.host, p.port)
        port = self.sock.getsockname()[1]
        host = f"[{p.host.strip('[]')}]" if ":" in p.host else p.host
        self.url = f"http://{host}:{port}"
        self.port = port

    def app(self, client: llmos.AsyncClient, params: Any) -> Any:
        raise NotImplementedError

    def where(self, params: Any) -> dict[str, Any]:
        return {"url": self.url, "host": params.host, "port": self.port}

    def run(self, ctx: llmos.JobContext) -> dict[str, Any]:
        import uvicorn

        p = ctx.params
        state: dict[str, Any] = {}

        async def main() -> None:
            client = llmos.AsyncClient()
            try:
                config = uvicorn.Config(self.app(client, p), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=3,
                                        timeout_keep_alive=30)
                server = state["server"] = uvicorn.Server(config)
                await server.serve(sockets=[self.sock])
            finally:
                await client.close()

        def serve() -> None:
            try:
                with asyncio.Runner(loop_factory=loop_factory()) as runner:
                    runner.run(main())
            except BaseException as exc:
                state["failed"] = exc

        thread = threading.Thread(target=serve, name=f"llmos-{p.name}", daemon=True)
        thread.start()
        while not (state.get("server") is not None and state["server"].started) and thread.is_alive() and not ctx.cancelled:
            time.sleep(0.01)
        if "failed" in state:
            raise RuntimeError(f"the {self.what} did not start: {state['failed']}")
        ctx.register_service(p.name)
        where = self.where(p)
        ctx.log.info("listening", service=p.name, **where)
        while not ctx.cancelled and thread.is_alive():
            call = ctx.next_request(timeout=0.2)
            if call is not None:
                ctx.respond(call.request_id, where)
        server = state.get("server")
        if server is not None:
            server.should_exit = True
        thread.join(timeout=10)
        if "failed" in state and not ctx.cancelled:
            raise RuntimeError(f"the {self.what} stopped: {state['failed']}")
        return where


class ApiRunner(HttpServiceRunner):
    what = "HTTP server"

    def app(self, client: llmos.AsyncClient, params: Any) -> Any:
        from llmos.plugins.api.app import Gateway

        return Gateway(client, key_sha256=params.api_key_sha256, max_body=params.max_body, name=params.name).app()

    def where(self, params: Any) -> dict[str, Any]:
        return {**super().where(params), "api_key": params.api_key_sha256 is not None}
