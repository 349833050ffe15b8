"""Memory limits without a kernel: what /proc and the cgroup files say, the v2 subtree, the
guard's choice of victim, and the ``[limits]`` checks. (The real v1 path runs in
tests/e2e/test_memory.py; cgroup v2's files are laid out here as the kernel would find them.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmos.config import load_settings
from llmos.errors import ConfigError
from llmos.kernel.limits import (
    CgroupV1,
    CgroupV2,
    Limits,
    MemoryCgroups,
    Victim,
    choose_victim,
    container_ceiling,
    exceeded_reason,
    find_own_group,
    guard_reason,
    min_free,
    parse_keyed,
    parse_mountinfo,
    parse_proc_cgroup,
)

HYBRID_CGROUP = """9:name=systemd:/
4:memory:/process_api/d82b
2:cpu,cpuacct:/
0::/
"""
HYBRID_MOUNTS = """31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_proc_files_are_read() -> None:
    assert parse_proc_cgroup(HYBRID_CGROUP) == {"name=systemd": "/", "memory": "/process_api/d82b", "cpu": "/", "cpuacct": "/", "": "/"}
    assert parse_proc_cgroup("0::/user.slice/session-1.scope\n") == {"": "/user.slice/session-1.scope"}
    mounts = parse_mountinfo(HYBRID_MOUNTS + "50 31 0:40 /a\\040b /mnt/my\\040cg rw - cgroup2 none rw,nsdelegate\n")
    assert [(m.fstype, m.mountpoint) for m in mounts] == [
        ("cgroup", "/sys/fs/cgroup/memory"), ("cgroup", "/sys/fs/cgroup/cpu,cpuacct"), ("cgroup2", "/sys/fs/cgroup/unified"), ("cgroup2", "/mnt/my cg"),
    ]
    assert "memory" in mounts[0].options and mounts[3].root == "/a b"
    assert parse_keyed("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\n") == {"low": 0, "high": 0, "max": 12, "oom": 2, "oom_kill": 1}
    assert parse_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")["oom_kill"] == 3


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_v2_is_preferred_where_it_offers_memory_else_v1(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "memory", tmp_path / "unified"
    _tree(tmp_path, {"memory/process_api/d82b/memory.limit_in_bytes": "9223372036854771712\n", "unified/cgroup.controllers": "cpu io pids\n"})
    mounts = f"35 31 0:32 / {v1} rw - cgroup cgroup rw,memory\n41 31 0:38 / {v2} rw - cgroup2 cgroup2 rw\n"
    found, why = find_own_group(HYBRID_CGROUP, mounts)
    assert found is not None and found.hierarchy.version == 1 and found.own == v1 / "process_api/d82b" and not why
    (v2 / "cgroup.controllers").write_text("cpu io memory pids\n")
    found, _ = find_own_group(HYBRID_CGROUP, mounts)
    assert found is not None and found.hierarchy.version == 2 and found.own == v2
    # A container's namespace: the mount's root is its own group, /proc/self/cgroup says "/".
    _tree(tmp_path, {"ns/cgroup.controllers": "memory\n"})
    found, _ = find_own_group("0::/\n", f"41 31 0:38 /kubepods/pod1 {tmp_path / 'ns'} rw - cgroup2 cgroup2 rw\n")
    assert found is not None and found.own == tmp_path / "ns"
    found, why = find_own_group("0::/x\n", f"41 31 0:38 / {tmp_path / 'none'} rw - cgroup2 cgroup2 rw\n")
    assert found is None and "cannot be read" in why and "no cgroup v1 memory hierarchy" in why


def test_v2_subtree_moves_the_kernel_out_of_its_own_group(tmp_path: Path) -> None:
    """The no-internal-processes rule: the kernel's group holds the kernel, so the kernel moves
    into llmos-<pid>/kernel before the group hands +memory down, and workers get leaves beside it."""
    own = tmp_path / "service"
    base = own / f"llmos-{os.getpid()}"
    _tree(tmp_path, {
        "service/cgroup.controllers": "cpu memory\n", "service/cgroup.subtree_control": "\n", "service/cgroup.procs": f"{os.getpid()}\n",
        f"{base.relative_to(tmp_path)}/cgroup.subtree_control": "", f"{base.relative_to(tmp_path)}/kernel/cgroup.procs": "",
        f"{base.relative_to(tmp_path)}/probe/memory.max": "max\n",
    })
    cgroups = MemoryCgroups(CgroupV2(), own, tmp_path)
    cgroups.open()
    assert (base / "kernel" / "cgroup.procs").read_text() == str(os.getpid())
    assert (own / "cgroup.subtree_control").read_text() == "+memory"
    assert (base / "cgroup.subtree_control").read_text() == "+memory"
    assert (base / "probe" / "memory.max").read_text() == str(64 << 20)  # the probe's limit, read back
    # Another process in the kernel's group: refused, saying how to boot it instead.
    (own / "cgroup.subtree_control").write_text("\n")
    (own / "cgroup.procs").write_text(f"{os.getpid()}\n1\n")
    with pytest.raises(OSError, match=r"also holds processes that are not the kernel's \(1\).*systemd-run --scope -p Delegate=yes"):
        CgroupV2().prepare(own, base, tmp_path)


def test_group_files_v1_and_v2(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "v2/memory.max": "max\n", "v2/memory.swap.max": "max\n", "v2/memory.events": "low 0\nhigh 0\nmax 40\noom 1\noom_kill 1\n",
        "v2/memory.current": "1000\n", "v2/memory.stat": "anon 600\ninactive_file 300\n",
        "v1/memory.limit_in_bytes": "9223372036854771712\n", "v1/memory.memsw.limit_in_bytes": "9223372036854771712\n",
        "v1/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "v1/memory.failcnt": "17\n",
        "v1/memory.max_usage_in_bytes": "67108864\n", "v1/memory.usage_in_bytes": "5000\n", "v1/memory.stat": "cache 100\ntotal_inactive_file 1000\n",
    })
    v2, v1 = CgroupV2(), CgroupV1()
    v2.set_limit(tmp_path / "v2", 64 << 20)
    assert v2.limit(tmp_path / "v2") == 64 << 20 and (tmp_path / "v2/memory.swap.max").read_text() == "0"
    stats = v2.stats(tmp_path / "v2")
    assert (stats.oom_kills, stats.limit_hits, stats.peak) == (1, 40, 1000)  # no memory.peak (before Linux 5.19): current
    (tmp_path / "v2/memory.peak").write_text("67108864\n")
    assert v2.stats(tmp_path / "v2").peak == 64 << 20
    assert v2.working_set(tmp_path / "v2") == 700
    v1.set_limit(tmp_path / "v1", 64 << 20)
    assert v1.limit(tmp_path / "v1") == 64 << 20 and (tmp_path / "v1/memory.memsw.limit_in_bytes").read_text() == str(64 << 20)
    stats = v1.stats(tmp_path / "v1")
    assert (stats.oom_kills, stats.limit_hits, stats.peak) == (2, 17, 64 << 20)
    (tmp_path / "v1/memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")  # before Linux 4.13
    assert v1.stats(tmp_path / "v1").oom_kills is None
    assert v1.working_set(tmp_path / "v1") == 4000


