"""Pipelines: a graph of stages, each a job whose inputs name earlier stages' outputs.

A spec (from a TOML file) is a name and ``[stages.<name>]`` tables: ``kind``, ``params``,
``resources``, and optionally ``priority``, ``max_retries``, ``timeout``. A string parameter may
hold ``${stage.model}`` (that stage's output artifact), ``${stage.<key>}`` (a key of its job's
result) or, in a list, ``${stage.model?}`` (dropped when that stage did not succeed, so a list
of candidates survives a rejected one). A stage starts when every stage it names has succeeded
(or, for ``?`` references, ended); stages that do not depend on each other run at once. A stage
whose job fails fails; one whose output a quality gate rejected is ``rejected``; what depends on
either is ``skipped`` with the reason, and the rest goes on. Service stages (``serve``) start
last and are left running (``serving``).

The graph and each stage's state are kernel state (SQLite, and journaled ``pipeline.<id>.state``
/ ``pipeline.<id>.stage`` events), so a pipeline survives a kernel restart; ``resume`` runs again
only what did not finish: a stage that succeeded, whose parameters are unchanged and whose
artifact still exists is kept.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from llmos.errors import LlmosError, ValidationError
from llmos.kernel.artifacts import Artifacts
from llmos.kernel.plugins import Registry
from llmos.kernel.store import JobRecord, Store
from llmos.params import validate_params
from llmos.plugin import Resources
from llmos.protocol import PipelineStageChanged, PipelineStateChanged

log = structlog.get_logger("llmos.kernel")

__all__ = ["Pipelines", "check_spec"]

_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_-]*)\.([A-Za-z_][A-Za-z0-9_]*)(\?)?\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_STAGE_KEYS = {"kind", "params", "resources", "priority", "max_retries", "timeout"}
ENDED_STAGE = ("succeeded", "failed", "rejected", "cancelled", "skipped")


@dataclass
class Stage:
    name: str
    kind: str
    params: dict[str, Any]
    resources: dict[str, Any]
    options: dict[str, Any]
    needs: dict[str, bool]  # stage -> required (False: a ``?`` reference)
    service: bool
    state: str = "waiting"
    job_id: int | None = None
    artifact: str | None = None
    reason: str | None = None
    key: str | None = None
    result: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "state": self.state, "job_id": self.job_id, "artifact": self.artifact, "reason": self.reason,
            "needs": sorted(self.needs), "service": self.service, "params": self.params,
        }


@dataclass
class Pipeline:
    id: int
    name: str
    spec: dict[str, Any]
    stages: dict[str, Stage]  # in a topological order
    state: str = "running"
    reason: str | None = None
    created_at: float = 0.0
    ended_at: float | None = None
    cwd: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "state": self.state, "reason": self.reason, "created_at": self.created_at, "ended_at": self.ended_at,
            "stages": [s.to_dict() for s in self.stages.values()],
        }


def _refs(value: Any) -> list[tuple[str, str, bool]]:
    if isinstance(value, str):
        return [(m.group(1), m.group(2), m.group(3) is not None) for m in _REF.finditer(value)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    return []


def _placeholder(value: Any) -> Any:
    """A value for checking the schema before the references exist."""
    if isinstance(value, str) and _REF.search(value):
        return "/pipeline/placeholder" if _REF.fullmatch(value) else _REF.sub("x", value)
    if isinstance(value, list):
        return [_placeholder(v) for v in value]
    return value


def check_spec(spec: Any, registry: Registry, cwd: str | None) -> tuple[str, dict[str, Stage]]:
    """The stages of ``spec`` in a topological order, or ValidationError naming the stage and
    the field: not a table, an unknown key or job kind, a bad parameter or resource, a reference
    to an unknown stage, a cycle."""
    if not isinstance(spec, dict):
        raise ValidationError("a pipeline is a table with a name and [stages.<name>] tables")
    name = spec.get("name", "pipeline")
    if not isinstance(name, str) or not name:
        raise ValidationError(f"pipeline name must be a non-empty string, got {name!r}", field="name")
    unknown = set(spec) - {"name", "description", "stages"}
    if unknown:
        raise ValidationError(f"unknown pipeline key(s) {', '.join(sorted(unknown))}; expected name, description, stages", field=sorted(unknown)[0])
    raw = spec.get("stages")
    if not isinstance(raw, dict) or not raw:
        raise ValidationError("a pipeline needs at least one stage: [stages.<name>] with kind = \"...\"", field="stages")
    stages: dict[str, Stage] = {}
    for sname, table in raw.items():
        where = f"stage {sname!r}"
        if not _NAME.match(sname):
            raise ValidationError(f"{where}: a stage name is letters, digits, '_' and '-', starting with a letter", field=sname)
        if not isinstance(table, dict):
            raise ValidationError(f"{where}: must be a table with kind = \"...\"", field=sname)
        extra = set(table) - _STAGE_KEYS
        if extra:
            raise ValidationError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; expected {', '.join(sorted(_STAGE_KEYS))}", field=f"{sname}.{sorted(extra)[0]}")
        kind = table.get("kind")
        if not isinstance(kind, str):
            raise ValidationError(f"{where}: kind must name a job kind, e.g. kind = \"train\"", field=f"{sname}.kind")
        if kind not in registry.kinds:
            known = ", ".join(sorted(registry.kinds))
            raise ValidationError(f"{where}: unknown job kind {kind!r} (known: {known})", field=f"{sname}.kind")
        params = table.get("params", {})
        resources = table.get("resources", {})
        if not isinstance(params, dict):
            raise ValidationError(f"{where}: params must be a table", field=f"{sname}.params")
        if not isinstance(resources, dict):
            raise ValidationError(f"{where}: resources must be a table", field=f"{sname}.resources")
        options = {k: table[k] for k in ("priority", "max_retries", "timeout") if k in table}
        for key, value in options.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValidationError(f"{where}: {key} must be a number, got {value!r}", field=f"{sname}.{key}")
        needs: dict[str, bool] = {}
        for ref_stage, _key, optional in _refs(params):
            needs[ref_stage] = needs.get(ref_stage, False) or not optional
        entry = registry.kinds[kind]
        try:
            validate_params(entry.spec.params, _placeholder(params), kind=kind, coerce=False, cwd=cwd)
            Resources.parse(resources, base=entry.spec.resources)
        except ValidationError as exc:
            field_name = exc.context.get("field")
            raise ValidationError(f"{where}: {exc}", field=f"{sname}.{field_name}" if field_name else sname) from None
        stages[sname] = Stage(sname, kind, params, resources, options, needs, service=bool(entry.service))
    for stage in stages.values():
        for ref in stage.needs:
            if ref not in stages:
                raise ValidationError(f"stage {stage.name!r}: refers to ${{{ref}...}}, but there is no stage {ref!r} (stages: {', '.join(stages)})", field=f"{stage.name}.params")
            if ref == stage.name:
                raise ValidationError(f"stage {stage.name!r}: refers to itself", field=f"{stage.name}.params")
    return name, _topological(stages)


def _topological(stages: dict[str, Stage]) -> dict[str, Stage]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*path[path.index(name):], name]
            raise ValidationError(f"the stages form a cycle: {' -> '.join(cycle)}", field=name)
        state[name] = 1
        for dep in stages[name].needs:
            visit(dep, [*path, name])
        state[name] = 2
        order.append(name)

    for name in stages:
        visit(name, [])
    return {n: stages[n] for n in order}


class Pipelines:
    """Running pipelines, in memory and in SQLite; the kernel tells it when a stage's job ends."""

    def __init__(
        self, store: Store, artifacts: Artifacts, emit: Callable[[str, Any], None],
        submit: Callable[[str, dict[str, Any], dict[str, Any], dict[str, Any], str | None], JobRecord],
        cancel: Callable[[int, str], None], find_job: Callable[[int], JobRecord], registry: Callable[[], Registry],
    ) -> None:
        self.store, self.db, self.artifacts, self.emit = store, store.db, artifacts, emit
        self._submit, self._cancel, self._find_job, self.registry = submit, cancel, find_job, registry
        self.active: dict[int, Pipeline] = {}
        self.by_job: dict[int, tuple[int, str]] = {}  # job id -> (pipeline id, stage)

    # -- making one --

    def create(self, spec: dict[str, Any], cwd: str | None) -> Pipeline:
        name, stages = check_spec(spec, self.registry(), cwd)
        self.store.begin()
        now = time.time()
        cur = self.db.execute("INSERT INTO pipelines (name, spec, state, created_at) VALUES (?, ?, 'running', ?)",
                              (name, json.dumps({"spec": spec, "cwd": cwd}), now))
        pid = int(cur.lastrowid or 0)
        pipe = Pipeline(pid, name, spec, stages, created_at=now, cwd=cwd)
        for stage in stages.values():
            self.db.execute("INSERT INTO pipeline_stages (pipeline_id, stage, state) VALUES (?, ?, 'waiting')", (pid, stage.name))
        self.active[pid] = pipe
        self.emit(f"pipeline.{pid}.state", PipelineStateChanged(state="running", reason=f"{len(stages)} stages"))
        log.info("pipeline_started", pipeline=pid, name=name, stages=list(stages))
        self.advance(pipe)
        return pipe

    # -- moving on --

    def _set(self, pipe: Pipeline, stage: Stage, state: str, reason: str | None = None) -> None:
        stage.state, stage.reason = state, reason
        self.store.begin()
        self.db.execute(
            "UPDATE pipeline_stages SET state=?, job_id=?, artifact=?, reason=?, key=?, result=? WHERE pipeline_id=? AND stage=?",
            (state, stage.job_id, stage.artifact, reason, stage.key, json.dumps(stage.result, default=str), pipe.id, stage.name),
        )
        self.emit(f"pipeline.{pipe.id}.stage", PipelineStageChanged(stage=stage.name, state=state, job_id=stage.job_id, artifact=stage.artifact, reason=reason))

    def _value(self, pipe: Pipeline, ref: tuple[str, str, bool]) -> Any:
        stage = pipe.stages[ref[0]]
        if ref[1] == "model":
            if stage.artifact is None:
                raise ValidationError(f"stage {stage.name!r} produced no model artifact")
            return f"artifact:{stage.artifact}"
        if isinstance(stage.result, dict) and ref[1] in stage.result:
            return stage.result[ref[1]]
        raise ValidationError(f"stage {stage.name!r} has no output {ref[1]!r} (its result has: {', '.join(stage.result or {}) or 'nothing'})")

    def _fill(self, pipe: Pipeline, value: Any) -> Any:
        if isinstance(value, str):
            whole = _REF.fullmatch(value)
            if whole:
                return self._value(pipe, (whole.group(1), whole.group(2), whole.group(3) is not None))
            return _REF.sub(lambda m: str(self._value(pipe, (m.group(1), m.group(2), False))), value)
        if isinstance(value, list):
            out = []
            for v in value:
                m = _REF.fullmatch(v) if isinstance(v, str) else None
                if m and m.group(3) and pipe.stages[m.group(1)].state != "succeeded":
                    continue  # an optional candidate that did not make it
                out.append(self._fill(pipe, v))
            return out
        if isinstance(value, dict):
            return {k: self._fill(pipe, v) for k, v in value.items()}
        return value

    def advance(self, pipe: Pipeline) -> None:
        """Start every stage whose inputs are ready; skip those that can never run; end the
        pipeline when nothing is left to wait for."""
        progressed = True
        while progressed:
            progressed = False
            for stage in pipe.stages.values():
                if stage.state != "waiting":
                    continue
                deps = [(pipe.stages[d], required) for d, required in stage.needs.items()]
                blocked = next((d for d, required in deps if required and d.state in ENDED_STAGE and d.state != "succeeded"), None)
                if blocked is not None:
                    self._set(pipe, stage, "skipped", f"stage {blocked.name} {blocked.state}" + (f": {blocked.reason}" if blocked.reason else ""))
                    progressed = True
                    continue
                if not all(d.state in ENDED_STAGE if not required else d.state == "succeeded" for d, required in deps):
                    continue
                if stage.service and any(s.state in ("waiting", "running") for s in pipe.stages.values() if not s.service and s is not stage):
                    continue  # services start last
                self._start(pipe, stage)
                progressed = True
        self._maybe_end(pipe)

    def _start(self, pipe: Pipeline, stage: Stage) -> None:
        try:
            params = self._fill(pipe, stage.params)
            stage.key = hashlib.sha256(json.dumps([stage.kind, params, stage.resources], sort_keys=True, default=str).encode()).hexdigest()
            job = self._submit(stage.kind, params, stage.resources, stage.options, pipe.cwd)
        except LlmosError as exc:
            stage.job_id = None
            self._set(pipe, stage, "failed", f"not started: {exc}")
            return
        stage.job_id = job.id
        self.by_job[job.id] = (pipe.id, stage.name)
        self._set(pipe, stage, "running")

    def job_serving(self, job_id: int | None) -> None:
        """A service stage is ``serving`` once its job's service answers (it has registered)."""
        where = self.by_job.get(job_id) if job_id is not None else None
        pipe = self.active.get(where[0]) if where else None
        if pipe is not None and where is not None and job_id is not None:
            stage = pipe.stages[where[1]]
            if stage.service and stage.state == "running":
                stage.artifact = self._input_artifact(job_id)
                self._set(pipe, stage, "serving")
                self._maybe_end(pipe)

    def _input_artifact(self, job_id: int) -> str | None:
        row = self.db.execute("SELECT artifact FROM job_inputs WHERE job_id=? ORDER BY param LIMIT 1", (job_id,)).fetchone()
        return row[0] if row else None

    def job_ended(self, job: JobRecord) -> None:
        """A job ended for good: if it is a stage's, record how and move the pipeline on."""
        where = self.by_job.pop(job.id, None)
        pipe = self.active.get(where[0]) if where else None
        if pipe is None or where is None:
            return
        stage = pipe.stages[where[1]]
        if stage.state not in ("running", "serving"):
            return
        stage.result = job.result
        try:
            stage.artifact = self.artifacts.find(f"job:{job.id}")["id"]
            rejected = bool(self.artifacts.find(stage.artifact)["rejected"])
        except ValidationError:
            stage.artifact, rejected = (stage.artifact if stage.service else None), False
        if job.state == "succeeded":
            self._set(pipe, stage, "succeeded")
        elif job.state == "failed" and rejected:
            self._set(pipe, stage, "rejected", job.reason)
        else:
            self._set(pipe, stage, "cancelled" if job.state == "cancelled" else "failed", job.reason)
        self.advance(pipe)

    def _maybe_end(self, pipe: Pipeline) -> None:
        if pipe.state != "running":
            return
        if any(s.state in ("waiting", "running") for s in pipe.stages.values()):
            return
        bad = [s for s in pipe.stages.values() if s.state not in ("succeeded", "serving")]
        if not bad:
            state, reason = "succeeded", "every stage succeeded" + (" (services left running)" if any(s.state == "serving" for s in pipe.stages.values()) else "")
        elif all(s.state in ("cancelled", "skipped", "succeeded", "serving") for s in pipe.stages.values()) and any(s.state == "cancelled" for s in bad):
            state, reason = "cancelled", "cancelled"
        else:
            state, reason = "failed", "; ".join(f"{s.name} {s.state}" + (f" ({s.reason})" if s.reason and s.state != "skipped" else "") for s in bad)
        pipe.state, pipe.reason, pipe.ended_at = state, reason, time.time()
        self.store.begin()
        self.db.execute("UPDATE pipelines SET state=?, reason=?, ended_at=? WHERE id=?", (state, reason, pipe.ended_at, pipe.id))
        self.emit(f"pipeline.{pipe.id}.state", PipelineStateChanged(state=state, reason=reason))
        log.info("pipeline_ended", pipeline=pipe.id, state=state, reason=reason)
        if not any(s.state == "serving" for s in pipe.stages.values()):
            self.active.pop(pipe.id, None)

    # -- requests --

    def load(self, pid: int) -> Pipeline:
        if pid in self.active:
            return self.active[pid]
        row = self.db.execute("SELECT * FROM pipelines WHERE id=?", (pid,)).fetchone()
        if row is None:
            raise ValidationError(f"no pipeline with id {pid} (see `llmos pipeline list`)", field="id")
        stored = json.loads(row["spec"])
        _, stages = check_spec(stored["spec"], self.registry(), stored.get("cwd"))
        for srow in self.db.execute("SELECT * FROM pipeline_stages WHERE pipeline_id=?", (pid,)):
            stage = stages.get(srow["stage"])
            if stage is not None:
                stage.state, stage.job_id, stage.artifact, stage.reason, stage.key = srow["state"], srow["job_id"], srow["artifact"], srow["reason"], srow["key"]
                stage.result = json.loads(srow["result"]) if srow["result"] else None
        return Pipeline(pid, row["name"], stored["spec"], stages, row["state"], row["reason"], row["created_at"], row["ended_at"], stored.get("cwd"))

    def show(self, pid: int) -> dict[str, Any]:
        return self.load(pid).to_dict()

    def list(self, limit: int) -> list[dict[str, Any]]:
        out = []
        for row in self.db.execute("SELECT id FROM pipelines ORDER BY id DESC LIMIT ?", (limit,)).fetchall():
            try:
                p = self.load(row[0]).to_dict()
            except LlmosError as exc:
                p = {"id": row[0], "state": "unreadable", "reason": str(exc), "stages": []}
            out.append(p)
        return out

    def cancel(self, pid: int) -> dict[str, Any]:
        pipe = self.load(pid)
        if pipe.state != "running" and not any(s.state == "serving" for s in pipe.stages.values()):
            return pipe.to_dict()
        self.active[pid] = pipe
        for stage in pipe.stages.values():
            if stage.state == "waiting":
                self._set(pipe, stage, "cancelled", "pipeline cancelled")
            elif stage.state in ("running", "serving") and stage.job_id is not None:
                self._cancel(stage.job_id, f"pipeline {pid} cancelled")
        self._maybe_end(pipe)
        return pipe.to_dict()

    def resume(self, pid: int) -> dict[str, Any]:
        """Run again what did not finish; keep a stage that succeeded if its inputs and
        parameters are unchanged and its artifact still exists."""
        pipe = self.load(pid)
        if pid in self.active and any(s.state in ("waiting", "running") for s in pipe.stages.values()):
            raise ValidationError(f"pipeline {pid} is still running; cancel it first or wait for it", field="id")
        kept = 0
        for stage in pipe.stages.values():
            if stage.state == "succeeded" and self._still_good(pipe, stage):
                kept += 1
                continue
            if stage.state == "serving":
                continue
            stage.job_id, stage.artifact, stage.result = None, None, None
            self._set(pipe, stage, "waiting", "resumed")
        pipe.state, pipe.reason, pipe.ended_at = "running", None, None
        self.store.begin()
        self.db.execute("UPDATE pipelines SET state='running', reason=NULL, ended_at=NULL WHERE id=?", (pid,))
        self.active[pid] = pipe
        self.emit(f"pipeline.{pid}.state", PipelineStateChanged(state="running", reason=f"resumed; {kept} finished stage(s) kept"))
        self.advance(pipe)
        return pipe.to_dict()

    def _still_good(self, pipe: Pipeline, stage: Stage) -> bool:
        try:
            params = self._fill(pipe, stage.params)
        except LlmosError:
            return False
        key = hashlib.sha256(json.dumps([stage.kind, params, stage.resources], sort_keys=True, default=str).encode()).hexdigest()
        if key != stage.key:
            return False
        if stage.artifact is None:
            return True  # a stage with no model output (eval, generate): its result stands
        try:
            art = self.artifacts.find(stage.artifact)
        except ValidationError:
            return False
        return art["removed_at"] is None and Path(art["path"]).exists()

    def recover(self) -> None:
        """At boot: pipelines that were running go on; a stage whose job ended while the kernel
        was down is settled now."""
        for (pid,) in self.db.execute("SELECT id FROM pipelines WHERE state='running'").fetchall():
            try:
                pipe = self.load(pid)
            except LlmosError as exc:
                log.warning("pipeline_unreadable", pipeline=pid, error=str(exc))
                continue
            self.active[pid] = pipe
            for stage in pipe.stages.values():
                if stage.state in ("running", "serving") and stage.job_id is not None:
                    self.by_job[stage.job_id] = (pid, stage.name)
            for stage in list(pipe.stages.values()):
                if stage.state in ("running", "serving") and stage.job_id is not None:
                    try:
                        job = self._find_job(stage.job_id)
                    except LlmosError:
                        continue
                    if job.state in ("succeeded", "failed", "cancelled"):
                        self.job_ended(job)
            self.advance(pipe)

    def uses(self) -> set[str]:
        return {s.artifact for p in self.active.values() for s in p.stages.values() if s.artifact}

