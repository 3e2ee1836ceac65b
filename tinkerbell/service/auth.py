"""API keys: each key belongs to a tenant; keys are stored only as sha256 hashes.

The tinker SDK refuses keys that do not start with `tml-` before sending anything, so every key minted here has
that prefix. `--no-auth` maps every request to the tenant "local" (clients still send some `tml-` placeholder).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

from tinkerbell.service.errors import Unauthorized
from tinkerbell.service.store import Store

log = logging.getLogger("tinkerbell.auth")

FIRST_KEY_FILE = "first-api-key"
LOCAL_TENANT = "local"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def mint_key() -> str:
    return "tml-" + secrets.token_urlsafe(32)


def tenant_for_configured_key(key: str) -> str:
    # A stable tenant name per configured key that reveals nothing of the key itself.
    return "key-" + hash_key(key)[:12]


def _display_prefix(key: str) -> str:
    return key[:8] + "…"


def create_key(data_dir: Path, tenant: str | None) -> str:
    """Mint a key (for `tinkerbell keys create`); a fresh tenant unless `tenant` is given. Returns the key."""
    store = Store(data_dir)
    try:
        key = mint_key()
        store.add_key(hash_key(key), tenant or tenant_for_configured_key(key), _display_prefix(key), "created")
        return key
    finally:
        store.close()


def list_keys(data_dir: Path) -> list[dict[str, Any]]:
    """Every key's tenant, display prefix, creation time (ISO 8601) and source; never the key itself."""
    store = Store(data_dir)
    try:
        return store.list_keys()
    finally:
        store.close()


def write_secret_file(path: Path, text: str) -> None:
    """Create `path` with mode 0600 from the start (no window in which others could read it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


class Authenticator:
    def __init__(self, store: Store, data_dir: Path, api_keys: list[str], no_auth: bool):
        self.store = store
        self.data_dir = Path(data_dir)
        self.no_auth = no_auth
        self.first_key_path: Path | None = None
        for key in api_keys:
            # A configured key keeps the tenant it already has (e.g. from `keys create --tenant`).
            self.store.add_key(hash_key(key), tenant_for_configured_key(key), _display_prefix(key), "configured")
        if not no_auth and not api_keys and self.store.count_keys() == 0:
            self._mint_first_key()
        elif (self.data_dir / FIRST_KEY_FILE).exists():
            self.first_key_path = self.data_dir / FIRST_KEY_FILE

    def _mint_first_key(self) -> None:
        key = mint_key()
        self.store.add_key(hash_key(key), "default", _display_prefix(key), "first-start")
        path = self.data_dir / FIRST_KEY_FILE
        write_secret_file(path, key + "\n")
        self.first_key_path = path
        log.warning("minted the first API key (shown once; also saved to %s, mode 0600):\n    %s\n"
                    "use it with:  export TINKER_API_KEY=%s", path, key, key)

    def authenticate(self, headers: Mapping[str, str]) -> str:
        """The tenant of the request's credential (`X-API-Key` or `Authorization: Bearer`)."""
        if self.no_auth:
            return LOCAL_TENANT
        key = headers.get("x-api-key")
        if not key:
            auth = headers.get("authorization") or ""
            if auth.lower().startswith("bearer "):
                key = auth[7:].strip()
        if not key:
            raise Unauthorized("missing API key: send it in the X-API-Key header (or Authorization: Bearer <key>); "
                               "the tinker SDK reads it from TINKER_API_KEY")
        tenant = self.store.key_tenant(hash_key(key))
        if tenant is None:
            raise Unauthorized(f"invalid API key {_display_prefix(key)}: not known to this server "
                               "(create one with `tinkerbell keys create`, or start the server with --api-key)")
        return tenant
