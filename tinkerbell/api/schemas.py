"""Parsing JSON request bodies into the SDK's own `tinker.types` models, leniently.

The SDK's request models forbid unknown fields (they are meant to catch user typos client-side), but a server
must ignore fields newer SDKs add and the constant `type` discriminator. So unknown keys are dropped wherever
pydantic reports them (at any depth) and validation is retried; what remains is reported as one readable
message naming `body.<field>`.
"""

from __future__ import annotations

import copy
import json
from typing import Any, TypeVar

import pydantic

from tinkerbell.service.errors import BadRequest

M = TypeVar("M", bound=pydantic.BaseModel)

MAX_JSON_BYTES = 64 << 20


def load_json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON ({e}); send a JSON object with Content-Type: application/json")
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object, got {type(data).__name__}")
    return data


def format_loc(loc: tuple[Any, ...] | list[Any], prefix: str = "body") -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def format_errors(errors: list[dict[str, Any]], prefix: str = "body") -> str:
    parts = []
    for err in errors[:5]:
        loc = [p for p in err.get("loc", ()) if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
        parts.append(f"{format_loc(loc, prefix)}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _delete(data: Any, loc: tuple[Any, ...]) -> bool:
    cur = data
    for part in loc[:-1]:
        try:
            cur = cur[part]
        except (KeyError, IndexError, TypeError):
            return False
    if isinstance(cur, dict) and loc and loc[-1] in cur:
        del cur[loc[-1]]
        return True
    return False


def parse(model: type[M], data: dict[str, Any]) -> M:
    """Validate `data` against a tinker request model, ignoring unknown fields and `type`."""
    data = copy.deepcopy(data)
    data.pop("type", None)
    for _ in range(64):
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as e:
            errors = e.errors()
            extras = [tuple(err["loc"]) for err in errors if err.get("type") == "extra_forbidden"]
            if not extras or not any(_delete(data, loc) for loc in extras):
                raise BadRequest(format_errors(errors)) from None
    raise BadRequest("body has too many unknown fields")
