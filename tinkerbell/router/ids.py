"""Identifiers the router reads to keep work on the replica that owns it.

Futures live in the memory of the replica that issued them (SQLite holds only finished results), so a poll
must reach that replica. Rather than a table that a router restart would lose, the router tags every request id
it hands out with the replica's index and the future's kind: `r<index>~<kind>~<replica's id>[~<model_id>]`.
The kind (`s` sampling, `t` training, `o` other) and the run let the router answer correctly for a future whose
replica died: a sample is "expired" (the SDK resubmits it), a training step fails naming its run.
"""

from __future__ import annotations

from dataclasses import dataclass

SEP = "~"
SAMPLE, TRAIN, OTHER = "s", "t", "o"


@dataclass(frozen=True)
class Tagged:
    replica: int
    kind: str
    request_id: str  # as the replica issued it
    model_id: str | None = None


def tag(replica: int, kind: str, request_id: str, model_id: str | None = None) -> str:
    out = f"r{replica}{SEP}{kind}{SEP}{request_id}"
    return out + f"{SEP}{model_id}" if model_id else out


def untag(value: str) -> Tagged | None:
    """The parts of a tagged id; None for an id the router did not issue. Replica ids never contain `~`
    (they are `req-` + URL-safe base64), so everything after the third separator is the run's id."""
    parts = value.split(SEP, 3)
    if len(parts) < 3 or not parts[0].startswith("r") or not parts[0][1:].isdigit() or not parts[2]:
        return None
    return Tagged(int(parts[0][1:]), parts[1], parts[2], parts[3] if len(parts) == 4 and parts[3] else None)


def session_of(ident: str | None) -> str | None:
    """The session id inside `{session}:train:{n}` / `{session}:sample:{n}`; None for other names."""
    if not ident:
        return None
    for marker in (":train:", ":sample:"):
        if marker in ident:
            return ident.split(marker, 1)[0] or None
    return None


def run_of_path(path: str | None) -> str | None:
    """The training run of `tinker://<run>/<kind>/<name>`."""
    if not path or not path.startswith("tinker://"):
        return None
    run = path[len("tinker://"):].split("/", 1)[0]
    return run or None


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def peek_model_id(body: bytes, content_encoding: str | None = None) -> str | None:
    """Field 1 (model_id) of a protobuf ForwardBackwardRequest, read from the first bytes only: the SDK writes
    fields in number order, so the router never decodes the (possibly large) data."""
    enc = (content_encoding or "identity").strip().lower()
    if enc == "zstd":
        try:
            import zstandard

            body = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True).read(1 << 16)
        except Exception:  # noqa: BLE001 - the replica reports a bad body; the router only routes
            return None
    elif enc not in ("", "identity"):
        return None
    pos = 0
    try:
        while pos < len(body):
            key, pos = _varint(body, pos)
            field_no, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(body, pos)
            elif wire == 2:
                n, pos = _varint(body, pos)
                if field_no == 1:
                    return bytes(body[pos:pos + n]).decode("utf-8", errors="replace") or None
                pos += n
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                return None
    except (IndexError, ValueError):
        return None
    return None
