"""Every hook, called by the real processes: a throwaway plugin loaded into a real kernel."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import KernelHandle, cli

PLUGIN = textwrap.dedent(
    '''
    from dataclasses import dataclass

    import click
    import llmos


    @llmos.message("hooktest.tick")
    @dataclass(frozen=True, slots=True, kw_only=True)
    class Tick:
        n: int


    @dataclass(frozen=True)
    class TickParams:
        interval: float = llmos.param(0.05, gt=0, help="seconds between ticks")


    class TickService(llmos.Runner):
        def run(self, ctx):
            n = 0
            while not ctx.wait_cancelled(ctx.params.interval):
                n += 1
                ctx.emit("tick", Tick(n=n))
            return {"ticks": n}


    class Hello(llmos.Runner):
        def run(self, ctx):
            return {"gpus": ctx.gpus, "workdir_exists": ctx.workdir.is_dir(), "model": ctx.load_model("weights.hooktest")}


    @llmos.hookimpl
    def llmos_load_model(path, device, dtype):
        return {"loaded": path} if path.endswith(".hooktest") else None


    @llmos.hookimpl
    def llmos_register_job_kinds(register):
        register(llmos.JobKind("hooktest.hello", runner=Hello))


    @llmos.hookimpl
    def llmos_register_services(register):
        register(llmos.ServiceKind("hooktest.ticker", runner=TickService, params=TickParams, autostart=True))


    @llmos.hookimpl
    def llmos_register_message_types(register):
        register(Tick)


    @llmos.hookimpl
    def llmos_register_commands(register):
        @click.command("hooktest-hello")
        def hello():
            """Say hello from a plugin."""
            click.echo("hello from hooktest")

        register(hello)


    @llmos.hookimpl
    def llmos_job_starting(ctx):
        ctx.log.info("hook_job_starting", kind=ctx.kind)


    @llmos.hookimpl
    def llmos_job_finished(ctx, outcome, error):
        ctx.log.info("hook_job_finished", outcome=outcome)
    '''
)


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "hooktest_plugin.py").write_text(PLUGIN)
    return {"PYTHONPATH": str(tmp_path / "plug"), "LLMOS_PLUGIN_MODULES": "hooktest=hooktest_plugin"}


def test_every_hook_is_called(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    handle = KernelHandle(tmp_path / "state", "--fake-gpus", "1x8GiB", env=plugin_env).boot()
    try:
        with handle.client() as c:
            # llmos_register_services: the autostart service runs without being submitted.
            deadline = time.monotonic() + 20
            while not [j for j in c.jobs(state="running") if j.kind == "hooktest.ticker"]:
                assert time.monotonic() < deadline, c.jobs()
                time.sleep(0.05)
            service = next(j for j in c.jobs(state="running") if j.kind == "hooktest.ticker")
            # llmos_register_message_types: the plugin's own type is journaled and validated.
            ticks = []
            for event in c.job(service.id).events(follow=True, timeout=20):
                if event.type == "hooktest.tick":
                    ticks.append(event.body["n"])
                    if len(ticks) == 3:
                        break
            assert ticks == [1, 2, 3]
            # llmos_register_job_kinds, llmos_job_starting, llmos_job_finished
            job = c.submit("hooktest.hello", resources={"gpus": 1})
            assert job.result(timeout=30) == {"gpus": [0], "workdir_exists": True, "model": {"loaded": "weights.hooktest"}}
            logs = [e.body["event"] for e in job.logs(follow=False)]
            assert logs == ["hook_job_starting", "hook_job_finished"]
            kinds = {k["name"]: k for k in c.kinds()}
            assert kinds["hooktest.ticker"]["service"] is True
            assert kinds["hooktest.ticker"]["params"][0]["name"] == "interval"
            plugin = next(p for p in c.plugins() if p["name"] == "hooktest")
            assert plugin["status"] == "ok" and plugin["message_types"] == ["hooktest.tick"]
            c.job(service.id).cancel()
            assert c.job(service.id).wait(timeout=30).state == "cancelled"
        # llmos_register_commands: the plugin's command is part of the CLI.
        proc = cli("hooktest-hello", env=plugin_env)
        assert proc.stdout.strip() == "hello from hooktest"
        assert "hooktest-hello" in cli("--help", env=plugin_env).stdout
    finally:
        handle.shutdown()


def test_hookspecs_are_documented() -> None:
    from llmos.kernel import hookspecs

    names = [n for n in dir(hookspecs) if n.startswith("llmos_")]
    assert names
    source = Path(__file__).read_text()
    for name in names:
        doc = getattr(hookspecs, name).__doc__
        assert doc and "Called in:" in doc, name
        assert f"def {name}(" in source, f"{name} has no test that implements and calls it"


def test_broken_plugin_does_not_stop_the_kernel(tmp_path: Path) -> None:
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "broken_plugin.py").write_text("import does_not_exist\n")
    (tmp_path / "plug" / "typo_plugin.py").write_text("import llmos\n@llmos.hookimpl\ndef llmos_register_job_kind(register):\n    pass\n")
    env = {"PYTHONPATH": str(tmp_path / "plug"), "LLMOS_PLUGIN_MODULES": "broken=broken_plugin,typo=typo_plugin"}
    handle = KernelHandle(tmp_path / "state", env=env).boot()
    try:
        plugins = {p["name"]: p for p in json.loads(handle.cli("plugins", "--json").stdout)}
        assert plugins["broken"]["status"] == "broken" and "does_not_exist" in plugins["broken"]["error"]
        assert plugins["typo"]["status"] == "broken" and "llmos_register_job_kind" in plugins["typo"]["error"]
        assert plugins["diag"]["status"] == "ok"
        with handle.client() as c:
            assert c.submit("diag.echo").wait(timeout=30).state == "succeeded"
    finally:
        handle.shutdown()
