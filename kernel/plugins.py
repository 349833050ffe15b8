"""Loading plugins from the ``llmos`` entry-point group and collecting what they register.

Every load builds a fresh plugin manager (:func:`load_plugins`); nothing happens at import time.
A plugin that fails to import, names an unknown hook, or registers something invalid is marked
``broken`` with the cause, and the rest load as if it were not there.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import json
import math
import os
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
import structlog

from llmos.errors import JobRejected, ValidationError
from llmos.kernel import hookspecs
from llmos.params import describe_schema, validate_params
from llmos.plugin import JobKind, Resources, ServiceKind
from llmos.protocol import message_types, register_message_type

log = structlog.get_logger(__name__)

GROUP = "llmos"
BUILTIN_PREFIX = "llmos.plugins."


@dataclass
class PluginRecord:
    """One plugin as ``llmos plugins`` shows it."""

    name: str
    module: str
    dist: str | None = None
    version: str | None = None
    builtin: bool = False
    status: str = "ok"
    error: str | None = None
    traceback: str | None = None
    api: str | None = None
    hooks: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    message_types: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class KindEntry:
    """A registered job kind (or service) and the plugin it came from."""

    spec: JobKind | ServiceKind
    plugin: str

    @property
    def service(self) -> bool:
        return isinstance(self.spec, ServiceKind)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "plugin": self.plugin,
            "service": self.service,
            "help": self.spec.help,
            "params": describe_schema(self.spec.params),
            "resources": self.spec.resources.to_dict(),
            "ranks": getattr(self.spec, "ranks", None),
        }


@dataclass
class Registry:
    """Everything the loaded plugins registered."""

    pm: pluggy.PluginManager
    plugins: dict[str, PluginRecord] = field(default_factory=dict)
    kinds: dict[str, KindEntry] = field(default_factory=dict)
    commands: list[tuple[str, Any]] = field(default_factory=list)
    #: kinds that exist but may not be submitted (their plugin broke, their service is quarantined)
    unavailable: dict[str, str] = field(default_factory=dict)

    def kind(self, name: str) -> KindEntry:
        """The entry for a job kind; JobRejected listing the known kinds if there is none."""
        if name in self.unavailable:
            raise JobRejected(f"job kind {name!r} is unavailable: {self.unavailable[name]}", kind=name)
        try:
            return self.kinds[name]
        except KeyError:
            pass
        for record in self.plugins.values():
            if record.status != "ok" and name.split(".")[0] == record.name:
                raise JobRejected(f"job kind {name!r} belongs to plugin {record.name!r}, which is {record.status}: {record.error}", kind=name)
        known = ", ".join(sorted(self.kinds)) or "(none)"
        raise JobRejected(f"unknown job kind {name!r}; known kinds: {known}", kind=name)

    def validate(
        self, kind: str, params: dict[str, Any] | None, resources: dict[str, Any] | None, *, coerce: bool = False, cwd: str | None = None
    ) -> tuple[KindEntry, dict[str, Any], Resources]:
        """Check a submit against the kind's schema; returns the entry, full params (relative paths
        made absolute against the submitter's ``cwd``) and resources."""
        entry = self.kind(kind)
        if cwd is not None and not os.path.isabs(cwd):
            raise JobRejected(f"the submitter's working directory must be an absolute path, got {cwd!r}", kind=kind, field="cwd")
        try:
            full = validate_params(entry.spec.params, params, kind=kind, coerce=coerce, cwd=cwd)
            res = Resources.parse(resources, base=entry.spec.resources)
        except ValidationError as exc:
            raise JobRejected(str(exc), kind=kind, field=exc.context.get("field")) from None
        if entry.spec.check is not None:
            try:
                entry.spec.check(entry.spec.params(**full))
            except (ValueError, TypeError, OSError) as exc:
                raise JobRejected(f"{kind}: {exc}", kind=kind) from None
            except Exception as exc:
                raise JobRejected(f"{kind}: the plugin's check failed: {type(exc).__name__}: {exc}", kind=kind) from None
        if entry.spec.ranks is not None:
            given = {k for k, v in (resources or {}).items() if v is not None}
            res = resources_for_ranks(kind, entry.spec.ranks, int(full[entry.spec.ranks]), res, entry.spec.resources, given)
        return entry, full, res

    def describe_plugins(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in sorted(self.plugins.values(), key=lambda r: r.name)]

    def describe_kinds(self) -> list[dict[str, Any]]:
        return [e.describe() for _, e in sorted(self.kinds.items())]


