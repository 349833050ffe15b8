"""The model lifecycle end to end with real models: `llmos demo --small` from no kernel (train,
structured prune, int8 and int4, compare, sample, serve), as CI runs it from a clean checkout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmos
from tests.conftest import cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def test_demo_small_runs_the_lifecycle_from_no_kernel_and_leaves_the_model_served(short_tmp: Path) -> None:
    state = short_tmp / "s"
    proc = cli("demo", "--small", "--json", state_dir=state, timeout=400, env={"LLMOS_MONITOR_AUTOSTART": "0"})
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1]
    try:
        assert summary["kernel_started"] is True
        stages = {s["name"]: s for s in summary["pipeline"]["stages"]}
        assert [s["state"] for s in stages.values()] == ["succeeded"] * 6 + ["serving"], stages
        assert any(line.get("topic", "").endswith(".stage") for line in lines[:-1])  # the live events came first
        models = {m["stage"]: m for m in summary["models"]}
        assert set(models) == {"train", "prune", "int8", "int4"}
        for name, m in models.items():
            assert m["accepted"] and m["artifact"] == stages[name]["artifact"] and m["ppl"] > 1 and m["bytes"] > 0
        assert models["int4"]["bytes"] < models["int8"]["bytes"] < models["prune"]["bytes"] < models["train"]["bytes"]
        best = [name for name, m in models.items() if m["best"]]
        assert best == ["int4"]  # the smallest that passed its gate
        assert summary["served"]["artifact"] == stages["int4"]["artifact"] and summary["sample"]["text"]
        with llmos.connect(state) as client:
            assert [s["name"] for s in client.services()] == ["quickstart"]
            assert client.generate("quickstart", "import os\\n", max_new_tokens=8, temperature=0).finish_reason in ("length", "stop")
            tree = client.lineage(stages["int4"]["artifact"])
            chain = []
            while tree:
                chain.append(tree["job_kind"])
                tree = tree["parents"][0] if tree["parents"] else None
            assert chain == ["quantize", "prune", "train"]
        status = cli("pipeline", "status", str(summary["pipeline"]["id"]), state_dir=state).stdout
        assert "quickstart-small: succeeded" in status and "◉ serve" in status
    finally:
        cli("shutdown", state_dir=state, check=False)
