"""``llmos prune``, ``llmos quantize`` and ``llmos kernels``: submit, follow with progress, end with
the before/after table (``--json``: the job record, result included). ``llmos eval A B ...`` (the
lm plugin's command) prints the same table side by side through :func:`compare`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

import llmos
from llmos.plugins.lm.cli import _params, _with_common, follow, model_path


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v: Any, fmt: str = "{:.4g}") -> str:
    return "-" if v is None else fmt.format(v)


def table(columns: list[tuple[str, dict[str, Any]]]) -> str:
    """Figures of each model (``[(title, figures)]``) side by side, one row per figure; the
    change against the first column in brackets where it helps."""
    base = columns[0][1]

    def change(key: str, fig: dict[str, Any], ratio: bool = False) -> str:
        a, b = base.get(key), fig.get(key)
        if fig is base or a in (None, 0) or b is None:
            return ""
        return f" ({b / a:.2f}x)" if ratio else f" ({b / a - 1:+.1%})"

    def tps(fig: dict[str, Any], batch: str) -> float | None:
        return (fig.get("tokens_per_s") or {}).get(batch)

    rows: list[tuple[str, list[str]]] = [
        ("perplexity", [_num(f.get("ppl")) + change("ppl", f) for _, f in columns]),
        ("agreement", [_num(f.get("agreement"), "{:.1%}") for _, f in columns]),
        ("bytes on disk", [_size(f.get("bytes")) + change("bytes", f, True) for _, f in columns]),
        ("parameters", [f"{f.get('params', 0):,}" for _, f in columns]),
        ("non-zero", [f"{f.get('nonzero', 0):,}" for _, f in columns]),
        ("decode tok/s b1", [_num(tps(f, "batch_1"), "{:.1f}") + (f" ({tps(f, 'batch_1') / tps(base, 'batch_1'):.2f}x)" if f is not base and tps(f, "batch_1") and tps(base, "batch_1") else "") for _, f in columns]),
        ("decode tok/s b8", [_num(tps(f, "batch_8"), "{:.1f}") + (f" ({tps(f, 'batch_8') / tps(base, 'batch_8'):.2f}x)" if f is not base and tps(f, "batch_8") and tps(base, "batch_8") else "") for _, f in columns]),
        ("peak memory", [_size(f.get("peak_memory")) for _, f in columns]),
    ]
    if any("prefill_tokens_per_s" in f for _, f in columns):
        rows.append(("prefill tok/s", [_num(f.get("prefill_tokens_per_s"), "{:.1f}") for _, f in columns]))
    titles = [t for t, _ in columns]
    width0 = max(len(r[0]) for r in rows)
    widths = [max(len(titles[i]), *(len(r[1][i]) for r in rows)) for i in range(len(titles))]
    lines = ["  ".join([" " * width0, *(t.rjust(w) for t, w in zip(titles, widths))])]
    for name, cells in rows:
        lines.append("  ".join([name.ljust(width0), *(c.rjust(w) for c, w in zip(cells, widths))]))
    return "\n".join(lines)


def _run(kind: str, params: dict[str, Any], state_dir: Path | None, cpus: float | None, gpus: float | None, detach: bool, as_json: bool) -> None:
    resources = {k: v for k, v in (("cpus", cpus), ("gpus", gpus)) if v is not None}
    try:
        with llmos.connect(state_dir) as client:
            job = client.submit(kind, params, resources, coerce=True)
            if detach:
                click.echo(json.dumps({"id": job.id}) if as_json else f"job {job.id} submitted ({kind}); follow it with: llmos logs {job.id} -f")
                return
            if not as_json:
                click.echo(f"job {job.id} submitted ({kind})")
            info = follow(job, as_json)
            report = _report_of(client, info)
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(info.to_dict(), default=str))
    elif report is not None:
        click.echo(table([("before", report["before"]), ("after", report["after"])]))
        click.echo(f"perplexity {report['ppl_increase']:+.2%} (limit +{report['max_ppl_increase']:.0%}): {'accepted' if report['accepted'] else 'REJECTED'}")
    if info.state == "succeeded":
        if not as_json:
            click.echo(f"job {info.id} succeeded: checkpoint {info.result['checkpoint']}")
    else:
        if not as_json:
            click.echo(f"job {info.id} {info.state}: {info.reason}")
        sys.exit(1)


def _report_of(client: llmos.Client, info: llmos.JobInfo) -> dict[str, Any] | None:
    """The gate's report: the result, or (a failed gate) the output's llmos.json."""
    if info.state == "succeeded" and isinstance(info.result, dict):
        return info.result.get("report")
    try:
        found = client.job(info.id).artifacts("checkpoint")
    except llmos.LlmosError:
        return None
    if not found:
        return None
    try:
        return json.loads((Path(found[-1]["path"]) / "llmos.json").read_text()).get("report")
    except (OSError, ValueError):
        return None


_shared = [
    click.option("--output", default=None, help="Where to write the checkpoint (default: the job's directory)."),
    click.option("--data", default=None, help="Held-out text for the gate (default: the model's own validation split)."),
    click.option("--max-ppl-increase", type=float, default=None, help="The gate: the largest perplexity rise allowed, as a fraction (0.05 is 5%)."),
    click.option("--allow-rejected", is_flag=True, default=None, help="Accept an input model a quality gate rejected."),
]


def _with_shared(f: Any) -> Any:
    for option in reversed(_shared):
        f = option(f)
    return _with_common(f)


def _base(model: str, state_dir: Path | None, output: str | None, data: str | None, max_ppl_increase: float | None, allow_rejected: bool | None) -> dict[str, Any]:
    params: dict[str, Any] = {"model": model if model.startswith("job:") else str(Path(model).absolute())}
    for key, value in (("output", output and str(Path(output).absolute())), ("data", data and (data if data == "stdlib" else str(Path(data).absolute()))),
                       ("max_ppl_increase", max_ppl_increase), ("allow_rejected", allow_rejected)):
        if value is not None:
            params[key] = value
    return params


@click.command("quantize")
@click.argument("model")
@click.option("--scheme", type=click.Choice(["int8", "int4", "w8a8"]), default="int8", show_default=True,
              help="int8: weight-only per channel. int4: weight-only in groups along the input. w8a8: int8 weights and per-token int8 activations.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None, help="int4: weights per scale (default 128).")
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default=None, help="rtn: round to nearest (default). gptq: error-compensating, from calibration text (int4).")
@click.option("--asymmetric", is_flag=True, help="int4: a zero point per group.")
@click.option("--head", type=click.Choice(["quantize", "keep"]), default=None, help="Quantize the lm_head too (default; int8 with int4) or keep it.")
@click.option("--calib-data", default=None, help="Calibration text for gptq (default: the model's training corpus, else stdlib).")
@_with_shared
def quantize_command(model: str, scheme: str, group_size: str | None, method: str | None, asymmetric: bool, head: str | None, calib_data: str | None,
                     output: str | None, data: str | None, max_ppl_increase: float | None, allow_rejected: bool | None,
                     extra: tuple[str, ...], cpus: float | None, gpus: float | None, detach: bool, state_dir: Path | None, as_json: bool) -> None:
    """Quantize MODEL (a checkpoint directory or job:ID), measure it before and after on the same
    held-out tokens, and end with the table. The job fails, and marks its output rejected, when
    perplexity rises more than --max-ppl-increase (default 5%).

    The output is a compressed-tensors checkpoint: transformers (with compressed-tensors) loads it,
    and llmos runs it with the fastest kernel it measured correct on this machine
    (`llmos kernels`)."""
    params = _base(model, state_dir, output, data, max_ppl_increase, allow_rejected)
    params["scheme"] = scheme
    for key, value in (("group_size", group_size), ("method", method), ("head", head), ("calib_data", calib_data if calib_data in (None, "stdlib") else str(Path(calib_data).absolute()))):
        if value is not None:
            params[key] = value
    if asymmetric:
        params["symmetric"] = False
    params.update(_params(extra))
    _run("quantize", params, state_dir, cpus, gpus, detach, as_json)


@click.command("prune")
@click.argument("model")
@click.option("--method", type=click.Choice(["magnitude", "wanda", "2:4", "structured"]), default="wanda", show_default=True,
              help="magnitude | wanda (|W| x activation norm) | 2:4 (two of every four) | structured (whole heads and MLP channels: a smaller dense model).")
@click.option("--sparsity", type=float, default=None, help="The share to remove, in [0, 1) (structured: of the parameters outside the embedding, taken from the layers; an untied output head counts but is kept).")
@click.option("--scope", type=click.Choice(["layer", "global"]), default=None, help="magnitude: per matrix or one global threshold.")
@click.option("--scores", type=click.Choice(["magnitude", "wanda"]), default=None, help="2:4: which scores pick the kept weights (default wanda).")
@click.option("--heads", type=float, default=None, help="structured: the share of key/value groups (with their query heads) to remove.")
@click.option("--mlp", type=float, default=None, help="structured: the share of MLP channels to remove.")
@click.option("--heal-steps", type=int, default=None, help="Fine-tune this many steps after pruning. Structured pruning of a small model without healing loses most of its quality.")
@click.option("--distill", is_flag=True, default=None, help="Heal by distilling from the unpruned model (KL to its logits).")
@click.option("--calib-data", default=None, help="Calibration text (default: the model's training corpus, else stdlib).")
@_with_shared
def prune_command(model: str, method: str, sparsity: float | None, scope: str | None, scores: str | None, heads: float | None, mlp: float | None,
                  heal_steps: int | None, distill: bool | None, calib_data: str | None, output: str | None, data: str | None, max_ppl_increase: float | None,
                  allow_rejected: bool | None, extra: tuple[str, ...], cpus: float | None, gpus: float | None, detach: bool, state_dir: Path | None, as_json: bool) -> None:
    """Prune MODEL (a checkpoint directory or job:ID), measure it before and after on the same
    held-out tokens, and end with the table. The job fails, and marks its output rejected, when
    perplexity rises more than --max-ppl-increase (default 15%).

    Unstructured and 2:4 outputs are stored dense (zeros in place; the sparsity pattern is in
    llmos.json): the gain is in size only once compressed on disk. Structured pruning gives a
    smaller dense model, faster to run; heal it (--heal-steps, --distill)."""
    params = _base(model, state_dir, output, data, max_ppl_increase, allow_rejected)
    params["method"] = method
    for key, value in (("sparsity", sparsity), ("scope", scope), ("scores", scores), ("heads", heads), ("mlp", mlp), ("heal_steps", heal_steps),
                       ("distill", distill), ("calib_data", calib_data if calib_data in (None, "stdlib") else str(Path(calib_data).absolute()))):
        if value is not None:
            params[key] = value
    params.update(_params(extra))
    _run("prune", params, state_dir, cpus, gpus, detach, as_json)


def compare(models: tuple[str, ...], data: str | None, params: dict[str, Any], state_dir: Path | None, cpus: float | None, gpus: float | None, detach: bool, as_json: bool) -> None:
    """``llmos eval A B ...``: the ``compare`` job over the models, then the table side by side."""
    submit = {"models": [model_path(m, state_dir) for m in models], **params}
    if data:
        submit["data"] = data if data == "stdlib" else str(Path(data).absolute())
    resources = {k: v for k, v in (("cpus", cpus), ("gpus", gpus)) if v is not None}
    try:
        with llmos.connect(state_dir) as client:
            job = client.submit("compare", submit, resources, coerce=True)
            if detach:
                click.echo(json.dumps({"id": job.id}) if as_json else f"job {job.id} submitted (compare); follow it with: llmos logs {job.id} -f")
                return
            if not as_json:
                click.echo(f"job {job.id} submitted (compare)")
            info = follow(job, as_json)
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(info.to_dict(), default=str))
    elif info.state == "succeeded":
        rows = info.result["models"]
        click.echo(table([(Path(r["model"]).name, r) for r in rows]))
    if info.state != "succeeded":
        if not as_json:
            click.echo(f"job {info.id} {info.state}: {info.reason}")
        sys.exit(1)


@click.command("kernels")
@click.argument("model", required=False)
@_with_common
def kernels_command(model: str | None, extra: tuple[str, ...], cpus: float | None, gpus: float | None, detach: bool, state_dir: Path | None, as_json: bool) -> None:
    """Which kernel each quantized layer shape runs on this machine, per batch size, and why: the
    timings of every candidate that agreed with the dequantize-then-matmul reference, and why the
    others were refused. With MODEL (a quantized checkpoint), settle its layers' choices first."""
    params: dict[str, Any] = {}
    if model:
        params["model"] = model_path(model, state_dir)
    params.update(_params(extra))
    resources = {k: v for k, v in (("cpus", cpus), ("gpus", gpus)) if v is not None}
    try:
        with llmos.connect(state_dir) as client:
            info = client.submit("compress.kernels", params, resources, coerce=True).wait()
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None
    if info.state != "succeeded":
        raise click.ClickException(f"job {info.id} {info.state}: {info.reason}")
    r = info.result
    if as_json:
        click.echo(json.dumps(r, default=str))
        return
    st = r.get("native", {})
    click.echo(f"native kernels: {st.get('reason')}; cpu flags: {', '.join(st.get('cpu_flags', [])) or '-'}")
    click.echo(f"threads {r.get('threads')}, torch {r.get('torch')}; choices cached in {r.get('cache')}")
    if not r["choices"]:
        click.echo("no choices made on this machine yet (quantize a model, or give MODEL)")
    for key in sorted(r["choices"]):
        e = r["choices"][key]
        timings = ", ".join(f"{k} {v:.0f}us" for k, v in sorted(e.get("timings_us", {}).items(), key=lambda kv: kv[1]))
        click.echo(f"{key}: {e['chosen']}  [{timings}]")
        for name, why in sorted(e.get("rejected", {}).items()):
            click.echo(f"    refused {name}: {why}")
