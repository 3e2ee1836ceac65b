"""Hypothesis strategies for hostile request bodies, built from the SDK's own request shapes: a valid body for
each endpoint, then one mutation (a field replaced by a nasty value, a field dropped, junk added) or a body
that is not a JSON object at all. Forward/backward bodies are protobuf, mutated at the message level."""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
from hypothesis import strategies as st
from tinker.proto import tinker_public_pb2 as pb

NASTY_STRINGS = ["", " ", "..", "../../etc/passwd", "a/../../b", "tinker://", "tinker://a/b",
                 "tinker://../weights/x", "tinker://x/weights/../../y", "tinker://x/weights/a%2F..%2Fb",
                 "tinker://x/nope/y", "s3://bucket/key", "\x00", "tml-", "☃" * 40, "a" * 20000, "null",
                 "cross_entropy\n", "stable_reinforce", "no_such_loss", "adamw", "dimuon", "-1", "1e309"]
NASTY_NUMBERS = [0, -1, 1, 2**31, 2**31 - 1, -2**31, 2**63, 2**63 - 1, -2**63, 2**64, 10**30, -10**30,
                 float("nan"), float("inf"), float("-inf"), 1e308, -0.0, 0.5, 1e-320]

nasty_scalar = st.one_of(
    st.none(), st.booleans(), st.sampled_from(NASTY_NUMBERS), st.sampled_from(NASTY_STRINGS),
    st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
)
nasty = st.one_of(
    nasty_scalar,
    st.lists(nasty_scalar, max_size=4),
    st.dictionaries(st.text(max_size=8), nasty_scalar, max_size=3),
    st.lists(st.integers(min_value=-2**40, max_value=2**40), max_size=8),  # token lists, in and out of vocab
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            out += _paths(v, prefix + (i,))
    return out


def _set(body: Any, path: tuple, value: Any, delete: bool = False) -> None:
    cur = body
    for p in path[:-1]:
        cur = cur[p]
    if delete:
        if isinstance(cur, dict):
            cur.pop(path[-1], None)
        else:
            cur.pop(path[-1])
    else:
        cur[path[-1]] = value


@st.composite
def mutated_json(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    """One hostile variant of `base`, serialised (NaN / Infinity allowed, as a careless client would send)."""
    kind = draw(st.sampled_from(["replace", "replace", "replace", "delete", "extra", "not_object", "raw"]))
    body = json.loads(json.dumps(base))
    paths = _paths(body)
    if kind == "replace" and paths:
        _set(body, draw(st.sampled_from(paths)), draw(nasty))
    elif kind == "delete" and paths:
        _set(body, draw(st.sampled_from(paths)), None, delete=True)
    elif kind == "extra":
        body[draw(st.text(min_size=1, max_size=10))] = draw(nasty)
    elif kind == "not_object":
        return json.dumps(draw(st.one_of(st.lists(nasty_scalar, max_size=3), nasty_scalar))).encode()
    elif kind == "raw":
        return draw(st.one_of(st.binary(max_size=64), st.sampled_from([b"{", b"{\"a\":", b"\xff\xfe", b"[]" * 9])))
    return json.dumps(body).encode()


def fb_message(model_id: str, seq_id: int, n: int = 4) -> pb.ForwardBackwardRequest:
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.arange(1, n + 1, dtype="<i4").tobytes()
    t = d.loss_fn_inputs["target_tokens"]
    t.dtype, t.dense = pb.DTYPE_INT64, np.arange(2, n + 2, dtype="<i8").tobytes()
    t.shape.append(n)
    w = d.loss_fn_inputs["weights"]
    w.dtype, w.dense = pb.DTYPE_FLOAT32, np.ones(n, dtype="<f4").tobytes()
    w.shape.append(n)
    return msg


def _tokens(values: list[int]) -> bytes:
    return np.asarray(values, dtype=np.int64).astype("<i4").tobytes()


FB_MUTATIONS: dict[str, Callable[[pb.ForwardBackwardRequest, Any], None]] = {
    "tokens": lambda m, v: setattr(m.data[0].model_input[0].encoded_text, "tokens", _tokens(v)),
    "token_bytes": lambda m, v: setattr(m.data[0].model_input[0].encoded_text, "tokens", v),
    "targets": lambda m, v: setattr(m.data[0].loss_fn_inputs["target_tokens"], "dense",
                                    np.asarray(v, dtype=np.int64).astype("<i8").tobytes()),
    "target_shape": lambda m, v: m.data[0].loss_fn_inputs["target_tokens"].shape.__setitem__(0, v),
    "weights": lambda m, v: setattr(m.data[0].loss_fn_inputs["weights"], "dense",
                                    np.asarray(v, dtype=np.float64).astype("<f4").tobytes()),
    "weight_dtype": lambda m, v: setattr(m.data[0].loss_fn_inputs["weights"], "dtype", v),
    "loss_fn": lambda m, v: setattr(m, "loss_fn", v),
    "loss_cfg": lambda m, v: m.loss_fn_config.__setitem__("clip_low_threshold", v),
    "no_data": lambda m, v: m.ClearField("data"),
    "no_model_input": lambda m, v: m.data[0].ClearField("model_input"),
    "image_chunk": lambda m, v: setattr(m.data[0].model_input[0].image, "data", b"\x89PNG"),
    "sparse": lambda m, v: (m.data[0].loss_fn_inputs["weights"].sparse_csr.__setattr__("crow_indices", v),
                            m.data[0].loss_fn_inputs["weights"].ClearField("shape")),
}

_token_lists = st.lists(st.integers(min_value=-2**31, max_value=2**31 - 1), max_size=6)
_fb_values: dict[str, st.SearchStrategy] = {
    "tokens": _token_lists, "token_bytes": st.binary(max_size=11), "targets": _token_lists,
    "target_shape": st.integers(min_value=0, max_value=2**62), "weight_dtype": st.integers(0, 2**31 - 1),
    "weights": st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=6),
    "loss_fn": st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=20)),
    "loss_cfg": st.floats(allow_nan=True, allow_infinity=True), "no_data": st.none(),
    "no_model_input": st.none(), "image_chunk": st.none(), "sparse": st.binary(max_size=24),
}


@st.composite
def mutated_fb(draw: st.DrawFn, model_id: str, seq_id: int) -> tuple[bytes, str | None]:
    """(body, Content-Encoding) of a hostile forward_backward request."""
    kind = draw(st.sampled_from([*FB_MUTATIONS, "garbage", "truncated", "zstd_garbage"]))
    msg = fb_message(model_id, seq_id)
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=200)), None
    if kind == "truncated":
        raw = msg.SerializeToString()
        return raw[: draw(st.integers(1, len(raw) - 1))], None
    if kind == "zstd_garbage":
        return b"\x28\xb5\x2f\xfd" + draw(st.binary(max_size=40)), "zstd"
    FB_MUTATIONS[kind](msg, draw(_fb_values[kind]))
    return msg.SerializeToString(), None