def resources_for_ranks(kind: str, name: str, n: int, res: Resources, base: Resources, given: set[str]) -> Resources:
    """The resources of a job of ``n`` ranks (the parameter ``name``): the kind's defaults that the
    submitter did not set are per rank and scale with ``n``; each rank must get a device of its own
    (whole GPUs, or at least one CPU core when there are no GPUs)."""
    if n <= 1:
        return res
    cpus = res.cpus if "cpus" in given else base.cpus * n
    memory = res.memory if "memory" in given else base.memory * n
    gpus = res.gpus if "gpus" in given else float(math.ceil(base.gpus) * n)
    if gpus:
        if gpus < n or gpus % n:
            raise JobRejected(
                f"{kind}: {name}={n} runs {n} processes, each on whole GPUs of its own: ask for gpus={n} (or a multiple of {n}), not {gpus:g}",
                kind=kind, field="gpus",
            )
    elif cpus < n:
        raise JobRejected(f"{kind}: {name}={n} runs {n} processes, each on a CPU core of its own: ask for cpus >= {n}, not {cpus:g}", kind=kind, field="cpus")
    return Resources(cpus=cpus, memory=memory, gpus=gpus, gpu_memory=res.gpu_memory)


def ranks_of(spec: Any, params: dict[str, Any]) -> int:
    """How many ranks a job of this kind with these parameters runs (1 for kinds without ranks)."""
    name = getattr(spec, "ranks", None)
    value = params.get(name) if name else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def make_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager that knows llmos's hook specs, with tracing when LLMOS_TRACE_HOOKS=1."""
    pm = pluggy.PluginManager("llmos")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("LLMOS_TRACE_HOOKS") == "1":
        trace_log = structlog.get_logger("llmos.hooks")
        pm.trace.root.setwriter(lambda text: trace_log.debug("hook_trace", text=text.rstrip()))
        pm.enable_tracing()
    return pm


def _wanted(ep_name: str, module: str) -> bool:
    if module.startswith(BUILTIN_PREFIX) or ep_name in _env_modules():
        return True
    env = os.environ.get("LLMOS_LOAD_PLUGINS")
    if env is None:
        return True
    return ep_name in {n.strip() for n in env.split(",") if n.strip()}


def _env_modules() -> set[str]:
    names = set()
    for spec in os.environ.get("LLMOS_PLUGIN_MODULES", "").split(","):
        if spec.strip():
            name, _, module_name = spec.strip().rpartition("=")
            names.add(name or module_name.rsplit(".", 1)[-1])
    return names


def _entry_points() -> list[tuple[str, str, str | None, str | None, Callable[[], Any]]]:
    out = []
    seen = set()
    for ep in metadata.entry_points(group=GROUP):
        if ep.name in seen:
            continue
        seen.add(ep.name)
        dist = getattr(ep, "dist", None)
        out.append((ep.name, ep.value, dist.name if dist else None, dist.version if dist else None, ep.load))
    return out


