"""Job parameter schemas: dataclasses with types, defaults, bounds and help.

A plugin declares its parameters as a dataclass and uses :func:`param` for bounds and help::

    @dataclass(frozen=True)
    class SleepParams:
        seconds: float = param(1.0, ge=0, le=86400, help="how long to sleep")

The kernel validates every submit against the schema (:func:`validate_params`) and stores the
complete, default-filled map; the worker rebuilds the dataclass from it for the runner.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

from llmos.errors import ValidationError

_META = "llmos"
_REFERENCE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(?![\\/])")  # job:12, hf:org/name; not C:\ or a path


def param(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    help: str = "",
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: typing.Sequence[Any] | None = None,
    path: bool | typing.Sequence[str] = False,
) -> Any:
    """A dataclass field with bounds and help text for a job parameter.

    ``path=True`` marks a filesystem path: a relative one is resolved at submit against the
    submitter's working directory (the job itself runs in a folder of its own). A sequence names
    the words that are not paths (``path=("stdlib",)``); ``job:12``-style references are left alone.
    """
    words = None if path is False else () if path is True else tuple(path)
    meta = {_META: {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": list(choices) if choices else None, "path": words}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class ParamField:
    """One parameter of a schema, as validation and ``plugins info`` see it."""

    name: str
    type: Any
    type_name: str
    required: bool
    default: Any
    help: str
    ge: float | None
    gt: float | None
    le: float | None
    lt: float | None
    choices: tuple[Any, ...] | None
    #: None: not a path; else the words that are not paths ("stdlib").
    path: tuple[str, ...] | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description."""
        out: dict[str, Any] = {"name": self.name, "type": self.type_name, "required": self.required, "help": self.help}
        if not self.required:
            out["default"] = self.default
        for key in ("ge", "gt", "le", "lt"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.path is not None:
            out["path"] = True
        return out

    def resolve(self, value: Any, cwd: str) -> Any:
        """A path value made absolute against ``cwd`` (other values unchanged)."""
        if self.path is None or not isinstance(value, str) or not value or value in self.path or _REFERENCE.match(value):
            return value
        return os.path.normpath(os.path.join(cwd, os.path.expanduser(value)))

    def expected(self) -> str:
        """What a valid value looks like, in words: ``a whole number from 1 to 1000``, ``one of
        'fast', 'slow'``, ``a number above 0 (or none)``."""
        if self.choices is not None:
            text = "one of " + ", ".join(map(repr, self.choices))
        else:
            text = _words(self.type)
        lo = ("at least", self.ge) if self.ge is not None else ("above", self.gt) if self.gt is not None else None
        hi = ("at most", self.le) if self.le is not None else ("below", self.lt) if self.lt is not None else None
        if lo and hi and lo[0] == "at least" and hi[0] == "at most":
            return f"{text} from {_num(lo[1])} to {_num(hi[1])}"
        bounds = [f"{word} {_num(v)}" for word, v in (b for b in (lo, hi) if b is not None)]
        return f"{text} {' and '.join(bounds)}" if bounds else text


def _num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and abs(value) >= 10_000 else f"{value:g}" if isinstance(value, float) else str(value)


_WORDS = {int: "a whole number", float: "a number", str: "text", bool: "true or false", list: "a list", dict: "a map", type(None): "none"}


def _words(tp: Any) -> str:
    """A parameter type in words (what a user can type), not in Python's notation."""
    if tp is Any:
        return "any value"
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(_words(a) for a in rest)
        return f"{text} (or none)" if len(rest) < len(args) else text
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if origin is list:
        args = get_args(tp)
        return f"a list of {_words(args[0]).removeprefix('a ')}s" if args and args[0] in _WORDS and args[0] is not str else ("a list of text" if args and args[0] is str else "a list")
    if origin is dict:
        return "a map"
    return _WORDS.get(tp, _type_name(tp))


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


@cache
def schema_of(cls: type) -> tuple[ParamField, ...]:
    """The fields of a parameter dataclass; TypeError if it is not one or has an unsupported type."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"a parameter schema must be a dataclass, got {cls!r}")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META, {})
        tp = hints.get(f.name, Any)
        _check_supported(tp, f"{cls.__name__}.{f.name}")
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        choices = meta.get("choices")
        if get_origin(tp) is Literal and choices is None:
            choices = list(get_args(tp))
        field = ParamField(
            name=f.name,
            type=tp,
            type_name=_type_name(tp),
            required=required,
            default=default,
            help=meta.get("help", ""),
            ge=meta.get("ge"),
            gt=meta.get("gt"),
            le=meta.get("le"),
            lt=meta.get("lt"),
            choices=tuple(choices) if choices is not None else None,
            path=meta.get("path"),
        )
        if not required:
            try:
                _check_value(field, default, coerce=False)
            except ValueError:
                raise TypeError(f"{cls.__name__}.{f.name}: invalid default {default!r} (expected {field.expected()})") from None
        out.append(field)
    return tuple(out)


def _check_supported(tp: Any, where: str) -> None:
    if tp in (int, float, str, bool, Any, type(None), list, dict):
        return
    origin = get_origin(tp)
    if origin in (Union, types.UnionType, list, dict, Literal):
        if origin is not Literal:
            for arg in get_args(tp):
                _check_supported(arg, where)
        return
    raise TypeError(f"{where}: parameter type {tp!r} is not supported (use int, float, str, bool, list, dict, Literal, or X | None)")


def _convert(tp: Any, value: Any, coerce: bool) -> Any:
    """Return ``value`` as type ``tp`` or raise ValueError. ``coerce``: ``value`` may be the text
    a user typed (``-p steps=200``) for any type."""
    if tp is Any:
        return _to_any(value, coerce)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _to_union(get_args(tp), value, coerce)
    if origin is Literal:
        return _to_literal(get_args(tp), value, coerce)
    if tp is list or origin is list:
        return _to_list(get_args(tp), value, coerce)
    if tp is dict or origin is dict:
        return _to_dict(get_args(tp), value, coerce)
    convert = _SCALARS.get(tp)
    if convert is None:
        raise ValueError
    return convert(value, coerce)


def _to_any(value: Any, coerce: bool) -> Any:
    if coerce and isinstance(value, str):
        # From the command line an untyped value may be JSON (numbers, lists, maps); else text.
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _to_none(value: Any, coerce: bool) -> None:
    if value is None or (coerce and isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    raise ValueError


def _to_union(args: tuple[Any, ...], value: Any, coerce: bool) -> Any:
    # None first (it takes only None or an explicit "none"), then the others in order.
    for arg in sorted(args, key=lambda a: a is not type(None)):
        try:
            return _convert(arg, value, coerce)
        except ValueError:
            continue
    raise ValueError


def _to_literal(options: tuple[Any, ...], value: Any, coerce: bool) -> Any:
    for option in options:
        if value == option and type(value) is type(option):
            return option
        if coerce and isinstance(value, str) and value == str(option):
            return option
    raise ValueError


def _to_bool(value: Any, coerce: bool) -> bool:
    if value is True or value is False:
        return value
    if coerce and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise ValueError


def _to_int(value: Any, coerce: bool) -> int:
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    if coerce and isinstance(value, str):
        return int(value.strip())
    raise ValueError


def _to_float(value: Any, coerce: bool) -> float:
    if type(value) in (int, float):
        return float(value)
    if coerce and isinstance(value, str):
        return float(value.strip())
    raise ValueError


def _to_str(value: Any, coerce: bool) -> str:
    if isinstance(value, str):
        return value
    raise ValueError


_SCALARS: dict[Any, Callable[[Any, bool], Any]] = {type(None): _to_none, bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _to_list(args: tuple[Any, ...], value: Any, coerce: bool) -> list[Any]:
    if coerce and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [v for v in value.split(",") if v]
    if not isinstance(value, list | tuple):
        raise ValueError
    return [_convert(args[0], v, coerce) for v in value] if args else list(value)


def _to_dict(args: tuple[Any, ...], value: Any, coerce: bool) -> dict[Any, Any]:
    if coerce and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError from None
    if not isinstance(value, dict):
        raise ValueError
    if args:
        return {_convert(args[0], k, coerce): _convert(args[1], v, coerce) for k, v in value.items()}
    return dict(value)


def _check_value(field: ParamField, value: Any, coerce: bool) -> Any:
    value = _convert(field.type, value, coerce)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if field.ge is not None and not value >= field.ge:
            raise ValueError
        if field.gt is not None and not value > field.gt:
            raise ValueError
        if field.le is not None and not value <= field.le:
            raise ValueError
        if field.lt is not None and not value < field.lt:
            raise ValueError
        if value != value or value in (float("inf"), float("-inf")):  # NaN, infinities
            raise ValueError
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            raise ValueError  # msgpack and SQLite carry 64-bit integers
    if field.choices is not None and value not in field.choices:
        raise ValueError
    return value


def validate_params(cls: type, values: dict[str, Any] | None, *, kind: str = "", coerce: bool = False, cwd: str | None = None) -> dict[str, Any]:
    """Check ``values`` against the schema ``cls`` and return the complete map with defaults.

    ``coerce`` converts strings (``"3"``, ``"true"``, JSON lists) to the declared types, as the
    CLI's ``-p KEY=VALUE`` needs. With ``cwd`` (the submitter's working directory), relative
    values of path parameters become absolute. Errors name the kind, the field and what was expected.
    """
    where = f"{kind}: " if kind else ""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValidationError(f"{where}parameters must be a map of name to value, got {type(values).__name__}")
    fields = schema_of(cls)
    names = {f.name for f in fields}
    for key in values:
        if key not in names:
            known = ", ".join(sorted(names)) or "(none)"
            raise ValidationError(f"{where}unknown parameter {key!r}; known parameters: {known}", field=str(key))
    out: dict[str, Any] = {}
    for f in fields:
        if f.name in values:
            raw = values[f.name]
            try:
                out[f.name] = _check_value(f, raw, coerce)
                if cwd is not None and f.path is not None:
                    out[f.name] = f.resolve(out[f.name], cwd)
            except (ValueError, TypeError, OverflowError):
                raise ValidationError(f"{where}parameter {f.name!r} must be {f.expected()}; got {raw!r}"[:400], field=f.name) from None
        elif f.required:
            raise ValidationError(f"{where}missing required parameter {f.name!r} ({f.expected()})", field=f.name)
        else:
            out[f.name] = f.default
    return out


def describe_schema(cls: type) -> list[dict[str, Any]]:
    """Every field of the schema as a JSON-friendly map (for ``plugins info``)."""
    return [f.describe() for f in schema_of(cls)]


@dataclass(frozen=True)
class NoParams:
    """The schema of a job kind that takes no parameters."""


__all__ = ["NoParams", "ParamField", "describe_schema", "param", "schema_of", "validate_params"]
