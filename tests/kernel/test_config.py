"""Settings: defaults < file < environment < flags; unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.config import defaults, env_name, load_settings
from llmos.errors import ConfigError


def test_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[workers]\npool_size = 5\ncancel_grace = 1\n[devices]\nfake_gpus = '1x8GiB'\n")
    s = load_settings(f, environ={})
    assert s["workers"]["pool_size"] == 5 and s["workers"]["cancel_grace"] == 1.0
    s = load_settings(f, environ={"LLMOS_WORKERS_POOL_SIZE": "7"})
    assert s["workers"]["pool_size"] == 7
    s = load_settings(f, environ={"LLMOS_WORKERS_POOL_SIZE": "7"}, overrides={"workers.pool_size": 9, "devices.fake_gpus": None})
    assert s["workers"]["pool_size"] == 9 and s["devices"]["fake_gpus"] == "1x8GiB"


def test_unknown_and_wrong_keys(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[workers]\npool_sise = 5\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'workers\.pool_sise'"):
        load_settings(f, environ={})
    f.write_text("[workers]\npool_size = 'many'\n")
    with pytest.raises(ConfigError, match=r"'workers\.pool_size' expected int"):
        load_settings(f, environ={})
    with pytest.raises(ConfigError, match="LLMOS_DEVICES_PROBE_GPUS"):
        load_settings(environ={"LLMOS_DEVICES_PROBE_GPUS": "perhaps"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_every_default_is_documented() -> None:
    text = (Path(__file__).parents[2] / "config" / "default.toml").read_text().splitlines()
    flat = []
    for section, values in defaults().items():
        if isinstance(values, dict):
            flat += [(section, k) for k in values]
        else:
            flat.append(("", section))
    for section, key in flat:
        idx = next(i for i, line in enumerate(text) if line.startswith(f"{key} ="))
        assert text[idx - 1].startswith("#") or "#" in text[idx], f"{section}.{key} has no comment"
    assert env_name("workers.pool_size") == "LLMOS_WORKERS_POOL_SIZE"
    assert env_name("state_dir") == "LLMOS_STATE_DIR"


def test_bad_config_is_one_line_error_at_boot(tmp_path: Path) -> None:
    from tests.conftest import cli

    f = tmp_path / "c.toml"
    f.write_text("[kernel]\nnope = 1\n")
    proc = cli("boot", "--config", str(f), state_dir=tmp_path / "s", check=False)
    assert proc.returncode == 1 and "unknown setting 'kernel.nope'" in proc.stderr and "Traceback" not in proc.stderr
