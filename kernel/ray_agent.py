"""The kernel's link to a Ray cluster: ``python -m llmos.kernel.ray_agent --address ADDRESS``.

A child of the kernel that is the cluster's Ray driver, so the kernel itself never imports Ray
(and never holds Ray's core worker, which ends its process when the cluster's GCS stays away).
It speaks JSON lines: commands on stdin, reports on stdout.

Reports:

* ``{"ev": "connected", "address", "ray"}`` once ``ray.init`` works; ``{"ev": "unavailable",
  "error"}`` each time it does not (it keeps trying).
* ``{"ev": "nodes", "nodes": [{id, ray_id, address, alive, cpus, memory, gpus, fake_gpus}]}``
  whenever the set of nodes or their resources change (polled every ``--poll`` seconds).
* ``{"ev": "probed", "node", "gpus", "source"}``: the GPU probe's answer, run on that node.
* ``{"ev": "started", "worker", "pid"}`` and ``{"ev": "exited", "worker", "code", "reason", "usage"}``
  for each worker it launched; ``reason`` is set when the worker's host (its actor) died, with
  ``"node <id> lost"`` when its node left the cluster. A worker whose actor died on a node Ray
  still lists as alive is held (``--hold`` s) until Ray declares the node dead; meanwhile
  ``{"ev": "suspect", "node"}`` (and ``{"ev": "trusted", "node"}`` if it was not).

Commands: ``{"op": "launch", "worker", "node", "argv", "env", "log", "bundles", "group",
"bundle_index", "rank"}`` (for a job's worker: a placement group of ``bundles``, a bundle per rank
on its rank's node, and an actor in bundle 0; for a rank started later: an actor in bundle
``bundle_index`` of the worker's ``group``; without bundles, an actor pinned to ``node``; the actor
runs ``python argv...``; an llmos worker also gets ``--kernel-pid`` of its actor, a job's own rank
process, ``"rank": true``, does not), ``{"op": "signal", "worker", "sig"}``, ``{"op": "quit"}``.

Fake GPUs: a node started with the custom resources ``llmos_fake_gpus: N`` and (optionally)
``llmos_fake_gpu_gib: G`` shows N fake GPUs of G GiB (24 without it).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from typing import Any

NODE_ID_LEN = 12  # the short node id llmos shows ("node 1a2b3c4d5e6f lost")


def short(node_id: str) -> str:
    return node_id[:NODE_ID_LEN]


_REPORTS = 1  # the fd the kernel reads; main() moves it off stdout, where Ray prints its logs


def say(**report: Any) -> None:
    data = (json.dumps(report) + "\n").encode()
    while data:
        data = data[os.write(_REPORTS, data):]


def node_entries(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for n in nodes:
        res = n.get("Resources") or {}
        fake = int(res.get("llmos_fake_gpus", 0))
        gib = float(res.get("llmos_fake_gpu_gib", 24))
        out.append({
            "id": short(n["NodeID"]), "ray_id": n["NodeID"], "address": n.get("NodeManagerAddress", ""), "alive": bool(n.get("Alive")),
            "cpus": float(res.get("CPU", 0)), "memory": int(res.get("memory", 0)), "gpus": int(res.get("GPU", 0)),
            "fake_gpus": [int(gib * (1 << 30))] * fake,
        })
    return sorted(out, key=lambda e: e["id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmos.kernel.ray_agent", description="The llmos kernel's Ray driver (started by the kernel).")
    parser.add_argument("--address", default="auto")
    parser.add_argument("--namespace", default="llmos")
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--hold", type=float, default=30.0,
                        help="Seconds to wait for Ray to declare a node dead after a worker's actor on it died (then its workers end as 'node <id> lost').")
    args = parser.parse_args(argv)
    global _REPORTS
    _REPORTS = os.dup(1)  # reports only on this fd; whatever Ray prints goes to the agent's log
    os.dup2(2, 1)
    if _loopback(args.address):
        # A cluster on this machine's loopback: Ray would otherwise turn 127.0.0.1 into the
        # interface's address (and find no raylet there). Read by Ray at import.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import (
            NodeAffinitySchedulingStrategy,
            PlacementGroupSchedulingStrategy,
        )
    except ImportError as exc:
        say(ev="fatal", error=f"the Ray backend needs ray: pip install 'llmos[ray]' ({exc})")
        return 3

    @ray.remote(num_cpus=0, max_concurrency=4)
    class WorkerHost:
        """Runs one llmos worker process on its node and reports how it ended."""

        def __init__(self) -> None:
            import threading

            self.started = threading.Event()
            self.proc: subprocess.Popen[bytes] | None = None

        def start(self, argv: list[str], env: dict[str, str], log: str, watch_parent: bool) -> int:
            full_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            full_env.update(env)
            # Where this really is, as Ray says (a job can check it against its placement).
            full_env["LLMOS_NODE"] = short(ray.get_runtime_context().get_node_id())
            with open(log, "ab") as out:
                self.proc = subprocess.Popen(
                    # A worker watches its parent (this actor): it leaves when the actor is gone.
                    [sys.executable, *argv, *(["--kernel-pid", str(os.getpid())] if watch_parent else [])], env=full_env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    start_new_session=True, close_fds=True,
                )
            self.started.set()
            return self.proc.pid

        def wait(self) -> tuple[int, dict[str, float]]:
            """The worker's return code and what it used (this actor's only child: its usage)."""
            import resource

            self.started.wait()
            assert self.proc is not None
            code = self.proc.wait()
            ru = resource.getrusage(resource.RUSAGE_CHILDREN)
            return code, {"utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss": ru.ru_maxrss}

        def signal(self, sig: int) -> None:
            if self.proc is None:
                return
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    @ray.remote(num_cpus=0)
    def probe_gpus() -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "llmos.kernel.probe"], capture_output=True, timeout=120,
                             env=dict(os.environ, CUDA_DEVICE_ORDER="PCI_BUS_ID"))
        try:
            return json.loads(out.stdout or b"{}")
        except ValueError:
            return {"source": "none", "gpus": []}

    while True:
        unreachable = _unreachable(args.address)
        if unreachable:
            # ray.init waits without end for a GCS that is not there: say so, and try again.
            say(ev="unavailable", error=unreachable)
            if _stdin_closed(2.0):
                return 0
            continue
        try:
            ray.init(address=args.address, namespace=args.namespace, log_to_driver=False, logging_level="ERROR", include_dashboard=False)
            break
        except Exception as exc:
            say(ev="unavailable", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            if _stdin_closed(2.0):
                return 0
    say(ev="connected", address=args.address, ray=ray.__version__)

    hosts: dict[str, Any] = {}  # worker id -> actor
    waits: dict[Any, tuple[str, str]] = {}  # wait ref -> (worker id, node)
    starts: dict[Any, str] = {}  # start ref -> worker id
    groups: dict[str, Any] = {}  # worker id -> placement group
    probes: dict[Any, str] = {}  # probe ref -> node
    probed: set[str] = set()
    held: dict[str, tuple[str, float, str]] = {}  # worker id -> (node, deadline, why): its actor died, its node not (yet) declared dead
    suspects: set[str] = set()
    alive: set[str] = set()
    last_nodes: list[dict[str, Any]] | None = None
    next_poll = 0.0
    failures = 0

    def end(worker: str, code: int | None, reason: str | None, usage: dict[str, float] | None = None) -> None:
        hosts.pop(worker, None)
        group = groups.pop(worker, None)
        if group is not None:
            try:
                remove_placement_group(group)
            except Exception:
                pass
        say(ev="exited", worker=worker, code=code, reason=reason, usage=usage)

    buf = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        lines: list[bytes] = []
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:
                return 0  # the kernel is gone: Ray ends this driver's actors with it
            buf += chunk
            *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                cmd = json.loads(line)
                op = cmd["op"]
            except (ValueError, KeyError, TypeError):
                say(ev="error", error=f"bad command {line[:200]!r}")
                continue
            if op == "quit":
                return 0
            if op == "launch":
                worker, node = cmd["worker"], cmd["node"]
                try:
                    # A job's placement group: a bundle per rank, each on its rank's node. Its
                    # worker runs in bundle 0; a rank started later for it, in its own bundle.
                    bundles = [({k: float(v) for k, v in b["resources"].items() if v > 0}, b["ray_id"]) for b in cmd.get("bundles") or []]
                    shared = groups.get(cmd.get("group") or "")
                    strategy: Any
                    if bundles and all(res for res, _ in bundles):
                        group = placement_group([res for res, _ in bundles], bundle_label_selector=[{"ray.io/node-id": rid} for _, rid in bundles],
                                                name=f"llmos-{worker}")
                        groups[worker] = group
                        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
                    elif shared is not None and cmd.get("bundle_index") is not None:
                        strategy = PlacementGroupSchedulingStrategy(shared, placement_group_bundle_index=int(cmd["bundle_index"]))
                    else:
                        strategy = NodeAffinitySchedulingStrategy(cmd["ray_id"], soft=False)
                    host = WorkerHost.options(scheduling_strategy=strategy, name=f"llmos-{worker}").remote()
                    hosts[worker] = host
                    starts[host.start.remote(cmd["argv"], cmd["env"], cmd["log"], not cmd.get("rank"))] = worker
                    waits[host.wait.remote()] = (worker, node)
                except Exception as exc:
                    end(worker, None, f"could not start a worker on node {node}: {type(exc).__name__}: {exc}")
            elif op == "signal":
                host = hosts.get(cmd.get("worker"))
                if host is not None:
                    host.signal.remote(int(cmd["sig"]))
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + args.poll
            try:
                nodes = node_entries(ray.nodes())
                failures = 0
            except Exception as exc:
                failures += 1
                say(ev="unavailable", error=f"{type(exc).__name__}: {str(exc)[:300]}")
                if failures >= 20:
                    return 4  # the kernel starts a fresh agent, which reconnects when the cluster is back
                continue
            if nodes != last_nodes:
                last_nodes = nodes
                say(ev="nodes", nodes=nodes)
            alive = {n["id"] for n in nodes if n["alive"]}
            for n in nodes:
                if n["alive"] and n["id"] not in probed:
                    probed.add(n["id"])
                    probes[probe_gpus.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["ray_id"], soft=False)).remote()] = n["id"]
        pending = [*starts, *waits, *probes]
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
        for ref in done:
            if ref in starts:
                worker = starts.pop(ref)
                try:
                    say(ev="started", worker=worker, pid=ray.get(ref))
                except Exception:
                    pass  # its wait() reports how it died
            elif ref in probes:
                node = probes.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:
                    result = {"source": "none", "gpus": [], "error": str(exc)[:300]}
                say(ev="probed", node=node, gpus=result.get("gpus", []), source=result.get("source", "none"))
            else:
                worker, node = waits.pop(ref)
                try:
                    code, usage = ray.get(ref)
                    end(worker, int(code), None, usage)
                except Exception as exc:
                    why = f"its Ray actor died: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                    if node not in alive:
                        end(worker, None, f"node {node} lost")
                    else:
                        # Ray may not have noticed the node's death yet (its health checks take
                        # seconds): wait for its verdict, and place nothing there meanwhile.
                        held[worker] = (node, time.monotonic() + args.hold, why)
                        if node not in suspects:
                            suspects.add(node)
                            say(ev="suspect", node=node, why=why)
        for worker, (node, deadline, why) in list(held.items()):
            if node not in alive:
                del held[worker]
                end(worker, None, f"node {node} lost")
            elif time.monotonic() >= deadline:
                del held[worker]
                end(worker, None, why)
        for node in list(suspects):
            if node not in alive or not any(n == node for n, _, _ in held.values()):
                suspects.discard(node)
                if node in alive:
                    say(ev="trusted", node=node)


def _loopback(address: str) -> bool:
    """Whether the cluster at ``address`` ("auto": the one `ray start` made here) is on loopback."""
    if address == "auto":
        try:
            with open("/tmp/ray/ray_current_cluster") as f:
                address = f.read().strip()
        except OSError:
            return False
    host = address.removeprefix("ray://").rpartition(":")[0]
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _unreachable(address: str) -> str | None:
    """Why the GCS at ``address`` (HOST:PORT) cannot be reached, or None (also for "auto")."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return None
    except OSError as exc:
        return f"cannot reach the Ray cluster's GCS at {host}:{port}: {exc.strerror or exc}"


def _stdin_closed(wait: float) -> bool:
    """Wait up to ``wait`` s; True if the kernel closed our stdin meanwhile (commands sent
    before the connection are dropped: the kernel sends none until it reads "connected")."""
    readable, _, _ = select.select([0], [], [], wait)
    return bool(readable) and not os.read(0, 65536)


if __name__ == "__main__":
    sys.exit(main())
