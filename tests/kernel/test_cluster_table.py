"""The cluster's device table (no Ray needed): nodes joining and leaving, best fit across nodes
through its index, suspect nodes, and the scheduler running on it unchanged."""

from __future__ import annotations

import pytest

from llmos.errors import ResourceError
from llmos.kernel import scheduler
from llmos.kernel.cluster import ClusterTable, ray_host
from llmos.kernel.store import JobRecord
from llmos.plugin import Resources

GiB = 1 << 30


def node(nid: str, cpus: float = 8, memory: int = 64 * GiB, gpus: int = 0, gib: int = 24) -> dict:
    return {"id": nid, "ray_id": nid * 4, "alive": True, "cpus": cpus, "memory": memory, "fake_gpus": [gib * GiB] * gpus}


def table(*nodes: dict) -> ClusterTable:
    t = ClusterTable()
    t.update(list(nodes))
    for n in t.nodes.values():
        n.probing = False
    return t


def job(i: int, **res: object) -> JobRecord:
    return JobRecord(id=i, kind="x", params={}, resources=Resources(**res).to_dict(), priority=0, max_retries=0, timeout=None, state="pending",
                     submitted_at=i, queued_at=i, preemptible=False)


def test_nodes_join_and_leave_and_devices_name_their_node() -> None:
    t = ClusterTable()
    assert t.probing and t.never_fits(Resources(cpus=1000)) is None  # no node yet: wait, do not refuse
    joined, left = t.update([node("a", gpus=2), node("b")])
    assert (joined, left) == (["a", "b"], [])
    ids = [d["id"] for d in t.to_list()]
    assert ids == ["a:cpu", "a:gpu0", "a:gpu1", "b:cpu"] and {d["node"] for d in t.to_list()} == {"a", "b"}
    assert t.probing  # until each node's probe answers
    t.probed("a", [], "none")
    t.probed("b", [], "none")
    assert not t.probing
    joined, left = t.update([node("b"), {**node("c"), "alive": False}])
    assert (joined, left) == ([], ["a"])
    assert [d["id"] for d in t.to_list()] == ["b:cpu"]


def test_best_fit_by_bytes_across_nodes_and_release_through_the_index() -> None:
    t = table(node("big", gpus=2, gib=80), node("small", gpus=2, gib=24), node("cpu", cpus=4, memory=16 * GiB))
    p = t.place(Resources(gpus=1, gpu_memory=20 * GiB))
    assert p is not None and p["node"] == "small"  # 4 GiB left over, not 60
    t.reserve(1, p)
    p2 = t.place(Resources(gpus=2))
    assert p2 is not None and p2["node"] == "big"  # the only node with two whole GPUs free
    t.reserve(2, p2)
    assert t.place(Resources(gpus=2)) is None
    # CPU only: the node left with the least (4 cores, 16 GiB) before the big ones.
    p3 = t.place(Resources(cpus=2, memory=8 * GiB))
    assert p3 is not None and p3["node"] == "cpu" and p3["gpus"] == []
    t.release(2)
    assert t.place(Resources(gpus=2))["node"] == "big"  # type: ignore[index]
    # A GPU share goes beside another share when one fits there.
    share = t.place(Resources(gpus=0.5, gpu_memory=10 * GiB))
    assert share is not None
    t.reserve(3, share)
    again = t.place(Resources(gpus=0.25, gpu_memory=4 * GiB))
    assert again is not None and again["gpus"][0]["id"] == share["gpus"][0]["id"]
    with pytest.raises(ResourceError, match="no node of the cluster"):
        t.check(Resources(gpus=4))


def test_a_suspect_node_gets_nothing_until_trusted() -> None:
    t = table(node("a", cpus=1), node("b", cpus=1))
    t.suspect.add("a")
    assert t.place(Resources(cpus=1))["node"] == "b"  # type: ignore[index]
    t.reserve(1, t.place(Resources(cpus=1)))  # type: ignore[arg-type]
    assert t.place(Resources(cpus=1)) is None
    t.suspect.discard("a")
    assert t.place(Resources(cpus=1))["node"] == "a"  # type: ignore[index]


def test_the_scheduler_plans_on_a_cluster_and_leaves_the_table_as_it_was() -> None:
    t = table(*(node(f"n{i}", cpus=4, gpus=2) for i in range(3)))
    pending = [job(i + 1, cpus=2, gpus=1) for i in range(10)]
    plan = scheduler.plan(pending, [], t, 100, scheduler.Policy(preemption=False), 0.0)
    assert len(plan.starts) == 6  # two GPUs and four cores a node
    assert sorted(p["node"] for _, p in plan.starts) == ["n0", "n0", "n1", "n1", "n2", "n2"]
    assert all(d["share_reserved"] == 0 for d in t.to_list())  # what the pass placed it gave back


def test_ray_host_is_where_the_cluster_reaches_us() -> None:
    assert ray_host("10.1.2.3:6379") == "10.1.2.3"
    assert ray_host("127.0.0.1:40000") == "127.0.0.1"
