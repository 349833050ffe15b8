"""Accounting: what finished jobs used."""

from __future__ import annotations

import datetime as _dt
import time

import click

from llmos.client import Client
from llmos.kernel.cli.common import (
    _table,
    echo_json,
    json_option,
    with_client,
)
from llmos.units import format_size


def _since(value: str | None) -> float | None:
    """``2h``, ``30m``, ``1d``, ``90s``, an ISO date-time, or epoch seconds."""
    if value is None:
        return None
    import re

    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", value.strip())
    if match:
        return time.time() - float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    try:
        epoch = float(value)
    except ValueError:
        pass
    else:
        if epoch < 1e9:  # 2001: a small bare number is surely meant as a duration
            raise click.BadParameter(f"a bare number is epoch seconds, and {value} is in 1970; for a duration add its unit: {value}m, {value}h or {value}d",
                                     param_hint="--since")
        return epoch
    try:
        return _dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise click.BadParameter(f"expected a duration like 2h or 30m, an ISO date-time, or epoch seconds, got {value!r}", param_hint="--since") from None


@click.command()
@click.option("--since", default=None, help="Only jobs that ended since: 2h, 30m, 1d, an ISO date-time, or epoch seconds.")
@click.option("--limit", type=int, default=1000, show_default=True, help="At most this many, newest.")
@with_client
@json_option
def acct(client: Client, since: str | None, limit: int, as_json: bool) -> None:
    """Accounting of finished jobs: wall and CPU time, peak memory, GPU use and tokens, one row each."""
    rows = client.acct(_since(since), limit)
    if as_json:
        echo_json(rows)
        return
    table = []
    for r in rows:
        gpu = f"{r['gpu_seconds']:.1f}" if r["gpu_seconds"] is not None else "-"
        table.append([
            str(r["id"]), r["kind"], r.get("plugin") or "-", r["state"], f"{r['wall_seconds']:.2f}s",
            f"{r['cpu_seconds']:.2f}s" if r["cpu_seconds"] is not None else "-",
            format_size(r["max_rss"]) if r["max_rss"] else "-", gpu, str(r["tokens"]) if r["tokens"] is not None else "-",
            (r["reason"] or "")[:40],
        ])
    _table(table, ["ID", "KIND", "PLUGIN", "STATE", "WALL", "CPU", "PEAK RSS", "GPU-S", "TOKENS", "REASON"])
