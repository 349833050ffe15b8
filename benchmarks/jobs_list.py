"""Listing jobs with 10,000 in the table: ``client.jobs()``, ``AsyncClient.jobs()`` and ``llmos jobs``.

Run ``python benchmarks/jobs_list.py`` (about 2 minutes on 2 cores; ``--jobs N`` for another
count, ``--no-write`` to leave docs/benchmarks.md alone).

It boots a real kernel (``llmos boot --detach``), holds every core with one ``diag.sleep`` job,
submits N ``diag.echo`` jobs of one core each from a thread pool sharing one client (they wait,
pending, in the kernel's memory), times the listings, cancels them (now they are ended rows in SQLite) and times
the listings again. Each figure is the median of 7 calls (3 for the command line).

Baselines in the same run: the whole table in one call (``limit=N``: what every listing cost
before pages), and ``llmos status`` for the command line (a Python process that starts, imports
llmos, asks the kernel one thing and exits). The target from the issue: under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _benchkernel import Kernel, llmos_cmd
from _report import cpu_model, say, timed, verdict, write_table

import llmos

TITLE = "## Listing jobs (benchmarks/jobs_list.py)"
TARGET_MS = 100.0


def median_ms(fn: Callable[[], Any], runs: int) -> float:
    fn()  # warm: the first call pays for connecting
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def measure(kernel: Kernel, n: int) -> dict[str, float]:
    client = kernel.client
    assert client is not None
    def run_cli(*args: str) -> None:
        proc = subprocess.run([*llmos_cmd(), *args, "--state-dir", str(kernel.dir)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr

    async def async_listing() -> float:
        async with llmos.AsyncClient(kernel.dir) as ac:
            await ac.jobs()
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                page = await ac.jobs()
                times.append(time.perf_counter() - t0)
            assert page.total >= n
            return statistics.median(times) * 1000

    page = client.jobs()
    assert len(page) == 1000 and page.total >= n, (len(page), page.total)
    return {
        "client.jobs() (newest 1,000)": median_ms(client.jobs, 7),
        "client.jobs(limit=100)": median_ms(lambda: client.jobs(limit=100), 7),
        "client.jobs(before=...) (a page back)": median_ms(lambda: client.jobs(before=page.before), 7),
        "AsyncClient.jobs() (newest 1,000)": asyncio.run(async_listing()),
        f"client.jobs(limit={n:,}) (the whole table, baseline)": median_ms(lambda: client.jobs(limit=n + 10), 3),
        "llmos jobs (newest 100)": median_ms(lambda: run_cli("jobs"), 3),
        "llmos jobs --json": median_ms(lambda: run_cli("jobs", "--json"), 3),
        "llmos status (command-line baseline)": median_ms(lambda: run_cli("status"), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000, help="how many jobs in the table (default 10,000)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave docs/benchmarks.md alone")
    args = ap.parse_args()
    n = args.jobs
    with Kernel() as kernel:
        client = kernel.client
        assert client is not None
        cores = sum(d["capacity"] for d in client.devices() if d["kind"] == "cpu")
        blocker = client.submit("diag.sleep", {"seconds": 3600}, resources={"cpus": cores})
        with ThreadPoolExecutor(8) as pool:  # one client shared by a thread pool, as users do
            jobs = timed(f"submitting {n:,} jobs", lambda: list(pool.map(lambda i: client.submit("diag.echo", {"message": str(i)}, resources={"cpus": 1}), range(n))))
            pending = timed("listing them pending", lambda: measure(kernel, n))
            timed("cancelling them", lambda: list(pool.map(lambda j: j.cancel(), jobs)))
        assert all(j.info().state == "cancelled" for j in jobs[:: max(1, n // 50)])
        ended = timed("listing them ended", lambda: measure(kernel, n))
        blocker.cancel()
    rows = []
    start = "llmos status (command-line baseline)"
    for what in pending:
        if "baseline" in what:
            rows.append((what, f"{pending[what]:.1f} ms", f"{ended[what]:.1f} ms", "-"))
        elif what.startswith("llmos "):  # a command: the listing is what it costs above starting one
            above = [max(0.0, table[what] - table[start]) for table in (pending, ended)]
            rows.append((what, f"{pending[what]:.1f} ms (+{above[0]:.1f})", f"{ended[what]:.1f} ms (+{above[1]:.1f})", verdict(max(above) < TARGET_MS)))
        else:
            rows.append((what, f"{pending[what]:.1f} ms", f"{ended[what]:.1f} ms", verdict(max(pending[what], ended[what]) < TARGET_MS)))
    intro = (
        f"{n:,} jobs in the table, on {cpu_model()}: median of 7 calls (3 for the command line), while the jobs wait "
        "pending in the kernel's memory and after they are cancelled (rows in SQLite). Target: under 100 ms. "
        "`llmos status` is how long any `llmos` command takes to start a Python process, import llmos and ask one "
        "thing; for a command, (+N) is what the listing costs above that, and the verdict is on it."
    )
    write_table(TITLE, intro, ("listing", "10,000 pending", "10,000 ended", "under 100 ms"), rows, write=not args.no_write)
    if any(r[3] == "**FAIL**" for r in rows):
        say("a listing missed its target")


if __name__ == "__main__":
    sys.exit(main())
