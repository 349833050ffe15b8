"""The scheduler: which pending jobs start now, on what, and what is preempted for them.

:func:`plan` is pure: it reads the queue, the running jobs and the device table and returns a
:class:`Plan`; it opens no socket, starts no process and leaves the device table as it found it
(what it places in a pass it holds only until the pass ends, so later jobs see it taken). The
kernel applies the plan: it reserves and binds workers for ``starts``, asks ``preemptions`` to
stop, and keeps ``waiting_for_worker`` more workers coming. (vLLM v1's scheduler is the model: it
returns what to run and does no I/O.)

The rules:

* **Order.** By effective priority ``priority + (now - queued_at) / aging_seconds`` (aging lets
  an old low-priority job overtake newer higher ones), then by id; without aging, by priority.
* **Fit.** A job starts when the device table places it and a ready worker is free. Requests that
  did not fit in a pass still do not later in it (reservations only grow): a queue of many alike
  jobs costs one placement, not one each.
* **Starvation.** Once the head of the queue has waited ``starvation_seconds``, nothing behind a
  job that waited that long may start ahead of it.
* **Workers.** Past ``enough_waiting`` jobs that fit but have no worker yet, the pass stops: no more
  workers would start for the rest.
* **Preemption.** A job that does not fit may stop running *preemptible* jobs of lower priority
  that have run ``preempt_min_runtime`` seconds: lowest priority first, then the most recently
  started (the least work lost), the fewest that make room; none if even all would not. While
  victims stop for a job, nothing more is preempted for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmos.kernel.devices import DeviceTable
from llmos.kernel.store import JobRecord
from llmos.plugin import Resources

__all__ = ["WAITING_FOR_WORKER", "Plan", "Policy", "choose_victims", "order", "plan", "rank_plan"]

WAITING_FOR_WORKER = "waiting for a worker to start"


@dataclass(frozen=True)
class Policy:
    """The settings the scheduler reads (``[scheduler]`` and ``[workers]`` of the config)."""

    aging_seconds: float = 300.0
    starvation_seconds: float = 3600.0
    preemption: bool = True
    preempt_min_runtime: float = 0.0
    enough_waiting: int = 4  # workers.max_starting + workers.pool_size

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Policy:
        sched, ws = settings["scheduler"], settings["workers"]
        return cls(
            aging_seconds=float(sched["aging_seconds"]),
            starvation_seconds=float(sched["starvation_seconds"]),
            preemption=bool(sched["preemption"]),
            preempt_min_runtime=float(sched["preempt_min_runtime"]),
            enough_waiting=int(ws["max_starting"]) + int(ws["pool_size"]),
        )


@dataclass
class Plan:
    """What to do this turn: start these (in order, each on the next ready worker), stop these
    victims for those jobs, and how many jobs fit but wait for a worker."""

    starts: list[tuple[JobRecord, dict[str, Any]]] = field(default_factory=list)
    preemptions: list[tuple[JobRecord, JobRecord]] = field(default_factory=list)  # (victim, for job)
    waiting_for_worker: int = 0
    #: Why each job this pass looked at and did not start waits (its pending reason).
    waiting: dict[int, str] = field(default_factory=dict)


def order(pending: Sequence[JobRecord], aging_seconds: float) -> list[JobRecord]:
    """Pending jobs, first to start first. ``priority + (now - queued_at) / aging`` orders them as
    ``priority - queued_at / aging`` does: a key that needs no clock."""
    if aging_seconds > 0:
        return sorted(pending, key=lambda j: (j.queued_at / aging_seconds - j.priority, j.id))
    return sorted(pending, key=lambda j: (-j.priority, j.id))


def plan(
    pending: Sequence[JobRecord],
    running: Sequence[JobRecord],
    devices: DeviceTable | Any,
    ready_workers: int,
    policy: Policy,
    now: float,
    preempting: Mapping[int, int] | None = None,
    ranks: Callable[[JobRecord], int] | None = None,
) -> Plan:
    """The plan for one scheduling pass (see the module's rules). ``preempting`` maps victims
    already stopping to the job they stop for; ``ranks`` says how many ranks a gang job runs (a
    cluster's table spreads them over nodes when they do not fit on one)."""
    out = Plan()
    if not pending:
        return out
    preempting = preempting or {}
    held: list[int] = []  # ids this pass placed: held in the table until it ends
    unfit: dict[tuple[Any, ...], str] = {}  # a shape that did not fit -> why
    chosen: set[int] = set()  # victims picked in this pass
    lowest = min((j.priority for j in running if j.preemptible), default=None) if policy.preemption else None
    ready = ready_workers
    try:
        for job in order(pending, policy.aging_seconds):
            n = ranks(job) if ranks is not None else 1
            key = (*job.resources.items(), n)
            known = unfit.get(key)
            if known is not None and lowest is None:
                # A shape that did not fit in this pass still does not (reservations only grow).
                out.waiting[job.id] = known
                if now - job.queued_at >= policy.starvation_seconds:
                    _behind(job, pending, out)
                    break
                continue
            res = Resources(**job.resources)
            placement = None if known is not None else (devices.place(res, ranks=n) if n > 1 else devices.place(res))
            if placement is not None and ready > 0:
                devices.reserve(job.id, placement)
                held.append(job.id)
                out.starts.append((job, placement))
                ready -= 1
                continue
            if placement is not None:
                out.waiting_for_worker += 1
                out.waiting[job.id] = WAITING_FOR_WORKER
                if ready == 0 and out.waiting_for_worker >= policy.enough_waiting:
                    break  # the rest waits for workers too; the next pass sees them
            else:
                if key not in unfit:
                    why = devices.why_waiting(res) if hasattr(devices, "why_waiting") else "waiting for room"
                    unfit[key] = f"its {n} ranks: {why}" if n > 1 else why
                out.waiting[job.id] = unfit[key]
                if lowest is not None and job.priority > lowest and job.id not in preempting.values():
                    for victim in choose_victims(job, res, [j for j in running if j.id not in chosen], devices, policy, now):
                        chosen.add(victim.id)
                        out.preemptions.append((victim, job))
            if now - job.queued_at >= policy.starvation_seconds:
                _behind(job, pending, out)
                break  # the head has waited too long: nothing behind it may jump ahead
    finally:
        for job_id in held:
            devices.release(job_id)
    return out


def _behind(head: JobRecord, pending: Sequence[JobRecord], out: Plan) -> None:
    """The jobs a starving head holds back say so."""
    started = {j.id for j, _ in out.starts}
    behind = f"waiting behind job {head.id}, which has waited longest"
    for later in pending:
        if later.id != head.id and later.id not in out.waiting and later.id not in started:
            out.waiting[later.id] = behind


def choose_victims(job: JobRecord, res: Resources, running: Sequence[JobRecord], devices: DeviceTable, policy: Policy, now: float) -> list[JobRecord]:
    """The fewest running preemptible jobs of lower priority whose devices let ``job`` fit
    (lowest priority first, then the most recently started); [] when none would do, or while the
    GPUs are not known yet. Victims are released from the table only in a what-if."""
    if res.gpus > 0 and devices.probing:
        return []
    victims = [
        j for j in running
        if j.state == "running" and j.preemptible and j.priority < job.priority and not j.stop_stage
        and j.worker_id is not None and now - (j.started_at or now) >= policy.preempt_min_runtime and j.placement
    ]
    if not victims:
        return []
    victims.sort(key=lambda j: (j.priority, -(j.started_at or 0.0)))
    chosen: list[JobRecord] = []
    try:
        for victim in victims:
            devices.release(victim.id)
            chosen.append(victim)
            if devices.place(res) is not None:
                return chosen
        return []  # even all of them would not make room
    finally:
        for victim in victims:
            if victim.placement:
                devices.reserve(victim.id, victim.placement)


def rank_plan(placement: Mapping[str, Any], n: int, master_port: int, master_addr: str = "127.0.0.1") -> dict[str, Any]:
    """A gang job's placement split among its ``n`` ranks: GPUs in equal runs, CPU cores shared
    evenly, and the rendezvous address every rank meets at."""
    if placement.get("ranks"):  # spread over a cluster's nodes: each rank where it was placed
        return {
            "world_size": n,
            "master_addr": master_addr,
            "master_port": master_port,
            "ranks": [{"rank": r, "node": p["node"], "gpus": [int(g["index"]) for g in p["gpus"]], "cpus": float(p["cpu"]["cores"])}
                      for r, p in enumerate(placement["ranks"])],
        }
    gpus = placement.get("gpus", [])
    per = len(gpus) // n
    cores = float(placement.get("cpu", {}).get("cores", 0)) / n
    node = {"node": placement["node"]} if placement.get("node") else {}
    return {
        "world_size": n,
        "master_addr": master_addr,
        "master_port": master_port,
        "ranks": [{"rank": r, **node, "gpus": [int(g["index"]) for g in gpus[r * per : (r + 1) * per]], "cpus": cores} for r in range(n)],
    }
