"""``llmos train`` and ``llmos eval``: submit the job, then follow it with a progress line."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

import llmos
from llmos.console import ProgressPrinter


def _params(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="-p")
        out[key] = value
    return out


def model_path(model: str, state_dir: Path | None) -> str:
    """MODEL as an absolute checkpoint path: a directory, or ``job:ID`` (that job's newest checkpoint)."""
    if model.startswith("job:"):
        try:
            with llmos.connect(state_dir) as client:
                return client.resolve_model(model)
        except llmos.LlmosError as exc:
            raise click.ClickException(str(exc)) from None
    return str(Path(model).absolute())


def follow(job: llmos.Job, as_json: bool) -> llmos.JobInfo:
    """Print the job's progress: one updating line on a terminal, plain lines when piped. Ctrl-C
    stops following, not the job, and says so (and how to follow or cancel it)."""
    try:
        return _follow(job, as_json)
    except KeyboardInterrupt:
        click.echo(f"\nllmos: stopped following job {job.id}, which keeps running; follow it again with `llmos logs {job.id} -f`, "
                   f"stop it with `llmos cancel {job.id}`", err=True)
        sys.exit(130)


def _follow(job: llmos.Job, as_json: bool) -> llmos.JobInfo:
    printer = ProgressPrinter()
    for event in job.events(follow=True):
        if as_json:
            continue
        b = event.body
        if event.type == "job.state" and b.get("state") == "pending" and b.get("reason"):
            printer.line(f"pending: {b['reason']}")  # why it does not start yet
        elif event.type == "job.progress":
            printer.progress(b)
        elif event.type == "job.log" and b.get("event") in ("evaluated", "corpus_ready", "runner_failed", "distributed"):
            fields = " ".join(f"{k}={v}" for k, v in b.get("fields", {}).items() if k != "traceback")
            printer.line(f"{b['event']} {fields}")
        elif event.type == "job.artifact":
            printer.line(f"{b.get('kind', 'artifact')} {b['path']}")
    printer.close()
    return job.wait()


def _finish(info: llmos.JobInfo, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(info.to_dict(), default=str))
    elif info.state == "succeeded":
        r = info.result or {}
        summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "samples" and v is not None)
        click.echo(f"job {info.id} succeeded: {summary}")
        for s in r.get("samples", []):
            click.echo(f"  {s['prompt']!r} -> {s['completion']!r}")
    else:
        click.echo(f"llmos: job {info.id} {info.state}: {info.reason}", err=True)  # one line on stderr, as every failure
    if info.state != "succeeded":
        sys.exit(1)


def _submit(kind: str, params: dict[str, Any], state_dir: Path | None, cpus: float | None, gpus: float | None, detach: bool, as_json: bool) -> None:
    resources = {k: v for k, v in (("cpus", cpus), ("gpus", gpus)) if v is not None}
    try:
        with llmos.connect(state_dir) as client:
            job = client.submit(kind, params, resources, coerce=True)
            if detach:
                click.echo(json.dumps({"id": job.id}) if as_json else f"job {job.id} submitted ({kind}); follow it with: llmos logs {job.id} -f")
                return
            if not as_json:
                click.echo(f"job {job.id} submitted ({kind})")
            _finish(follow(job, as_json), as_json)
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None


_common = [
    click.option("-p", "--param", "extra", multiple=True, metavar="KEY=VALUE", help="Any other parameter (see `llmos plugins info lm`)."),
    click.option("--cpus", type=float, default=None, help="CPU cores to reserve (and torch threads)."),
    click.option("--gpus", type=float, default=None, help="GPUs to reserve."),
    click.option("--detach", is_flag=True, help="Submit and return; do not follow."),
    click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="The kernel's state directory."),
    click.option("--json", "as_json", is_flag=True, help="Print the final job record as JSON."),
]


def _with_common(f: Any) -> Any:
    for option in reversed(_common):
        f = option(f)
    return f


