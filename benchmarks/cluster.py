"""llmos on a Ray cluster against one machine, measured on a loopback cluster here.

A Ray cluster of a head (no CPUs) and two nodes of one CPU each, all on 127.0.0.1, and two kernels
booted side by side: the local backend (workers forked from the zygote) and ``llmos boot --ray``
(each job's worker started by Ray on the node llmos placed it on: a placement group, an actor,
the worker reaching the bus over CurveZMQ TCP). Measured:

1. placement and launch: a one-core ``diag.echo`` submitted and waited for, one after another:
   submit to running (placement) and submit to succeeded (placement, launch, run, end);
2. events/s from a worker: ``diag.emit`` of 20,000 log records, from its first event to the job's
   end as the kernel records it, over ipc (local) and over CurveZMQ TCP (a worker on a Ray node).

Run: ``python benchmarks/cluster.py [--quick] [--no-write]`` (needs ``pip install 'llmos[ray]'``);
the table goes to stdout and into ``docs/benchmarks.md`` under "## Cluster (Ray, loopback)".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_NODE_IP_ADDRESS", "127.0.0.1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # else Ray turns 127.0.0.1 into the interface address

from _benchkernel import Kernel
from _report import cpu_model, pct, say, write_table

import llmos

TITLE = "## Cluster (Ray, loopback)"
LOOPBACK = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 << 20}


def wait_nodes(client: llmos.Client, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len({d.get("node") for d in client.devices()}) < n or client.status()["stats"]["gpus_probing"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the kernel did not see {n} nodes within {timeout}s")
        time.sleep(0.1)


def launches(client: llmos.Client, n: int) -> tuple[list[float], list[float]]:
    to_running, to_end = [], []
    for i in range(n):
        t0 = time.time()
        job = client.submit("diag.echo", {"message": f"launch {i}"}, resources={"cpus": 1})
        info = job.wait(timeout=120)
        if info.state != "succeeded":
            raise RuntimeError(f"job {job.id} {info.state}: {info.reason}")
        running = next(e.ts for e in job.events(follow=False) if e.type == "job.state" and e.body["state"] == "running")
        to_running.append(running - t0)
        to_end.append(time.time() - t0)
    return to_running, to_end


def events_rate(client: llmos.Client, count: int) -> float:
    job = client.submit("diag.emit", {"count": count, "only": "log"}, resources={"cpus": 1})
    info = job.wait(timeout=300)
    if info.state != "succeeded":
        raise RuntimeError(f"diag.emit {info.state}: {info.reason}")
    first = next(e.ts for e in job.events(follow=False) if e.type == "job.log")
    assert info.ended_at is not None
    return count / (info.ended_at - first)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args(argv)
    n, rounds, count = (5, 1, 10_000) if args.quick else (15, 3, 20_000)
    from ray.cluster_utils import Cluster

    say("- starting a loopback Ray cluster (a head, two nodes of one CPU)")
    cluster = Cluster(initialize_head=True, head_node_args={**LOOPBACK, "num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, **LOOPBACK)
    rows = []
    try:
        with Kernel("llmos-bench-local-") as local, Kernel("llmos-bench-ray-", ("--ray", cluster.address)) as onray:
            assert local.client is not None and onray.client is not None
            wait_nodes(onray.client, 3)
            results = {}
            for name, k in (("local", local), ("ray", onray)):
                launches(k.client, 1)  # warm
                run, end = launches(k.client, n)
                rates = [events_rate(k.client, count) for _ in range(rounds)]
                results[name] = (run, end, rates)
                say(f"  {name}: running after {statistics.median(run) * 1e3:.0f} ms, done after {statistics.median(end) * 1e3:.0f} ms, "
                    f"{statistics.median(rates):,.0f} events/s")
            (lr, le, lrate), (rr, re_, rrate) = results["local"], results["ray"]
            rows.append((f"submit to running (placement), median of {n}", f"{statistics.median(rr) * 1e3:.1f} ms", f"{statistics.median(lr) * 1e3:.1f} ms",
                         f"p90 {pct(rr, 0.9) * 1e3:.1f} / {pct(lr, 0.9) * 1e3:.1f} ms"))
            rows.append((f"submit to succeeded (placement, worker start, run, end), median of {n}", f"{statistics.median(re_) * 1e3:.0f} ms",
                         f"{statistics.median(le) * 1e3:.0f} ms", f"{statistics.median(re_) / statistics.median(le):.0f}x: a Ray actor and a fresh interpreter per job"))
            rows.append((f"events/s from one worker, {count:,} log records, median of {rounds}", f"{statistics.median(rrate):,.0f} (CurveZMQ TCP)",
                         f"{statistics.median(lrate):,.0f} (ipc)", f"{statistics.median(rrate) / statistics.median(lrate):.2f}x"))
    finally:
        cluster.shutdown()
    write_table(TITLE, f"`python benchmarks/cluster.py` on {cpu_model()}, {time.strftime('%Y-%m-%d')}: a loopback Ray cluster (a head and two "
                "one-CPU nodes) and two kernels side by side, `--ray` and the local backend.",
                ("what", "Ray backend", "local backend", "note"), rows, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
