"""The web dashboard: its API without a browser, then the page in a real headless Chromium
(from the system's packages, driven by Selenium; nothing is downloaded at test time).

The browser tests save screenshots; with ``LLMOS_DASHBOARD_SCREENSHOTS=docs`` they go into
docs/dashboard/ (the pictures docs/dashboard.md shows), else into the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import llmos
from tests.conftest import KernelHandle, write_endless_nano, write_word_corpus

DOCS = Path(__file__).resolve().parents[2] / "docs" / "dashboard"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Any, what: str, timeout: float = 30.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _dashboard(kernel: KernelHandle, *args: str) -> dict[str, Any]:
    return json.loads(kernel.cli("dashboard", "--port", "0", *args, "--json").stdout)


@pytest.fixture
def kernel(short_tmp: Path) -> Iterator[KernelHandle]:
    handle = KernelHandle(short_tmp / "state").boot()
    try:
        yield handle
    finally:
        handle.shutdown()


@pytest.fixture
def monitored(short_tmp: Path) -> Iterator[KernelHandle]:
    """A kernel with the monitor on (as a user's is), sampling quickly: measured use appears."""
    handle = KernelHandle(short_tmp / "state", env={"LLMOS_MONITOR_AUTOSTART": "1", "LLMOS_MONITOR_INTERVAL": "0.25"}).boot()
    try:
        yield handle
    finally:
        handle.shutdown()


# ---------------------------------------------------------------- the API, no browser


def test_the_api_shows_jobs_their_history_and_streams_events_from_a_seq(kernel: KernelHandle) -> None:
    where = _dashboard(kernel)
    url = where["url"]
    with kernel.client() as c, httpx.Client(base_url=url, timeout=10) as http:
        sleeper = c.submit("diag.sleep", {"seconds": 30})
        _wait(lambda: sleeper.info().state == "running", "the sleeper to run")
        overview = http.get("/api/overview").json()
        assert any(j["id"] == sleeper.id and j["state"] == "running" for j in overview["jobs"])
        assert any(s["name"] == "dashboard" for s in overview["services"]) and overview["devices"][0]["kind"] == "cpu"
        assert overview["kernel"]["storage"]["state"] in ("ok", "low")
        emit = c.submit("diag.emit", {"count": 7})
        emit.wait(timeout=30)
        page = http.get(f"/api/jobs/{emit.id}").json()
        assert [line[3] for line in page["logs"]][:1] == ["emit"] and len(page["logs"]) == 7
        assert page["states"][-1][1] == "succeeded" and page["last_seq"] > 0
        assert http.get("/api/jobs/99999").status_code == 404
        # The event stream replays from a sequence number (what a reconnecting page sends).
        first = page["logs"][2][0]
        seen: list[dict[str, Any]] = []
        with http.stream("GET", "/api/events", params={"prefix": f"job.{emit.id}."}, headers={"Last-Event-ID": str(first)}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["type"] == "job.state" and seen[-1]["body"]["state"] == "succeeded":
                        break
        assert seen[0]["seq"] == first + 1 and all(e["topic"].startswith(f"job.{emit.id}.") for e in seen)
        assert http.get("/api/pipelines").json()["pipelines"] == [] and http.get("/api/models").json()["models"] == []
        # A serve service shows its queue: one stream decoding, none waiting.
        serve = c.submit("serve", {"model": str(write_endless_nano(kernel.state_dir.parent / "nano")), "name": "tiny"}, resources={"cpus": 1})
        _wait(lambda: any(s["name"] == "tiny" for s in c.services()), "the serve service", timeout=60)
        stream = c.call("tiny", {"prompt": "a", "sampling": {"max_new_tokens": 1000, "temperature": 0}, "stream": True})
        next(stream)
        queue = {s["name"]: s.get("queue") for s in http.get("/api/overview").json()["services"]}
        stream.close()
        assert queue["tiny"] == {"running": 1, "waiting": 0, "max_seqs": 16} and queue["dashboard"] is None
        serve.cancel()
        assert "dashboard" in kernel.cli("status").stdout and where["page"] in kernel.cli("status").stdout
        sleeper.cancel()


def test_off_loopback_needs_a_token_and_the_token_is_checked(kernel: KernelHandle) -> None:
    with kernel.client() as c, pytest.raises(llmos.JobRejected, match="needs a token"):
        c.submit("dashboard", {"host": "0.0.0.0", "port": 0})
    token = "t" * 24
    where = _dashboard(kernel, "--token", token)
    assert where["page"].endswith(f"/?token={token}")
    with httpx.Client(base_url=where["url"], timeout=10) as http:
        refused = http.get("/api/overview")
        assert refused.status_code == 401 and "needs its token" in refused.text
        assert http.get("/api/overview", headers={"Authorization": "token wrong-token-here"}).status_code == 401
        opened = http.get("/", params={"token": token})
        assert opened.status_code == 200 and "llmos_dashboard_token" in opened.headers["set-cookie"]
        assert http.get("/api/overview").status_code == 200  # the cookie carries it from now on


# ---------------------------------------------------------------- the page, in Chromium


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    found = _chromium()
    if found is None:
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    options.binary_location = found[0]
    driver = webdriver.Chrome(options=options, service=Service(found[1]))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: Any, tmp_path: Path, name: str) -> None:
    where = DOCS if os.environ.get("LLMOS_DASHBOARD_SCREENSHOTS") == "docs" else tmp_path
    where.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(where / f"{name}.png"))


