"""The README's commands, run as written, so that the docs cannot drift from the code.

- Every ``llmos ...`` line and backticked ``llmos ...`` span names a command that exists, and
  every option it shows is one that command (or one of its subcommands) takes; every command
  takes ``--json`` and ``--help``, as the README says.
- The Python SDK's snippets run as they stand against a real kernel: the checkpoint they name
  (``path/to/checkpoint``) and the service (``my-service``) are made for them first.
- The remote-kernel commands run against a kernel listening on loopback TCP.
- The pipeline file runs as written, and then the compression and API blocks against the models
  it made (``job:N`` in the README is mapped to that run's job ids; the port to a free one).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import click
import pytest

from tests.conftest import LLMOS, KernelHandle

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _blocks(lang: str) -> list[tuple[str, str]]:
    """Every fenced ``lang`` block of the README, with the heading of the section it is in."""
    found, heading = [], ""
    for match in re.finditer(rf"^(## [^\n]*)$|^```{lang}\n(.*?)^```$", README, re.M | re.S):
        if match.group(1):
            heading = match.group(1)[3:].strip()
        else:
            found.append((heading, match.group(2)))
    return found


def _block(lang: str, section: str, index: int = 0) -> str:
    blocks = [code for heading, code in _blocks(lang) if heading == section]
    assert len(blocks) > index, f"the README has no {lang} block #{index} under '## {section}'"
    return blocks[index]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ commands and options


def _command_lines() -> list[str]:
    """``llmos ...`` lines of the bash blocks (comments cut) and backticked spans of the prose."""
    lines = []
    for _, code in _blocks("bash"):
        for line in code.splitlines():
            line = line.strip()
            if line.startswith("llmos "):
                lines.append(line.split("  #")[0].strip())
            elif "&& llmos " in line:  # the Quickstart's install-and-run line
                lines.append("llmos " + line.split("&& llmos ", 1)[1])
    prose = re.sub(r"^```.*?^```$", "", README, flags=re.M | re.S)
    lines += re.findall(r"`(llmos [^`]+)`", prose.replace("\n", " "))
    return lines


def _root() -> tuple[click.Group, click.Context]:
    from llmos.kernel.cli import cli

    return cli, click.Context(cli, info_name="llmos")


def _options(cmd: click.Command) -> set[str]:
    opts = {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(click.Context(cmd)):
            sub = cmd.get_command(click.Context(cmd), name)
            if sub is not None:
                opts |= _options(sub)
    return opts | {"--help", "-h"}


def _check_line(line: str) -> list[str]:
    """What is wrong with one README command line (nothing: an empty list)."""
    cli, ctx = _root()
    words = line.split()[1:]
    while words and words[0].startswith("--"):  # llmos --kernel URL --key FILE CMD ...
        assert words[0] in _options(cli) - {"--help", "-h"} or words[0] == "--version", words[0]
        words = words[1:] if words[0] == "--version" else words[2:]
    if not words or words[0] == "CMD":
        return []
    problems: list[str] = []
    cmd = cli.get_command(ctx, words[0])
    if cmd is None:
        return [f"`llmos {words[0]}` is not a command (in: {line})"]
    # "a | b | c" (spaced) outside brackets: siblings (top level) or subcommands (of a group).
    rest = " ".join(words[1:])
    depth, parts, current = 0, [], ""
    for i, ch in enumerate(rest):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "|" and depth == 0 and rest[i - 1 : i] == " ":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for alt in parts[1:]:
        name = alt.split()[0] if alt.split() else ""
        if not re.fullmatch(r"[a-z][a-z-]*", name):
            continue
        owner = cmd if isinstance(cmd, click.Group) else cli
        if owner.get_command(click.Context(owner), name) is None:
            problems.append(f"`{name}` is not a command of `{owner.name}` (in: {line})")
    if isinstance(cmd, click.Group):
        # [list|info NAME|...] right after a group: its subcommands.
        for inner in re.findall(r"\[([a-z][^\]]*\|[^\]]*)\]", line):
            for alt in inner.split("|"):
                name = alt.split()[0] if alt.split() else ""
                if re.fullmatch(r"[a-z][a-z-]*", name) and cmd.get_command(click.Context(cmd), name) is None:
                    problems.append(f"`{name}` is not a subcommand of `llmos {cmd.name}` (in: {line})")
        if len(words) > 1 and re.fullmatch(r"[a-z][a-z-]*", words[1]) and cmd.get_command(click.Context(cmd), words[1]) is None:
            problems.append(f"`{words[1]}` is not a subcommand of `llmos {cmd.name}` (in: {line})")
    known = _options(cmd) | (_options(cli) if len(parts) > 1 else set())
    for alt in parts[1:]:
        name = alt.split()[0] if alt.split() else ""
        other = cli.get_command(ctx, name)
        if other is not None:
            known |= _options(other)
    for opt in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", rest):
        if opt not in known:
            problems.append(f"`{opt}` is not an option of `llmos {cmd.name}` (in: {line})")
    return problems


def test_every_command_and_option_the_readme_shows_exists() -> None:
    lines = _command_lines()
    assert len(lines) > 40, lines  # the parser found the README's commands
    problems = [p for line in lines for p in _check_line(line)]
    assert not problems, "\n".join(problems)


def test_every_command_takes_json_and_help_as_the_readme_says() -> None:
    assert "Every command takes `--json`" in README
    cli, ctx = _root()
    missing = []

    def walk(cmd: click.Command, path: str) -> None:
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(click.Context(cmd)):
                walk(cmd.get_command(click.Context(cmd), name), f"{path} {name}")  # type: ignore[arg-type]
            return
        opts = _options(cmd)
        missing.extend(f"{path} {flag}" for flag in ("--json", "--help") if flag not in opts)

    for name in cli.list_commands(ctx):
        walk(cli.get_command(ctx, name), f"llmos {name}")  # type: ignore[arg-type]
    assert not missing, "commands without: " + ", ".join(missing)


# ------------------------------------------------------------------ the SDK and a remote kernel


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(argv)[:300]} exited {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_the_readme_sdk_and_remote_kernel_snippets_run_as_written(tmp_path: Path, short_tmp: Path) -> None:
    pytest.importorskip("torch")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the snippet's jobs need a core beside my-service's")
    from llmos.plugins.lm.checkpoint import save_checkpoint
    from llmos.plugins.lm.config import config_from_preset
    from llmos.plugins.lm.model import Llama
    from llmos.plugins.lm.text import bytes_tokenizer

    # What the snippets name: a checkpoint at path/to/checkpoint, a service called my-service.
    tok = bytes_tokenizer()
    model = Llama(config_from_preset("nano", tok.vocab_size))
    model.init_weights(seed=3)
    save_checkpoint(tmp_path / "path" / "to" / "checkpoint", model, tok.to_json(), {})
    port = _free_port()
    kernel = KernelHandle(short_tmp / "state", "--listen", f"127.0.0.1:{port}").boot()
    env = dict(os.environ, LLMOS_STATE_DIR=str(kernel.state_dir))
    env.pop("LLMOS_KERNEL", None)
    try:
        # One core for the service: the snippet's own jobs need the other (a service without
        # --cpus takes every free core).
        served = _run([*LLMOS, "serve", "path/to/checkpoint", "--name", "my-service", "--cpus", "1"], tmp_path, env)
        assert "my-service" in served.stdout

        sync = _block("python", "The Python SDK", 0)
        out = _run([sys.executable, "-c", sync], tmp_path, env).stdout
        assert re.search(r"^\d+ job\.\d+\.state \{.*'state': 'succeeded'", out, re.M), out  # the events, to the end
        assert re.search(r"^\{'slept': 2(\.0)?, 'cancelled': False\}$", out, re.M), out  # job.result()
        assert len(out.splitlines()[-1]) > 0, out  # the streamed pieces from my-service
        async_block = _block("python", "The Python SDK", 1)
        wrapped = "import asyncio\nimport llmos\n\nasync def main():\n" + textwrap.indent(async_block, "    ") + "\nasyncio.run(main())\n"
        out = _run([sys.executable, "-c", wrapped], tmp_path, env).stdout
        assert re.search(r"^\{'data': 1, 'message': ''\}$", out, re.M), out  # the job's result
        assert re.search(r"^job\.\d+\.state$", out, re.M), out  # its events' topics
        assert out.count("{") >= 2, out  # my-service's replies

        # More than one machine: a key, then the CLI and the SDK over CurveZMQ on loopback.
        issue = re.search(r"`(llmos keys add alice --out alice\.key)`", README)
        assert issue, "the README no longer shows how to issue a key"
        _run([*LLMOS, *shlex.split(issue.group(1))[1:]], tmp_path, env)
        remote = _block("bash", "More than one machine").replace("HOST:PORT", f"127.0.0.1:{port}")
        bare = {k: v for k, v in env.items() if k != "LLMOS_STATE_DIR"}
        bare["LLMOS_STATE_DIR"] = str(tmp_path / "not-a-kernel")  # only the URL and the key can reach it
        for line in remote.splitlines():
            command = line.split("  #")[0].strip()
            if not command:
                continue
            argv = shlex.split(command)
            argv = [*LLMOS, *argv[1:]] if argv[0] == "llmos" else [sys.executable, *argv[1:]]
            out = _run(argv, tmp_path, bare, timeout=60).stdout
            assert str(kernel.pid) in out, (command, out)
    finally:
        kernel.shutdown()


# ------------------------------------------------------------------ the model lifecycle blocks


def _mapped(command: str, ids: dict[str, int], port: int) -> list[str]:
    """A README command with its job ids mapped to this run's, and port 8000 to a free one."""
    command = re.sub(r"job:(\d+)", lambda m: f"job:{ids[m.group(1)]}", command)
    command = command.replace("--http 8000", f"--http {port}").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    return shlex.split(command)


