"""Settings: the schema in ``default.toml``, and a loader with a fixed precedence.

defaults < ``--config FILE`` < ``LLMOS_<SECTION>_<KEY>`` environment < explicit overrides (flags).
Types come from the defaults; an unknown key or a value of the wrong type is a
:class:`~llmos.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmos.errors import ConfigError

DEFAULT_FILE = Path(__file__).with_name("default.toml")

Settings = dict[str, Any]


def defaults() -> Settings:
    """The default settings, as ``default.toml`` lists them."""
    with DEFAULT_FILE.open("rb") as f:
        return tomllib.load(f)


def env_name(key: str) -> str:
    """``workers.pool_size`` -> ``LLMOS_WORKERS_POOL_SIZE``."""
    return "LLMOS_" + key.replace(".", "_").upper()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _coerce(key: str, default: Any, value: Any, source: str) -> Any:
    kind = type(default)
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        try:
            if kind is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                return text.lower() in ("1", "true", "yes", "on")
            return kind(text)
        except ValueError:
            raise ConfigError(f"{source}: setting {key!r} expected {kind.__name__}, got {value!r}", key=key) from None
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"{source}: setting {key!r} expected {kind.__name__}, got {type(value).__name__} {value!r}", key=key)
    return value


def load_settings(
    file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge defaults, a TOML file, the environment and overrides (dotted keys) into a nested map."""
    flat = _flatten(defaults())
    if file is not None:
        path = Path(file)
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist", path=str(path)) from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}", path=str(path)) from None
        for key, value in _flatten(data).items():
            if key not in flat:
                raise ConfigError(f"{path}: unknown setting {key!r}; known settings: {', '.join(sorted(flat))}", key=key)
            flat[key] = _coerce(key, flat[key], value, str(path))
    env = os.environ if environ is None else environ
    for key in list(flat):
        name = env_name(key)
        if name in env:
            flat[key] = _coerce(key, flat[key], env[name], f"environment {name}")
    for key, value in (overrides or {}).items():
        if key not in flat:
            raise ConfigError(f"unknown setting {key!r}", key=key)
        if value is not None:
            flat[key] = _coerce(key, flat[key], value, "command line")
    out: Settings = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return out


__all__ = ["DEFAULT_FILE", "Settings", "defaults", "env_name", "load_settings"]
