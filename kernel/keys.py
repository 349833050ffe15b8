"""The kernel's CurveZMQ keys: its own key pair, the allow-list of client keys, and the ZAP
authenticator that admits only those on its TCP endpoints.

Layout under ``<state>/keys/`` (the folder 0700, every file 0600):

- ``kernel.json``: the kernel's key pair, made at first boot and kept across boots (clients hold
  its public key: a new pair would lock every issued key out).
- ``allowed.json``: ``{"keys": [{"name", "public", "added", "issued"}]}``, the public keys the
  kernel admits. ``llmos keys add|revoke`` edit it, with or without a kernel running; the
  authenticator reads it again whenever it changes, so an added key works at once and a revoked
  one is refused from its next connection on.

Without a ZAP handler CURVE only encrypts: any key completes the handshake. The kernel therefore
starts :class:`KeyGuard` (pyzmq's ``ThreadAuthenticator`` with a callback) on its context before
it binds a TCP endpoint, and logs every refusal.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import zmq

from llmos.errors import ConfigError
from llmos.keys import ClientKey, is_z85_key, write_private_json

log = structlog.get_logger("llmos.kernel")

__all__ = ["ZAP_DOMAIN", "KeyGuard", "KeyStore"]

ZAP_DOMAIN = "llmos"
WORKERS_KEY = "workers"  # the key the kernel issues to its own remote workers


@dataclass(frozen=True)
class AllowedKey:
    name: str
    public: str
    added: float
    issued: bool  # made by the kernel (its secret was handed out once), or brought by its holder

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "public": self.public, "added": self.added, "issued": self.issued}


class KeyStore:
    """The key files of one state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "keys"
        self.kernel_file = self.dir / "kernel.json"
        self.allowed_file = self.dir / "allowed.json"

    # -- the kernel's pair --

    def kernel_pair(self, *, create: bool = True) -> tuple[str, str]:
        """(public, secret) of the kernel, made on first use."""
        try:
            data = json.loads(self.kernel_file.read_text())
            if is_z85_key(data.get("public")) and is_z85_key(data.get("secret")):
                return data["public"], data["secret"]
            raise ConfigError(f"{self.kernel_file} is damaged (no Z85 public and secret keys); move it away to make a new pair (every issued key must then be issued again)")
        except FileNotFoundError:
            if not create:
                raise ConfigError(f"no kernel key pair in {self.dir}: boot a kernel on this state dir first") from None
        public, secret = (k.decode() for k in zmq.curve_keypair())
        self._mkdir()
        write_private_json(self.kernel_file, {"public": public, "secret": secret, "created": time.time()})
        return public, secret

    # -- the allow-list --

    def allowed(self) -> list[AllowedKey]:
        try:
            data = json.loads(self.allowed_file.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the key allow-list {self.allowed_file}: {exc}") from None
        out = []
        for item in data.get("keys", []) if isinstance(data, dict) else []:
            if isinstance(item, dict) and is_z85_key(item.get("public")):
                out.append(AllowedKey(str(item.get("name", "")), item["public"], float(item.get("added", 0)), bool(item.get("issued", False))))
        return out

    def _save(self, keys: list[AllowedKey]) -> None:
        self._mkdir()
        write_private_json(self.allowed_file, {"keys": [k.to_dict() for k in keys]})

    def _mkdir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)

    def add(self, name: str, public: str | None = None) -> tuple[AllowedKey, ClientKey | None]:
        """Allow a key under ``name``: the given public key, or a new pair made here (its secret
        returned once, in a :class:`ClientKey`, and kept nowhere else)."""
        check_key_name(name)
        keys = self.allowed()
        if any(k.name == name for k in keys):
            raise ConfigError(f"a key named {name!r} is already allowed; revoke it first (llmos keys revoke {name}) or choose another name")
        secret = None
        if public is None:
            public, secret = (k.decode() for k in zmq.curve_keypair())
        elif not is_z85_key(public):
            raise ConfigError(f"public key {public!r:.60}: expected a CurveZMQ public key in Z85 (40 characters)")
        entry = AllowedKey(name, public, time.time(), secret is not None)
        self._save([*keys, entry])
        issued = ClientKey(name=name, public=public, secret=secret, kernel_public=self.kernel_pair()[0]) if secret else None
        return entry, issued

    def revoke(self, name: str) -> AllowedKey:
        keys = self.allowed()
        gone = [k for k in keys if k.name == name]
        if not gone:
            names = ", ".join(k.name for k in keys) or "none"
            raise ConfigError(f"no allowed key is named {name!r} (allowed: {names})")
        self._save([k for k in keys if k.name != name])
        return gone[0]

    def workers_key(self) -> ClientKey:
        """The key remote workers of this kernel connect with (made and allowed on first use;
        its secret lives in ``keys/workers.json``, 0600, and travels to workers in their
        environment through the cluster's own channel)."""
        path = self.dir / f"{WORKERS_KEY}.json"
        kernel_public = self.kernel_pair()[0]
        try:
            data = json.loads(path.read_text())
            key = ClientKey(name=WORKERS_KEY, public=data["public"], secret=data["secret"], kernel_public=kernel_public)
            if any(k.public == key.public for k in self.allowed()):
                return key
        except (OSError, ValueError, KeyError):
            pass
        public, secret = (k.decode() for k in zmq.curve_keypair())
        key = ClientKey(name=WORKERS_KEY, public=public, secret=secret, kernel_public=kernel_public)
        write_private_json(path, key.to_dict())
        keys = [k for k in self.allowed() if k.name != WORKERS_KEY]
        self._save([*keys, AllowedKey(WORKERS_KEY, public, time.time(), True)])
        return key


def check_key_name(name: str) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"key name {name!r}: expected 1-64 letters, digits, '-', '_' or '.'")


class KeyGuard:
    """The ZAP authenticator of the kernel's context: admits a CURVE client only if its public key
    is on the allow-list (re-read when the file changes), logs each refusal."""

    def __init__(self, zctx: zmq.Context[Any], store: KeyStore) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.store = store
        self._lock = threading.Lock()
        self._mtime: float | None = -1.0
        self._keys: dict[str, str] = {}
        self.refused = 0
        self._reload()
        self.auth = ThreadAuthenticator(zctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)

    def _reload(self) -> None:
        try:
            mtime: float | None = self.store.allowed_file.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._mtime:
            return
        try:
            self._keys = {k.public: k.name for k in self.store.allowed()}
        except ConfigError as exc:
            log.error("key_allow_list_unreadable", error=str(exc))  # keep the last good list
            return
        self._mtime = mtime

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook (in the authenticator's thread)."""
        public = key.decode(errors="replace")
        with self._lock:
            self._reload()
            name = self._keys.get(public)
        if name is None:
            self.refused += 1
            log.warning("curve_key_refused", key=public, domain=domain, reason="not on the allow-list", refused=self.refused)
            return False
        log.debug("curve_key_admitted", key=public, name=name)
        return True

    def stop(self) -> None:
        self.auth.stop()
