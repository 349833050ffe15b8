"""The ``dashboard`` service's runner: the page and its API on uvicorn (see llmos.plugins.api.runner)."""

from __future__ import annotations

from typing import Any

import llmos
from llmos.plugins.api.runner import HttpServiceRunner


class DashboardRunner(HttpServiceRunner):
    what = "dashboard"

    def app(self, client: llmos.AsyncClient, params: Any) -> Any:
        from llmos.plugins.dashboard.app import Dashboard

        return Dashboard(client, token=params.token or None).app()

    def where(self, params: Any) -> dict[str, Any]:
        where = super().where(params)
        where["page"] = where["url"] + (f"/?token={params.token}" if params.token else "/")
        where["token"] = bool(params.token)
        return where