@click.command("train")
@click.option("--data", required=True, help="A text file, a directory of them, a .jsonl file, or 'stdlib'.")
@click.option("--preset", default=None, help="Model shape: nano, micro, small, llama-3.2-1b, ...")
@click.option("--steps", type=int, default=None, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=None, help="Sequences per micro-batch.")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence.")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--seed", type=int, default=None, help="Seed for weights and data order.")
@click.option("--output", default=None, help="Where to write the final checkpoint.")
@_with_common
def train_command(data: str, preset: str | None, steps: int | None, batch_size: int | None, seq_len: int | None, lr: float | None, seed: int | None,
                  output: str | None, extra: tuple[str, ...], cpus: float | None, gpus: float | None, detach: bool, state_dir: Path | None, as_json: bool) -> None:
    """Train a Llama-style model on text and follow it (step, loss, tokens/s, ETA)."""
    params: dict[str, Any] = {"data": str(Path(data).absolute()) if Path(data).exists() else data}
    for key, value in (("preset", preset), ("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len), ("lr", lr), ("seed", seed), ("output", output)):
        if value is not None:
            params[key] = str(value)
    params.update(_params(extra))
    _submit("train", params, state_dir, cpus, gpus, detach, as_json)


@click.command("generate")
@click.argument("model")
@click.argument("prompt")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Print text as it is made.")
@click.option("--max-new-tokens", type=int, default=None, help="Tokens to generate at most.")
@click.option("--temperature", type=float, default=None, help="0 is greedy (default: the model's generation_config.json, which llmos writes: 0.7 with top_p 0.9).")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--repetition-penalty", type=float, default=None)
@click.option("--seed", type=int, default=None, help="Make sampling repeatable.")
@click.option("--stop", multiple=True, help="Stop at this string (repeatable).")
@click.option("--stop-token", "stop_tokens", type=int, multiple=True, help="Stop at this token id (repeatable).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="The weights' type (a checkpoint only: a service has its own).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="The kernel's state directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the Completion as JSON.")
def generate_command(model: str, prompt: str, stream: bool, max_new_tokens: int | None, temperature: float | None, top_k: int | None, top_p: float | None,
                     repetition_penalty: float | None, seed: int | None, stop: tuple[str, ...], stop_tokens: tuple[int, ...], dtype: str | None,
                     state_dir: Path | None, as_json: bool) -> None:
    """Complete PROMPT with MODEL: a checkpoint directory, job:ID (that job's newest checkpoint)
    or the name of a running service (streamed to the terminal by default)."""
    options: dict[str, Any] = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
                                                  ("repetition_penalty", repetition_penalty), ("seed", seed)) if v is not None}
    if stop:
        options["stop"] = list(stop)
    if stop_tokens:
        options["stop_tokens"] = list(stop_tokens)
    try:
        with llmos.connect(state_dir) as client:
            if dtype is not None:
                # dtype is how a checkpoint is loaded for this job; a service loaded its model once.
                if not Path(client.resolve_model(model)).exists():
                    raise click.ClickException(f"--dtype is for a checkpoint; {model!r} is a service, which runs with the dtype it was started with (llmos serve --dtype)")
                options["dtype"] = dtype
            if stream and not as_json:
                for piece in client.generate(model, prompt, stream=True, **options):
                    click.echo(piece, nl=False)
                click.echo("")
                return
            completion = client.generate(model, prompt, **options)
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(completion.to_dict()))
    else:
        click.echo(completion.text)