@pytest.mark.slow
def test_the_readme_lifecycle_blocks_are_accepted_and_its_api_block_answers(tmp_path: Path, short_tmp: Path) -> None:
    """The pipeline file and the compression commands are submitted as written (the kernel checks
    a pipeline whole, and every job's parameters, at submit) and cancelled once accepted: running
    them to the end is what the demo test and the compression tests do, at a cost this one keeps
    out of the suite. The API block runs to its answer."""
    pytest.importorskip("torch")
    kernel = KernelHandle(short_tmp / "state").boot()
    env = dict(os.environ, LLMOS_STATE_DIR=str(kernel.state_dir))
    try:
        # job:7 in the README is a trained model: a micro one (one step) here.
        trained = json.loads(_run([*LLMOS, "train", "--data", "stdlib", "--preset", "micro", "--steps", "1", "--json"], tmp_path, env).stdout.splitlines()[-1])
        assert trained["state"] == "succeeded", trained
        train = int(trained["id"])

        (tmp_path / "small.toml").write_text(_block("toml", "Pipelines and artifacts"))
        started = json.loads(_run([*LLMOS, "pipeline", "run", "small.toml", "--json"], tmp_path, env).stdout)
        assert [stage["name"] for stage in started["stages"]] == ["train", "int8", "compare", "serve"], started
        _run([*LLMOS, "pipeline", "cancel", str(started["id"])], tmp_path, env)

        block = [line.split("  #")[0].strip() for line in _block("bash", "Compression").splitlines() if line.strip()]
        assert [line.split()[1] for line in block] == ["quantize", "prune", "eval"], block
        # (eval compares what the two lines before it made: here the trained model three times over.)
        for line in block:
            argv = _mapped(line, {"7": train, "8": train, "9": train}, 0)
            accepted = json.loads(_run([*LLMOS, *argv[1:], "--detach", "--json"], tmp_path, env).stdout)
            _run([*LLMOS, "cancel", str(accepted["id"])], tmp_path, env)

        api = [line.strip() for line in _block("bash", "The OpenAI-compatible API").replace("\\\n", " ").splitlines() if line.strip()]
        port = _free_port()
        _run([*LLMOS, *_mapped(api[0].split("  #")[0], {"3": train}, port)[1:]], tmp_path, env, timeout=120)
        curl = _mapped(api[1], {}, port)
        deadline = time.monotonic() + 60
        while True:
            answer = subprocess.run(curl, capture_output=True, text=True, timeout=60)
            if answer.returncode == 0 and '"choices"' in answer.stdout:
                break
            assert time.monotonic() < deadline, (answer.returncode, answer.stdout, answer.stderr)
            time.sleep(0.5)
        body = json.loads(answer.stdout)
        assert body["model"] == "mini" and body["usage"]["completion_tokens"] == 32, body
    finally:
        kernel.shutdown()
