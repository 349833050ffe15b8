"""Messages of the model lifecycle: artifacts (the models jobs produce) and pipelines (graphs of
stages that make them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmos.protocol.registry import message

#: What ``ArtifactsRequest.action`` may be.
ARTIFACT_ACTIONS = ("list", "show", "lineage", "rm", "gc")
PIPELINE_STATES = ("running", "succeeded", "failed", "cancelled")
STAGE_STATES = ("waiting", "running", "succeeded", "failed", "rejected", "cancelled", "skipped", "serving")


@message("kernel.artifacts_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class ArtifactsRequest:
    """Artifacts: ``list`` (newest first; ``all`` includes removed ones), ``show``, ``lineage`` or
    ``rm`` of ``ref`` (an id, a unique prefix, ``artifact:<id>`` or ``job:<id>``), or ``gc``
    (``dry_run``: only say what would go)."""

    action: str = "list"
    ref: str | None = None
    limit: int = 1000
    all: bool = False
    force: bool = False
    dry_run: bool = False


@message("kernel.artifacts_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class ArtifactsReply:
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    artifact: dict[str, Any] | None = None


@message("kernel.pipeline_submit")
@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineSubmit:
    """Run a pipeline: ``spec`` is the parsed file (``name``, ``[stages.<name>]`` tables with
    ``kind``, ``params``, ``resources``...); ``cwd`` makes its relative paths absolute."""

    spec: dict[str, Any]
    cwd: str | None = None


@message("kernel.pipeline_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineRequest:
    """One pipeline (``action`` ``show``), or ``cancel`` / ``resume`` it."""

    id: int
    action: str = "show"


@message("kernel.pipelines_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class PipelinesRequest:
    limit: int = 100


@message("kernel.pipeline_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineReply:
    pipeline: dict[str, Any]


@message("kernel.pipelines_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class PipelinesReply:
    pipelines: list[dict[str, Any]] = field(default_factory=list)


@message("pipeline.state")
@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineStateChanged:
    """A pipeline started, ended (``succeeded``: every stage did; else ``failed`` or
    ``cancelled``) or was resumed."""

    state: str
    reason: str | None = None


@message("pipeline.stage")
@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineStageChanged:
    """A stage moved to ``state``, with its job, its output artifact and why."""

    stage: str
    state: str
    job_id: int | None = None
    artifact: str | None = None
    reason: str | None = None