def load_plugins(
    *,
    extra: Sequence[tuple[str, Any]] = (),
    disabled: Iterable[str] | None = None,
    entry_points: bool = True,
) -> Registry:
    """Load every ``llmos`` entry point (and ``extra`` (name, module) pairs) and collect their
    registrations. Failures are recorded on the plugin, never raised."""
    pm = make_plugin_manager()
    reg = Registry(pm)
    disabled = set(disabled_plugins() if disabled is None else disabled)
    sources: list[tuple[str, str, str | None, str | None, Callable[[], Any]]] = []
    if entry_points:
        sources.extend(_entry_points())
    for name, module in extra:
        sources.append((name, getattr(module, "__name__", name), None, None, lambda m=module: m))
    for spec in os.environ.get("LLMOS_PLUGIN_MODULES", "").split(","):
        # "name=package.module" or "package.module": load a plugin that has no entry point
        # (a plugin under development, or a test's throwaway plugin). One that is installed
        # too is loaded once, through its entry point.
        spec = spec.strip()
        if spec:
            name, _, module_name = spec.rpartition("=")
            name = name or module_name.rsplit(".", 1)[-1]
            if any(s[0] == name or s[1].split(":")[0] == module_name for s in sources):
                continue
            sources.append((name, module_name, None, None, lambda m=module_name: importlib.import_module(m)))
    for name, value, dist, version, load in sources:
        record = PluginRecord(name=name, module=value, dist=dist, version=version, builtin=value.startswith(BUILTIN_PREFIX))
        reg.plugins[name] = record
        if name in disabled:
            record.status = "disabled"
            record.error = f"disabled (llmos plugins enable {name})"
            continue
        if not _wanted(name, value):
            record.status = "disabled"
            record.error = "not in LLMOS_LOAD_PLUGINS"
            continue
        try:
            module = load()
        except BaseException as exc:  # a plugin's import may raise anything, SystemExit included
            _broken(record, f"import failed: {type(exc).__name__}: {exc}", traceback.format_exc())
            continue
        problem = _api_problem(record, module)
        if problem:
            record.status, record.error = "incompatible", problem
            log.warning("plugin_incompatible", plugin=name, error=problem)
            continue
        try:
            pm.register(module, name=name)
            pm.check_pending()
        except Exception as exc:
            if pm.is_registered(module):
                pm.unregister(module)
            _broken(record, f"{type(exc).__name__}: {exc}", None)
            continue
        record.hooks = sorted(impl.name for impl in pm.get_hookcallers(module) or [])
    _collect(reg)
    return reg


def _api_problem(record: PluginRecord, module: Any) -> str | None:
    """Why the plugin's declared ``LLMOS_API`` range excludes this llmos, or None."""
    declared = getattr(module, "LLMOS_API", None)
    if declared is None:
        return None  # undeclared: taken as compatible (and shown as such)
    record.api = str(declared)
    return api_problem(record.name, str(declared))


def api_problem(name: str, declared: str) -> str | None:
    """None if the range ``declared`` (like ">=1,<2") admits this llmos's plugin API."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    from llmos import PLUGIN_API

    try:
        ok = SpecifierSet(declared).contains(str(PLUGIN_API), prereleases=True)
    except InvalidSpecifier:
        return f"plugin {name!r} declares LLMOS_API = {declared!r}, which is not a version range like '>=1,<2'"
    if not ok:
        return f"plugin {name!r} supports llmos plugin API {declared}; this llmos has plugin API {PLUGIN_API}"
    return None


def disabled_plugins(state_dir: Path | None = None) -> list[str]:
    """The plugins disabled in the state dir's plugins.json (``llmos plugins disable``)."""
    from llmos.paths import resolve_state_dir

    path = resolve_state_dir(state_dir) / "plugins.json"
    try:
        return [str(n) for n in json.loads(path.read_text()).get("disabled", [])]
    except (OSError, ValueError, AttributeError):
        return []


def _broken(record: PluginRecord, error: str, tb: str | None) -> None:
    record.status = "broken"
    error = " ".join(error.split())  # one line, whatever the exception's text looked like
    record.error = error
    record.traceback = tb
    log.warning("plugin_broken", plugin=record.name, error=error, traceback=tb)


def _call(impl: Any, hook_name: str, **kwargs: Any) -> Any:
    """Call one plugin's implementation of a hook (traced when LLMOS_TRACE_HOOKS=1).

    We call implementations one by one, not through pluggy's hook caller, so that one plugin's
    exception is its own; pluggy's tracing never sees these calls, hence our own.
    """
    if os.environ.get("LLMOS_TRACE_HOOKS") != "1":
        return impl.function(**kwargs)
    log.debug("hook_call", hook=hook_name, plugin=impl.plugin_name, args=sorted(kwargs))
    started = time.perf_counter()
    try:
        result = impl.function(**kwargs)
    except BaseException as exc:
        log.debug("hook_raised", hook=hook_name, plugin=impl.plugin_name, error=f"{type(exc).__name__}: {exc}")
        raise
    log.debug("hook_returned", hook=hook_name, plugin=impl.plugin_name, ms=round((time.perf_counter() - started) * 1000, 3))
    return result


