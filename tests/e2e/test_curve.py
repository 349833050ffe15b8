"""The authenticated TCP bus: CurveZMQ on every TCP endpoint, an allow-list the kernel's ZAP
authenticator enforces, `llmos keys`, and remote clients (SDK and CLI) over it."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import zmq

import llmos
from llmos.client import submit_request
from llmos.errors import ConfigError, KernelUnavailable
from llmos.protocol import StatusRequest, encode_control
from tests.conftest import KernelHandle, cli


@pytest.fixture(scope="module")
def tcp_kernel(tmp_path_factory: pytest.TempPathFactory):
    k = KernelHandle(tmp_path_factory.mktemp("curve") / "state", "--listen", "127.0.0.1:0").boot()
    try:
        yield k
    finally:
        k.shutdown()


def _endpoints(k: KernelHandle) -> dict[str, str]:
    return json.loads((k.state_dir / "kernel.json").read_text())


def test_keys_are_private_and_tcp_endpoints_are_listed(tcp_kernel: KernelHandle) -> None:
    ep = _endpoints(tcp_kernel)
    for name in ("control_tcp", "events_tcp", "ingest_tcp"):
        assert ep[name].startswith("tcp://127.0.0.1:") and not ep[name].endswith(":0")
    assert ep["control"].startswith("ipc://")  # local clients keep the ipc sockets
    kernel_key = tcp_kernel.state_dir / "keys" / "kernel.json"
    assert stat.S_IMODE(kernel_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(kernel_key.parent.stat().st_mode) == 0o700
    assert json.loads(kernel_key.read_text())["public"] == ep["curve_public"]
    status = tcp_kernel.cli("status").stdout
    assert ep["control_tcp"] in status


def test_a_remote_client_with_an_issued_key_works_sdk_and_cli(tcp_kernel: KernelHandle, tmp_path: Path) -> None:
    keyfile = tmp_path / "alice.key"
    out = tcp_kernel.cli_json("keys", "add", "alice", "--out", str(keyfile))
    assert out["name"] == "alice" and out["issued"] and Path(out["key_file"]) == keyfile.resolve()
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    url = _endpoints(tcp_kernel)["control_tcp"]
    with llmos.connect(url, key=keyfile) as client:
        job = client.submit("diag.echo", {"message": "over curve"})
        assert job.wait(timeout=30).state == "succeeded"
        # The event stream comes over the TCP events endpoint, encrypted too.
        types = [e.type for e in job.events()]
        assert "job.state" in types
    listed = tcp_kernel.cli_json("keys", "list")
    assert [k["name"] for k in listed["keys"]] == ["alice"]
    # The CLI's --kernel/--key reach the same kernel; no state dir involved.
    proc = cli("--kernel", url, "--key", str(keyfile), "jobs", "--json", env={"LLMOS_STATE_DIR": str(tmp_path / "nowhere")})
    assert any(j["kind"] == "diag.echo" for j in json.loads(proc.stdout))
    tcp_kernel.cli("keys", "revoke", "alice")
    with pytest.raises(KernelUnavailable, match="refused key 'alice'"):
        llmos.connect(url, key=keyfile, timeout=5)


def test_an_unknown_key_is_refused_logged_and_reaches_no_handler(tcp_kernel: KernelHandle) -> None:
    ep = _endpoints(tcp_kernel)
    with tcp_kernel.client() as local:
        jobs_before = len(local.jobs())
    public, secret = (k.decode() for k in zmq.curve_keypair())
    stranger = {"name": "mallory", "public": public, "secret": secret, "kernel_public": ep["curve_public"]}
    with pytest.raises(KernelUnavailable, match="refused key 'mallory'"):
        llmos.connect(ep["control_tcp"], key=stranger, timeout=5)
    # A raw socket with the stranger's key that sends well-formed submits anyway: no answer, no job.
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = ep["curve_public"].encode(), public.encode(), secret.encode()
        sock.connect(ep["control_tcp"])
        for _ in range(20):
            sock.send_multipart(encode_control(submit_request("diag.echo", {"message": "from a stranger"}, {}, 0, 0, None, False, None), "mallory"))
        assert sock.poll(1500) == 0
    finally:
        ctx.destroy(0)
    with tcp_kernel.client() as local:
        assert len(local.jobs()) == jobs_before  # nothing the stranger sent reached a handler
    log = (tcp_kernel.state_dir / "kernel.log").read_text().splitlines()
    refusals = [json.loads(line) for line in log if "curve_key_refused" in line]
    assert refusals and all(r["key"] == public for r in refusals[-2:])
    # A socket without CURVE at all does not get through either.
    ctx = zmq.Context()
    try:
        plain = ctx.socket(zmq.DEALER)
        plain.linger = 0
        plain.connect(ep["control_tcp"])
        plain.send_multipart(encode_control(StatusRequest(), "plain"))
        assert plain.poll(1000) == 0
    finally:
        ctx.destroy(0)


def test_keys_cli_refuses_bad_input(tcp_kernel: KernelHandle, tmp_path: Path) -> None:
    bad = tcp_kernel.cli("keys", "add", "bob", "--public", "not-a-key", check=False)
    assert bad.returncode != 0 and "Z85" in bad.stderr
    bad = tcp_kernel.cli("keys", "revoke", "nobody", check=False)
    assert bad.returncode != 0 and "no allowed key is named 'nobody'" in bad.stderr
    bad = tcp_kernel.cli("keys", "add", "bad name!", check=False)
    assert bad.returncode != 0 and "key name" in bad.stderr
    public, _ = (k.decode() for k in zmq.curve_keypair())
    out = tcp_kernel.cli_json("keys", "add", "carol", "--public", public)
    assert out["public"] == public and not out["issued"] and out["key_file"] is None
    again = tcp_kernel.cli("keys", "add", "carol", "--public", public, check=False)
    assert again.returncode != 0 and "already allowed" in again.stderr
    tcp_kernel.cli("keys", "revoke", "carol")


def test_connect_over_tcp_without_a_key_or_with_a_bad_file(tcp_kernel: KernelHandle, tmp_path: Path) -> None:
    url = _endpoints(tcp_kernel)["control_tcp"]
    env_key = os.environ.pop("LLMOS_KEY", None)
    try:
        with pytest.raises(ConfigError, match="needs a key"):
            llmos.connect(url)
    finally:
        if env_key is not None:
            os.environ["LLMOS_KEY"] = env_key
    with pytest.raises(ConfigError, match="does not exist"):
        llmos.connect(url, key=tmp_path / "missing.key")
    (tmp_path / "junk.key").write_text('{"public": "x"}')
    with pytest.raises(ConfigError, match="'public' must be a CurveZMQ key"):
        llmos.connect(url, key=tmp_path / "junk.key")


def test_a_non_loopback_tcp_bind_without_curve_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "llmos.toml"
    config.write_text('[kernel]\ncurve = false\nlisten = "0.0.0.0:0"\n')
    t0 = time.monotonic()
    proc = cli("boot", "--config", str(config), state_dir=tmp_path / "state", check=False, env={"LLMOS_MONITOR_AUTOSTART": "0"})
    assert proc.returncode != 0
    assert "refusing to bind tcp://0.0.0.0" in proc.stderr and "CurveZMQ" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert time.monotonic() - t0 < 30
    # Loopback without CURVE stays allowed (a local test bus).
    config.write_text('[kernel]\ncurve = false\nlisten = "127.0.0.1:0"\n')
    k = KernelHandle(tmp_path / "state2", "--config", str(config))
    k.boot()
    try:
        ep = _endpoints(k)
        assert ep["control_tcp"].startswith("tcp://127.0.0.1:") and "curve_public" not in ep
    finally:
        k.shutdown()