def _js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def _points(driver: Any, chart: str) -> int:
    return int(_js(driver, f"const c = document.querySelector('[data-chart=\"{chart}\"]'); return c ? Number(c.dataset.points) : -1;"))


def test_the_overview_lists_a_running_job_and_a_jobs_page_follows_its_loss_and_log(monitored: KernelHandle, browser: Any, tmp_path: Path) -> None:
    kernel = monitored
    where = _dashboard(kernel)
    (tmp_path / "corpus").mkdir()
    corpus = write_word_corpus(tmp_path / "corpus", 20)
    with kernel.client() as c:
        sleeper = c.submit("diag.sleep", {"seconds": 60}, resources={"cpus": 2})
        _wait(lambda: sleeper.info().state == "running", "the sleeper to run")
        browser.get(where["page"])
        _wait(lambda: _js(browser, f"const r = document.querySelector('[data-job=\"{sleeper.id}\"]'); return r && r.textContent.includes('running');"),
              "the overview to list the running job")
        # The CPU's row: its capacity, what is reserved and by which jobs, and what the monitor measured.
        cpu_row = "const r = document.querySelector('[data-device=\"cpu\"]'); return r ? [...r.cells].map(c => c.textContent) : [];"
        row = _wait(lambda: (cells := _js(browser, cpu_row)) and "% CPU" in cells[5] and cells, "the monitor's measured use on the overview")
        assert row[2].startswith("2 cores") and row[3].startswith("2 cores") and str(sleeper.id) in row[4].split(", ")
        # A job submitted while the page is open appears without a reload (from the journal's events).
        emit = c.submit("diag.emit", {"count": 40}, resources={"cpus": 1})  # waits: the sleeper holds both cores
        _wait(lambda: _js(browser, f"const r = document.querySelector('[data-job=\"{emit.id}\"]'); return r && r.textContent.includes('pending');"),
              "the overview to show the new pending job")
        _shot(browser, tmp_path, "overview")
        # Its page, open before it runs: the log tail follows as its lines arrive.
        browser.get(where["page"] + f"#/job/{emit.id}")
        _wait(lambda: _js(browser, "return document.getElementById('logs') !== null;"), "the job page")
        assert _js(browser, "return document.querySelectorAll('#logs > div').length;") == 0
        sleeper.cancel()
        lines = "return document.querySelectorAll('#logs > div').length;"
        _wait(lambda: _js(browser, lines) >= 40, "the log tail to follow the 40 lines")
        assert _js(browser, lines) == 40, "a line shown twice"
        _wait(lambda: "succeeded" in _js(browser, "return document.getElementById('job-state').textContent;"), "the job's state to change live")
        # A train job's loss chart gains points as its steps arrive.
        train = c.submit("train", {"data": str(corpus), "preset": "nano", "tokenizer": "bytes", "seq_len": 32, "batch_size": 4, "steps": 150,
                                   "log_every": 5, "eval_every": 50, "eval_batches": 2, "warmup_steps": 5, "lr": 3e-3, "threads": 1})
        browser.get(where["page"] + f"#/job/{train.id}")
        first = _wait(lambda: max(0, _points(browser, "loss")), "the first loss points", timeout=120)
        later = _wait(lambda: (n := _points(browser, "loss")) > first and n, "more loss points", timeout=120)
        assert later > first
        _wait(lambda: _points(browser, "lr") > 0 and _points(browser, "tokens_per_s") > 0, "the learning-rate and tokens/s charts")
        # Its resource use over time, from the monitor's samples.
        _wait(lambda: _points(browser, "cpu") > 1 and _points(browser, "rss") > 1, "the CPU and memory charts")
        _shot(browser, tmp_path, "job")
        train.wait(timeout=240)
        _wait(lambda: _points(browser, "loss") == 150 + 3, "every step's train_loss and the three val_loss points on the chart")
        # The same points over time instead of steps.
        on_steps = _points(browser, "loss")
        _js(browser, "const s = document.getElementById('x-axis'); s.value = 'time'; s.dispatchEvent(new Event('change'));")
        assert _points(browser, "loss") == on_steps and "time" in _js(browser, "return document.querySelector('[data-chart=\"loss\"]').textContent;")
        # The level filter means what it says.
        browser.get(where["page"] + f"#/job/{train.id}")
        _wait(lambda: _js(browser, "return document.querySelectorAll('#logs > div').length;") > 0, "the train log")
        _js(browser, "const s = document.getElementById('log-level'); s.value = 'warning'; s.dispatchEvent(new Event('change'));")
        levels = _js(browser, "return [...document.querySelectorAll('#logs > div')].map(d => d.className);")
        assert all(level in ("warning", "error", "critical") for level in levels)


