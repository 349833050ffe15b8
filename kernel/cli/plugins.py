"""``llmos plugins``: list, inspect, install, remove, enable, disable, reload, and start a new one.

Without a running kernel the commands work on the local environment (what a kernel would load);
with one, they show the kernel's own view and make it reload after a change.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import click

import llmos
from llmos.errors import KernelUnavailable
from llmos.kernel.cli.common import _table, echo_json, json_option, state_dir_option
from llmos.paths import resolve_state_dir
from llmos.protocol import PluginsReloadRequest


def _kernel(state_dir: Path | None) -> llmos.Client | None:
    state_dir = _state(state_dir)
    try:
        return llmos.connect(state_dir)
    except KernelUnavailable:
        return None


def _local_view() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from llmos.kernel.cli.common import BUILTIN_COMMANDS
    from llmos.kernel.plugins import collect_commands, load_plugins

    reg = load_plugins()
    collect_commands(reg, set(BUILTIN_COMMANDS))
    return reg.describe_plugins(), reg.describe_kinds()


def _view(state_dir: Path | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    client = _kernel(state_dir)
    if client is None:
        plugins, kinds = _local_view()
        return plugins, kinds, "this environment (no kernel running)"
    with client:
        return client.plugins(), client.kinds(), f"the kernel (pid {client.kernel['pid']})"


def _state(state_dir: Path | None) -> Path | None:
    """A subcommand's --state-dir, else the one given to `llmos plugins --state-dir DIR ...`."""
    if state_dir is not None:
        return state_dir
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.params.get("state_dir"):
            return ctx.params["state_dir"]
        ctx = ctx.parent
    return None


def _reload(state_dir: Path | None) -> dict[str, Any] | None:
    client = _kernel(state_dir)
    if client is None:
        return None
    with client:
        reply = client.request(PluginsReloadRequest())
        return {"added": reply.added, "removed": reply.removed, "kinds_added": reply.kinds_added, "kinds_removed": reply.kinds_removed}


def _say_reload(change: dict[str, Any] | None) -> None:
    if change is None:
        click.echo("no kernel is running; the next `llmos boot` loads the new set")
        return
    parts = []
    for key, label in (("added", "plugins added"), ("removed", "plugins removed"), ("kinds_added", "kinds added"), ("kinds_removed", "kinds removed")):
        if change[key]:
            parts.append(f"{label}: {', '.join(change[key])}")
    click.echo("kernel reloaded its plugins" + (" (" + "; ".join(parts) + ")" if parts else " (nothing changed)"))


@click.group(invoke_without_command=True)
@click.pass_context
@state_dir_option
@json_option
def plugins(ctx: click.Context, state_dir: Path | None, as_json: bool) -> None:
    """List plugins (the default), or manage them with a subcommand."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_plugins, state_dir=state_dir, as_json=as_json)


@plugins.command("list")
@state_dir_option
@json_option
def list_plugins(state_dir: Path | None, as_json: bool) -> None:
    """Every plugin: version, distribution, hooks, what it registers, and its status."""
    records, _kinds, source = _view(state_dir)
    if as_json:
        echo_json(records)
        return
    rows = []
    for r in records:
        registers = r["kinds"] + r["services"] + [f"cmd:{c}" for c in r["commands"]] + [f"msg:{m}" for m in r["message_types"]]
        rows.append([r["name"], r.get("version") or "-", r.get("dist") or "-", r["status"], ", ".join(registers) or "-", (r.get("error") or "")[:70]])
    _table(rows, ["PLUGIN", "VERSION", "DISTRIBUTION", "STATUS", "REGISTERS", "ERROR"])
    click.echo(f"(as loaded by {source})")


@plugins.command("info")
@click.argument("name")
@state_dir_option
@json_option
def info(name: str, state_dir: Path | None, as_json: bool) -> None:
    """One plugin in full, with each job kind's parameter schema."""
    records, kinds, _source = _view(state_dir)
    record = next((r for r in records if r["name"] == name or r.get("dist") == name), None)
    if record is None:
        raise click.ClickException(f"no plugin named {name!r}; known plugins: {', '.join(sorted(r['name'] for r in records))}")
    mine = [k for k in kinds if k["plugin"] == record["name"]]
    if as_json:
        echo_json(dict(record, kind_schemas=mine))
        return
    for key in ("name", "version", "dist", "module", "status", "api", "error"):
        if record.get(key) is not None:
            click.echo(f"{key:<14} {record[key]}")
    for key in ("hooks", "kinds", "services", "commands", "message_types"):
        click.echo(f"{key:<14} {', '.join(record[key]) or '-'}")
    if record.get("traceback"):
        click.echo("traceback:\n" + record["traceback"].rstrip())
    for k in mine:
        res = k["resources"]
        click.echo(f"\n{'service' if k['service'] else 'job kind'} {k['name']}: {k['help']}")
        per_rank = f" per rank; `{k['ranks']}` ranks run as one gang" if k.get("ranks") else ""
        click.echo(f"  default resources: cpus {res['cpus']:g}, memory {res['memory']}, gpus {res['gpus']:g}, gpu_memory {res['gpu_memory']}{per_rank}")
        for p in k["params"]:
            bounds = " ".join(f"{op}{p[key]}" for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if key in p)
            default = "required" if p["required"] else f"default {p['default']!r}"
            choices = f" one of {p['choices']}" if "choices" in p else ""
            click.echo(f"  {p['name']}: {p['type']} ({default}{', ' + bounds if bounds else ''}{choices})  {p['help']}")


