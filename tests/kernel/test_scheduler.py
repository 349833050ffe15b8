"""The scheduler on its own: no kernel process, no sockets; a device table and job records."""

from __future__ import annotations

import itertools

from llmos.kernel.devices import DeviceTable
from llmos.kernel.scheduler import Policy, choose_victims, order, plan, rank_plan
from llmos.kernel.store import JobRecord
from llmos.plugin import Resources

GiB = 1024**3
NOW = 1_000_000.0
_ids = itertools.count(1)


def job(priority: int = 0, queued_ago: float = 0.0, state: str = "pending", **resources: float) -> JobRecord:
    res = Resources(**{"cpus": 1, **resources}).to_dict()
    return JobRecord(id=next(_ids), kind="k", params={}, resources=res, priority=priority, max_retries=0, timeout=None,
                     state=state, submitted_at=NOW - queued_ago, queued_at=NOW - queued_ago)


def running(table: DeviceTable, priority: int = 0, started_ago: float = 100.0, preemptible: bool = True, **resources: float) -> JobRecord:
    j = job(priority, state="running", **resources)
    j.placement = table.place(Resources(**j.resources))
    assert j.placement is not None, "the test's running job must fit"
    table.reserve(j.id, j.placement)
    j.preemptible, j.started_at, j.worker_id = preemptible, NOW - started_ago, f"w{j.id}"
    return j


POLICY = Policy(aging_seconds=0, starvation_seconds=1e9, preemption=True, preempt_min_runtime=0, enough_waiting=4)


def started(p) -> list[int]:
    return [j.id for j, _ in p.starts]


def test_priority_orders_and_ties_go_by_id() -> None:
    low, high, high2 = job(0), job(5), job(5)
    assert [j.id for j in order([low, high2, high], 0)] == [high.id, high2.id, low.id]
    table = DeviceTable(2, 8 * GiB)
    p = plan([low, high, high2], [], table, ready_workers=8, policy=POLICY, now=NOW)
    assert started(p) == [high.id, high2.id]  # two cores: the low one waits
    assert table.cpu.share_reserved == 0  # the table is left as it was


def test_aging_lets_an_old_job_overtake() -> None:
    old_low, new_high = job(0, queued_ago=1000), job(2, queued_ago=0)
    aging = Policy(aging_seconds=100, starvation_seconds=1e9, enough_waiting=4)
    assert [j.id for j in order([new_high, old_low], 100)] == [old_low.id, new_high.id]  # 0 + 10 > 2
    p = plan([new_high, old_low], [], DeviceTable(1, 8 * GiB), 4, aging, NOW)
    assert started(p) == [old_low.id]
    assert started(plan([new_high, old_low], [], DeviceTable(1, 8 * GiB), 4, POLICY, NOW)) == [new_high.id]


def test_fit_skips_what_does_not_fit_and_backfills() -> None:
    table = DeviceTable(4, 8 * GiB)
    big, small1, small2 = job(5, cpus=8), job(1, cpus=1), job(0, cpus=1, memory=16 * GiB)
    p = plan([big, small1, small2], [], table, 4, POLICY, NOW)
    assert started(p) == [small1.id]  # big never fits 4 cores, small2's memory neither
    assert p.preemptions == [] and p.waiting_for_worker == 0


def test_no_ready_worker_counts_waiting_and_stops_early() -> None:
    table = DeviceTable(64, 64 * GiB)
    jobs = [job(0) for _ in range(10)]
    p = plan(jobs, [], table, ready_workers=1, policy=POLICY, now=NOW)
    assert len(p.starts) == 1 and p.waiting_for_worker == POLICY.enough_waiting  # then the pass stops


def test_starvation_stops_jumping_ahead() -> None:
    table = DeviceTable(2, 8 * GiB)
    head = job(5, queued_ago=500, cpus=4)  # cannot fit, waited past the limit
    behind = job(0, cpus=1)
    strict = Policy(aging_seconds=0, starvation_seconds=100, enough_waiting=4)
    assert started(plan([head, behind], [], table, 4, strict, NOW)) == []
    assert started(plan([head, behind], [], table, 4, POLICY, NOW)) == [behind.id]


