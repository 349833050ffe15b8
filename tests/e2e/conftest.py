"""Fixtures the end-to-end tests share."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

import llmos
from tests.conftest import KernelHandle

ECHO = textwrap.dedent(
    """
    import llmos

    class Echo(llmos.Runner):
        def run(self, ctx):
            ctx.register_service("echo")
            while not ctx.cancelled:
                call = ctx.next_request(timeout=0.1)
                if call is None:
                    continue
                if call.body.get("together"):  # wait for that many calls, then answer them all in one message
                    calls = [call]
                    while len(calls) < call.body["together"] and not ctx.cancelled:
                        more = ctx.next_request(timeout=0.1)
                        if more is not None:
                            calls.append(more)
                    with ctx.responding_together():
                        for i in range(3):
                            for c in calls:
                                ctx.respond(c.request_id, {"i": i, "text": c.body.get("text", "")}, done=False)
                        for c in calls:
                            ctx.respond(c.request_id, {"end": True})
                    continue
                if call.body.get("die"):
                    import os, signal
                    os.kill(os.getpid(), signal.SIGKILL)
                for i in range(call.body.get("n", 3)):
                    if ctx.request_cancelled(call.request_id):
                        break
                    ctx.respond(call.request_id, {"i": i, "text": call.body.get("text", "")}, done=False)
                ctx.respond(call.request_id, {"end": True})
            return {"ok": True}

    @llmos.hookimpl
    def llmos_register_services(register):
        register(llmos.ServiceKind("echo.service", runner=Echo, resources=llmos.Resources(cpus=0)))
    """
)


@pytest.fixture
def echo_kernel(tmp_path: Path):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "echo_plugin.py").write_text(ECHO)
    env = {"PYTHONPATH": str(tmp_path / "plug"), "LLMOS_PLUGIN_MODULES": "echo=echo_plugin"}
    handle = KernelHandle(tmp_path / "state", env=env).boot()
    try:
        yield handle
    finally:
        handle.shutdown()


def wait_service(c: llmos.Client, name: str, replicas: int = 1) -> None:
    """Until the service ``name`` has ``replicas`` replicas registered (30 s at most)."""
    deadline = time.monotonic() + 30
    while not any(s["name"] == name and len(s["replicas"]) >= replicas for s in c.services()):
        assert time.monotonic() < deadline, c.services()
        time.sleep(0.05)
