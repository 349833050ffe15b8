"""Parameter schemas: types, defaults, bounds, coercion from the command line."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import pytest

from llmos import JobKind, Resources, Runner, param
from llmos.errors import ValidationError
from llmos.params import describe_schema, validate_params
from llmos.units import format_size, parse_size


@dataclass(frozen=True)
class P:
    steps: int = param(10, ge=1, le=1000, help="how many")
    lr: float = param(1e-3, gt=0)
    name: str = "x"
    mode: Literal["fast", "slow"] = "fast"
    tags: list[str] = param(default_factory=list)
    seed: int | None = None
    flag: bool = False


def test_defaults_fill_in() -> None:
    assert validate_params(P, {}) == {"steps": 10, "lr": 1e-3, "name": "x", "mode": "fast", "tags": [], "seed": None, "flag": False}


def test_types_and_bounds() -> None:
    with pytest.raises(ValidationError, match="'steps' must be a whole number from 1 to 1000; got 0"):
        validate_params(P, {"steps": 0}, kind="k")
    with pytest.raises(ValidationError, match="'mode'"):
        validate_params(P, {"mode": "medium"})
    with pytest.raises(ValidationError, match="unknown parameter 'stepz'; known parameters: flag, lr, mode, name, seed, steps, tags"):
        validate_params(P, {"stepz": 1})
    with pytest.raises(ValidationError, match="'name' must be text; got 3"):
        validate_params(P, {"name": 3})
    assert validate_params(P, {"lr": 1})["lr"] == 1.0


def test_coercion_from_strings() -> None:
    out = validate_params(P, {"steps": "5", "lr": "0.1", "mode": "slow", "tags": "a,b", "seed": "none", "flag": "yes"}, coerce=True)
    assert out == {"steps": 5, "lr": 0.1, "name": "x", "mode": "slow", "tags": ["a", "b"], "seed": None, "flag": True}
    with pytest.raises(ValidationError):
        validate_params(P, {"steps": "five"}, coerce=True)
    with pytest.raises(ValidationError):
        validate_params(P, {"steps": "5"})  # no coercion from the SDK


def test_describe_schema() -> None:
    steps = describe_schema(P)[0]
    assert steps == {"name": "steps", "type": "int", "required": False, "help": "how many", "default": 10, "ge": 1, "le": 1000}


def test_bad_default_is_caught_at_registration() -> None:
    @dataclass(frozen=True)
    class Bad:
        n: int = param(-1, ge=0)

    with pytest.raises(TypeError, match="invalid default"):
        JobKind("bad", runner=Runner, params=Bad)


def test_resources_parse() -> None:
    r = Resources.parse({"gpus": 0.5, "gpu_memory": "4GiB"}, base=Resources(cpus=2))
    assert r == Resources(cpus=2.0, memory=0, gpus=0.5, gpu_memory=4 * 1024**3)
    for bad in ({"gpus": -1}, {"gpus": 1.5}, {"cpu": 1}, {"memory": "lots"}, {"gpu_memory": "1GiB"}):
        with pytest.raises(ValidationError):
            Resources.parse(bad)


def test_sizes() -> None:
    assert parse_size("4GiB") == 4 * 1024**3
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size(12) == 12
    assert format_size(24 * 1024**3) == "24.0GiB"
    with pytest.raises(ValueError, match="expected a size"):
        parse_size("4 potatoes")


@dataclass
class Paths:
    data: str = param("stdlib", path=("stdlib",))
    output: str | None = param(None, path=True)
    model: str = param("m", path=True)
    name: str = param("x")


def test_relative_paths_resolve_against_the_submitters_directory() -> None:
    got = validate_params(Paths, {"data": "corpus/a.txt", "output": "../ck", "model": "job:12", "name": "rel"}, cwd="/home/u/proj")
    assert got == {"data": "/home/u/proj/corpus/a.txt", "output": "/home/u/ck", "model": "job:12", "name": "rel"}
    assert validate_params(Paths, {"data": "stdlib", "output": "/abs/ck"}, cwd="/w") == {"data": "stdlib", "output": "/abs/ck", "model": "m", "name": "x"}  # defaults are the kind's own
    assert validate_params(Paths, {"output": "~/ck"}, cwd="/w")["output"] == os.path.expanduser("~/ck")
    assert validate_params(Paths, {"output": "ck"})["output"] == "ck"  # no cwd given: left as sent
    assert [f.get("path") for f in describe_schema(Paths)] == [True, True, True, None]
