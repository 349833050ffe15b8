"""The message registry: each message type is a frozen dataclass registered under a name with
:func:`message`; bodies are checked against its fields (precisely, or by a generated fast check)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from llmos.errors import UnknownMessageType, ValidationError

T = TypeVar("T")
Checker = Callable[[Any], bool]

# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one field of a message is checked."""

    name: str
    check: Checker
    expected: str
    required: bool


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """A registered message type: its name, class and field checks."""

    name: str
    cls: type
    fields: tuple[FieldSpec, ...]
    names: frozenset[str]


_REGISTRY: dict[str, MessageSpec] = {}
_BY_CLASS: dict[type, str] = {}


def _describe(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def make_checker(tp: Any) -> Checker:
    """A function that says whether a decoded msgpack value fits the annotation ``tp``."""
    if tp is Any or tp is object:
        return lambda v: True
    if tp is type(None) or tp is None:
        return lambda v: v is None
    if tp is bool:
        return lambda v: v is True or v is False
    if tp is int:
        return lambda v: type(v) is int
    if tp is float:
        return lambda v: type(v) is float or type(v) is int
    if tp is str:
        return lambda v: type(v) is str
    if tp is bytes:
        return lambda v: type(v) is bytes
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (Union, types.UnionType):
        simple = {bool: bool, int: int, float: float, str: str, bytes: bytes, type(None): type(None)}
        if all(a in simple for a in args) and bool not in args:
            allowed = frozenset(args) | ({int} if float in args else set())
            return lambda v: type(v) in allowed
        checks = [make_checker(a) for a in args]
        return lambda v: any(c(v) for c in checks)
    if origin is Literal:
        allowed = set(args)
        literal_types = frozenset(type(a) for a in args)
        return lambda v: type(v) in literal_types and v in allowed  # type first: a map or list is unhashable
    if tp is list or origin in (list, tuple, typing.Sequence):
        if args and origin is list:
            item = make_checker(args[0])
            return lambda v: isinstance(v, list | tuple) and all(item(x) for x in v)
        return lambda v: isinstance(v, list | tuple)
    if tp is dict or origin is dict:
        if args and args[1] is Any and args[0] is str:
            return lambda v: type(v) is dict and all(type(k) is str for k in v)
        if args and args[0] is str and args[1] in (int, str):
            value_type = args[1]
            return lambda v: type(v) is dict and all(type(k) is str and type(x) is value_type for k, x in v.items())
        if args:
            key, val = make_checker(args[0]), make_checker(args[1])
            return lambda v: isinstance(v, dict) and all(key(k) and val(x) for k, x in v.items())
        return lambda v: isinstance(v, dict)
    raise TypeError(f"message fields cannot have type {tp!r}")


def message(name: str) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as the message type ``name``.

    Field names and annotations become the validation rules. Registering the same name twice
    raises :class:`ValueError`, unless it is the very same class (a module imported twice).
    """

    def decorate(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"@message({name!r}) needs a dataclass, got {cls!r}")
        register_message_type(cls, name)
        return cls

    return decorate


def register_message_type(cls: type, name: str | None = None) -> MessageSpec:
    """Add ``cls`` to the registry under ``name`` (default: the name it was registered with)."""
    if name is None:
        if cls in _BY_CLASS:
            return _REGISTRY[_BY_CLASS[cls]]
        raise ValueError(f"{cls.__qualname__} has no message name; decorate it with @message(name)")
    old = _REGISTRY.get(name)
    if old is not None:
        if old.cls is cls or (old.cls.__qualname__ == cls.__qualname__ and old.cls.__module__ == cls.__module__):
            return old
        raise ValueError(f"message type {name!r} is already registered by {old.cls.__module__}.{old.cls.__qualname__}")
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        tp = hints.get(f.name, Any)
        specs.append(FieldSpec(f.name, make_checker(tp), _describe(tp), required))
    spec = MessageSpec(name, cls, tuple(specs), frozenset(s.name for s in specs))
    _REGISTRY[name] = spec
    _BY_CLASS[cls] = name
    return spec


def message_types() -> dict[str, type]:
    """Every registered message type by name."""
    return {name: spec.cls for name, spec in sorted(_REGISTRY.items())}


def spec_for(type_name: str) -> MessageSpec:
    """The registry entry for ``type_name``; :class:`UnknownMessageType` if there is none."""
    try:
        return _REGISTRY[type_name]
    except (KeyError, TypeError):
        raise UnknownMessageType(f"unknown message type {type_name!r}", type=str(type_name)) from None


def type_name_of(msg: object) -> str:
    """The registered name of a message instance."""
    try:
        return _BY_CLASS[type(msg)]
    except KeyError:
        raise UnknownMessageType(f"{type(msg).__qualname__} is not a registered message type") from None


def validate_body(type_name: str, body: Any) -> MessageSpec:
    """Check ``body`` (a decoded map) against the type's fields without building the object."""
    spec = spec_for(type_name)
    if not _fast_ok(spec, body):
        _explain(spec, body)
    return spec


_FAST: dict[str, Callable[[Any], bool]] = {}


def _fast_ok(spec: MessageSpec, body: Any) -> bool:
    """A quick yes for valid bodies (the common case); a no sends us to :func:`_explain`."""
    check = _FAST.get(spec.name)
    if check is None:
        check = _FAST[spec.name] = _fast_check(spec)
    return check(body)


def _fast_check(spec: MessageSpec) -> Callable[[Any], bool]:
    """A function that says, as fast as Python allows, whether a body is valid for ``spec``:
    generated source with the simple type tests written inline (the kernel runs it per event)."""
    cached = _FAST.get(spec.name)
    if cached is not None:
        return cached
    env: dict[str, Any] = {"_names": spec.names, "_M": _MISSING}
    lines = ["def check(b):", "    if type(b) is not dict or not (b.keys() <= _names):", "        return False"]
    hints = typing.get_type_hints(spec.cls) if dataclasses.is_dataclass(spec.cls) else {}
    for i, f in enumerate(spec.fields):
        expr = _inline_check(hints.get(f.name, Any))
        if expr is None:
            env[f"_c{i}"] = f.check
            expr = f"_c{i}(v)"
        if expr == "True" and not f.required:
            continue
        lines.append(f"    v = b.get({f.name!r}, _M)")
        if f.required:
            lines += ["    if v is _M:", "        return False"]
            lines += [f"    if not ({expr}):", "        return False"] if expr != "True" else []
        else:
            lines += [f"    if v is not _M and not ({expr}):", "        return False"]
    lines.append("    return True")
    exec(compile("\n".join(lines), f"<llmos check {spec.name}>", "exec"), env)
    check: Callable[[Any], bool] = env["check"]
    _FAST[spec.name] = check
    return check


_SIMPLE_EXPR = {
    int: "type(v) is int",
    float: "(type(v) is float or type(v) is int)",
    str: "type(v) is str",
    bytes: "type(v) is bytes",
    bool: "(v is True or v is False)",
    type(None): "v is None",
}


def _inline_check(tp: Any) -> str | None:
    """Python source testing ``v`` against ``tp`` for the common annotations, else None (the
    field's checker function is called instead). Must agree with :func:`make_checker`."""
    if tp is Any or tp is object:
        return "True"
    if tp is None:
        tp = type(None)
    if tp in _SIMPLE_EXPR:
        return _SIMPLE_EXPR[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType) and all(a in _SIMPLE_EXPR for a in args) and bool not in args:
        return "(" + " or ".join(_SIMPLE_EXPR[a] for a in args) + ")"
    if origin is dict and args == (str, Any):
        return "(type(v) is dict and all([type(k) is str for k in v]))"
    return None


_MISSING = object()


def _explain(spec: MessageSpec, body: Any) -> None:
    """Raise the ValidationError that says what is wrong with ``body``."""
    type_name = spec.name
    if not isinstance(body, dict):
        raise ValidationError(f"{type_name}: body must be a map, got {type(body).__name__}", type=type_name)
    extra = body.keys() - spec.names
    if extra:
        raise ValidationError(
            f"{type_name}: unknown field {sorted(map(str, extra))[0]!r}; expected fields: {', '.join(sorted(spec.names))}",
            type=type_name,
        )
    for fs in spec.fields:
        if fs.name in body:
            if not fs.check(body[fs.name]):
                value = body[fs.name]
                raise ValidationError(
                    f"{type_name}.{fs.name}: expected {fs.expected}, got {type(value).__name__} {_short(value)}",
                    type=type_name,
                    field=fs.name,
                )
        elif fs.required:
            raise ValidationError(f"{type_name}: missing field {fs.name!r} ({fs.expected})", type=type_name, field=fs.name)
    raise ValidationError(f"{type_name}: invalid body", type=type_name)


def decode_body(type_name: str, body: Any) -> Any:
    """Validate ``body`` and build the message object."""
    spec = validate_body(type_name, body)
    return spec.cls(**body)


def encode_body(msg: object) -> dict[str, Any]:
    """The map that carries ``msg`` on the wire (fields in declaration order)."""
    cls = type(msg)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    return {name: getattr(msg, name) for name in names}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
