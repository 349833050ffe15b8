"""dashboard: a live web page of what llmos is doing, served by llmos itself.

``llmos dashboard`` starts the ``dashboard`` service: a worker that serves one page (plain HTML,
JavaScript and CSS shipped in this package: nothing comes from the internet) and a small JSON and
server-sent-events API backed by :class:`llmos.AsyncClient`. The page shows the nodes and
devices, jobs and services (overview), one job (its log tail, its metrics and resource use as
charts), pipelines (the graph, stage by stage) and models (lineage, and size against perplexity
against decode speed after compression). It updates from the journal's events; a page that loses
its connection catches up from the last sequence number it saw. See docs/dashboard.md.

It binds 127.0.0.1 by default; any other address needs a token, which the URL carries
(``?token=...``), as Jupyter's does. With ``[dashboard] autostart = true`` the kernel starts it
at boot (and so after a restart).

This module stays light (no web framework): the kernel imports it to validate parameters.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import llmos
from llmos import Resources, ServiceKind, param
from llmos.plugins.api import is_loopback

LLMOS_API = ">=1,<2"
NEEDS = ("starlette", "uvicorn")


@dataclass(frozen=True)
class DashboardParams:
    host: str = param("127.0.0.1", help="The address to listen on; any but a loopback address needs a token.")
    port: int = param(8265, ge=0, le=65535, help="The TCP port (0: any free one; llmos status shows the URL).")
    token: str = param("", help="The token the URL must carry (?token=...) off loopback; empty on loopback: none needed.")
    name: str = param("dashboard", help="The service name (llmos services lists it).")


def check_dashboard(p: DashboardParams) -> None:
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"the dashboard needs {', '.join(missing)}: pip install 'llmos[api]'")
    if not is_loopback(p.host) and len(p.token) < 16:
        raise ValueError(f"listening on {p.host} (not a loopback address) needs a token of at least 16 characters: "
                         "llmos dashboard --host HOST makes one, or give --token")
    if not p.name or " " in p.name:
        raise ValueError(f"name {p.name!r} must be non-empty without spaces")


@llmos.hookimpl
def llmos_register_services(register) -> None:  # type: ignore[no-untyped-def]
    register(ServiceKind("dashboard", runner="llmos.plugins.dashboard.runner:DashboardRunner", params=DashboardParams, resources=Resources(cpus=0),
                         check=check_dashboard, autostart=True, config="dashboard",
                         help="A live web dashboard: devices, jobs, logs, metric charts, pipelines and models."))


@llmos.hookimpl
def llmos_register_commands(register) -> None:  # type: ignore[no-untyped-def]
    from llmos.plugins.dashboard.cli import dashboard_command

    register(dashboard_command)
