"""llmos on a Ray cluster (``llmos boot --ray ADDRESS``): a loopback cluster of a head and two
one-CPU nodes (fake GPUs on one, as Ray resources), the real kernel, real workers started by Ray.

Everything talks over 127.0.0.1: the nodes get ``node_ip_address="127.0.0.1"`` and the drivers
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (else Ray resolves 127.0.0.1 to the interface address).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_NODE_IP_ADDRESS", "127.0.0.1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from tests.conftest import KernelHandle  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

LOOPBACK = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 << 20}
# Ray declares a silent node dead after these health checks (defaults: 5 misses of 3 s checks).
HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 4}


def short(node_id: str) -> str:
    return node_id[:12]


def _wait(what: str, ok: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = ok()
        if value:
            return value
        assert time.monotonic() < deadline, f"still waiting for {what} after {timeout}s"
        time.sleep(0.1)


class RayCluster:
    def __init__(self) -> None:
        self.cluster = cluster_utils.Cluster(
            initialize_head=True, head_node_args={**LOOPBACK, "num_cpus": 0, "include_dashboard": False, "_system_config": HEALTH},
        )
        self.gpu_node = self.cluster.add_node(num_cpus=1, resources={"llmos_fake_gpus": 2, "llmos_fake_gpu_gib": 16}, **LOOPBACK)
        self.cpu_node = self.cluster.add_node(num_cpus=1, **LOOPBACK)
        self.head = short(self.cluster.head_node.node_id)

    @property
    def address(self) -> str:
        return self.cluster.address


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    c = RayCluster()
    try:
        yield c
    finally:
        c.cluster.shutdown()


@pytest.fixture(scope="module")
def kernel(cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelHandle]:
    k = KernelHandle(tmp_path_factory.mktemp("ray") / "state", "--ray", cluster.address).boot()
    try:
        with k.client() as c:
            _wait("the cluster's three nodes", lambda: len({d.get("node") for d in c.devices()}) == 3 and not c.status()["stats"]["gpus_probing"])
        yield k
    finally:
        k.shutdown()


def _job(k: KernelHandle, job_id: int) -> dict[str, Any]:
    return k.cli_json("job", str(job_id))


def test_devices_are_grouped_by_node_and_jobs_land_where_llmos_placed_them(cluster: RayCluster, kernel: KernelHandle) -> None:
    gpu_node, cpu_node = short(cluster.gpu_node.node_id), short(cluster.cpu_node.node_id)
    with kernel.client() as c:
        devices = c.devices()
        by_node: dict[str, list[dict[str, Any]]] = {}
        for d in devices:
            by_node.setdefault(d["node"], []).append(d)
        assert sorted(by_node) == sorted([cluster.head, gpu_node, cpu_node])
        assert [d["memory_total"] for d in by_node[gpu_node] if d["kind"] == "gpu"] == [16 << 30, 16 << 30]
        assert all(d["fake"] for d in by_node[gpu_node] if d["kind"] == "gpu")
        assert next(d for d in by_node[cpu_node] if d["kind"] == "cpu")["capacity"] == 1.0
        assert next(d for d in by_node[cluster.head] if d["kind"] == "cpu")["capacity"] == 0.0

        # A GPU job can only go to the node with the (fake) GPUs; it runs there, as Ray says.
        gpu_job = c.submit("diag.devices", resources={"gpus": 1, "gpu_memory": "8GiB", "cpus": 1})
        info = gpu_job.wait(timeout=120)
        assert info.state == "succeeded", info.reason
        result = gpu_job.result()
        assert info.placement["node"] == gpu_node == result["node"]
        assert result["placement"]["gpus"][0]["id"] == f"{gpu_node}:gpu0" and result["cuda_visible_devices"] == ""

        # Two one-core jobs at once: one on each node with a core, each where it was placed.
        jobs = [c.submit("diag.devices", resources={"cpus": 1}) for _ in range(2)]
        results = [(j.wait(timeout=120), j) for j in jobs]
        assert all(i.state == "succeeded" for i, _ in results), [i.reason for i, _ in results]
        placed = sorted(i.placement["node"] for i, _ in results)
        assert placed == sorted([gpu_node, cpu_node])
        assert all(i.placement["node"] == j.result()["node"] for i, j in results)
        assert all(j.result()["omp_num_threads"] == "1" for _, j in results)

        # A request no node can ever hold is refused at submit, naming the nodes.
        with pytest.raises(Exception, match="no node of the cluster"):
            c.submit("diag.echo", resources={"cpus": 2})

        # Accounting: the remote try's CPU time and memory, measured on its node.
        acct = {row["id"]: row for row in c.acct()}
        assert acct[gpu_job.id]["max_rss"] > 10 << 20 and acct[gpu_job.id]["cpu_seconds"] > 0

    table = kernel.cli("devices").stdout
    assert table.splitlines()[0].split()[:2] == ["NODE", "DEVICE"] and f"{gpu_node}" in table and "gpu1" in table
    status = kernel.cli("status").stdout
    assert f"cluster    ray {cluster.address}: connected, 3 node(s)" in status


def test_cancel_and_timeout_reach_a_remote_worker(kernel: KernelHandle) -> None:
    with kernel.client() as c:
        job = c.submit("diag.sleep", {"seconds": 120}, resources={"cpus": 1})
        _wait("the sleeper to run", lambda: job.info().state == "running" and (Path(kernel.state_dir) / "jobs" / str(job.id)).exists(), 120)
        time.sleep(0.5)
        started = time.monotonic()
        info = job.cancel()
        info = job.wait(timeout=60)
        assert info.state == "cancelled" and time.monotonic() - started < 15
        timed = c.submit("diag.sleep", {"seconds": 120}, resources={"cpus": 1}, timeout=2)
        info = timed.wait(timeout=120)
        assert info.state == "failed" and "timeout after 2s" in info.reason


def test_a_removed_node_fails_its_job_with_the_reason_and_it_retries_on_another(cluster: RayCluster, kernel: KernelHandle) -> None:
    # Only a node with this much memory (as Ray counts it) can hold the job.
    big = {"num_cpus": 1, "memory": 64 << 30, **LOOPBACK}
    extra = cluster.cluster.add_node(**big)
    extra_id = short(extra.node_id)
    with kernel.client() as c:
        _wait("the new node", lambda: any(d.get("node") == extra_id for d in c.devices()))
        job = c.submit("diag.sleep", {"seconds": 300}, resources={"cpus": 1, "memory": "48GiB"}, max_retries=1)
        _wait("the job to run", lambda: job.info().state == "running", 120)
        assert job.info().placement["node"] == extra_id
        _wait("its worker to be up", lambda: (Path(kernel.state_dir) / "jobs" / str(job.id)).exists(), 60)
        time.sleep(0.5)
        removed = time.monotonic()
        cluster.cluster.remove_node(extra, allow_graceful=False)  # as a crashed machine: no goodbye
        requeued = _wait("the job to be requeued", lambda: (lambda i: i if i.state == "pending" else None)(job.info()), 60)
        detected = time.monotonic() - removed
        assert requeued.reason.startswith(f"retrying after: node {extra_id} lost; "), requeued.reason  # then why it waits
        assert detected < 30
        assert not any(d.get("node") == extra_id for d in c.devices())
        # It waits for a node that can hold it; one joins, and the retry runs there.
        other = cluster.cluster.add_node(**big)
        _wait("the retry to run", lambda: job.info().state == "running" and job.info().attempts == 2, 120)
        assert job.info().placement["node"] == short(other.node_id)
        events = list(c.events("kernel.node", follow=False))
        assert any(e.body["node"] == extra_id and e.body["state"] == "lost" for e in events)
        job.cancel()
        assert job.wait(timeout=60).state == "cancelled"
    cluster.cluster.remove_node(other)


def test_the_kernel_survives_its_ray_link_dying_and_places_again(kernel: KernelHandle) -> None:
    with kernel.client() as c:
        agent = int(next(line for line in (Path(kernel.state_dir) / "kernel.log").read_text().splitlines()[::-1] if '"ray_agent_started"' in line)
                    .split('"pid": ')[1].split(",")[0])
        os.kill(agent, signal.SIGKILL)
        _wait("the kernel to report the cluster unavailable", lambda: c.status()["cluster"]["state"] == "unavailable", 30)
        job = c.submit("diag.echo", {"message": "after"}, resources={"cpus": 1})
        assert job.info().state == "pending"  # kept, waiting for the cluster
        info = job.wait(timeout=120)
        assert info.state == "succeeded" and c.status()["cluster"]["state"] == "connected"
        kinds = [e.body["state"] for e in c.events("kernel.cluster", follow=False)]
        assert "unavailable" in kinds and kinds[-1] == "connected"


def test_serve_replicas_on_two_nodes_behind_one_name(kernel: KernelHandle, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from llmos.plugins.lm.checkpoint import save_checkpoint
    from llmos.plugins.lm.config import config_from_preset
    from llmos.plugins.lm.model import Llama
    from llmos.plugins.lm.text import bytes_tokenizer

    tok = bytes_tokenizer()
    model = Llama(config_from_preset("nano", tok.vocab_size))
    model.init_weights(seed=3)
    path = tmp_path / "nano"
    save_checkpoint(path, model, tok.to_json(), {})
    out = kernel.cli("serve", str(path), "--replicas", "2", "--name", "m", "--json", timeout=300)
    service = json.loads(out.stdout)
    with kernel.client() as c:
        jobs = {r["job_id"] for r in service["replicas"]}
        nodes = {c.job(j).info().placement["node"] for j in jobs}
        assert len(jobs) == 2 and len(nodes) == 2
        texts = {c.generate("m", "hello", max_new_tokens=4, temperature=0).text for _ in range(4)}
        assert len(texts) == 1
        for j in jobs:
            c.job(j).cancel()
        for j in jobs:
            c.job(j).wait(timeout=60)


def test_a_gang_across_two_nodes_trains_with_ddp_to_the_losses_of_one_rank(cluster: RayCluster, kernel: KernelHandle, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from tests.conftest import write_word_corpus

    (tmp_path / "corpus").mkdir()
    corpus = write_word_corpus(tmp_path / "corpus", 40)
    base = {"preset": "nano", "tokenizer": "bytes", "seq_len": 32, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "eval_batches": 4, "log_every": 5,
            "data": str(corpus), "steps": 6, "eval_every": 0, "threads": 1}
    with kernel.client() as c:
        # Two ranks of one core each: no node has two free cores, so the gang is spread.
        two = c.submit("train", params={**base, "world_size": 2, "output": str(tmp_path / "two")}, resources={"cpus": 2})
        info = two.wait(timeout=280)
        assert info.state == "succeeded", info.reason
        plan = info.placement["distributed"]
        assert {r["node"] for r in plan["ranks"]} == {short(cluster.gpu_node.node_id), short(cluster.cpu_node.node_id)}
        assert plan["master_addr"] == "127.0.0.1" and info.placement["node"] == plan["ranks"][0]["node"]
        logs = [e.body for e in two.logs(follow=False) if e.body["event"] == "distributed"]
        assert logs and logs[0]["fields"]["world_size"] == 2 and logs[0]["fields"]["backend"] == "gloo"
        one = c.submit("train", params={**base, "output": str(tmp_path / "one")}, resources={"cpus": 1})
        assert one.wait(timeout=280).state == "succeeded"

        def losses(job: Any) -> dict[int, float]:
            return {e.body["step"]: e.body["value"] for e in job.events(follow=False) if e.type == "job.metric" and e.body["name"] == "train_loss"}

        a, b = losses(one), losses(two)
        assert sorted(a) == sorted(b) == list(range(1, 7))
        assert max(abs(a[s] - b[s]) for s in a) < 1e-4
        assert (tmp_path / "two" / "model.safetensors").exists()


def test_a_gang_loses_all_its_ranks_together_when_one_node_dies(cluster: RayCluster, kernel: KernelHandle, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from tests.conftest import write_word_corpus

    (tmp_path / "corpus").mkdir()
    corpus = write_word_corpus(tmp_path / "corpus", 20)
    big = {"num_cpus": 1, "memory": 64 << 30, **LOOPBACK}
    nodes = [cluster.cluster.add_node(**big) for _ in range(2)]
    ids = {short(n.node_id): n for n in nodes}
    params = {"preset": "nano", "tokenizer": "bytes", "seq_len": 32, "batch_size": 8, "data": str(corpus), "steps": 100_000, "eval_every": 0,
              "threads": 1, "world_size": 2, "output": str(tmp_path / "gang")}
    with kernel.client() as c:
        _wait("the new nodes", lambda: set(ids) <= {d.get("node") for d in c.devices()})
        # 48 GiB a rank: only the two new nodes hold one each.
        job = c.submit("train", params=params, resources={"cpus": 2, "memory": "96GiB"}, max_retries=1)
        _wait("both ranks to train", lambda: any(e.body.get("event") == "distributed" for e in job.logs(follow=False)), 180)
        plan = job.info().placement["distributed"]
        assert {r["node"] for r in plan["ranks"]} == set(ids)
        rank1 = plan["ranks"][1]["node"]
        # Ray holds the gang as one placement group, a bundle per rank on each rank's node.
        groups = [g for g in cluster.cluster.global_state.placement_group_table().values()
                  if g["name"].startswith("llmos-") and g["state"] == "CREATED" and len(g["bundles"]) == 2]
        assert len(groups) == 1, groups
        assert {short(n) for n in groups[0]["bundles_to_node_id"].values()} == set(ids)
        cluster.cluster.remove_node(ids[rank1], allow_graceful=False)
        requeued = _wait("the gang to be requeued", lambda: (lambda i: i if i.state == "pending" else None)(job.info()), 90)
        assert requeued.reason.startswith(f"retrying after: node {rank1} lost"), requeued.reason
        assert requeued.attempts == 1
        job.cancel()
        assert job.wait(timeout=60).state == "cancelled"
    cluster.cluster.remove_node(ids[plan["ranks"][0]["node"]])
