"""Content hashes of artifacts (a model directory or a file): what the worker computes when a job
announces a checkpoint, what it checks before a job uses one, and what ``llmos artifacts
verify`` compares."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["describe", "tree_hash"]

_CHUNK = 1 << 20


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_hash(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """(sha256, total bytes, file count) over a directory's regular files (relative names and
    contents, in name order) or one file. FileNotFoundError if it is not there."""
    root = Path(path)
    if root.is_file():
        return _file_sha256(root), root.stat().st_size, 1
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    outer = hashlib.sha256()
    size = count = 0
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = file.relative_to(root).as_posix()
        outer.update(rel.encode() + b"\0" + _file_sha256(file).encode() + b"\n")
        size += file.stat().st_size
        count += 1
    return outer.hexdigest(), size, count


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a checkpoint announcement carries: its hash, size, file count and ``llmos.json``."""
    digest, size, count = tree_hash(path)
    out: dict[str, Any] = {"sha256": digest, "size": size, "files": count}
    manifest = Path(path) / "llmos.json"
    provenance: dict[str, Any] = {}
    if manifest.is_file():
        try:
            provenance = json.loads(manifest.read_text())
        except (OSError, ValueError):
            provenance = {}
    if isinstance(provenance, dict):
        provenance.setdefault("versions", _versions())
        out["provenance"] = provenance
    return out


def _versions() -> dict[str, str]:
    """The library versions of the process that made it (those it has loaded)."""
    import platform
    import sys

    from llmos import __version__

    out = {"llmos": __version__, "python": platform.python_version()}
    for name in ("torch", "safetensors", "tokenizers", "numpy", "transformers", "compressed_tensors"):
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, "__version__", None), str):
            out[name] = module.__version__
    return out