def test_container_ceiling_is_the_tightest_limit_above(tmp_path: Path) -> None:
    from llmos.kernel.limits import Found

    _tree(tmp_path, {"memory.limit_in_bytes": "9223372036854771712\n", "pod/memory.limit_in_bytes": str(2 << 30), "pod/c/memory.limit_in_bytes": str(4 << 30)})
    found = Found(CgroupV1(), tmp_path / "pod" / "c", tmp_path)
    ceiling = container_ceiling(found, 16 << 30)
    assert ceiling is not None and ceiling[0] == tmp_path / "pod" and ceiling[2] == 2 << 30
    assert container_ceiling(found, 1 << 30) is None  # the machine is smaller than every limit


def test_guard_stops_lowest_priority_then_most_recent() -> None:
    jobs = [Victim(1, 0, 100.0), Victim(2, 0, 200.0), Victim(3, -1, 50.0), Victim(4, 5, 300.0)]
    assert choose_victim(jobs).job_id == 3
    assert choose_victim(j for j in jobs if j.job_id != 3).job_id == 2
    assert choose_victim([]) is None


def test_reasons_and_thresholds() -> None:
    assert exceeded_reason(200 << 20, 64 << 20) == "exceeded its memory (200.0MiB used of 64.0MiB reserved)"
    assert guard_reason(1 << 30, 16 << 30) == "stopped to keep the machine from running out of memory: 1.0GiB free of 16.0GiB"
    assert min_free("5%", 1000) == 50 and min_free("2GiB", 1) == 2 << 30 and min_free("", 1000) == 0 and min_free(" 100% ", 1000) == 1000
    for bad in ("lots", "150%", "-1%"):
        with pytest.raises(ValueError):
            min_free(bad, 1000)


@pytest.mark.parametrize(("key", "value", "words"), [
    ("memory", "strict", "limits.memory must be 'enforce' or 'report', got 'strict'"),
    ("cgroup", "v3", "limits.cgroup must be 'auto' or 'off'"),
    ("node_min_free", "lots", "limits.node_min_free must be a share such as '5%' or a size such as '2GiB'"),
    ("guard_interval", 0, "limits.guard_interval must be a number of seconds above 0"),
])
def test_bad_limits_settings_are_refused(key: str, value: object, words: str) -> None:
    settings = load_settings(environ={}, overrides={"limits.cgroup": "off", f"limits.{key}": value})["limits"]
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Limits(settings, {}, {}, lambda topic, msg: None, lambda job, why: None)
