"""``llmos demo``: the whole lifecycle on this machine, as one pipeline.

It starts a kernel if none runs (in the background, as ``llmos boot --detach`` does), runs
``examples/pipelines/quickstart.toml`` (train, prune, quantize int8 and int4, compare, serve the
best, write a sample) with a live view of its stages, and ends with a table of the models, the
sample, and how to talk to the served model and stop everything. The kernel and the service are
left running.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import click

import llmos
from llmos.client import Client
from llmos.errors import KernelUnavailable, LlmosError
from llmos.kernel.cli.common import echo_json, json_option, state_dir_option
from llmos.paths import resolve_state_dir
from llmos.pipeline import load_pipeline_file
from llmos.units import format_size

#: The pipeline (shipped with the package; examples/pipelines/quickstart.toml links to it).
QUICKSTART = Path(__file__).resolve().parents[2] / "config" / "pipelines" / "quickstart.toml"
SERVICE = "quickstart"

#: ``--small``: the same graph on a nano model, for CI (well under a minute on two cores).
SMALL = {
    "train": {"preset": "nano", "steps": 40, "max_bytes": 400_000, "eval_batches": 2},
    "prune": {"heal_steps": 8, "eval_windows": 4, "calib_tokens": 1024, "speed_tokens": 8},
    "int8": {"eval_windows": 4, "speed_tokens": 8},
    "int4": {"eval_windows": 4, "speed_tokens": 8},
    "compare": {"eval_windows": 4, "speed_tokens": 8},
    "sample": {"max_new_tokens": 16},
    "serve": {"max_len": 128},
}


def _spec(small: bool) -> dict[str, Any]:
    spec = load_pipeline_file(_pipeline_file())
    if small:
        spec = copy.deepcopy(spec)
        spec["name"] = "quickstart-small"
        for stage, extra in SMALL.items():
            if stage in spec["stages"]:
                spec["stages"][stage].setdefault("params", {}).update(extra)
    return spec


def _pipeline_file() -> Path:
    from importlib.resources import files

    packaged = Path(str(files("llmos.config") / "pipelines" / "quickstart.toml"))
    return packaged if packaged.exists() else QUICKSTART


def _connect(state: Path, quiet: bool) -> tuple[Client, bool]:
    try:
        return llmos.connect(state), False
    except KernelUnavailable:
        from llmos.kernel.cli.kernel import _boot_detached

        _boot_detached(state, None, None, None, False, quiet=quiet)
        return llmos.connect(state), True


def _stop_earlier(client: Client, quiet: bool) -> None:
    """An earlier demo's service holds the name: stop it, so one name never serves two models."""
    for svc in client.services():
        if svc["name"] == SERVICE:
            for replica in svc["replicas"]:
                client.job(replica["job_id"]).cancel("replaced by a new llmos demo")
                if not quiet:
                    click.echo(f"stopping the earlier demo's service {SERVICE!r} (job {replica['job_id']})")
                client.job(replica["job_id"]).wait(timeout=60)


@click.command()
@click.option("--small", is_flag=True, help="The same graph on a nano model (well under a minute; for CI).")
@state_dir_option
@json_option
def demo(small: bool, state_dir: Path | None, as_json: bool) -> None:
    """Train, prune, quantize, evaluate and serve a model on this machine, as one pipeline.

    Starts a kernel if none runs and leaves it running with the best model served as
    'quickstart' (stop everything with `llmos shutdown`). About 5 minutes on two cores.
    """
    state = resolve_state_dir(state_dir)
    client, started = _connect(state, as_json)
    with client:
        _stop_earlier(client, as_json)
        handle = client.pipeline(_spec(small))
        if as_json:
            for event in handle.events(follow=True):
                echo_json({"seq": event.seq, "topic": event.topic, **event.body})
            info = handle.info()
        else:
            from llmos.kernel.cli.live import PipelineView

            click.echo(f"llmos demo: pipeline {handle.id}, {len(handle.info(cached=True)['stages'])} stages (state dir {state})")
            with PipelineView(client, handle, title=f"llmos demo (pipeline {handle.id})") as view:
                info = view.run()
        summary = _summary(client, info)
    if as_json:
        echo_json({"pipeline": info, **summary, "kernel_started": started})
    else:
        _print_summary(info, summary)
    ok = summary["served"] is not None and summary["sample"] is not None
    if not ok:
        sys.exit(1)


