"""Every error llmos raises, in one tree.

::

    LlmosError
      ProtocolError        bad frames, unknown type, failed validation, oversize
        UnknownMessageType
        ValidationError    a field is missing, unknown or of the wrong type
        MessageTooLarge
      KernelUnavailable    no kernel at the endpoint (with the endpoint and what to run)
      KernelError          the kernel answered a request with an error it could not classify
        StorageFull        the state dir's disk is full: submits are refused until there is room
      PluginError          import/registration failures, keeps .plugin
      ResourceError        cannot fit now / can never fit, with what was asked and what exists
      ServiceError         a service request failed
        ServiceUnavailable no service of that name is running
        ServiceBusy        its queue is full
      JobError             anything about one job, keeps .job_id
        JobNotFound
        JobRejected        refused at submit: unknown kind, bad parameters, never fits
        JobFailed          ended in ``failed`` (keeps .reason and .exit_code)
        JobCancelled       ended in ``cancelled``
      ConfigError          a bad setting, file or value

Each error has a stable integer ``code`` so that an error crossing the bus keeps its class:
the kernel sends ``ename``, ``evalue`` and ``code``; :func:`error_from_reply` rebuilds the
exception on the caller's side.
"""

from __future__ import annotations

from typing import Any


class LlmosError(Exception):
    """Base class of every llmos error."""

    code = 1

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return self.message


class ProtocolError(LlmosError):
    """A frame could not be decoded or a message failed validation."""

    code = 100


class UnknownMessageType(ProtocolError):
    """The header names a message type that nobody registered."""

    code = 101


class ValidationError(ProtocolError):
    """A message or parameter field is missing, unknown or of the wrong type."""

    code = 102


class MessageTooLarge(ProtocolError):
    """A frame or one of its values is larger than the bus allows."""

    code = 103


class KernelUnavailable(LlmosError):
    """No kernel answers at the endpoint; ``.state_dir`` and ``.endpoint`` say where we looked."""

    code = 200


class KernelError(LlmosError):
    """The kernel answered with an error that has no more specific class."""

    code = 201


class StorageFull(KernelError):
    """The state dir's disk is full: the kernel refuses submits and workers' events until there
    is room again (keeps .state_dir and .free, in bytes)."""

    code = 202


class ConfigError(LlmosError):
    """A setting, a config file or a value given on the command line is wrong."""

    code = 210


class PluginError(LlmosError):
    """A plugin failed to import or to register; ``.plugin`` names it."""

    code = 300


class ServiceError(LlmosError):
    """A service request failed: no such service, the service is busy, or its replica died."""

    code = 600


class ServiceUnavailable(ServiceError):
    """No running service has that name."""

    code = 601


class ServiceBusy(ServiceError):
    """The service's queue is full; try again later."""

    code = 602


class ResourceError(LlmosError):
    """A resource request that cannot be met; ``.requested`` and ``.available`` say why."""

    code = 400


class JobError(LlmosError):
    """Something about one job; ``.job_id`` names it."""

    code = 500


class JobNotFound(JobError):
    """No job has that id."""

    code = 501


class JobRejected(JobError):
    """The kernel refused the job at submit time (unknown kind, bad parameters)."""

    code = 502


class JobFailed(JobError):
    """The job ended in state ``failed``; ``.reason`` and ``.exit_code`` say how."""

    code = 503


class JobCancelled(JobError):
    """The job ended in state ``cancelled``."""

    code = 504


_BY_CODE: dict[int, type[LlmosError]] = {}


def _index(cls: type[LlmosError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _index(sub)


_index(LlmosError)


def error_from_reply(ename: str, evalue: str, code: int, context: dict[str, Any] | None = None) -> LlmosError:
    """Rebuild the exception an error reply describes (unknown codes become :class:`KernelError`)."""
    cls = _BY_CODE.get(code, KernelError)
    context = {k: v for k, v in (context or {}).items() if k not in ("message", "context", "code")}
    err = cls(evalue, **context)
    if cls is KernelError and ename:
        err.ename = ename  # type: ignore[attr-defined]
    return err


__all__ = [
    "ConfigError",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "JobNotFound",
    "JobRejected",
    "KernelError",
    "KernelUnavailable",
    "LlmosError",
    "MessageTooLarge",
    "PluginError",
    "ProtocolError",
    "ResourceError",
    "ServiceBusy",
    "ServiceError",
    "ServiceUnavailable",
    "StorageFull",
    "UnknownMessageType",
    "ValidationError",
    "error_from_reply",
]