def _impls(pm: pluggy.PluginManager, hook_name: str) -> list[Any]:
    # get_hookimpls() lists implementations in registration (load) order; pluggy *calls* them in
    # reverse, but registrations must go first-come first-served.
    return list(getattr(pm.hook, hook_name).get_hookimpls())


def _collect(reg: Registry) -> None:
    """Run each registration hook once per plugin, so a failure stays with its plugin."""
    pm = reg.pm
    for hook_name, what in (
        ("llmos_register_message_types", "message type"),
        ("llmos_register_job_kinds", "job kind"),
        ("llmos_register_services", "service"),
    ):
        for impl in _impls(pm, hook_name):
            record = reg.plugins.get(impl.plugin_name)
            if record is None or record.status != "ok":
                continue
            staged: list[Any] = []
            try:
                _call(impl, hook_name, register=staged.append)
                for item in staged:
                    _register_one(reg, record, what, item)
            except Exception as exc:
                _broken(record, f"{hook_name} failed: {type(exc).__name__}: {exc}", traceback.format_exc())
                _forget(reg, record)


def _register_one(reg: Registry, record: PluginRecord, what: str, item: Any) -> None:
    if what == "message type":
        if not isinstance(item, type):
            raise TypeError(f"register() takes a message class, got {item!r}")
        names = {cls: n for n, cls in message_types().items()}
        name = names.get(item)
        if name is None:
            raise ValueError(f"{item.__qualname__} is not decorated with @llmos.message(name)")
        register_message_type(item, name)
        record.message_types.append(name)
        return
    expected = ServiceKind if what == "service" else JobKind
    if not isinstance(item, expected) or (what != "service" and isinstance(item, ServiceKind)):
        raise TypeError(f"register() takes llmos.{expected.__name__}, got {type(item).__name__}")
    if item.name in reg.kinds:
        other = reg.kinds[item.name].plugin
        raise ValueError(f"{what} {item.name!r} is already registered by plugin {other!r}")
    reg.kinds[item.name] = KindEntry(item, record.name)
    (record.services if what == "service" else record.kinds).append(item.name)


def _forget(reg: Registry, record: PluginRecord) -> None:
    for name in [n for n, e in reg.kinds.items() if e.plugin == record.name]:
        del reg.kinds[name]
    record.kinds.clear()
    record.services.clear()


def collect_commands(reg: Registry, taken: set[str]) -> list[tuple[str, Any]]:
    """Run ``llmos_register_commands`` per plugin; returns (plugin, command) pairs."""
    import click

    out: list[tuple[str, Any]] = []
    for impl in _impls(reg.pm, "llmos_register_commands"):
        record = reg.plugins.get(impl.plugin_name)
        if record is None or record.status != "ok":
            continue
        staged: list[Any] = []
        try:
            _call(impl, "llmos_register_commands", register=staged.append)
            for cmd in staged:
                if not isinstance(cmd, click.Command):
                    raise TypeError(f"register() takes a click.Command, got {type(cmd).__name__}")
                if cmd.name in taken:
                    raise ValueError(f"command {cmd.name!r} already exists")
                taken.add(cmd.name)
                out.append((record.name, cmd))
                record.commands.append(cmd.name)
        except Exception as exc:
            log.warning("plugin_command_failed", plugin=record.name, error=f"{type(exc).__name__}: {exc}")
            record.error = f"llmos_register_commands failed: {type(exc).__name__}: {exc}"
    return out


def call_broadcast(reg: Registry, hook_name: str, **kwargs: Any) -> None:
    """Call every implementation of a broadcast hook on its own; one failure never stops the rest."""
    for impl in _impls(reg.pm, hook_name):
        try:
            _call(impl, hook_name, **{k: v for k, v in kwargs.items() if k in impl.argnames})
        except Exception as exc:
            log.warning("hook_failed", hook=hook_name, plugin=impl.plugin_name, error=f"{type(exc).__name__}: {exc}")


__all__ = ["KindEntry", "PluginRecord", "Registry", "api_problem", "call_broadcast", "collect_commands", "disabled_plugins", "load_plugins", "make_plugin_manager"]
