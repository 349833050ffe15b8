"""Memory limits: a job's ``memory`` reservation enforced, and the node guard (``[limits]``).

Two ways to enforce a reservation, chosen at boot:

* **Memory cgroups.** Each worker that runs a job with a ``memory`` reservation is moved into a
  group of its own, limited to the reservation, before its job starts; the host's OOM killer acts
  inside that group only, and the kernel reads the group's OOM count to end the job as failed,
  "exceeded its memory (X used of Y reserved)".
* **The monitor.** Elsewhere (or with ``cgroup = "off"``) the monitor's measured resident memory
  of the job's process tree, over the reservation, ends the job the same way within a sample.

How the kernel finds out which it can use (:func:`discover`): it reads ``/proc/self/cgroup`` (its
own group in each hierarchy) and ``/proc/self/mountinfo`` (where each hierarchy is mounted), and
takes cgroup v2 where the unified hierarchy offers the ``memory`` controller to its group, else
cgroup v1's ``memory`` hierarchy. Under its own group it makes ``llmos-<pid>/``, and in that a
probe group whose limit it writes and reads back. Anything that fails on the way (no hierarchy,
no permission, a v2 group shared with other processes) falls back to the monitor, logged once with
the reason. cgroup v2 forbids processes in a group that hands controllers to its children, so on
v2 the kernel (and its helpers) first move into ``llmos-<pid>/kernel`` when its own group holds
nothing else. Groups go when their workers are reaped; groups of kernels that are gone are
removed at boot.

The node guard: when the machine's available memory (or, in a container, what its memory cgroup
still allows) falls below ``node_min_free``, the lowest-priority, most recently started job is
stopped, one at a time. And every job's worker gets an ``oom_score_adj`` above the kernel's, so
that if the host's OOM killer must choose, it chooses a job, never the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from llmos.errors import ConfigError
from llmos.kernel.store import JobRecord
from llmos.kernel.supervisor import WorkerProc
from llmos.protocol import JobLog, JobUsage
from llmos.units import format_size, parse_share

log = structlog.get_logger("llmos.kernel")

__all__ = [
    "CgroupV1", "CgroupV2", "Found", "GroupStats", "Limits", "MemoryCgroups", "Mount", "Victim", "choose_victim", "container_ceiling",
    "discover", "exceeded_reason", "find_own_group", "guard_reason", "min_free", "parse_keyed", "parse_mountinfo", "parse_proc_cgroup", "raise_oom_score",
]

PROBE_LIMIT = 64 << 20
UNLIMITED = 1 << 62  # v1 writes "unlimited" as a number near 2**63


def exceeded_reason(used: int, reserved: int) -> str:
    return f"exceeded its memory ({format_size(used)} used of {format_size(reserved)} reserved)"


def guard_reason(free: int, total: int) -> str:
    return f"stopped to keep the machine from running out of memory: {format_size(free)} free of {format_size(total)}"


# ---------------------------------------------------------------------------- what /proc says


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/self/mountinfo, the fields that matter here."""

    root: str  # the path inside the filesystem that is mounted (a cgroup namespace's own group)
    mountpoint: str
    fstype: str
    options: frozenset[str]  # the superblock options: a v1 hierarchy's controllers are among them


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` as {controller: path}; the v2 entry (``0::/path``) is under ``""``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            out[""] = path
        for name in controllers.split(","):
            if name:
                out[name] = path
    return out


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup mounts in ``/proc/<pid>/mountinfo`` (fields after `` - ``: type, source, options)."""
    out = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
            continue
        out.append(Mount(root=_unescape(fields[3]), mountpoint=_unescape(fields[4]), fstype=rest[0], options=frozenset(rest[2].split(","))))
    return out


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def parse_keyed(text: str) -> dict[str, int]:
    """A flat keyed file (``memory.events``, ``memory.oom_control``, ``memory.stat``) as {key: number}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _group_dir(mount: Mount, path: str) -> Path:
    """Where the group ``path`` (as /proc/self/cgroup names it) is in the mounted tree."""
    root = mount.root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    return Path(mount.mountpoint) / path.lstrip("/")


def min_free(text: str, total: int) -> int:
    """``node_min_free`` in bytes: ``"5%"`` of ``total``, a size (``"2GiB"``), or 0 for ``""``."""
    return parse_share(text, total)


# ---------------------------------------------------------------------------- the hierarchies


@dataclass(frozen=True, slots=True)
class GroupStats:
    """What a memory group says about itself. ``oom_kills`` is None where the kernel of the host
    does not count them (cgroup v1 before Linux 4.13); ``limit_hits`` then tells."""

    oom_kills: int | None
    limit_hits: int  # v1 memory.failcnt, v2 memory.events ``max``
    peak: int | None  # the most it used (v1 max_usage_in_bytes, v2 memory.peak), else its current use


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, text: str) -> None:
    # One write() per value: a cgroup file takes a value per write, and a partial one is an error.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # as a shell's `echo N > file` opens it
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class CgroupV1:
    """The v1 ``memory`` hierarchy's files."""

    version = 1
    limit_file = "memory.limit_in_bytes"

    def prepare(self, own: Path, base: Path, top: Path) -> None:
        base.mkdir(exist_ok=True)

    def set_limit(self, group: Path, limit: int) -> None:
        _write(group / "memory.limit_in_bytes", str(limit))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            # Memory plus swap at the same figure: a job over its memory cannot go on in swap.
            try:
                _write(swap, str(limit))
            except OSError:
                pass

    def limit(self, group: Path) -> int:
        return int(_read(group / "memory.limit_in_bytes").strip())

    def stats(self, group: Path) -> GroupStats:
        oom = parse_keyed(_read(group / "memory.oom_control")).get("oom_kill")
        return GroupStats(oom_kills=oom, limit_hits=_int(group / "memory.failcnt") or 0, peak=_int(group / "memory.max_usage_in_bytes"))

    def working_set(self, group: Path) -> int:
        stat = parse_keyed(_read(group / "memory.stat"))
        return max(0, int(_read(group / "memory.usage_in_bytes").strip()) - stat.get("total_inactive_file", 0))


class CgroupV2:
    """The unified hierarchy's memory files, and its rule that a group handing controllers to its
    children holds no processes itself."""

    version = 2
    limit_file = "memory.max"

    def prepare(self, own: Path, base: Path, top: Path) -> None:
        """Make ``base`` (a child of ``own``) a group whose children get the memory controller.
        Only the root group (``top``) may hold processes and hand controllers down at once."""
        if "memory" not in _read(own / "cgroup.subtree_control").split():
            if own != top and _read(own / "cgroup.procs").split():
                self._leave(own, base)
            _write(own / "cgroup.subtree_control", "+memory")
        base.mkdir(exist_ok=True)
        if "memory" not in _read(base / "cgroup.subtree_control").split():
            _write(base / "cgroup.subtree_control", "+memory")

    def _leave(self, own: Path, base: Path) -> None:
        """Move the kernel and its children out of ``own`` into ``base/kernel`` (so that ``own``
        may hand the memory controller down); refused when ``own`` holds other processes."""
        ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
        procs = {int(p) for p in _read(own / "cgroup.procs").split()}
        others = sorted(procs - ours)
        if others:
            raise OSError(
                errno.EBUSY,
                f"cgroup v2 group {own} also holds processes that are not the kernel's ({', '.join(map(str, others[:5]))}): a group with processes "
                "cannot hand the memory controller to child groups; boot the kernel in a group of its own (systemd-run --scope -p Delegate=yes llmos boot)",
            )
        leaf = base / "kernel"
        leaf.mkdir(parents=True, exist_ok=True)
        for pid in sorted(procs):
            try:
                _write(leaf / "cgroup.procs", str(pid))
            except ProcessLookupError:
                pass  # a helper that has just exited

    def set_limit(self, group: Path, limit: int) -> None:
        _write(group / "memory.max", str(limit))
        swap = group / "memory.swap.max"
        if swap.exists():
            try:
                _write(swap, "0")
            except OSError:
                pass

    def limit(self, group: Path) -> int:
        text = _read(group / "memory.max").strip()
        return UNLIMITED if text == "max" else int(text)

    def stats(self, group: Path) -> GroupStats:
        events = parse_keyed(_read(group / "memory.events"))
        peak = _int(group / "memory.peak")
        return GroupStats(oom_kills=events.get("oom_kill"), limit_hits=events.get("max", 0), peak=peak if peak is not None else _int(group / "memory.current"))

    def working_set(self, group: Path) -> int:
        stat = parse_keyed(_read(group / "memory.stat"))
        return max(0, int(_read(group / "memory.current").strip()) - stat.get("inactive_file", 0))


def _int(path: Path) -> int | None:
    try:
        return int(_read(path).strip())
    except (OSError, ValueError):
        return None


Hierarchy = CgroupV1 | CgroupV2


@dataclass(frozen=True, slots=True)
class Found:
    """The kernel's own memory group: which hierarchy, where its directory is, and the mount's top."""

    hierarchy: Hierarchy
    own: Path
    top: Path


def find_own_group(proc_cgroup: str, mountinfo: str) -> tuple[Found | None, str]:
    """The kernel's own memory group (v2 preferred), or None and why there is none."""
    groups, mounts = parse_proc_cgroup(proc_cgroup), parse_mountinfo(mountinfo)
    why = []
    v2 = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if "" in groups and v2 is not None:
        own = _group_dir(v2, groups[""])
        try:
            controllers = _read(own / "cgroup.controllers").split()
        except OSError as exc:
            controllers = []
            why.append(f"cgroup v2 group {own} cannot be read ({exc.strerror or exc})")
        if "memory" in controllers:
            return Found(CgroupV2(), own, Path(v2.mountpoint)), ""
        if not why:
            why.append(f"cgroup v2 at {v2.mountpoint} offers no memory controller to {own}")
    v1 = next((m for m in mounts if m.fstype == "cgroup" and "memory" in m.options), None)
    if "memory" in groups and v1 is not None:
        return Found(CgroupV1(), _group_dir(v1, groups["memory"]), Path(v1.mountpoint)), ""
    why.append("no cgroup v1 memory hierarchy is mounted" if v1 is None else "this process is in no cgroup v1 memory group")
    return None, "; ".join(why)


def discover(proc_cgroup: str | None = None, mountinfo: str | None = None) -> tuple[MemoryCgroups | None, str]:
    """Memory cgroups the kernel can make groups in, after a probe group worked; else None and why."""
    try:
        found, why = find_own_group(
            _read(Path("/proc/self/cgroup")) if proc_cgroup is None else proc_cgroup,
            _read(Path("/proc/self/mountinfo")) if mountinfo is None else mountinfo,
        )
    except OSError as exc:
        return None, f"/proc cannot be read: {exc}"
    if found is None:
        return None, why
    cgroups = MemoryCgroups(found.hierarchy, found.own, found.top)
    try:
        cgroups.open()
    except OSError as exc:
        cgroups.close()
        where = f" ({exc.filename})" if exc.filename else ""
        return None, f"cgroup v{found.hierarchy.version} group {found.own} cannot hold groups of llmos: {exc.strerror or exc}{where}"
    return cgroups, ""


class MemoryCgroups:
    """The kernel's groups: ``<own>/llmos-<pid>/`` and a leaf per worker in it."""

    def __init__(self, hierarchy: Hierarchy, own: Path, top: Path) -> None:
        self.hierarchy, self.own, self.top = hierarchy, own, top
        self.base = own / f"llmos-{os.getpid()}"
        self.stale = 0  # subtrees of dead kernels not removed yet

    @property
    def version(self) -> int:
        return self.hierarchy.version

    def open(self) -> None:
        """Make the kernel's subtree, try a probe group in it, and sweep groups of dead kernels."""
        self.hierarchy.prepare(self.own, self.base, self.top)
        probe = self.base / "probe"
        probe.mkdir(exist_ok=True)
        try:
            self.hierarchy.set_limit(probe, PROBE_LIMIT)
            got = self.hierarchy.limit(probe)
            if got != PROBE_LIMIT:
                raise OSError(errno.EIO, f"a probe group's limit reads back as {got}, not {PROBE_LIMIT}")
        finally:
            _rmdir(probe)
        self.stale = self.sweep()

    def sweep(self) -> int:
        """Remove the subtrees of kernels that are gone; returns how many are left (a group goes
        only once its processes have: the orphans of a killed kernel may still be exiting)."""
        gone, left = [], 0
        for entry in self.own.glob("llmos-*"):
            pid = entry.name.removeprefix("llmos-")
            if entry == self.base or not pid.isdigit() or not entry.is_dir() or psutil.pid_exists(int(pid)):
                continue
            if all([_rmdir(leaf) for leaf in entry.iterdir() if leaf.is_dir()]) and _rmdir(entry):
                gone.append(entry)
            else:
                left += 1
        if gone:
            log.info("stale_cgroups_removed", groups=[str(g) for g in gone])
        return left

    def create(self, name: str, limit: int, pid: int) -> Path:
        """A group ``name`` limited to ``limit`` bytes, with ``pid`` (all its threads) in it."""
        group = self.base / name
        group.mkdir(exist_ok=True)
        try:
            self.hierarchy.set_limit(group, limit)
            _write(group / "cgroup.procs", str(pid))
        except OSError:
            _rmdir(group)
            raise
        return group

    def stats(self, group: Path) -> GroupStats | None:
        try:
            return self.hierarchy.stats(group)
        except OSError:
            return None

    def remove(self, group: Path) -> bool:
        return _rmdir(group)

    def close(self) -> None:
        """Remove the kernel's subtree (what cannot go yet is swept by the next kernel)."""
        if not self.base.is_dir():
            return
        for leaf in self.base.iterdir():
            if leaf.is_dir():
                _rmdir(leaf)
        _rmdir(self.base)


def _rmdir(group: Path) -> bool:
    """Remove a group (only empty ones go: EBUSY while a process is still inside)."""
    try:
        group.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def container_ceiling(found: Found | None, total: int) -> tuple[Path, Hierarchy, int] | None:
    """The tightest memory limit on the kernel's own group and its parents, when it is below the
    machine's RAM (a container): (that group, its hierarchy, the limit)."""
    if found is None:
        return None
    best = None
    group = found.own
    while True:
        try:
            limit = found.hierarchy.limit(group)
        except (OSError, ValueError):
            limit = UNLIMITED
        if limit < total and (best is None or limit < best[2]):
            best = (group, found.hierarchy, limit)
        if group == found.top or group.parent == group:
            return best
        group = group.parent


# ---------------------------------------------------------------------------- the guard's choice


@dataclass(frozen=True, slots=True)
class Victim:
    """A running job as the node guard weighs it."""

    job_id: int
    priority: int
    started_at: float


def choose_victim(candidates: Iterable[Victim]) -> Victim | None:
    """The job the node guard stops first: the lowest priority, then the most recently started."""
    return min(candidates, key=lambda v: (v.priority, -v.started_at), default=None)


# ---------------------------------------------------------------------------- the component


@dataclass(slots=True)
class _Group:
    path: Path
    job_id: int
    limit: int
    done: bool = False  # its job was ended for it already


class Limits:
    """The ``[limits]`` policy in the kernel: groups per worker, the monitor's check, the guard.

    It stops a job through ``kill(job, reason)`` (the kernel ends it at once, failed)."""

    def __init__(
        self, settings: Mapping[str, Any], jobs: Mapping[int, JobRecord], workers: Mapping[str, WorkerProc],
        emit: Callable[[str, Any], None], kill: Callable[[JobRecord, str], None],
    ) -> None:
        self.jobs, self.workers, self.emit, self.kill = jobs, workers, emit, kill
        self.mode = str(settings["memory"])
        if self.mode not in ("enforce", "report"):
            raise ConfigError(f"limits.memory must be 'enforce' or 'report', got {self.mode!r}", key="limits.memory")
        how = str(settings["cgroup"])
        if how not in ("auto", "off"):
            raise ConfigError(f"limits.cgroup must be 'auto' or 'off', got {how!r}", key="limits.cgroup")
        self.total = psutil.virtual_memory().total
        try:
            min_free(str(settings["node_min_free"]), self.total)
        except ValueError:
            raise ConfigError(
                f"limits.node_min_free must be a share such as '5%' or a size such as '2GiB' ('' for no guard), got {settings['node_min_free']!r}",
                key="limits.node_min_free",
            ) from None
        self.min_free_setting = str(settings["node_min_free"])
        self.interval = float(settings["guard_interval"])
        if not self.interval > 0:
            raise ConfigError(f"limits.guard_interval must be a number of seconds above 0, got {self.interval}", key="limits.guard_interval")
        self.oom_offset = int(settings["worker_oom_score_adj"])
        if not 0 <= self.oom_offset <= 2000:
            raise ConfigError(f"limits.worker_oom_score_adj must be from 0 to 2000, got {self.oom_offset}", key="limits.worker_oom_score_adj")
        self.cgroups: MemoryCgroups | None = None
        self.why_not = "limits.memory is 'report': nothing is limited" if self.mode == "report" else "limits.cgroup is 'off'"
        if self.mode == "enforce" and how == "auto":
            self.cgroups, why = discover()
            if self.cgroups is None:
                self.why_not = why
        if self.cgroups is not None:
            log.info("memory_limits", enforcement=f"cgroup v{self.cgroups.version}", groups=str(self.cgroups.base))
        else:
            log.info("memory_limits", enforcement="monitor" if self.mode == "enforce" else "report", why=self.why_not)
        found = None
        with contextlib.suppress(OSError, ValueError):
            found = find_own_group(_read(Path("/proc/self/cgroup")), _read(Path("/proc/self/mountinfo")))[0]
        self.ceiling = container_ceiling(found, self.total)
        self._groups: dict[str, _Group] = {}  # worker id -> its group
        self._verdicts: dict[str, str] = {}  # worker id -> why its job ended (read at its reap)
        self._leftover: list[tuple[Path, int]] = []  # groups to remove once their last process is gone
        self._reported: set[tuple[int, int]] = set()  # (job, attempt) over its reservation, in report mode
        self._next_look = self._next_sweep = 0.0
        self._guard_victim: tuple[int, float] | None = None  # (job, until when its end is awaited)
        self._low_reported = False

    @property
    def enforcement(self) -> str:
        """``cgroup v1``, ``cgroup v2``, ``monitor`` or ``report``."""
        if self.cgroups is not None:
            return f"cgroup v{self.cgroups.version}"
        return "monitor" if self.mode == "enforce" else "report"

    # -- a job's start and its worker's end

    def job_started(self, job: JobRecord, worker: WorkerProc) -> None:
        """Before the job's code runs: its worker into a group at its reservation (where there are
        groups), and its ``oom_score_adj`` above the kernel's."""
        if worker.node is not None or worker.pid is None:
            return  # a remote worker: its node's business
        if self.oom_offset:
            raise_oom_score(worker.pid, self.oom_offset)
        reserved = int(job.resources.get("memory") or 0)
        if self.cgroups is None or not reserved:
            return
        try:
            path = self.cgroups.create(worker.id, reserved, worker.pid)
        except OSError as exc:
            log.warning("memory_cgroup_failed", job_id=job.id, worker=worker.id, error=str(exc), enforcement="monitor")
            return
        self._groups[worker.id] = _Group(path, job.id, reserved)

    def worker_exited(self, worker: WorkerProc) -> None:
        """A reaped worker: read its group a last time (did the OOM killer act?), then remove it."""
        group = self._groups.pop(worker.id, None)
        if group is None or self.cgroups is None:
            return
        stats = self.cgroups.stats(group.path)
        killed = worker.exited is not None and os.WIFSIGNALED(worker.exited) and os.WTERMSIG(worker.exited) == signal.SIGKILL
        if stats is not None and (stats.oom_kills or (stats.oom_kills is None and stats.limit_hits and killed)):
            self._verdicts[worker.id] = self._exceeded(group, stats)
        if not self.cgroups.remove(group.path):
            self._leftover.append((group.path, 50))

    def verdict(self, worker: WorkerProc) -> str | None:
        """Why the job of a reaped worker ended, when its memory group says (else None)."""
        return self._verdicts.pop(worker.id, None)

    # -- the monitor's measurements

    def measured(self, job: JobRecord, usage: JobUsage) -> None:
        """A job's measured resident memory: over its reservation, it is stopped (or reported)."""
        reserved = int(job.resources.get("memory") or 0)
        if not reserved or usage.rss <= reserved or job.stop_stage or (job.worker_id in self._groups):
            return  # no reservation, within it, already stopping, or its group enforces it
        reason = exceeded_reason(usage.rss, reserved)
        if self.mode == "report":
            if (job.id, job.attempts) not in self._reported:
                self._reported.add((job.id, job.attempts))
                self._log(job, "warning", "memory_over_reservation", used=usage.rss, reserved=reserved)
            return
        self._log(job, "error", "memory_exceeded", used=usage.rss, reserved=reserved, measured_by="monitor")
        self.kill(job, reason)

    # -- timers

    def tick(self, now: float) -> None:
        """Each ``guard_interval``: groups' OOM counts, leftover groups, and the node guard."""
        if now < self._next_look:
            return
        self._next_look = now + self.interval
        self._check_groups()
        if self.cgroups is not None:
            if self._leftover:
                self._leftover = [(p, n - 1) for p, n in self._leftover if not self.cgroups.remove(p) and n > 1]
            if self.cgroups.stale and now >= self._next_sweep:
                self._next_sweep = now + 5.0
                self.cgroups.stale = self.cgroups.sweep()
        self._guard(now)

    def _check_groups(self) -> None:
        """A job whose group saw an OOM kill (perhaps of one of its children) ends now."""
        if self.cgroups is None:
            return
        for worker_id, group in self._groups.items():
            worker, job = self.workers.get(worker_id), self.jobs.get(group.job_id)
            if group.done or worker is None or not worker.alive or job is None or job.state != "running" or job.worker_id != worker_id:
                continue
            stats = self.cgroups.stats(group.path)
            if stats is not None and stats.oom_kills:
                self.kill(job, self._exceeded(group, stats))

    def _exceeded(self, group: _Group, stats: GroupStats) -> str:
        """The reason a group's job ends with (said once on its log stream)."""
        used = stats.peak or group.limit
        job = self.jobs.get(group.job_id)
        if job is not None and not group.done:
            assert self.cgroups is not None
            self._log(job, "error", "memory_exceeded", used=used, reserved=group.limit, oom_kills=stats.oom_kills, measured_by=f"cgroup v{self.cgroups.version}")
        group.done = True
        return exceeded_reason(used, group.limit)

    def node_memory(self) -> tuple[int, int]:
        """(available, total) bytes: the machine's, or its container's where that is less."""
        mem = psutil.virtual_memory()
        free, total = int(mem.available), int(mem.total)
        if self.ceiling is not None:
            group, hierarchy, limit = self.ceiling
            with contextlib.suppress(OSError, ValueError):
                free, total = min(free, max(0, limit - hierarchy.working_set(group))), limit
        return free, total

    def _guard(self, now: float) -> None:
        if not self.min_free_setting:
            return
        free, total = self.node_memory()
        if free >= min_free(self.min_free_setting, total):
            self._low_reported = False
            return
        if self._guard_victim is not None:
            job_id, until = self._guard_victim
            victim = self.jobs.get(job_id)
            if victim is not None and victim.state == "running" and now < until:
                return  # one at a time: wait for the last one's memory to come back
            self._guard_victim = None
        candidates = [
            Victim(job.id, job.priority, job.started_at or 0.0)
            for job in self.jobs.values()
            if job.state == "running" and not job.stop_stage and job.worker_id in self.workers and self.workers[job.worker_id].node is None
        ]
        chosen = choose_victim(candidates)
        reason = guard_reason(free, total)
        if chosen is None:
            if not self._low_reported:
                self._low_reported = True
                log.warning("node_memory_low", free=free, total=total, stopped=None)
            return
        job = self.jobs[chosen.job_id]
        if self.mode == "report":
            if not self._low_reported:
                self._low_reported = True
                log.warning("node_memory_low", free=free, total=total, would_stop=job.id)
                self._log(job, "warning", "node_memory_low", free=free, total=total)
            return
        log.warning("node_memory_low", free=free, total=total, stopped=job.id, priority=job.priority)
        self._log(job, "error", "node_memory_low", free=free, total=total)
        self._guard_victim = (job.id, now + 10.0)
        self.kill(job, reason)

    def _log(self, job: JobRecord, level: str, event: str, **fields: Any) -> None:
        getattr(log, level)(event, job_id=job.id, **fields)
        self.emit(f"job.{job.id}.log", JobLog(level=level, event=event, logger="llmos.kernel", fields=fields))

    def close(self) -> None:
        """At shutdown (after the workers are gone): the kernel's groups go."""
        if self.cgroups is not None:
            deadline = time.monotonic() + 1.0
            while any(p.is_dir() for p in (g.path for g in self._groups.values())) and time.monotonic() < deadline:
                if all(self.cgroups.remove(g.path) for g in self._groups.values()):
                    break
                time.sleep(0.02)
            self.cgroups.close()


def raise_oom_score(pid: int, offset: int) -> None:
    """Make ``pid`` the host's OOM killer's choice before the kernel: its ``oom_score_adj`` set
    ``offset`` above the kernel's own (at most 1000; raising it needs no privilege)."""
    try:
        own = int(_read(Path("/proc/self/oom_score_adj")).strip())
        _write(Path(f"/proc/{pid}/oom_score_adj"), str(min(1000, own + offset)))
    except (OSError, ValueError) as exc:
        log.debug("oom_score_adj_not_set", pid=pid, error=str(exc))


