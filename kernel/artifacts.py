"""Artifacts: the models jobs produce, registered in the kernel's SQLite state.

An artifact is content-addressed: its id is the sha256 over its files (names and contents), which
the worker computes when the job announces a checkpoint (``ctx.artifact(path, kind="checkpoint")``;
the kernel never reads model files). It keeps its ``llmos.json`` provenance, its size, when it was
made, the job that made it and its parents: the artifacts that job took as inputs.

Jobs name inputs as ``artifact:<id>`` (a unique prefix is enough), ``job:<id>`` (that job's newest
checkpoint) or a path; the kernel resolves the first two at submit, refuses a missing, ambiguous
or (without ``allow_rejected``) rejected one, and records what the job used. The worker checks
each input's hash before the job runs, so an altered file is reported, never silently used.

``gc`` removes what nothing references: an artifact stays while a pending or running job (a
service included) uses it, while it is a pipeline stage's output, and while it is the final
output of a job that succeeded. Files are deleted only inside the state directory; a row that is
removed stays as a tombstone, so lineage still shows where a model came from.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from llmos.errors import JobRejected, ValidationError
from llmos.kernel.store import Store

__all__ = ["SCHEMA", "Artifacts"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    job_id INTEGER,
    job_kind TEXT,
    size INTEGER NOT NULL DEFAULT 0,
    files INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    rejected TEXT,
    provenance TEXT NOT NULL DEFAULT '{}',
    removed_at REAL,
    removed_why TEXT
);
CREATE INDEX IF NOT EXISTS artifacts_job ON artifacts(job_id);
CREATE INDEX IF NOT EXISTS artifacts_path ON artifacts(path);
CREATE TABLE IF NOT EXISTS artifact_parents (child TEXT NOT NULL, parent TEXT NOT NULL, PRIMARY KEY (child, parent));
CREATE TABLE IF NOT EXISTS job_inputs (job_id INTEGER NOT NULL, param TEXT NOT NULL, artifact TEXT NOT NULL, PRIMARY KEY (job_id, param));
CREATE TABLE IF NOT EXISTS pipelines (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    created_at REAL NOT NULL,
    ended_at REAL
);
CREATE TABLE IF NOT EXISTS pipeline_stages (
    pipeline_id INTEGER NOT NULL,
    stage TEXT NOT NULL,
    state TEXT NOT NULL,
    job_id INTEGER,
    artifact TEXT,
    reason TEXT,
    key TEXT,
    result TEXT,
    PRIMARY KEY (pipeline_id, stage)
);
"""

#: The prefix of a reference to an artifact, and to a job's main output.
ARTIFACT, JOB = "artifact:", "job:"


def _row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["provenance"] = json.loads(out["provenance"] or "{}")
    out["rejected"] = json.loads(out["rejected"]) if out["rejected"] else None
    return out


