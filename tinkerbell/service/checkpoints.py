"""Checkpoints on disk and in the store: `tinker://` paths, atomic writes, listing, TTL, publishing, signed URLs.

Layout: `<data-dir>/checkpoints/<run>/<kind>/<name>/` holding PEFT `adapter_model.safetensors` +
`adapter_config.json` (plus optimizer state for `weights`). Every checkpoint is written into a staging folder
under `<data-dir>/checkpoints/.staging/` and renamed into place, so a torn write leaves nothing visible. Expiry
is lazy: expired checkpoints are deleted whenever someone looks.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import shutil
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tinkerbell.service.auth import write_secret_file
from tinkerbell.service.errors import BadRequest, NotFound
from tinkerbell.service.store import Store, iso, now

KIND_TO_TYPE = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
URL_LIFETIME_SECONDS = 3600
SECRET_FILE = "url-signing-secret"
# Suffix of a checkpoint folder being replaced by an overwrite; '~' is not allowed in names, so it never clashes.
REPLACED_SUFFIX = "~replaced"


def validate_name(name: str | None, field: str = "path") -> str:
    if not name or not NAME_RE.match(name) or ".." in name:
        raise BadRequest(f"{field} must be a checkpoint name of letters, digits, '.', '_' or '-' (at most 200, no "
                         f"'/', no '..', not starting with '.' or '-'); got {name!r}")
    return name


def validate_ttl(ttl_seconds: int | None, field: str = "ttl_seconds") -> float | None:
    """The absolute expiry time for a TTL (None: never expires)."""
    if ttl_seconds is None:
        return None
    if not 1 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise BadRequest(f"{field} must be between 1 and {MAX_TTL_SECONDS} seconds (10 years), or null for no "
                         f"expiry; got {ttl_seconds}")
    return now() + ttl_seconds


def validate_kind(kind: str) -> str:
    if kind not in KIND_TO_TYPE:
        raise BadRequest(f"checkpoint kind must be one of {', '.join(KIND_TO_TYPE)}; got {kind!r}")
    return kind


def tinker_path(run: str, kind: str, name: str) -> str:
    return f"tinker://{run}/{kind}/{name}"


def parse_tinker_path(path: str | None, field: str = "path") -> tuple[str, str, str]:
    """(run, kind, name) of `tinker://<run>/<kind>/<name>`; 400 naming `field` when malformed."""
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise BadRequest(f"{field} must be a tinker:// path (tinker://<model_id>/<weights|sampler_weights|"
                         f"external_weights>/<name>); got {path!r}")
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3 or not all(parts):
        raise BadRequest(f"{field} must have exactly three parts after tinker:// (<model_id>/<kind>/<name>); "
                         f"got {path!r}")
    run, kind, name = parts
    if kind not in KIND_TO_TYPE:
        raise BadRequest(f"{field}: the kind segment must be one of {', '.join(KIND_TO_TYPE)}; got {kind!r} "
                         f"in {path!r}")
    validate_name(name, field)
    return run, kind, name


def to_wire(row: dict[str, Any]) -> dict[str, Any]:
    """A store row as the SDK's `Checkpoint`."""
    meta = row.get("user_metadata")
    return {
        "checkpoint_id": f"{row['kind']}/{row['name']}",
        "checkpoint_type": KIND_TO_TYPE[row["kind"]],
        "time": iso(row["created"]),
        "tinker_path": row["tinker_path"],
        "size_bytes": row["size_bytes"],
        "public": row["public"],
        "user_metadata": {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None,
        "expires_at": iso(row["expires_at"]),
    }


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class CheckpointManager:
    def __init__(self, data_dir: Path, store: Store):
        self.store = store
        self.root = Path(data_dir) / "checkpoints"
        self.staging = self.root / ".staging"
        self.root.mkdir(parents=True, exist_ok=True)
        # Whatever is in staging was torn by a crash: it never became visible, so it can go.
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        self._recover_replaced()
        secret_path = Path(data_dir) / SECRET_FILE
        if not secret_path.exists():
            write_secret_file(secret_path, secrets.token_hex(32))
        self._secret = secret_path.read_text().strip().encode()

    # ----------------------------------------------------------------------------------------- files

    def dir_for(self, run: str, kind: str, name: str) -> Path:
        return self.root / run / kind / name

    def new_staging_dir(self) -> Path:
        path = self.staging / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def commit(self, staging: Path, run: str, kind: str, name: str, tenant: str, expires_at: float | None,
               user_metadata: dict[str, Any] | None) -> dict[str, Any]:
        """Move a fully written staging folder into place and record it; replaces an existing checkpoint."""
        final = self.dir_for(run, kind, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        size = dir_size(staging)
        # An overwrite sets the old folder aside next to its place (not in staging, which a restart wipes), so a
        # crash between the two renames leaves the previous checkpoint recoverable (_recover_replaced).
        old = final.with_name(final.name + REPLACED_SUFFIX)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        self.store.put_checkpoint(run, kind, name, tenant, tinker_path(run, kind, name), size, expires_at,
                                  user_metadata)
        row = self.store.get_checkpoint(run, kind, name)
        assert row is not None
        return row

    def _recover_replaced(self) -> None:
        """Finish overwrites a crash interrupted: put the previous folder back if the new one never landed."""
        for old in self.root.glob(f"*/*/*{REPLACED_SUFFIX}"):
            final = old.with_name(old.name[: -len(REPLACED_SUFFIX)])
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(final)

    # ----------------------------------------------------------------------------------------- lookup

    def expire(self) -> int:
        """Delete every checkpoint whose TTL has passed."""
        expired = self.store.expired_checkpoints(now())
        for r in expired:
            self._remove(r["run"], r["kind"], r["name"])
        return len(expired)

    def _remove(self, run: str, kind: str, name: str) -> None:
        self.store.delete_checkpoint(run, kind, name)
        shutil.rmtree(self.dir_for(run, kind, name), ignore_errors=True)

    def exists(self, run: str, kind: str, name: str) -> bool:
        self.expire()
        return self.store.get_checkpoint(run, kind, name) is not None

    def _not_found(self, run: str, kind: str, name: str) -> NotFound:
        return NotFound(f"checkpoint {tinker_path(run, kind, name)} does not exist (or belongs to another API key, "
                        "or its TTL expired)")

    def get_owned(self, tenant: str, run: str, kind: str, name: str) -> dict[str, Any]:
        validate_kind(kind)
        self.expire()
        row = self.store.get_checkpoint(run, kind, name)
        if row is None or row["tenant"] != tenant:
            raise self._not_found(run, kind, name)
        return row

    def resolve(self, tenant: str, path: str, field: str = "path",
                kinds: tuple[str, ...] = tuple(KIND_TO_TYPE)) -> tuple[dict[str, Any], Path]:
        """A checkpoint readable by `tenant` (its own, or a published one) and its folder."""
        run, kind, name = parse_tinker_path(path, field)
        if kind not in kinds:
            raise BadRequest(f"{field} must be a {' or '.join(kinds)} checkpoint path; got {path!r}")
        self.expire()
        row = self.store.get_checkpoint(run, kind, name)
        if row is None or (row["tenant"] != tenant and not row["public"]):
            raise self._not_found(run, kind, name)
        folder = self.dir_for(run, kind, name)
        if not folder.is_dir():
            raise NotFound(f"checkpoint {path} is recorded but its files are missing from the server's data dir")
        return row, folder

    def list_for_run(self, run: str) -> list[dict[str, Any]]:
        self.expire()
        return [to_wire(r) for r in self.store.list_checkpoints_of_run(run)]

    def list_for_tenant(self, tenant: str, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        self.expire()
        rows, total = self.store.list_checkpoints_of_tenant(tenant, limit, offset)
        return [to_wire(r) for r in rows], total

    def last_of_kind(self, run: str, kind: str) -> dict[str, Any] | None:
        for r in self.store.list_checkpoints_of_run(run):
            if r["kind"] == kind:
                return to_wire(r)
        return None

    # ----------------------------------------------------------------------------------------- changes

    def delete(self, tenant: str, run: str, kind: str, name: str) -> None:
        self.get_owned(tenant, run, kind, name)
        self._remove(run, kind, name)

    def set_public(self, tenant: str, run: str, kind: str, name: str, public: bool) -> None:
        self.get_owned(tenant, run, kind, name)
        self.store.set_checkpoint_public(run, kind, name, public)

    def set_ttl(self, tenant: str, run: str, kind: str, name: str, ttl_seconds: int | None) -> None:
        self.get_owned(tenant, run, kind, name)
        self.store.set_checkpoint_expiry(run, kind, name, validate_ttl(ttl_seconds))

    def copy(self, row: dict[str, Any], dest_run: str, tenant: str, expires_at: float | None) -> dict[str, Any]:
        staging = self.new_staging_dir()
        shutil.copytree(self.dir_for(row["run"], row["kind"], row["name"]), staging, dirs_exist_ok=True)
        return self.commit(staging, dest_run, row["kind"], row["name"], tenant, expires_at, row["user_metadata"])

    # ----------------------------------------------------------------------------------------- signed URLs

    def _sign(self, run: str, name: str, file: str, expires: int) -> str:
        msg = f"{run}\n{name}\n{file}\n{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def external_urls(self, tenant: str, run: str, name: str, base_url: str) -> dict[str, Any]:
        """Self-authorising, expiring download URLs for every file of an external_weights checkpoint."""
        self.get_owned(tenant, run, "external_weights", name)
        folder = self.dir_for(run, "external_weights", name)
        expires = int(time.time()) + URL_LIFETIME_SECONDS
        base = base_url.rstrip("/")
        urls: dict[str, str] = {}
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = f.relative_to(folder).as_posix()
            urls[rel] = (f"{base}/api/v1/download/{quote(run, safe='')}/{quote(name, safe='')}/"
                         f"{quote(rel, safe='/')}?expires={expires}&sig={self._sign(run, name, rel, expires)}")
        return {"urls": urls, "expires": iso(expires)}

    def verify_download(self, run: str, name: str, file: str, expires: int, sig: str) -> Path:
        """The file a signed URL names, if the signature is valid and unexpired (else NotFound: reveal nothing)."""
        # compare_digest refuses non-ASCII str (TypeError, a 500): compare bytes, so any forged sig is a 404.
        good = hmac.compare_digest(self._sign(run, name, file, expires).encode(), (sig or "").encode())
        if not good or expires < time.time():
            raise NotFound("this download link is invalid or has expired; ask for new ones with "
                           "GET /api/v1/training_runs/{run}/checkpoints/external_weights/{name}/external_weights_urls")
        folder = self.dir_for(run, "external_weights", name).resolve()
        target = (folder / file).resolve()
        if folder not in target.parents or not target.is_file() or not self.exists(run, "external_weights", name):
            raise NotFound("the checkpoint this download link points to no longer exists")
        return target
