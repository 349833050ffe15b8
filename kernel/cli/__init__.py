"""The ``llmos`` command line, by topic: :mod:`.kernel` (boot, shutdown, status, devices),
:mod:`.jobs` (submit, jobs, job, cancel), :mod:`.events` (logs, events), :mod:`.acct`,
:mod:`.plugins` and :mod:`.state` (check, backup, repair); plugins add their own commands
(``llmos train``, ``llmos prune``...).

Every command takes ``--state-dir`` (default ``$LLMOS_STATE_DIR`` or the XDG state dir) and
``--json``. Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

import llmos
from llmos.errors import ConfigError, LlmosError


class _OneLineUsageError(click.ClickException):
    exit_code = 2


class LlmosGroup(click.Group):
    """Turns llmos errors into one-line messages; adds plugin commands on first use."""

    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        if os.environ.get("LLMOS_NO_PLUGIN_COMMANDS") == "1":
            return
        try:
            from llmos.kernel.plugins import collect_commands, load_plugins

            reg = load_plugins()
            for _plugin, cmd in collect_commands(reg, set(self.commands)):
                self.add_command(cmd)
        except Exception as exc:  # a broken plugin never breaks the CLI
            click.echo(f"warning: plugin commands unavailable: {exc}", err=True)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None:
            self._load_plugin_commands()
            cmd = super().get_command(ctx, cmd_name)
        return cmd

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LlmosError as exc:
            raise click.ClickException(str(exc)) from None
        except click.UsageError as exc:
            # A bad option or argument: one line that says what was wrong and where help is,
            # not click's usage block (exit code 2, as click gives).
            where = exc.ctx.command_path if exc.ctx is not None else "llmos"
            raise _OneLineUsageError(f"{exc.format_message()} (see '{where} --help')") from None
        except KeyboardInterrupt:
            click.echo("", err=True)
            ctx.exit(130)


@click.group(cls=LlmosGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(llmos.__version__, prog_name="llmos")
@click.option("--kernel", "kernel_url", default=None, metavar="tcp://HOST:PORT", help="Reach a remote kernel at its control_tcp endpoint (CurveZMQ; needs --key). Also $LLMOS_KERNEL.")
@click.option("--key", "key_file", default=None, type=click.Path(dir_okay=False), help="The key file (from `llmos keys add NAME`) for --kernel. Also $LLMOS_KEY.")
def cli(kernel_url: str | None, key_file: str | None) -> None:
    """llmos: an operating system for language-model work.

    Start a kernel with `llmos boot`, then submit jobs, follow their logs and manage the machine.
    Every command finds the kernel through its state directory: --state-dir, else
    $LLMOS_STATE_DIR, else $XDG_STATE_HOME/llmos; or reaches a remote one with
    `llmos --kernel tcp://HOST:PORT --key FILE COMMAND`.
    """
    import os

    if kernel_url:
        if not kernel_url.startswith("tcp://"):
            raise click.BadParameter(f"expected tcp://HOST:PORT, got {kernel_url!r}", param_hint="--kernel")
        os.environ["LLMOS_KERNEL"] = kernel_url
    if key_file:
        os.environ["LLMOS_KEY"] = key_file


from llmos.kernel.cli.acct import acct  # noqa: E402 - the commands hang on the group above
from llmos.kernel.cli.demo import demo  # noqa: E402
from llmos.kernel.cli.events import events, logs  # noqa: E402
from llmos.kernel.cli.jobs import cancel, job, jobs, submit  # noqa: E402
from llmos.kernel.cli.kernel import boot, devices, shutdown, status  # noqa: E402
from llmos.kernel.cli.keys import keys  # noqa: E402
from llmos.kernel.cli.lifecycle import artifacts, pipeline  # noqa: E402
from llmos.kernel.cli.plugins import plugins  # noqa: E402
from llmos.kernel.cli.state import state  # noqa: E402

for _command in (demo, boot, shutdown, status, devices, submit, jobs, job, cancel, logs, events, acct, artifacts, pipeline, plugins, keys, state):
    cli.add_command(_command)


def main() -> None:
    """Entry point of the ``llmos`` command."""
    from llmos.kernel.logs import configure_logging

    # Warnings (a broken plugin, say) go to stderr, never into --json output.
    configure_logging(json_lines=False, level="warning", stream=sys.stderr)
    try:
        cli.main(prog_name="llmos")
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
