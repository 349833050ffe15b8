"""CurveZMQ keys as a client holds them: the key file ``llmos keys add`` writes, and the socket
options that make a connection over TCP encrypted and authenticated.

A key file is JSON (mode 0600): ``{"name", "public", "secret", "kernel_public"}``, the keys in Z85
(40 characters). The kernel admits a connection only when its public key is on the kernel's
allow-list (``<state>/keys/allowed.json``); see :mod:`llmos.kernel.keys`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.errors import ConfigError

__all__ = ["ClientKey", "apply_client_key", "is_z85_key", "load_client_key", "write_private_json"]

Z85_KEY_LEN = 40
_Z85 = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


def is_z85_key(text: Any) -> bool:
    """Whether ``text`` is a CurveZMQ key in Z85 (40 characters of its alphabet)."""
    return isinstance(text, str) and len(text) == Z85_KEY_LEN and set(text) <= _Z85


@dataclass(frozen=True)
class ClientKey:
    """A client's key pair and the public key of the kernel it may reach."""

    name: str
    public: str
    secret: str
    kernel_public: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "public": self.public, "secret": self.secret, "kernel_public": self.kernel_public}


def load_client_key(key: str | os.PathLike[str] | dict[str, Any] | ClientKey) -> ClientKey:
    """A :class:`ClientKey` from a key file's path, its parsed JSON, or a ClientKey; ConfigError
    saying what is wrong otherwise."""
    if isinstance(key, ClientKey):
        return key
    where = "the key"
    if isinstance(key, str | os.PathLike):
        path = Path(key).expanduser()
        where = f"key file {path}"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{where} does not exist; make one with: llmos keys add NAME --out {path}", path=str(path)) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {where}: {exc}", path=str(path)) from None
    else:
        data = key
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object with public, secret and kernel_public keys")
    for field in ("public", "secret", "kernel_public"):
        if not is_z85_key(data.get(field)):
            raise ConfigError(f"{where}: {field!r} must be a CurveZMQ key in Z85 (40 characters), got {data.get(field)!r:.60}")
    return ClientKey(name=str(data.get("name", "")), public=data["public"], secret=data["secret"], kernel_public=data["kernel_public"])


def apply_client_key(sock: Any, key: ClientKey) -> None:
    """Make ``sock`` (not yet connected) a CURVE client of the kernel that issued ``key``."""
    import zmq

    sock.setsockopt(zmq.CURVE_SERVERKEY, key.kernel_public.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, key.public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, key.secret.encode())


def write_private_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically, readable by this user only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, indent=2)
        out.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
