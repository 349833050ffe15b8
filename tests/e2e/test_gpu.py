"""Real GPUs, where the machine has them (the device machine): probe, placement, CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import KernelHandle, wait_for_gpu_probe


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="no NVIDIA GPU on this machine")
def test_real_gpus_are_probed_and_given_to_jobs(state_dir) -> None:
    handle = KernelHandle(state_dir, "--fake-gpus", "1x8GiB").boot()
    try:
        with handle.client() as c:
            wait_for_gpu_probe(c, timeout=60)
            gpus = [d for d in c.devices() if d["kind"] == "gpu"]
            real = [d for d in gpus if not d["fake"]]
            assert real and real[0]["memory_total"] > 1 << 30
            assert gpus[-1]["fake"]  # fake GPUs come after the real ones
            out = c.submit("diag.devices", params={"torch": True}, resources={"gpus": 1, "gpu_memory": "1GiB"}).result(timeout=120)
            assert out["cuda_visible_devices"] == str(real[0]["index"])
            assert out["torch"]["cuda_available"] and len(out["torch"]["devices"]) == 1
            cpu_only = c.submit("diag.devices", params={"torch": True}).result(timeout=120)
            assert cpu_only["cuda_visible_devices"] == "" and cpu_only["torch"]["devices"] == []
    finally:
        handle.shutdown()


def test_fake_gpu_jobs_see_no_real_device(client) -> None:
    out = client.submit("diag.devices", resources={"gpus": 1}).result(timeout=30)
    assert out["cuda_visible_devices"] == ""
    assert out["placement"]["gpus"][0]["fake"] is True
    assert out["gpus"] == [out["placement"]["gpus"][0]["index"]]
