"""Pipelines from the SDK: ``client.pipeline(spec)`` runs one and returns a :class:`Pipeline`
handle; :func:`load_pipeline_file` reads a TOML file (errors name the line)."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos.errors import ValidationError
from llmos.protocol import Event, PipelineRequest

if TYPE_CHECKING:
    from llmos.client import Client

__all__ = ["Pipeline", "load_pipeline_file"]

PIPELINE_ENDED = ("succeeded", "failed", "cancelled")


def load_pipeline_file(path: str | Path) -> dict[str, Any]:
    """The spec in a pipeline TOML file; ValidationError with the file and line of a TOML error."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ValidationError(f"cannot read the pipeline file {file}: {exc.strerror or exc}", field="file") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(f"{file}: not valid TOML: {exc}", field="file") from None


class Pipeline:
    """A pipeline the kernel runs: its record, its stages, its events; wait, cancel, resume."""

    def __init__(self, client: Client, pipeline_id: int, info: dict[str, Any] | None = None) -> None:
        self.client = client
        self.id = pipeline_id
        self._info = info

    def __repr__(self) -> str:
        return f"Pipeline({self.id}, {self.info(cached=True).get('state')!r})"

    def info(self, *, cached: bool = False) -> dict[str, Any]:
        """The record: ``id``, ``name``, ``state``, ``reason`` and ``stages`` (each with ``name``,
        ``kind``, ``state``, ``job_id``, ``artifact``, ``reason``, ``needs``)."""
        if not cached or self._info is None:
            self._info = self.client.request(PipelineRequest(id=self.id)).pipeline
        return self._info

    @property
    def state(self) -> str:
        return str(self.info()["state"])

    def stages(self) -> dict[str, dict[str, Any]]:
        """Each stage's record, by name, in the graph's order."""
        return {s["name"]: s for s in self.info()["stages"]}

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> dict[str, Any]:
        """Wait until the pipeline ends (a service stage left running counts as done); its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in self.events(follow=True, timeout=timeout):
            pass
        info = self.info()
        while info["state"] not in PIPELINE_ENDED:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"pipeline {self.id} is still {info['state']} after {timeout}s")
            time.sleep(poll)
            info = self.info()
        return info

    def events(self, since: int = 0, follow: bool = True, timeout: float | None = None) -> Iterator[Event]:
        """The pipeline's ``pipeline.<id>.state`` and ``pipeline.<id>.stage`` events; with
        ``follow``, until it ends."""
        for event in self.client.events(f"pipeline.{self.id}.", since=since, follow=follow, timeout=timeout):
            yield event
            if event.type == "pipeline.state" and event.body.get("state") in PIPELINE_ENDED:
                return

    def cancel(self) -> dict[str, Any]:
        """Cancel what runs and what waits (service stages included)."""
        self._info = self.client.request(PipelineRequest(id=self.id, action="cancel")).pipeline
        return self._info

    def resume(self) -> dict[str, Any]:
        """Run again what did not finish; stages whose inputs and artifact are unchanged are kept."""
        self._info = self.client.request(PipelineRequest(id=self.id, action="resume")).pipeline
        return self._info