class Artifacts:
    def __init__(self, store: Store, state_dir: Path) -> None:
        self.store = store
        self.db = store.db
        self.state_dir = state_dir.resolve()
        self.db.executescript(SCHEMA)

    # -- registering --

    def register(self, job_id: int, job_kind: str, body: dict[str, Any]) -> str | None:
        """A ``job.artifact`` event whose meta carries the worker's hash: record it (once per
        content), with the job's inputs as its parents. An earlier artifact at the same path is
        replaced by it (its files are gone). Returns the id, or None if it is not a registered kind."""
        meta = body.get("meta") or {}
        digest = meta.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            return None
        path = str(body.get("path", ""))
        provenance = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
        rejected = provenance.get("rejected")
        self.store.begin()
        now = time.time()
        self.db.execute(
            "UPDATE artifacts SET removed_at=?, removed_why=? WHERE path=? AND id<>? AND removed_at IS NULL",
            (now, f"replaced by {digest[:12]} (same path)", path, digest),
        )
        self.db.execute(
            "INSERT INTO artifacts (id, path, kind, job_id, job_kind, size, files, created_at, rejected, provenance) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(id) DO UPDATE SET path=excluded.path, removed_at=NULL, removed_why=NULL, rejected=excluded.rejected,"
            " job_id=COALESCE(artifacts.job_id, excluded.job_id)",
            (digest, path, str(body.get("kind", "checkpoint")), job_id, job_kind, int(meta.get("size") or 0), int(meta.get("files") or 0), now,
             json.dumps(rejected) if rejected else None, json.dumps(provenance)),
        )
        for (parent,) in self.db.execute("SELECT artifact FROM job_inputs WHERE job_id=?", (job_id,)).fetchall():
            if parent != digest:
                self.db.execute("INSERT OR IGNORE INTO artifact_parents (child, parent) VALUES (?, ?)", (digest, parent))
        return digest

    # -- resolving references --

    def find(self, ref: str) -> dict[str, Any]:
        """The artifact ``ref`` names: an id or a unique prefix (with or without ``artifact:``),
        or ``job:<id>`` for that job's newest checkpoint. ValidationError if none or several."""
        text = ref[len(ARTIFACT):] if ref.startswith(ARTIFACT) else ref
        if ref.startswith(JOB):
            number = ref[len(JOB):]
            if not number.isdigit():
                raise ValidationError(f"a job's output is named job:ID (a job number), got {ref!r}")
            row = self.db.execute(
                "SELECT * FROM artifacts WHERE job_id=? AND removed_at IS NULL ORDER BY created_at DESC, rowid DESC LIMIT 1", (int(number),)
            ).fetchone()
            if row is None:
                raise ValidationError(f"job {number} has no registered model artifact (it published no checkpoint, or it was removed)")
            return _row(row)
        if len(text) < 4 or any(c not in "0123456789abcdef" for c in text):
            raise ValidationError(f"an artifact is named by its id or a prefix of it (at least 4 hex digits), got {ref!r}")
        rows = self.db.execute("SELECT * FROM artifacts WHERE id LIKE ? ORDER BY created_at LIMIT 3", (text + "%",)).fetchall()
        if not rows:
            raise ValidationError(f"no artifact {text!r} (see `llmos artifacts list`)")
        if len(rows) > 1:
            raise ValidationError(f"artifact prefix {text!r} is ambiguous: it names {', '.join(r['id'][:12] for r in rows)}...; give more digits")
        return _row(rows[0])

    def resolve_inputs(self, kind: str, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Replace ``artifact:``/``job:`` references in string parameters (and lists of them) by
        their paths; also note plain paths that are registered artifacts. Returns the new params
        and {param: artifact id} of the inputs. JobRejected for a bad reference, a removed
        artifact, or a rejected one without ``allow_rejected``."""
        out = dict(params)
        inputs: dict[str, str] = {}
        for name, value in params.items():
            values = value if isinstance(value, list) else [value]
            resolved = []
            for i, item in enumerate(values):
                if isinstance(item, str) and item.startswith((ARTIFACT, JOB)):
                    try:
                        art = self.find(item)
                    except ValidationError as exc:
                        raise JobRejected(f"{kind}: {name}: {exc}", kind=kind, field=name) from None
                    if art["removed_at"] is not None:
                        raise JobRejected(f"{kind}: {name}: artifact {art['id'][:12]} was removed ({art['removed_why']})", kind=kind, field=name)
                    if art["rejected"] and not params.get("allow_rejected"):
                        why = art["rejected"].get("reason", "rejected") if isinstance(art["rejected"], dict) else str(art["rejected"])
                        raise JobRejected(
                            f"{kind}: {name}: artifact {art['id'][:12]} was rejected by its quality gate ({why}); pass allow_rejected=true to use it anyway",
                            kind=kind, field=name,
                        )
                    resolved.append(art["path"])
                    inputs[name if len(values) == 1 else f"{name}[{i}]"] = art["id"]
                else:
                    resolved.append(item)
                    if isinstance(item, str) and item.startswith("/"):
                        row = self.db.execute("SELECT id FROM artifacts WHERE path=? AND removed_at IS NULL ORDER BY created_at DESC LIMIT 1", (item,)).fetchone()
                        if row is not None:
                            inputs[name if len(values) == 1 else f"{name}[{i}]"] = row[0]
            out[name] = resolved if isinstance(value, list) else resolved[0]
        return out, inputs

    def record_inputs(self, job_id: int, inputs: dict[str, str]) -> None:
        if inputs:
            self.store.begin()
            self.db.executemany("INSERT OR REPLACE INTO job_inputs (job_id, param, artifact) VALUES (?, ?, ?)", [(job_id, k, v) for k, v in inputs.items()])

    def inputs_of(self, job_id: int) -> dict[str, dict[str, Any]]:
        """{param: {id, path}} of a job's inputs, for the worker to check before it runs."""
        rows = self.db.execute("SELECT j.param, a.id, a.path FROM job_inputs j JOIN artifacts a ON a.id = j.artifact WHERE j.job_id=?", (job_id,)).fetchall()
        return {r[0]: {"id": r[1], "path": r[2]} for r in rows}

    # -- reading --

    def list(self, limit: int = 1000, include_removed: bool = False) -> list[dict[str, Any]]:
        where = "" if include_removed else "WHERE removed_at IS NULL"
        rows = self.db.execute(f"SELECT * FROM artifacts {where} ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,)).fetchall()
        return [self._brief(_row(r)) for r in rows]

    def _brief(self, art: dict[str, Any]) -> dict[str, Any]:
        out = {k: art[k] for k in ("id", "path", "kind", "job_id", "job_kind", "size", "files", "created_at", "removed_at", "removed_why")}
        out["rejected"] = bool(art["rejected"])
        out["parents"] = [r[0] for r in self.db.execute("SELECT parent FROM artifact_parents WHERE child=?", (art["id"],))]
        return out

    def show(self, ref: str) -> dict[str, Any]:
        art = self.find(ref)
        brief = self._brief(art)
        brief["provenance"] = art["provenance"]
        brief["rejected_reason"] = art["rejected"]
        brief["used_by"] = [r[0] for r in self.db.execute("SELECT DISTINCT job_id FROM job_inputs WHERE artifact=? ORDER BY job_id", (art["id"],))]
        return brief

    def lineage(self, ref: str) -> dict[str, Any]:
        """The artifact and its ancestors, as a tree (``parents`` nested), each with its job and
        the data its training read (from provenance)."""
        root = self.find(ref)
        seen: set[str] = set()

        def node(art: dict[str, Any]) -> dict[str, Any]:
            out = self._brief(art)
            data = art["provenance"].get("data") if isinstance(art["provenance"], dict) else None
            if data:
                out["data"] = {k: data[k] for k in ("source", "tokens_sha256", "train_tokens", "files") if k in data}
            produced = art["provenance"].get("produced_by") if isinstance(art["provenance"], dict) else None
            if produced:
                out["produced_by"] = produced
            children = []
            for pid in out.pop("parents"):
                if pid in seen:
                    continue
                seen.add(pid)
                row = self.db.execute("SELECT * FROM artifacts WHERE id=?", (pid,)).fetchone()
                children.append(node(_row(row)) if row is not None else {"id": pid, "missing": True})
            out["parents"] = children
            return out

        seen.add(root["id"])
        return node(root)

    def holds_live(self, folder: Path) -> bool:
        """Whether a registered artifact (not removed) lies in ``folder``."""
        inside = str(folder.resolve()) + "/%"
        row = self.db.execute("SELECT 1 FROM artifacts WHERE removed_at IS NULL AND (path = ? OR path LIKE ?) LIMIT 1", (str(folder.resolve()), inside)).fetchone()
        return row is not None

    # -- removing --

    def referenced(self, active_jobs: set[int]) -> dict[str, str]:
        """{artifact id: why it must stay}."""
        why: dict[str, str] = {}
        if active_jobs:
            marks = ",".join("?" * len(active_jobs))
            for aid, job_id in self.db.execute(f"SELECT artifact, job_id FROM job_inputs WHERE job_id IN ({marks})", tuple(active_jobs)):
                why.setdefault(aid, f"used by job {job_id}")
            for aid, job_id in self.db.execute(f"SELECT id, job_id FROM artifacts WHERE job_id IN ({marks})", tuple(active_jobs)):
                why.setdefault(aid, f"made by job {job_id}, still running")
        for aid, pipeline, stage in self.db.execute("SELECT artifact, pipeline_id, stage FROM pipeline_stages WHERE artifact IS NOT NULL"):
            why.setdefault(aid, f"output of stage {stage} of pipeline {pipeline}")
        # A succeeded job's final output (its newest checkpoint).
        for (aid, job_id) in self.db.execute(
            "SELECT a.id, a.job_id FROM artifacts a JOIN jobs j ON j.id = a.job_id WHERE j.state='succeeded' AND a.removed_at IS NULL"
            " AND a.created_at = (SELECT MAX(b.created_at) FROM artifacts b WHERE b.job_id = a.job_id)"
        ):
            why.setdefault(aid, f"the output of job {job_id}")
        return why

    def remove(self, ref: str, active_jobs: set[int], *, force: bool = False) -> dict[str, Any]:
        art = self.find(ref)
        if art["removed_at"] is not None:
            return self._brief(art)
        keep = self.referenced(active_jobs).get(art["id"])
        if keep and (not force or keep.startswith(("used by job", "made by job"))):
            raise ValidationError(f"artifact {art['id'][:12]} is in use ({keep}); " + ("it cannot be removed while that job runs" if keep.startswith(("used", "made")) else "pass --force to remove it anyway"))
        self._delete(art, "removed by user")
        return self._brief(_row(self.db.execute("SELECT * FROM artifacts WHERE id=?", (art["id"],)).fetchone()))

    def gc(self, active_jobs: set[int], *, dry_run: bool = False) -> list[dict[str, Any]]:
        keep = self.referenced(active_jobs)
        rows = [_row(r) for r in self.db.execute("SELECT * FROM artifacts WHERE removed_at IS NULL ORDER BY created_at")]
        out = []
        for art in rows:
            if art["id"] in keep:
                continue
            if not dry_run:
                self._delete(art, "garbage-collected: nothing referenced it")
            out.append(self._brief(art))
        return out

    def _delete(self, art: dict[str, Any], why: str) -> None:
        path = Path(art["path"])
        # Files are deleted only inside the state dir (a job's own output folder); a path the user
        # chose (--output) is theirs: the record goes, the files stay.
        inside = path.resolve().is_relative_to(self.state_dir) if path.exists() else False
        shared = self.db.execute("SELECT COUNT(*) FROM artifacts WHERE path=? AND id<>? AND removed_at IS NULL", (art["path"], art["id"])).fetchone()[0]
        if inside and not shared:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        self.store.begin()
        self.db.execute("UPDATE artifacts SET removed_at=?, removed_why=? WHERE id=?", (time.time(), why if inside else f"{why} (files outside the state dir kept)", art["id"]))
