"""``llmos plugins new NAME``: the files of a working plugin package, tests included."""

from __future__ import annotations

from pathlib import Path

PYPROJECT = '''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "llmos-{dash}"
version = "0.1.0"
description = "An llmos plugin: {name}"
requires-python = ">=3.11"
dependencies = ["llmos"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points.llmos]
{name} = "llmos_{name}"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

README = '''# llmos-{dash}

An llmos plugin. It registers the job kind `{name}.hello`, the CLI command `llmos {dash}-hello`
and the message type `{name}.greeted`.

```bash
pip install -e '.[test]' && python -m pytest -q   # its tests boot a real kernel
llmos plugins install .                        # into the environment llmos runs in
llmos submit {name}.hello -p who=you --wait
```
'''

INIT = '''"""llmos plugin {name}: registers what it offers; the work happens in runner.py, in workers.

Keep this module light: the kernel imports it to read the registrations.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

import llmos

#: The llmos plugin API versions this plugin works with.
LLMOS_API = ">=1,<2"


@dataclass(frozen=True)
class HelloParams:
    who: str = llmos.param("world", help="Whom to greet.")
    times: int = llmos.param(1, ge=1, le=1000, help="How many greetings.")


@llmos.message("{name}.greeted")
@dataclass(frozen=True, slots=True, kw_only=True)
class Greeted:
    who: str
    n: int


@llmos.hookimpl
def llmos_register_job_kinds(register):
    register(
        llmos.JobKind(
            "{name}.hello",
            runner="llmos_{name}.runner:HelloRunner",
            params=HelloParams,
            resources=llmos.Resources(cpus=0),
            help="Greet someone, a few times.",
        )
    )


@llmos.hookimpl
def llmos_register_message_types(register):
    register(Greeted)


@llmos.hookimpl
def llmos_register_commands(register):
    @click.command("{dash}-hello")
    @click.argument("who", default="world")
    @click.option("--state-dir", default=None, help="The kernel's state directory.")
    def hello(who, state_dir):
        """Greet WHO through a {name}.hello job."""
        try:
            with llmos.connect(state_dir) as client:
                result = client.submit("{name}.hello", params={{"who": who}}).result(timeout=60)
        except llmos.LlmosError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(result["greeting"])

    register(hello)
'''

RUNNER = '''"""The {name}.hello runner (imported only in worker processes)."""

from __future__ import annotations

import llmos

from llmos_{name} import Greeted


class HelloRunner(llmos.Runner):
    def run(self, ctx: llmos.JobContext) -> dict:
        greeting = f"hello, {{ctx.params.who}}"
        for n in range(1, ctx.params.times + 1):
            if ctx.cancelled:
                break
            ctx.progress(n, ctx.params.times)
            ctx.emit("greeted", Greeted(who=ctx.params.who, n=n))
            ctx.log.info("greeted", who=ctx.params.who, n=n)
        return {{"greeting": greeting, "times": ctx.params.times}}
'''

CONFTEST = '''"""Make the plugin importable before it is installed: here and in the kernel's processes."""

import os
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
'''

TEST = '''"""Tests with the fixtures llmos ships: a real kernel (llmos_kernel) and a client (llmos_client)."""

import pytest

import llmos

pytestmark = pytest.mark.llmos(plugins=["{name}=llmos_{name}"])


def test_hello(llmos_client):
    job = llmos_client.submit("{name}.hello", params={{"who": "tests", "times": 3}})
    assert job.result(timeout=60) == {{"greeting": "hello, tests", "times": 3}}
    greeted = [e.body["n"] for e in job.events(follow=False) if e.type == "{name}.greeted"]
    assert greeted == [1, 2, 3]


def test_bad_parameter_is_rejected(llmos_client):
    with pytest.raises(llmos.JobRejected, match="times"):
        llmos_client.submit("{name}.hello", params={{"times": 0}})


def test_kind_is_listed(llmos_client):
    kinds = {{k["name"]: k for k in llmos_client.kinds()}}
    assert [p["name"] for p in kinds["{name}.hello"]["params"]] == ["who", "times"]
'''


def write_skeleton(name: str, target: Path) -> list[Path]:
    """Write the plugin package ``llmos-<name>`` into ``target``; returns the files written."""
    dash = name.replace("_", "-")
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"src/llmos_{name}/__init__.py": INIT,
        f"src/llmos_{name}/runner.py": RUNNER,
        "tests/conftest.py": CONFTEST,
        f"tests/test_{name}.py": TEST,
    }
    written = []
    for rel, template in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(name=name, dash=dash))
        written.append(path)
    return written


__all__ = ["write_skeleton"]
