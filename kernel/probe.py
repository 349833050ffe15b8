"""Find the machine's GPUs; run as ``python -m llmos.kernel.probe`` so the kernel never imports torch.

Prints one JSON object: ``{"source": "nvml" | "torch" | "none", "gpus": [{index, name, memory_total}], "error": ...}``.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys
import time
from typing import Any


def probe_nvml() -> list[dict[str, Any]]:
    import pynvml

    pynvml.nvmlInit()
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name), "memory_total": int(mem.total)})
        return out
    finally:
        pynvml.nvmlShutdown()


def probe_torch() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": props.name, "memory_total": int(props.total_memory)})
    return out


def _has_gpu_device_files() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


def probe() -> dict[str, Any]:
    errors = []
    if importlib.util.find_spec("pynvml") is not None:
        try:
            return {"source": "nvml", "gpus": probe_nvml()}
        except Exception as exc:
            errors.append(f"nvml: {type(exc).__name__}: {exc}")
    # torch takes seconds to import: only when the machine shows GPU device files.
    if importlib.util.find_spec("torch") is not None and _has_gpu_device_files():
        try:
            return {"source": "torch", "gpus": probe_torch()}
        except Exception as exc:
            errors.append(f"torch: {type(exc).__name__}: {exc}")
    return {"source": "none", "gpus": [], "error": "; ".join(errors) or None}


if __name__ == "__main__":
    # LLMOS_PROBE_DELAY: seconds to wait first, as a slow probe (torch starting CUDA) would; for tests.
    time.sleep(float(os.environ.get("LLMOS_PROBE_DELAY") or 0))
    json.dump(probe(), sys.stdout)
    sys.stdout.write("\n")