def test_a_pipelines_stages_change_state_on_the_page(kernel: KernelHandle, browser: Any, tmp_path: Path) -> None:
    where = _dashboard(kernel)
    spec = {"name": "two", "stages": {
        "first": {"kind": "diag.artifact", "params": {"text": "F", "seconds": 2.0}},
        "second": {"kind": "diag.artifact", "params": {"text": "S", "inputs": ["${first.model}"], "seconds": 2.0}},
    }}
    with kernel.client() as c:
        pipe = c.pipeline(spec)
        browser.get(where["page"] + f"#/pipeline/{pipe.id}")

        def state(stage: str) -> str:
            return str(_js(browser, f"const g = document.querySelector('g[data-stage=\"{stage}\"]'); return g ? g.dataset.state : '';"))

        _wait(lambda: state("first") == "running", "the first stage to run")
        assert state("second") == "waiting"
        _shot(browser, tmp_path, "pipeline")
        _wait(lambda: state("first") == "succeeded" and state("second") == "running", "the second stage to run")
        _wait(lambda: state("second") == "succeeded", "the second stage to finish")
        pipe.wait(timeout=30)
        browser.get(where["page"] + "#/pipelines")
        _wait(lambda: _js(browser, f"const r = document.querySelector('[data-pipeline=\"{pipe.id}\"]'); return r && r.textContent.includes('succeeded');"),
              "the pipeline list")
        browser.get(where["page"] + "#/models")
        _wait(lambda: _js(browser, "return document.querySelectorAll('[data-model]').length;") == 2, "both artifacts on the models page")
        _shot(browser, tmp_path, "artifacts")  # docs/dashboard/models.png is from a real `llmos demo` run instead


def test_the_page_recovers_after_the_kernel_restarts(short_tmp: Path, browser: Any, tmp_path: Path) -> None:
    port = _free_port()
    env = {"LLMOS_DASHBOARD_AUTOSTART": "1", "LLMOS_DASHBOARD_PORT": str(port)}
    kernel = KernelHandle(short_tmp / "state", env=env).boot()
    try:
        page = f"http://127.0.0.1:{port}/"
        with kernel.client() as c:
            _wait(lambda: any(s["name"] == "dashboard" for s in c.services()), "the autostarted dashboard")
            before = c.submit("diag.echo")
            before.wait(timeout=30)
        browser.get(page)
        _wait(lambda: _js(browser, f"return document.querySelector('#recent [data-job=\"{before.id}\"]') !== null;"), "the overview")
        old_pid = _js(browser, "return document.getElementById('kernel').textContent;")
        kernel.shutdown()
        _wait(lambda: _js(browser, "return document.getElementById('conn').dataset.state;") == "reconnecting", "the page to notice")
        kernel.boot()
        with kernel.client() as c:
            after = c.submit("diag.echo", {"message": "after the restart"})
            after.wait(timeout=30)
        _wait(lambda: _js(browser, "return document.getElementById('conn').dataset.state;") == "live", "the page to reconnect", timeout=60)
        _wait(lambda: _js(browser, f"return document.querySelector('#recent [data-job=\"{after.id}\"]') !== null;"),
              "the job run after the restart on the page, without a reload")
        assert _js(browser, "return document.getElementById('kernel').textContent;") != old_pid
    finally:
        kernel.shutdown()
