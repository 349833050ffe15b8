"""``llmos wordcount PATH``: submit a ``wordcount`` job to the running kernel and print the count.

Registered with the ``llmos_register_commands`` hook, which imports this module only when it is called.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

import llmos


@click.command("wordcount")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--glob",
    "pattern",
    default="*.txt",
    show_default=True,
    help="Which files of a directory to count.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The kernel's state directory (default: $LLMOS_STATE_DIR or $XDG_STATE_HOME/llmos).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the job's result as JSON.")
def wordcount(path: Path, pattern: str, state_dir: Path | None, as_json: bool) -> None:
    """Count the words in PATH (a text file, or a directory of text files) with a wordcount job."""
    # The job runs in a folder of its own: an absolute path means the same there.
    params = {"path": str(path.expanduser().absolute()), "glob": pattern}
    try:
        with llmos.connect(state_dir) as client:
            result = client.submit("wordcount", params=params).result()
    except llmos.LlmosError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        files = result["files"]
        click.echo(f"{result['words']} words in {files} file{'' if files == 1 else 's'}")


__all__ = ["wordcount"]