# -- install / uninstall ------------------------------------------------------------------------


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True)


def _wheel_for(spec: str, workdir: Path) -> Path:
    """Build or fetch a wheel for ``spec`` (a path, a .whl, or a requirement) without installing it."""
    path = Path(spec).expanduser()
    if path.suffix == ".whl" and path.is_file():
        return path
    args = ["wheel", "--no-deps", "-q", "-w", str(workdir)]
    if path.is_dir():
        # Build from a copy: building leaves build/ and *.egg-info behind in the project otherwise.
        import shutil

        source = workdir / "source"
        shutil.copytree(path, source, ignore=shutil.ignore_patterns("build", "*.egg-info", ".git", "__pycache__", ".pytest_cache"))
        args += ["--no-build-isolation", str(source)]
    elif path.exists():
        args += ["--no-build-isolation", str(path.absolute())]
    else:
        args.append(spec)
    proc = _pip(*args)
    wheels = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise click.ClickException(f"could not build or download {spec!r}: {' | '.join(tail) or 'pip failed'}")
    return wheels[0]


def _wheel_plugins(wheel: Path) -> tuple[str, dict[str, str]]:
    """The distribution name and its ``llmos`` entry points, read from the wheel's metadata."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        dist = wheel.name.split("-")[0]
        if meta:
            match = re.search(r"^Name: (.+)$", zf.read(meta).decode(errors="replace"), re.M)
            dist = match.group(1).strip() if match else dist
        ep_file = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
        text = zf.read(ep_file).decode(errors="replace") if ep_file else ""
    eps: dict[str, str] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]").strip()
        elif section == "llmos" and "=" in line:
            key, _, value = line.partition("=")
            eps[key.strip()] = value.strip()
    return dist, eps


def _check_api_in_wheel(wheel: Path, eps: dict[str, str]) -> str | None:
    """Import each entry point's module from the unpacked wheel (in a subprocess) and check its
    LLMOS_API; None if compatible or if the module needs dependencies not installed yet."""
    from llmos.kernel.plugins import api_problem

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        for name, value in eps.items():
            module = value.split(":")[0]
            code = f"import json, {module} as m; print(json.dumps(getattr(m, 'LLMOS_API', None)))"
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp, env={**_env(), "PYTHONPATH": tmp})
            if proc.returncode != 0:
                continue  # checked again after the install, with its dependencies there
            declared = json.loads(proc.stdout.strip() or "null")
            if declared is not None:
                problem = api_problem(name, str(declared))
                if problem:
                    return problem
    return None


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


@plugins.command("install")
@click.argument("spec")
@state_dir_option
@json_option
def install(spec: str, state_dir: Path | None, as_json: bool) -> None:
    """Install a plugin: a package name, a local project directory, or a wheel.

    It is refused, and nothing changes, if it declares no `llmos` entry point or supports another
    llmos plugin API. A running kernel reloads its plugins afterwards.
    """
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _wheel_for(spec, Path(tmp))
        dist, eps = _wheel_plugins(wheel)
        if not eps:
            raise click.ClickException(f"{spec!r} is not an llmos plugin: distribution {dist!r} declares no entry point in the 'llmos' group; nothing was installed")
        problem = _check_api_in_wheel(wheel, eps)
        if problem:
            raise click.ClickException(f"refusing to install {dist}: {problem}")
        proc = _pip("install", "-q", str(wheel))
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise click.ClickException(f"pip could not install {dist}: {' | '.join(tail)}")
    # With its dependencies installed now, check what a kernel would see; roll back if unusable.
    from llmos.kernel.plugins import load_plugins

    reg = load_plugins()
    bad = [reg.plugins[n] for n in eps if n in reg.plugins and reg.plugins[n].status == "incompatible"]
    if bad:
        _pip("uninstall", "-y", "-q", dist)
        raise click.ClickException(f"refusing to install {dist}: {bad[0].error}; it was removed again")
    change = _reload(state_dir)
    records = {n: reg.plugins[n].to_dict() for n in eps if n in reg.plugins}
    if as_json:
        echo_json({"installed": dist, "plugins": records, "reload": change})
        return
    for name, record in records.items():
        kinds = ", ".join(record["kinds"] + record["services"]) or "no job kinds"
        click.echo(f"installed plugin {name} ({dist} {record.get('version') or ''}): {record['status']}; {kinds}")
    _say_reload(change)


def _dist_of(name: str) -> tuple[str, list[str]]:
    """The distribution behind a plugin (or distribution) name, and its plugin names."""
    found: dict[str, list[str]] = {}
    for ep in metadata.entry_points(group="llmos"):
        dist = ep.dist.name if ep.dist else None
        if dist:
            found.setdefault(dist, []).append(ep.name)
    for dist, names in found.items():
        if name in names or dist.lower().replace("_", "-") == name.lower().replace("_", "-"):
            return dist, names
    raise click.ClickException(f"no installed plugin or distribution named {name!r}; installed: {', '.join(sorted(n for ns in found.values() for n in ns))}")


@plugins.command("uninstall")
@click.argument("name")
@state_dir_option
@json_option
def uninstall(name: str, state_dir: Path | None, as_json: bool) -> None:
    """Remove an installed plugin (by plugin or distribution name); a running kernel reloads."""
    dist, names = _dist_of(name)
    if dist.lower() == "llmos":
        raise click.ClickException(f"{name!r} is built into llmos; disable it instead: llmos plugins disable {name}")
    proc = _pip("uninstall", "-y", "-q", dist)
    if proc.returncode != 0:
        raise click.ClickException(f"pip could not uninstall {dist}: {(proc.stderr or proc.stdout).strip()}")
    change = _reload(state_dir)
    if as_json:
        echo_json({"uninstalled": dist, "plugins": names, "reload": change})
        return
    click.echo(f"uninstalled {dist} (plugins: {', '.join(names)})")
    _say_reload(change)


# -- enable / disable / reload ------------------------------------------------------------------


def _set_disabled(state_dir: Path | None, name: str, disabled: bool) -> list[str]:
    state = resolve_state_dir(_state(state_dir))
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state / "plugins.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    current = set(data.get("disabled", []))
    (current.add if disabled else current.discard)(name)
    data["disabled"] = sorted(current)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return data["disabled"]


def _known_names() -> set[str]:
    return {ep.name for ep in metadata.entry_points(group="llmos")}


def _toggle(name: str, state_dir: Path | None, as_json: bool, disabled: bool) -> None:
    if disabled and name not in _known_names():
        raise click.ClickException(f"no installed plugin named {name!r}; installed: {', '.join(sorted(_known_names()))}")
    names = _set_disabled(state_dir, name, disabled)
    change = _reload(state_dir)
    if as_json:
        echo_json({"disabled": names, "reload": change})
    else:
        click.echo(f"plugin {name} {'disabled' if disabled else 'enabled'}")
        _say_reload(change)


@plugins.command("disable")
@click.argument("name")
@state_dir_option
@json_option
def disable(name: str, state_dir: Path | None, as_json: bool) -> None:
    """Keep a plugin installed but do not load it (remembered in the state dir)."""
    _toggle(name, state_dir, as_json, disabled=True)


@plugins.command("enable")
@click.argument("name")
@state_dir_option
@json_option
def enable(name: str, state_dir: Path | None, as_json: bool) -> None:
    """Load a disabled plugin again."""
    _toggle(name, state_dir, as_json, disabled=False)


@plugins.command("reload")
@state_dir_option
@json_option
def reload(state_dir: Path | None, as_json: bool) -> None:
    """Make the running kernel load the installed plugins again (after a manual pip install)."""
    change = _reload(state_dir)
    if change is None:
        raise click.ClickException(f"no kernel is running for state dir {resolve_state_dir(_state(state_dir))}")
    if as_json:
        echo_json(change)
    else:
        _say_reload(change)


# -- new ----------------------------------------------------------------------------------------


@plugins.command("new")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where to create it (default: ./llmos-NAME).")
@json_option
def new(name: str, directory: Path | None, as_json: bool) -> None:
    """Write a working plugin skeleton (package, a job kind, a CLI command, a message type, tests)."""
    from llmos.kernel.skeleton import write_skeleton

    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise click.ClickException(f"plugin name {name!r} must be lowercase letters, digits and underscores, starting with a letter")
    target = directory or Path(f"llmos-{name.replace('_', '-')}")
    if target.exists() and any(target.iterdir()):
        raise click.ClickException(f"{target} already exists and is not empty")
    files = write_skeleton(name, target)
    if as_json:
        echo_json({"path": str(target), "files": [str(f) for f in files]})
        return
    click.echo(f"created plugin {name} in {target}:")
    for f in files:
        click.echo(f"  {f}")
    click.echo(f"next: cd {target} && python -m pytest -q && llmos plugins install .")
