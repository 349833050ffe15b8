"""The device table: fake GPUs, best-fit placement, release."""

from __future__ import annotations

import pytest

from llmos.errors import ConfigError, ResourceError
from llmos.kernel.devices import DeviceTable, parse_fake_gpus
from llmos.plugin import Resources

GiB = 1024**3


def test_parse_fake_gpus() -> None:
    assert parse_fake_gpus("2x24GiB") == [24 * GiB, 24 * GiB]
    assert parse_fake_gpus("24GiB, 16GiB") == [24 * GiB, 16 * GiB]
    assert parse_fake_gpus("") == []
    with pytest.raises(ConfigError):
        parse_fake_gpus("lots")


def test_best_fit_by_bytes() -> None:
    table = DeviceTable(8, 64 * GiB, [24 * GiB, 16 * GiB, 80 * GiB])
    p = table.place(Resources(cpus=1, gpus=0.5, gpu_memory=12 * GiB))
    assert p["gpus"][0]["id"] == "gpu1"  # the 16 GiB one leaves the least over
    table.reserve(1, p)
    p2 = table.place(Resources(cpus=1, gpus=0.5, gpu_memory=12 * GiB))
    assert p2["gpus"][0]["id"] == "gpu0"
    whole = table.place(Resources(cpus=1, gpus=1))
    assert whole["gpus"][0]["id"] == "gpu0" and whole["gpus"][0]["memory"] == 24 * GiB
    table.release(1)
    assert table.gpus[1].share_reserved == 0 and table.gpus[1].memory_reserved == 0
    table.release(1)  # twice is harmless
    assert table.gpus[1].memory_reserved == 0


def test_cpu_and_memory_limits_and_never_fits() -> None:
    table = DeviceTable(2, 8 * GiB, [])
    table.reserve(1, table.place(Resources(cpus=2)))
    assert table.place(Resources(cpus=1)) is None
    assert table.place(Resources(cpus=0)) is not None
    with pytest.raises(ResourceError, match="asked for 1 GPU"):
        table.check(Resources(gpus=1))
    with pytest.raises(ResourceError, match="asked for 3 CPU cores"):
        table.check(Resources(cpus=3))
    with pytest.raises(ResourceError, match="RAM"):
        table.check(Resources(memory=9 * GiB))


def test_real_gpus_before_fake_ones() -> None:
    """Fake GPUs simulate placement: where a real GPU fits, a job gets it even if a fake one fits tighter."""
    table = DeviceTable(8, 64 * GiB, [8 * GiB, 8 * GiB])
    table.add_probed([{"index": 0, "name": "real", "memory_total": 80 * GiB}], "nvml")
    assert [(g.id, g.fake) for g in table.gpus] == [("gpu0", False), ("gpu1", True), ("gpu2", True)]
    share = table.place(Resources(cpus=1, gpus=0.5, gpu_memory=GiB))
    assert share["gpus"][0]["id"] == "gpu0" and not share["gpus"][0]["fake"]
    two = table.place(Resources(cpus=1, gpus=2))
    assert [g["id"] for g in two["gpus"]] == ["gpu0", "gpu1"]  # the real one, then the tightest fake one
    table.reserve(1, table.place(Resources(cpus=1, gpus=1)))
    assert table.place(Resources(cpus=1, gpus=0.5, gpu_memory=GiB))["gpus"][0]["id"] == "gpu1"  # fake ones when no real one is free
