"""``llmos keys``: the CurveZMQ keys a kernel admits on its TCP endpoints.

The commands edit ``<state>/keys/allowed.json`` directly, with or without a kernel running; a
running kernel reads the file again at the next connection, so an added key works at once and a
revoked one is refused from its next connection on.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from llmos.kernel.cli.common import (
    _table,
    echo_json,
    json_option,
    parent_state_dir,
    state_dir_option,
)
from llmos.paths import resolve_state_dir


def _store(state_dir: Path | None):
    from llmos.kernel.keys import KeyStore

    return KeyStore(resolve_state_dir(state_dir or parent_state_dir()))


@click.group()
@state_dir_option
def keys(state_dir: Path | None) -> None:
    """The keys remote clients and workers connect with over TCP (CurveZMQ).

    A kernel listening on TCP ([kernel] listen, or `llmos boot --listen HOST:PORT`) admits a
    connection only when its public key is allowed here. `llmos keys add NAME` makes a key file
    to hand to the remote user, who connects with `llmos --kernel tcp://HOST:PORT --key FILE
    status` or `llmos.connect("tcp://HOST:PORT", key=FILE)`.
    """


@keys.command("list")
@state_dir_option
@json_option
def list_keys(state_dir: Path | None, as_json: bool) -> None:
    """The allowed keys: name, public key, when added, and whether the kernel made it."""
    store = _store(state_dir)
    allowed = store.allowed()
    if as_json:
        echo_json({"kernel_public": store.kernel_pair(create=False)[0] if store.kernel_file.exists() else None, "keys": [k.to_dict() for k in allowed]})
        return
    if not allowed:
        click.echo("no keys are allowed (add one with: llmos keys add NAME)")
        return
    rows = [[k.name, k.public, dt.datetime.fromtimestamp(k.added).strftime("%Y-%m-%d %H:%M"), "issued" if k.issued else "brought"] for k in allowed]
    _table(rows, ["NAME", "PUBLIC KEY", "ADDED", "ORIGIN"])


@keys.command("add")
@click.argument("name")
@click.option("--public", "public", default=None, help="Allow this public key (Z85, 40 characters) instead of making a new pair.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Where to write the new key file (default: ./NAME.key, mode 0600).")
@state_dir_option
@json_option
def add_key(name: str, public: str | None, out: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Allow a key named NAME: a new key pair written to a key file for its holder (its secret
    is kept nowhere else), or with --public a key its holder already has."""
    from llmos.keys import write_private_json

    store = _store(state_dir)
    target = out or Path(f"{name}.key")
    if public is None and target.exists():
        raise click.UsageError(f"{target} exists; choose another --out (a key file is never overwritten)")
    entry, issued = store.add(name, public)
    if issued is not None:
        write_private_json(target, issued.to_dict())
    result = {**entry.to_dict(), "key_file": str(target.resolve()) if issued else None, "kernel_public": store.kernel_pair()[0]}
    if as_json:
        echo_json(result)
        return
    click.echo(f"allowed key {name!r} ({entry.public})")
    if issued is not None:
        click.echo(f"key file: {target} (mode 0600; hand it to its holder, who connects with --key {target})")


@keys.command("revoke")
@click.argument("name")
@state_dir_option
@json_option
def revoke_key(name: str, state_dir: Path | None, as_json: bool) -> None:
    """Stop admitting the key named NAME (from its next connection on)."""
    entry = _store(state_dir).revoke(name)
    if as_json:
        echo_json({**entry.to_dict(), "revoked": True})
    else:
        click.echo(f"revoked key {name!r} ({entry.public}); connections made with it from now on are refused")