def _summary(client: Client, info: dict[str, Any]) -> dict[str, Any]:
    stages = {s["name"]: s for s in info["stages"]}
    by_path: dict[str, tuple[str, str]] = {}  # model path -> (stage, artifact id)
    for s in info["stages"]:
        if s.get("artifact") and s["kind"] != "serve":
            try:
                by_path[client.artifact(s["artifact"])["path"]] = (s["name"], s["artifact"])
            except LlmosError:
                pass
    models = []
    compare = stages.get("compare")
    rows = []
    if compare and compare["state"] == "succeeded" and compare["job_id"]:
        result = client.job(compare["job_id"]).info().result or {}
        rows = result.get("models", [])
        best = result.get("best")
    else:
        best = None
    seen = set()
    for row in rows:
        stage, art = by_path.get(row["model"], (Path(row["model"]).name, None))
        seen.add(stage)
        models.append({
            "stage": stage, "artifact": art, "bytes": row.get("bytes"), "ppl": row.get("ppl"),
            "decode_tokens_per_s": (row.get("tokens_per_s") or {}).get("batch_1"), "accepted": not row.get("rejected"), "best": row["model"] == best,
        })
    for s in info["stages"]:
        if s["kind"] in ("train", "prune", "quantize") and s["name"] not in seen:
            models.append({"stage": s["name"], "artifact": s.get("artifact"), "bytes": None, "ppl": None, "decode_tokens_per_s": None,
                           "accepted": False, "best": False, "state": s["state"], "reason": s.get("reason")})
    sample = None
    if stages.get("sample", {}).get("state") == "succeeded":
        result = client.job(stages["sample"]["job_id"]).info().result or {}
        done = result.get("completions") or []
        sample = {"prompt": done[0].get("prompt"), "text": done[0].get("text")} if done else None
    serve = stages.get("serve")
    served = {"service": SERVICE, "job_id": serve["job_id"], "artifact": serve.get("artifact")} if serve and serve["state"] == "serving" else None
    return {"models": models, "sample": sample, "served": served}


def _print_summary(info: dict[str, Any], summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="models", title_justify="left")
    for col in ("model", "size", "perplexity", "decode tok/s", "gate", "artifact"):
        table.add_column(col, justify="right" if col in ("size", "perplexity", "decode tok/s") else "left")
    for m in summary["models"]:
        gate = "best, served" if m["best"] and summary["served"] else ("accepted" if m["accepted"] else m.get("state", "rejected"))
        table.add_row(
            m["stage"], format_size(m["bytes"]) if m["bytes"] else "-", f"{m['ppl']:.2f}" if m["ppl"] else "-",
            f"{m['decode_tokens_per_s']:.0f}" if m["decode_tokens_per_s"] else "-", gate, (m["artifact"] or "-")[:12],
        )
    console.print(table)
    for s in info["stages"]:
        if s["state"] in ("failed", "rejected", "skipped"):
            console.print(f"[yellow]{s['name']} {s['state']}[/]: {s['reason']}")
    if summary["sample"]:
        console.print("[bold]sample[/] (from the best model):")
        console.print(summary["sample"]["prompt"] + summary["sample"]["text"], markup=False, highlight=False)
    if summary["served"]:
        console.print(f"\nThe best model is served as [bold]{SERVICE}[/] (job {summary['served']['job_id']}). Talk to it:")
        console.print(f"  llmos generate {SERVICE} 'def add(a, b):' --max-new-tokens 32", markup=False)
        console.print(f"  python -c \"import llmos; print(llmos.connect().generate('{SERVICE}', 'import os', max_new_tokens=32, temperature=0).text)\"", markup=False)
        lineage = (summary["served"]["artifact"] or "ID")[:12]
        console.print(f"See everything: llmos pipeline status {info['id']}, llmos artifacts lineage {lineage}. Stop it all: llmos shutdown", markup=False)
    else:
        console.print(f"[red]nothing was served[/]: pipeline {info['id']} {info['state']} ({info.get('reason')})")