@click.command("serve")
@click.argument("model")
@click.option("--name", default=None, help="The service name (default: the checkpoint directory's name).")
@click.option("--replicas", type=click.IntRange(1, 64), default=1, show_default=True, help="Workers behind the one name.")
@click.option("--max-seqs", type=int, default=None, help="Sequences decoded together per replica.")
@click.option("--max-len", type=int, default=None, help="Tokens per sequence (prompt and completion) each replica's KV cache holds.")
@click.option("--max-queue", type=int, default=None, help="Requests that may wait for a slot per replica; past that, 'busy'.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="The weights' type.")
@click.option("--allow-rejected", is_flag=True, default=None, help="Serve a checkpoint a quality gate rejected.")
@click.option("--kv-memory", default=None, metavar="SIZE", help="The KV cache's budget per replica (2GiB, bytes): sequences hold as many tokens as max-seqs of them fit in it (at most max-len).")
@click.option("-p", "--param", "extra", multiple=True, metavar="KEY=VALUE", help="Any other parameter (see `llmos plugins info lm`).")
@click.option("--cpus", type=float, default=None, help="CPU cores per replica (default: the cores free now, shared among the replicas; at least 1).")
@click.option("--gpus", type=float, default=None, help="GPUs per replica.")
@click.option("--http", "http", default=None, metavar="[HOST:]PORT", help="Also answer OpenAI's HTTP API there (starts or reuses an `llmos api` gateway).")
@click.option("--api-key", default=None, envvar="LLMOS_API_KEY", show_envvar=True, help="With --http: the key clients must send (needed off loopback).")
@click.option("--timeout", "wait_s", type=float, default=300, show_default=True, help="Seconds to wait for every replica to answer requests.")
@click.option("--follow", is_flag=True, help="Stay attached and print the replicas' logs (Ctrl-C detaches).")
@click.option("--replace", is_flag=True, help="If the name already serves another model, stop those replicas first (else that is refused).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="The kernel's state directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the service as JSON.")
def serve_command(model: str, name: str | None, replicas: int, max_seqs: int | None, max_len: int | None, max_queue: int | None, dtype: str | None,
                  allow_rejected: bool | None, kv_memory: str | None, extra: tuple[str, ...], cpus: float | None, gpus: float | None, http: str | None,
                  api_key: str | None, wait_s: float, follow: bool, replace: bool, state_dir: Path | None, as_json: bool) -> None:
    """Serve the checkpoint MODEL (a directory, or job:ID for that job's newest checkpoint);
    returns once every replica answers requests. If one fails first (or the wait times out),
    the replicas already started are cancelled. Without --cpus, the replicas take the cores that
    are free when they start, as other inference servers use the machine. With --http, the model
    also answers OpenAI's API (`llmos api`; the model name is the service name)."""
    from llmos.plugins.lm.serve import service_name

    if http is not None:
        from llmos.plugins.api import is_loopback
        from llmos.plugins.api.cli import parse_http

        http_at = parse_http(http)
        if not is_loopback(http_at[0]) and not api_key:
            raise click.ClickException(f"--http on {http_at[0]} (not a loopback address) needs an API key: give --api-key KEY or set LLMOS_API_KEY")

    path = model_path(model, state_dir)
    service = service_name(path, name or (f"job-{model[4:]}" if model.startswith("job:") else None))
    params: dict[str, Any] = {"model": path, "name": service}
    for key, value in (("max_seqs", max_seqs), ("max_len", max_len), ("max_queue", max_queue), ("dtype", dtype), ("kv_memory", kv_memory), ("allow_rejected", allow_rejected)):
        if value is not None:
            params[key] = value
    params.update(_params(extra))
    resources = {k: v for k, v in (("cpus", cpus), ("gpus", gpus)) if v is not None}
    try:
        with llmos.connect(state_dir) as client:
            _one_model_per_name(client, service, path, replace)
            if cpus is None:
                resources["cpus"] = free_cores(client, replicas)
            jobs: list[llmos.Job] = []
            try:
                for _ in range(replicas):
                    jobs.append(client.submit("serve", params, resources, coerce=True))
                entry = _wait_for_replicas(client, service, jobs, wait_s)
            except BaseException:
                # Half a service is no service: take back what was started (Ctrl-C included).
                for job in jobs:
                    with contextlib.suppress(llmos.LlmosError):
                        job.cancel(f"llmos serve {service!r} did not come up")
                raise
            if http is not None:
                from llmos.plugins.api.cli import start_gateway

                entry = {**entry, "http": start_gateway(client, *http_at, api_key)}
            if as_json:
                click.echo(json.dumps(entry))
            else:
                click.echo(f"serving {model} as {service!r} ({replicas} replica(s) of {resources['cpus']:g} core(s): jobs {', '.join(str(j.id) for j in jobs)}); "
                           f"try: llmos generate {service} \"hello\"")
                if http is not None:
                    click.echo(f"OpenAI-compatible API at {entry['http']['url']}/v1 (model {service!r}, gateway job {entry['http']['job_id']})")
            if follow:
                for event in client.events("job.", follow=True):
                    if event.topic.split(".")[1] in {str(j.id) for j in jobs} and event.type in ("job.log", "job.state"):
                        click.echo(f"job {event.topic.split('.')[1]}: {event.type} {json.dumps(event.body)}")
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None


def _one_model_per_name(client: llmos.Client, service: str, path: str, replace: bool) -> None:
    """A name answers with one model: serving another under a running name is refused, unless
    ``replace`` (then the running replicas are stopped first). The same model adds replicas."""
    entry = next((s for s in client.services() if s["name"] == service), None)
    if entry is None:
        return
    want = str(Path(path).resolve())
    other = [r for r in entry["replicas"] if r.get("version") and r["version"] != want]
    if not other:
        return
    jobs = ", ".join(str(r["job_id"]) for r in other)
    if not replace:
        raise click.ClickException(
            f"service {service!r} already serves {other[0]['version']} (jobs {jobs}); serve {path} under another --name, "
            f"or replace it: llmos serve {path} --name {service} --replace"
        )
    for r in other:
        client.job(r["job_id"]).cancel(f"replaced by {path} (llmos serve --replace)")
    for r in other:
        client.job(r["job_id"]).wait(timeout=120)


def free_cores(client: llmos.Client, replicas: int = 1) -> float:
    """The whole CPU cores free in the device table now, shared among ``replicas`` (at least 1 each).
    On a cluster (a CPU per node): the cores of the node with the most free, when the replicas
    fit there together, else of the node with the fewest free among the ones that hold one each."""
    cpus = [d for d in client.devices() if d.get("kind") == "cpu"]
    if not cpus:
        return 1.0
    free = sorted((float(d.get("capacity", 1)) - float(d.get("share_reserved", 0)) for d in cpus), reverse=True)
    n = max(replicas, 1)
    if len(free) > 1 and int(free[0] + 1e-9) < n and len([f for f in free if f >= 1 - 1e-9]) >= n:
        return float(max(1, int(free[n - 1] + 1e-9)))  # one replica a node
    return float(max(1, int(free[0] + 1e-9) // n))


def _wait_for_replicas(client: llmos.Client, service: str, jobs: list[llmos.Job], wait_s: float) -> dict[str, Any]:
    """The service's entry once all of ``jobs`` answer under its name; ClickException if one ends first or time runs out."""
    deadline = time.monotonic() + wait_s
    while True:
        entry = next((s for s in client.services() if s["name"] == service), None)
        if entry and {r["job_id"] for r in entry["replicas"]} >= {j.id for j in jobs}:
            return entry
        ended = [info for info in (j.info() for j in jobs) if info.ended]
        if ended:
            raise click.ClickException(f"a replica of {service!r} ended before it answered: job {ended[0].id} {ended[0].state}: {ended[0].reason}")
        if time.monotonic() > deadline:
            raise click.ClickException(f"service {service!r} did not come up within {wait_s:g}s")
        time.sleep(0.1)


@click.command("services")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="The kernel's state directory.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def services_command(state_dir: Path | None, as_json: bool) -> None:
    """List running services, their replicas and requests in flight."""
    try:
        with llmos.connect(state_dir) as client:
            services = client.services()
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(services))
        return
    if not services:
        click.echo("no services are running")
    for s in services:
        jobs = ", ".join(str(r["job_id"]) for r in s["replicas"])
        click.echo(f"{s['name']}: {len(s['replicas'])} replica(s) (jobs {jobs}), {s['in_flight']} request(s) in flight")
        for r in s["replicas"]:
            where = f" on node {r['node']}" if r.get("node") else ""
            click.echo(f"  job {r['job_id']}{where}: {r.get('version') or '-'}")


@click.command("eval")
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option("--data", default=None, help="A corpus; default: the one the (first) model was trained on.")
@click.option("--split", type=click.Choice(["validation", "all"]), default=None, help="Which part of the corpus (one model).")
@click.option("--allow-rejected", is_flag=True, default=None, help="Evaluate a checkpoint a quality gate rejected.")
@_with_common
def eval_command(models: tuple[str, ...], data: str | None, split: str | None, allow_rejected: bool | None, extra: tuple[str, ...], cpus: float | None,
                 gpus: float | None, detach: bool, state_dir: Path | None, as_json: bool) -> None:
    """Perplexity of a checkpoint (a directory, or job:ID) and a few greedy samples.

    With several MODELs: each measured on the same held-out tokens (the first model's own validation
    split by default) and printed side by side: perplexity, agreement with the first, bytes on disk,
    parameters, decode tokens/s at batch 1 and 8, peak memory (the compress plugin's compare job)."""
    if len(models) > 1:
        try:
            from llmos.plugins.compress.cli import compare
        except ImportError:
            raise click.ClickException("comparing several models needs the compress plugin (llmos plugins list)") from None
        compare(models, data, _params(extra), state_dir, cpus, gpus, detach, as_json)
        return
    params: dict[str, Any] = {"model": model_path(models[0], state_dir)}
    if data:
        params["data"] = data
    if split:
        params["split"] = split
    if allow_rejected:
        params["allow_rejected"] = True
    params.update(_params(extra))
    _submit("eval", params, state_dir, cpus, gpus, detach, as_json)
