"""The wordcount plugin against a real kernel, with the fixtures llmos ships for plugin authors.

``llmos_kernel`` boots a kernel in a temporary state directory (one per test) and
``llmos_client`` is connected to it. Run from this directory: ``python -m pytest -q``.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from llmos_wordcount.runner import count_words

import llmos
from llmos.testing import KernelProcess

# An installed llmos-wordcount loads through its entry point; a source checkout is loaded by
# module name (conftest.py puts src/ on the kernel's PYTHONPATH). Naming an installed plugin here
# as well would load it twice, so the marker only names it when it is not installed.
INSTALLED = any(ep.name == "wordcount" for ep in entry_points(group="llmos"))
pytestmark = pytest.mark.llmos(plugins=[] if INSTALLED else ["wordcount=llmos_wordcount"])

TEXTS = {
    "a.txt": "the quick brown fox\njumps over\n",
    "b.txt": "  lazy\tdog  \n\n",
    "c.txt": "",
    "notes.md": "not counted: the glob is *.txt",
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in TEXTS.items():
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_count_words_splits_on_any_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("one  two\tthree\nfour\r\n\n five", encoding="utf-8")
    assert count_words(path) == 5


def test_a_directory_is_counted_file_by_file(llmos_client: llmos.Client, corpus: Path) -> None:
    job = llmos_client.submit("wordcount", params={"path": str(corpus)})
    assert job.result(timeout=60) == {"words": 8, "files": 3}
    events = list(job.events(follow=False))
    files = [e.message() for e in events if e.type == "wordcount.file"]
    assert [(Path(f.path).name, f.words) for f in files] == [
        ("a.txt", 6),
        ("b.txt", 2),
        ("c.txt", 0),
    ]
    assert all(e.topic == f"job.{job.id}.file" for e in events if e.type == "wordcount.file")
    progress = [e.body for e in events if e.type == "job.progress"]
    assert [(p["step"], p["total"], p["message"], p["fields"]["words"]) for p in progress] == [
        (1, 3, "a.txt", 6),
        (2, 3, "b.txt", 8),
        (3, 3, "c.txt", 8),
    ]


def test_a_single_file_and_another_glob(llmos_client: llmos.Client, corpus: Path) -> None:
    job = llmos_client.submit("wordcount", params={"path": str(corpus / "a.txt")})
    assert job.result(timeout=60) == {"words": 6, "files": 1}
    job = llmos_client.submit("wordcount", params={"path": str(corpus), "glob": "*.md"})
    assert job.result(timeout=60) == {"words": 6, "files": 1}


def test_a_missing_path_fails_the_job_with_the_path(
    llmos_client: llmos.Client, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dir"
    job = llmos_client.submit("wordcount", params={"path": str(missing)})
    with pytest.raises(llmos.JobFailed) as err:
        job.result(timeout=60)
    assert str(missing) in err.value.reason
    assert "FileNotFoundError" in err.value.reason
    job = llmos_client.submit("wordcount", params={"path": str(tmp_path), "glob": "*.x"})
    with pytest.raises(llmos.JobFailed, match="no files matching"):
        job.result(timeout=60)


def test_bad_parameters_are_rejected_at_submit(llmos_client: llmos.Client) -> None:
    for params, match in [
        ({}, "missing required parameter 'path'"),
        ({"path": 3}, "parameter 'path' must be text; got 3"),
        ({"path": "/tmp", "glb": "*.txt"}, "unknown parameter 'glb'"),
    ]:
        with pytest.raises(llmos.JobRejected, match=match):
            llmos_client.submit("wordcount", params=params)
    assert llmos_client.jobs() == []  # nothing was queued


def test_the_kind_and_its_schema_are_listed(llmos_client: llmos.Client) -> None:
    kinds = {k["name"]: k for k in llmos_client.kinds()}
    kind = kinds["wordcount"]
    assert kind["plugin"] == "wordcount" and kind["service"] is False
    params = {p["name"]: p for p in kind["params"]}
    assert params["path"]["type"] == "str" and params["path"]["required"] is True
    assert params["glob"]["default"] == "*.txt" and params["encoding"]["default"] == "utf-8"
    plugin = next(p for p in llmos_client.plugins() if p["name"] == "wordcount")
    assert plugin["status"] == "ok"
    assert plugin["kinds"] == ["wordcount"] and plugin["message_types"] == ["wordcount.file"]


def test_the_cli_command(llmos_kernel: KernelProcess, corpus: Path) -> None:
    proc = llmos_kernel.cli("wordcount", str(corpus), "--json")
    assert json.loads(proc.stdout) == {"words": 8, "files": 3}
    proc = llmos_kernel.cli("wordcount", str(corpus / "b.txt"))
    assert proc.stdout.strip() == "2 words in 1 file"
    proc = llmos_kernel.cli("wordcount", str(corpus / "missing"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and str(corpus / "missing") in proc.stderr
