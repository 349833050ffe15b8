"""Monitoring: the monitor service's samples, usage events, the Prometheus exporter, `llmos top`."""

from __future__ import annotations

import socket
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KernelHandle, cli

HOG = textwrap.dedent(
    """
    import llmos

    class Hog(llmos.Runner):
        def run(self, ctx):
            block = bytearray(200 * 1024 * 1024)  # resident: every page written
            for i in range(0, len(block), 4096):
                block[i] = 1
            ctx.progress(1, 2, message="holding")
            ctx.wait_cancelled(60)
            return {"held": len(block)}

    @llmos.hookimpl
    def llmos_register_job_kinds(register):
        register(llmos.JobKind("hog", runner=Hog, resources=llmos.Resources(cpus=0)))
    """
)


@pytest.fixture
def monitored(tmp_path: Path):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "hog_plugin.py").write_text(HOG)
    config = tmp_path / "m.toml"
    config.write_text("[monitor]\nautostart = true\ninterval = 0.2\n")
    env = {"PYTHONPATH": str(tmp_path / "plug"), "LLMOS_PLUGIN_MODULES": "hog=hog_plugin", "LLMOS_MONITOR_AUTOSTART": "1"}
    handle = KernelHandle(tmp_path / "state", "--config", str(config), "--fake-gpus", "1x8GiB", env=env).boot()
    try:
        yield handle
    finally:
        handle.shutdown()


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_usage_events_exporter_top_and_acct(monitored: KernelHandle) -> None:
    with monitored.client() as c:
        hog = c.submit("hog", resources={"gpus": 0.5})
        done = c.submit("diag.sleep", params={"seconds": 0.2})
        done.wait(timeout=30)
        deadline = time.monotonic() + 30
        usage = None
        while usage is None or usage["rss"] < 200 * 1024 * 1024:
            assert time.monotonic() < deadline, usage
            events = [e for e in hog.events(follow=False) if e.type == "job.usage"]
            usage = events[-1].body if events else None
            time.sleep(0.1)
        assert "gpu_memory" not in usage or usage["gpu_memory"] is None  # no NVML: absent, not zero
        cpu_metrics = [e for e in c.events("device.cpu", follow=False) if e.type == "device.metrics"]
        assert cpu_metrics and {"cpu_percent", "memory_used", "memory_total"} <= set(cpu_metrics[-1].body["used"])
        cpu_dev = next(d for d in c.devices() if d["id"] == "cpu")
        assert cpu_dev["used"]["memory_total"] > 0
        status = c.status()
        assert status["metrics_url"].startswith("http://127.0.0.1:")
        m = _metrics(status["metrics_url"])
        assert m[("llmos_jobs", (("state", "running"),))] == status["jobs"]["running"] == 2  # hog and the monitor
        assert m[("llmos_jobs", (("state", "succeeded"),))] == status["jobs"]["succeeded"]
        assert m[("llmos_queue_depth", ())] == 0
        assert m[("llmos_events_journaled_total", ())] > 0
        gpu = next(d for d in c.devices() if d["id"] == "gpu0")
        assert m[("llmos_device_memory_bytes", (("device", "gpu0"), ("kind", "reserved")))] == gpu["memory_reserved"] == 4 * 1024**3
        assert m[("llmos_job_resident_memory_bytes", (("job", str(hog.id)), ("kind", "hog")))] >= 200 * 1024 * 1024
        assert m[("llmos_job_duration_seconds_count", (("kind", "diag.sleep"), ("state", "succeeded")))] == 1
        top = monitored.cli("top", "--once").stdout
        assert ("hog" in top and "monitor" in top and "devices" in top and "holding" not in top) or "hog" in top
        acct = monitored.cli_json("acct")
        assert any(r["id"] == done.id and r["state"] == "succeeded" for r in acct)
        hog.cancel()


def test_exporter_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        config = tmp_path / "c.toml"
        config.write_text(f'[monitor]\nexporter = "127.0.0.1:{port}"\n')
        proc = cli("boot", "--config", str(config), state_dir=tmp_path / "s", check=False)
        assert proc.returncode == 1 and f"127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr
        config.write_text(f'[monitor]\nexporter = "127.0.0.1:{port}"\nexporter_optional = true\n')
        handle = KernelHandle(tmp_path / "s2", "--config", str(config)).boot()
        try:
            with handle.client() as c:
                assert c.status()["metrics_url"] is None
        finally:
            handle.shutdown()
