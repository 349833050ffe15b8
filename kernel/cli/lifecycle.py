"""The model lifecycle: ``llmos artifacts`` and ``llmos pipeline``."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from llmos.artifacts import tree_hash
from llmos.client import Client
from llmos.kernel.cli.common import _table, echo_json, json_option, state_dir_option, with_client
from llmos.kernel.cli.live import MARKS
from llmos.units import format_size


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 90 else f"{s / 60:.0f}m ago" if s < 5400 else f"{s / 3600:.1f}h ago"


# ---------------------------------------------------------------------------------------------
# artifacts


@click.group(invoke_without_command=True)
@state_dir_option
@json_option
@click.option("--all", "show_all", is_flag=True, help="Removed artifacts too (their rows stay for lineage).")
@click.pass_context
def artifacts(ctx: click.Context, state_dir: Path | None, as_json: bool, show_all: bool) -> None:
    """The models jobs produced, content-addressed, with where they came from.

    Jobs take them as inputs by `artifact:<id>` (a unique prefix is enough) or `job:<id>` (that
    job's newest checkpoint). Without a subcommand: the list.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_artifacts, state_dir=state_dir, as_json=as_json, show_all=show_all)


@artifacts.command("list")
@with_client
@json_option
@click.option("--all", "show_all", is_flag=True, help="Removed artifacts too.")
def list_artifacts(client: Client, as_json: bool, show_all: bool = False) -> None:
    """List artifacts, newest first."""
    rows = client.artifacts(all=show_all)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no artifacts yet: a job that writes a checkpoint (llmos train, prune, quantize) registers one")
        return
    _table(
        [[a["id"][:12], a["job_kind"] or "-", str(a["job_id"] or "-"), format_size(a["size"]), "rejected" if a["rejected"] else ("removed" if a["removed_at"] else "ok"),
          _age(a["created_at"]), a["path"]] for a in rows],
        ["ID", "MADE BY", "JOB", "SIZE", "STATE", "CREATED", "PATH"],
    )


@artifacts.command("show")
@click.argument("ref")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Hash the files and say whether they are intact.")
@with_client
@json_option
def show_artifact(client: Client, ref: str, verify: bool, as_json: bool) -> None:
    """Show one artifact: its provenance, parents, and the jobs that used it."""
    art = client.artifact(ref)
    if verify:
        art["intact"] = _verify(art)
    if as_json:
        echo_json(art)
        return
    click.echo(f"artifact  {art['id']}")
    click.echo(f"path      {art['path']}  ({format_size(art['size'])}, {art['files']} files)")
    click.echo(f"made by   job {art['job_id']} ({art['job_kind']}), {_age(art['created_at'])}")
    if art["rejected"]:
        why = art.get("rejected_reason") or {}
        click.echo(f"rejected  {why.get('reason', why) if isinstance(why, dict) else why}")
    if art["removed_at"]:
        click.echo(f"removed   {art['removed_why']}")
    click.echo("parents   " + (", ".join(p[:12] for p in art["parents"]) or "none"))
    click.echo("used by   " + (", ".join(f"job {j}" for j in art["used_by"]) or "no job yet"))
    if verify:
        click.echo(f"files     {art['intact']}")
    data = (art.get("provenance") or {}).get("data")
    if data:
        click.echo(f"data      {data.get('source')} (tokens sha256 {str(data.get('tokens_sha256', '-'))[:12]})")


def _verify(art: dict[str, Any]) -> str:
    try:
        digest = tree_hash(art["path"])[0]
    except FileNotFoundError:
        return "missing"
    return "intact" if digest == art["id"] else f"altered (now {digest[:12]})"


@artifacts.command("lineage")
@click.argument("ref")
@with_client
@json_option
def lineage(client: Client, ref: str, as_json: bool) -> None:
    """The chain an artifact came from, back to its training data, as a tree."""
    tree = client.lineage(ref)
    if as_json:
        echo_json(tree)
        return

    def draw(node: dict[str, Any], prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        if node.get("missing"):
            click.echo(f"{prefix}{branch}{node['id'][:12]}  (no record)")
            return
        state = " rejected" if node["rejected"] else (" removed" if node.get("removed_at") else "")
        data = node.get("data")
        where = f"  data {data.get('source')}" + (f" ({data['train_tokens']:,} tokens)" if data.get("train_tokens") else "") if data else ""
        click.echo(f"{prefix}{branch}{node['id'][:12]}  {node['job_kind'] or '-'} (job {node['job_id']}){state}  {format_size(node['size'])}{where}")
        children = node.get("parents", [])
        for i, child in enumerate(children):
            draw(child, prefix + ("" if top else ("   " if last else "│  ")), i == len(children) - 1, False)

    draw(tree, "", True, True)


@artifacts.command("export")
@click.argument("ref")
@click.argument("path", type=click.Path(path_type=Path))
@with_client
@json_option
def export(client: Client, ref: str, path: Path, as_json: bool) -> None:
    """Copy an artifact's files to PATH (a new directory), after checking they are intact."""
    art = client.artifact(ref)
    state = _verify(art)
    if state != "intact":
        raise click.ClickException(f"artifact {art['id'][:12]} is {state}: not exported")
    if path.exists():
        raise click.ClickException(f"{path} exists: give a new directory")
    src = Path(art["path"])
    if src.is_dir():
        shutil.copytree(src, path)
    else:
        shutil.copy2(src, path)
    if as_json:
        echo_json({"id": art["id"], "path": str(path.absolute())})
    else:
        click.echo(f"exported {art['id'][:12]} to {path}")


@artifacts.command("rm")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Remove even a job's final output or a pipeline's (never one a running job uses).")
@with_client
@json_option
def remove(client: Client, ref: str, force: bool, as_json: bool) -> None:
    """Remove an artifact (its files, when they are in the state directory)."""
    art = client.remove_artifact(ref, force=force)
    if as_json:
        echo_json(art)
    else:
        click.echo(f"removed {art['id'][:12]} ({art['removed_why']})")


@artifacts.command("gc")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@with_client
@json_option
def gc(client: Client, dry_run: bool, as_json: bool) -> None:
    """Remove artifacts nothing references: not used by a pending or running job or service, not
    a pipeline stage's output, not a succeeded job's final output (intermediate checkpoints,
    outputs of failed jobs)."""
    gone = client.gc_artifacts(dry_run=dry_run)
    if as_json:
        echo_json(gone)
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(gone)} artifact(s), {format_size(sum(a['size'] for a in gone))}")
    for a in gone:
        click.echo(f"  {a['id'][:12]}  job {a['job_id']}  {a['path']}")


# ---------------------------------------------------------------------------------------------
# pipelines


@click.group()
@state_dir_option
def pipeline(state_dir: Path | None) -> None:
    """Graphs of jobs: train, prune, quantize, evaluate, serve, from one TOML file.

    Each [stages.<name>] table has a kind, params and resources; a parameter names an earlier
    stage's output as "${stage.model}" (its artifact) or "${stage.<result key>}". See
    examples/pipelines/quickstart.toml.
    """


@pipeline.command("run")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-f", "--follow", is_flag=True, help="Show the stages live until the pipeline ends; exit non-zero unless it succeeded.")
@with_client
@json_option
def run(client: Client, file: Path, follow: bool, as_json: bool) -> None:
    """Run the pipeline in FILE (checked whole before anything runs)."""
    handle = client.pipeline(file)
    if not follow:
        info = handle.info(cached=True)
        if as_json:
            echo_json(info)
        else:
            click.echo(f"pipeline {handle.id} ({info['name']}) started: {len(info['stages'])} stages; follow it with `llmos pipeline status {handle.id} --follow`")
        return
    info = follow_pipeline(client, handle.id, as_json)
    if info["state"] != "succeeded":
        sys.exit(1)


def follow_pipeline(client: Client, pipeline_id: int, as_json: bool) -> dict[str, Any]:
    """Print the pipeline's changes until it ends (JSON lines, or a live view); its record."""
    handle = client.get_pipeline(pipeline_id)
    if as_json:
        for event in handle.events(follow=True):
            echo_json({"seq": event.seq, "topic": event.topic, **event.body})
        return handle.info()
    from llmos.kernel.cli.live import PipelineView

    with PipelineView(client, handle) as view:
        view.run()
    info = handle.info()
    draw_pipeline(info)
    return info


def draw_pipeline(info: dict[str, Any]) -> None:
    click.echo(f"pipeline {info['id']} {info['name']}: {info['state']}" + (f" ({info['reason']})" if info.get("reason") and info["state"] != "running" else ""))
    for stage in info["stages"]:
        needs = f"  <- {', '.join(stage['needs'])}" if stage["needs"] else ""
        job = f"job {stage['job_id']}" if stage["job_id"] else "no job yet"
        art = f"  artifact {stage['artifact'][:12]}" if stage.get("artifact") else ""
        why = f"  ({stage['reason']})" if stage.get("reason") and stage["state"] not in ("succeeded", "running", "serving") else ""
        click.echo(f"  {MARKS.get(stage['state'], '?')} {stage['name']:<12} {stage['kind']:<10} {stage['state']:<10} {job}{art}{needs}{why}")


@pipeline.command("status")
@click.argument("pipeline_id", type=int)
@click.option("-f", "--follow", is_flag=True, help="Keep showing it until it ends.")
@with_client
@json_option
def status(client: Client, pipeline_id: int, follow: bool, as_json: bool) -> None:
    """Draw a pipeline's graph with each stage's state."""
    if follow:
        follow_pipeline(client, pipeline_id, as_json)
        return
    info = client.get_pipeline(pipeline_id).info(cached=True)
    if as_json:
        echo_json(info)
    else:
        draw_pipeline(info)


@pipeline.command("list")
@click.option("--limit", type=int, default=100, show_default=True)
@with_client
@json_option
def list_pipelines(client: Client, limit: int, as_json: bool) -> None:
    """Pipelines, newest first."""
    rows = client.pipelines(limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no pipelines yet: `llmos pipeline run FILE.toml` (or `llmos demo`)")
        return
    _table(
        [[str(p["id"]), p.get("name", "-"), p["state"], " ".join(f"{MARKS.get(s['state'], '?')}{s['name']}" for s in p["stages"]), _age(p.get("created_at"))] for p in rows],
        ["ID", "NAME", "STATE", "STAGES", "CREATED"],
    )


@pipeline.command("cancel")
@click.argument("pipeline_id", type=int)
@with_client
@json_option
def cancel(client: Client, pipeline_id: int, as_json: bool) -> None:
    """Cancel a pipeline: its running stages' jobs (services included) and what waits."""
    info = client.get_pipeline(pipeline_id).cancel()
    if as_json:
        echo_json(info)
    else:
        click.echo(f"pipeline {pipeline_id}: cancelling ({sum(1 for s in info['stages'] if s['state'] in ('running', 'serving'))} running stage(s) asked to stop)")


@pipeline.command("resume")
@click.argument("pipeline_id", type=int)
@click.option("-f", "--follow", is_flag=True, help="Show the stages live until the pipeline ends.")
@with_client
@json_option
def resume(client: Client, pipeline_id: int, follow: bool, as_json: bool) -> None:
    """Run again what did not finish; stages whose inputs and parameters are unchanged and whose
    artifact exists are kept."""
    info = client.get_pipeline(pipeline_id).resume()
    if follow:
        info = follow_pipeline(client, pipeline_id, as_json)
        if info["state"] != "succeeded":
            sys.exit(1)
        return
    if as_json:
        echo_json(info)
    else:
        kept = [s["name"] for s in info["stages"] if s["state"] == "succeeded"]
        click.echo(f"pipeline {pipeline_id} resumed; kept: {', '.join(kept) or 'nothing'}")