def test_fragmentation_whole_gpus_need_free_gpus_and_best_fit_keeps_big_ones() -> None:
    table = DeviceTable(16, 64 * GiB, [24 * GiB, 80 * GiB])
    half = job(0, gpus=0.5, gpu_memory=12 * GiB)
    whole = job(0, gpus=1, gpu_memory=60 * GiB)
    p = plan([half, whole], [], table, 4, POLICY, NOW)
    placed = {j.id: pl for j, pl in p.starts}
    assert placed[half.id]["gpus"][0]["id"] == "gpu0"  # best fit by bytes: the 80 GiB one stays whole
    assert placed[whole.id]["gpus"][0]["id"] == "gpu1"
    # Best fit packs two halves on one GPU, so a whole one stays free for a 1-GPU job...
    table2 = DeviceTable(16, 64 * GiB, [24 * GiB, 24 * GiB])
    a, b = running(table2, gpus=0.5, gpu_memory=1 * GiB), running(table2, gpus=0.5, gpu_memory=1 * GiB)
    assert a.placement["gpus"][0]["id"] == b.placement["gpus"][0]["id"]
    p = plan([job(0, gpus=1)], [], table2, 4, POLICY, NOW)
    assert [pl["gpus"][0]["id"] for _, pl in p.starts] == ["gpu1" if a.placement["gpus"][0]["id"] == "gpu0" else "gpu0"]
    # ...while a share held on each GPU leaves none whole: the 1-GPU job waits though half of each is free.
    table3 = DeviceTable(16, 64 * GiB, [24 * GiB, 24 * GiB])
    for i, gpu in enumerate(("gpu0", "gpu1")):
        table3.reserve(900 + i, {"cpu": {"cores": 0, "memory": 0}, "gpus": [{"id": gpu, "share": 0.5, "memory": GiB}]})
    assert started(plan([job(0, gpus=1)], [], table3, 4, POLICY, NOW)) == []


def test_alike_jobs_cost_one_placement() -> None:
    table = DeviceTable(1, 8 * GiB)
    calls = 0
    place = table.place

    def counting(res: Resources):
        nonlocal calls
        calls += 1
        return place(res)

    table.place = counting  # type: ignore[method-assign]
    jobs = [job(0, cpus=2) for _ in range(50)]
    assert started(plan(jobs, [], table, 4, POLICY, NOW)) == [] and calls == 1


def test_preemption_chooses_the_lowest_then_the_newest_and_the_fewest() -> None:
    table = DeviceTable(3, 8 * GiB)
    a = running(table, priority=1, started_ago=500)
    b = running(table, priority=0, started_ago=500)
    c = running(table, priority=0, started_ago=10)  # lowest priority, newest: least work lost
    urgent = job(10, cpus=1)
    p = plan([urgent], [a, b, c], table, 4, POLICY, NOW)
    assert p.starts == [] and [(v.id, f.id) for v, f in p.preemptions] == [(c.id, urgent.id)]
    two = job(10, cpus=2)
    p = plan([two], [a, b, c], table, 4, POLICY, NOW)
    assert sorted(v.id for v, _ in p.preemptions) == sorted([b.id, c.id])
    assert table.cpu.share_reserved == 3  # the what-if gave everything back


def test_preemption_respects_priority_min_runtime_flags_and_ongoing_stops() -> None:
    table = DeviceTable(2, 8 * GiB)
    same = running(table, priority=5, started_ago=1)
    fresh = running(table, priority=0, started_ago=1)
    urgent = job(0, cpus=1)
    assert plan([urgent], [same, fresh], table, 4, POLICY, NOW).preemptions == []  # equal or higher priority: no reason
    assert [v.id for v, _ in plan([job(1)], [same, fresh], table, 4, POLICY, NOW).preemptions] == [fresh.id]
    patient = Policy(aging_seconds=0, starvation_seconds=1e9, preempt_min_runtime=60, enough_waiting=4)
    assert plan([job(9)], [same, fresh], table, 4, patient, NOW).preemptions == []  # too new to stop
    never = Policy(aging_seconds=0, starvation_seconds=1e9, preemption=False, enough_waiting=4)
    assert plan([job(9)], [same, fresh], table, 4, never, NOW).preemptions == []
    other = job(9)
    assert plan([other], [same, fresh], table, 4, POLICY, NOW, preempting={fresh.id: other.id}).preemptions == []
    big = job(9, cpus=4)  # even every victim would not make room
    assert choose_victims(big, Resources(**big.resources), [same, fresh], table, POLICY, NOW) == []
    fixed = running(DeviceTable(1, 8 * GiB), preemptible=False)
    assert choose_victims(job(9), Resources(cpus=1), [fixed], table, POLICY, NOW) == []


def test_gangs_place_all_ranks_at_once_and_split_them() -> None:
    table = DeviceTable(8, 64 * GiB, [24 * GiB] * 4)
    gang = job(0, cpus=4, gpus=4)
    p = plan([gang], [], table, 4, POLICY, NOW)
    (_, placement), = p.starts
    ranks = rank_plan(placement, 2, 29500)
    assert ranks["world_size"] == 2 and ranks["master_port"] == 29500 and ranks["master_addr"] == "127.0.0.1"
    assert [r["gpus"] for r in ranks["ranks"]] == [[0, 1], [2, 3]] and [r["cpus"] for r in ranks["ranks"]] == [2.0, 2.0]
    # Half the GPUs taken: a gang of four whole GPUs waits (no partial start).
    running(table, gpus=2)
    assert plan([job(0, gpus=4)], [], table, 4, POLICY, NOW).starts == []
