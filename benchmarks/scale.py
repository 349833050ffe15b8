"""The head at 1,000 nodes and 8,000 GPUs, by simulation (docs/scale.md reads these figures).

Measures, with the kernel's own components and no cluster:

1. the scheduler's pass (:func:`llmos.kernel.scheduler.plan`, alone) over 10,000 pending jobs of
   mixed shapes on a :class:`~llmos.kernel.cluster.ClusterTable` of 1,000 nodes with 8 GPUs each:
   at the kernel's launch limit (4 starts a pass), with the cluster full (nothing fits), and with
   no limit (every job that fits placed in one pass); target under 50 ms for the first two;
2. the journal's events/s into SQLite (``Journal.extend`` + commit, as ingest writes) as the jobs
   sending events at once grow from 1 to 4,096 (one row per stream per turn);
3. the head's memory per pending job (a JobRecord in the job table) and per node (its devices in
   the cluster table), with tracemalloc.

Run: ``python benchmarks/scale.py [--quick] [--no-write]``; the table goes to stdout and into
``docs/benchmarks.md`` under "## Scale (simulated)".
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

from _report import cpu_model, say, verdict, write_table

from llmos.kernel import scheduler
from llmos.kernel.cluster import ClusterTable
from llmos.kernel.journal import Journal
from llmos.kernel.store import JobRecord, Store
from llmos.plugin import Resources
from llmos.protocol import JobLog, encode_body, make_header, pack_item

GiB = 1 << 30
TITLE = "## Scale (simulated)"
SHAPES = [  # (weight, resources): single-GPU work, pairs, whole-node gangs, GPU shares, CPU jobs
    (4, {"cpus": 4, "memory": 32 * GiB, "gpus": 1, "gpu_memory": 40 * GiB}),
    (2, {"cpus": 8, "memory": 64 * GiB, "gpus": 2}),
    (1, {"cpus": 32, "memory": 256 * GiB, "gpus": 8}),
    (2, {"cpus": 2, "memory": 8 * GiB, "gpus": 0.5, "gpu_memory": 20 * GiB}),
    (1, {"cpus": 1, "memory": 2 * GiB}),
]


def cluster(nodes: int, gpus: int) -> ClusterTable:
    table = ClusterTable()
    table.update([{"id": f"n{i:05d}", "ray_id": f"n{i:05d}", "alive": True, "cpus": 96, "memory": 1024 * GiB, "fake_gpus": [80 * GiB] * gpus}
                  for i in range(nodes)])
    for t in table.nodes.values():
        t.probing = False
    return table


NOW = 1_000_000.0  # the simulated clock: jobs were queued within the last 10 minutes (none starves)


def pending_jobs(n: int, seed: int = 1) -> list[JobRecord]:
    rng = random.Random(seed)
    shapes = [s for w, s in SHAPES for _ in range(w)]
    out = []
    for i in range(n):
        queued = NOW - 600.0 + 600.0 * i / n
        out.append(JobRecord(id=i + 1, kind="train", params={}, resources=Resources(**rng.choice(shapes)).to_dict(), priority=rng.randint(0, 3),
                             max_retries=0, timeout=None, state="pending", submitted_at=queued, queued_at=queued, preemptible=False))
    return out


def fill(table: ClusterTable) -> None:
    """Reserve every GPU and core (as running jobs would)."""
    for i, (nid, t) in enumerate(table.nodes.items()):
        table.reserve(10**9 + i, {"node": nid, "cpu": {"cores": t.cpu.capacity, "memory": t.cpu.memory_total},
                                  "gpus": [{"id": g.id, "share": 1.0, "memory": g.memory_total} for g in t.gpus]})


def time_pass(pending: list[JobRecord], table: ClusterTable, slots: int, rounds: int) -> tuple[float, int]:
    policy = scheduler.Policy(preemption=False)
    times, starts = [], 0
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        plan = scheduler.plan(pending, [], table, slots, policy, NOW)
        times.append(time.perf_counter() - t0)
        starts = len(plan.starts)
    return statistics.median(times), starts


def journal_rate(streams: int, events: int, per_turn: int) -> float:
    """Events/s through the journal into SQLite with ``streams`` jobs sending at once."""
    with tempfile.TemporaryDirectory(prefix="llmos-scale-") as tmp:
        store = Store(Path(tmp) / "llmos.db")
        journal = Journal(store)
        raws = {s: pack_item(f"job.{s}.log", make_header("job.log", f"w{s}"), encode_body(JobLog(level="info", event="step", fields={"loss": 1.5})))
                for s in range(1, streams + 1)}
        t0 = time.perf_counter()
        done, s = 0, 1
        while done < events:
            # One turn: per_turn events, spread over the streams that send in it.
            share = max(1, per_turn // streams)
            sent = 0
            while sent < per_turn:
                journal.extend(f"job.{s}", [raws[s]] * share)
                sent += share
                s = s % streams + 1
            journal.end_turn()
            store.commit()
            done += sent
        rate = done / (time.perf_counter() - t0)
        store.close()
        return rate


def memory_per(make: object, n: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = make(n)  # type: ignore[operator]
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return (after - before) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else 7
    rows: list[tuple[str, str, str, str]] = []

    say("- scheduler passes over 10,000 pending jobs, 1,000 nodes x 8 GPUs")
    table = cluster(1000, 8)
    pending = pending_jobs(10_000)
    t, starts = time_pass(pending, table, 4, rounds)
    rows.append(("scheduler pass, 10,000 pending, 8,000 free GPUs, 4 starts a pass (the kernel's launch limit)", f"{t * 1e3:.1f} ms",
                 f"{starts} placed", f"target < 50 ms: {verdict(t < 0.05)}"))
    t, starts = time_pass(pending, table, 64, rounds)
    rows.append(("the same, 64 starts a pass", f"{t * 1e3:.1f} ms", f"{starts} placed", f"target < 50 ms: {verdict(t < 0.05)}"))
    t, starts = time_pass(pending, table, 100_000, max(1, rounds // 2))
    rows.append(("the same, no launch limit (everything that fits placed in one pass)", f"{t * 1e3:.1f} ms", f"{starts} placed",
                 f"{t / max(starts, 1) * 1e6:.0f} us a placement"))
    fill(table)
    t, starts = time_pass(pending, table, 4, rounds)
    rows.append(("scheduler pass, 10,000 pending, every GPU and core held (nothing fits)", f"{t * 1e3:.1f} ms", f"{starts} placed",
                 f"target < 50 ms: {verdict(t < 0.05)}"))

    say("- journal events/s as the jobs sending at once grow")
    events = 100_000 if args.quick else 300_000
    base = None
    for streams in (1, 16, 256, 4096):
        rate = journal_rate(streams, events, 1024)
        base = base or rate
        rows.append((f"journal into SQLite, {streams} job(s) sending at once, 1,024 events a turn", f"{rate:,.0f} events/s",
                     f"{rate / base:.2f}x of one job", "one row per stream per turn"))
        say(f"  {streams} streams: {rate:,.0f} events/s")

    say("- head memory")
    per_job = memory_per(lambda n: pending_jobs(n, seed=2), 20_000)
    per_node = memory_per(lambda n: cluster(n, 8), 1000)
    rows.append(("head memory per pending job (its JobRecord)", f"{per_job / 1024:.2f} KiB", f"10,000 jobs: {per_job * 10_000 / (1 << 20):.0f} MiB", ""))
    rows.append(("head memory per node of 8 GPUs (its device table and index)", f"{per_node / 1024:.2f} KiB",
                 f"1,000 nodes: {per_node * 1000 / (1 << 20):.1f} MiB", ""))

    write_table(TITLE, f"`python benchmarks/scale.py` on {cpu_model()}, {time.strftime('%Y-%m-%d')}. Simulated: the kernel's scheduler, "
                "cluster device table and journal, no cluster. docs/scale.md explains what the figures mean for 1,000 nodes.",
                ("what", "measured", "detail", "against"), rows, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
