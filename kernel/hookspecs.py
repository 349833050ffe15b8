"""Hook specifications: every way a plugin extends llmos.

Plugins implement these with ``@llmos.hookimpl`` (pluggy pairs markers by the project name
``"llmos"``, so plugins never import the kernel). Registration hooks take a ``register``
callback; each registration is checked when it is made and attributed to its plugin, so one bad
plugin is reported and isolated while every other one keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("llmos")

# ---------------------------------------------------------------------------------------------
# registration: called once per plugin manager, when plugins are loaded


@hookspec
def llmos_register_job_kinds(register: Callable[[Any], None]) -> None:
    """Register job kinds: call ``register(llmos.JobKind(...))`` once per kind.

    A kind has a dotted or plain name (``"diag.sleep"``, ``"train"``), a parameter schema (a
    dataclass whose fields carry types, defaults and bounds; see :func:`llmos.param`), default
    resources (:class:`llmos.Resources`) and a runner class or ``"module:Class"`` string. The kernel
    validates submitted parameters against the schema; the worker runs the runner.

    :param register: takes one :class:`llmos.JobKind`. A name another plugin registered first
        marks this plugin broken (reported by ``llmos plugins``), never the other one.

    Called in: kernel | worker | cli
    """


@hookspec
def llmos_register_services(register: Callable[[Any], None]) -> None:
    """Register services: long-lived workers such as a monitor or an inference server.

    Call ``register(llmos.ServiceKind(...))``. A service is submitted like a job of its name and
    runs until cancelled; ``autostart=True`` services are started by the kernel at boot.

    :param register: takes one :class:`llmos.ServiceKind`.

    Called in: kernel | worker | cli
    """


@hookspec
def llmos_register_commands(register: Callable[[Any], None]) -> None:
    """Register CLI commands: call ``register(command)`` with a :class:`click.Command`.

    The command is added to the ``llmos`` group under its own name; a name that an llmos command
    already has is refused and reported.

    :param register: takes one ``click.Command`` (or ``click.Group``).

    Called in: cli | kernel (to list each plugin's commands)
    """


@hookspec
def llmos_register_message_types(register: Callable[[type], None]) -> None:
    """Register the plugin's own bus message types: call ``register(cls)`` for each class
    decorated with :func:`llmos.message`, so that the kernel imports and validates them.

    :param register: takes one message class.

    Called in: kernel | worker | cli
    """


# ---------------------------------------------------------------------------------------------
# dispatch: the first plugin that answers wins


@hookspec(firstresult=True)
def llmos_load_model(path: str, device: Any, dtype: Any) -> Any:
    """Load the model stored at ``path`` if this plugin knows its format, else return None.

    Runners call it through :meth:`llmos.JobContext.load_model`; the built-in ``lm`` plugin
    loads Hugging Face-style Llama checkpoint directories. Stops at the first non-None result.

    :param path: a directory or file holding a model.
    :param device: the torch device to load onto (None: the CPU).
    :param dtype: the torch dtype of the weights (None: as stored).

    Called in: worker
    """


# ---------------------------------------------------------------------------------------------
# worker lifecycle: broadcast hooks, each implementation called on its own


@hookspec
def llmos_job_starting(ctx: Any) -> None:
    """Observe a job about to run (after its context exists, before the runner's ``setup``).

    An exception here is logged with the plugin's name and does not stop the job.

    :param ctx: the job's :class:`llmos.JobContext`.

    Called in: worker
    """


@hookspec
def llmos_job_finished(ctx: Any, outcome: str, error: str | None) -> None:
    """Observe a job that finished running (after the runner's ``teardown``).

    :param ctx: the job's :class:`llmos.JobContext`.
    :param outcome: ``"succeeded"``, ``"failed"`` or ``"cancelled"``.
    :param error: the failure's one-line reason, or None.

    Called in: worker
    """
