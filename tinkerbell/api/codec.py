"""Wire formats <-> engine types.

The wire types are the `tinker` SDK's own (`tinker.proto.tinker_public_pb2`, `tinker.types`); nothing here
re-declares them. Decoding validates everything the engine would otherwise trip over (byte lengths, CSR
indices, token ranges, finite numbers) and raises `WireError` naming the offending field, so the API layer can
answer a 4xx (or fail the future with category `user`) whose message tells the user what to fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard
from google.protobuf.message import DecodeError
from tinker.proto import tinker_public_pb2 as pb
from tinker.types import ModelInput
from tinker.types.topk_logprobs import MASK_LOGPROB

from tinkerbell.engine.types import ForwardBackwardResult, SampleJob, SampleResult, TrainDatum

# A real forward_backward chunk is a few MiB; this bound only stops a zstd bomb from exhausting memory.
MAX_BODY_BYTES = 512 << 20
# Cells of one decoded (densified) tensor: a forged CSR shape must not make us allocate terabytes.
MAX_TENSOR_ELEMENTS = 1 << 27
# Server default when sampling_params.max_tokens is absent: the remaining context, capped so that a
# forgotten max_tokens cannot hold KV blocks for thousands of steps.
DEFAULT_MAX_TOKENS = 512
MAX_NUM_SAMPLES = 256
MAX_TOPK_LOGPROBS = 128

TEXT_ONLY = "this server serves text-only models; send encoded_text chunks only"

# loss_fn_inputs keys the SDK knows (tinker/types/datum.py _KEY_TO_TYPE); all are aligned with the model input.
_INT_INPUTS = frozenset({"target_tokens"})
_FLOAT_INPUTS = frozenset(
    {"weights", "advantages", "logprobs", "clip_low_threshold", "clip_high_threshold", "sequence_ratio_mask"}
)

_PROTO_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
}


class WireError(ValueError):
    """A request body or field the server cannot accept. `field` is the path of the offending field
    (`data[3].loss_fn_inputs.weights`); `model_id` / `seq_id` are set when they could be read, so the caller
    can still consume the seq_id of a rejected training request (tinker_api.md 6.1)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.model_id: str | None = None
        self.seq_id: int | None = None


# --------------------------------------------------------------------------------------------- body / ids


def decompress_body(body: bytes, content_encoding: str | None, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw protobuf bytes of a request body sent with `Content-Encoding` identity or zstd."""
    enc = (content_encoding or "identity").strip().lower()
    if enc in ("", "identity"):
        if len(body) > limit:
            raise WireError("body", f"is {len(body)} bytes; the limit is {limit}")
        return body
    if enc != "zstd":
        raise WireError("Content-Encoding", f"{content_encoding!r} is not supported (use zstd or identity)")
    return _zstd_read(body, limit, must_fit=True)


def _zstd_read(body: bytes, limit: int, must_fit: bool) -> bytes:
    # Streaming, not ZstdDecompressor.decompress: a frame header may claim any content size, and we must not
    # trust it to size an allocation.
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
        while len(out) <= limit:
            piece = reader.read(min(1 << 20, limit + 1 - len(out)))
            if not piece:
                return bytes(out)
            out += piece
    except zstandard.ZstdError as e:
        raise WireError("body", f"is not a valid zstd stream ({e})") from None
    if must_fit:
        raise WireError("body", f"decompresses to more than {limit} bytes")
    return bytes(out[:limit])


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]  # IndexError on truncation, handled by the caller
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _scan_ids(buf: bytes) -> tuple[str | None, int | None, bool]:
    """Top-level fields 1 (model_id) and 2 (seq_id) of a ForwardBackwardRequest, without parsing the rest.
    Returns (model_id, seq_id, reached_end); stops early once both are found or the buffer runs out."""
    model_id: str | None = None
    seq_id: int | None = None
    pos = 0
    try:
        while pos < len(buf) and (model_id is None or seq_id is None):
            tag, pos = _varint(buf, pos)
            field_no, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                v, pos = _varint(buf, pos)
                if field_no == 2:
                    v &= 0xFFFFFFFF  # int32 on the wire is sign-extended to 64 bits; protobuf truncates
                    seq_id = v - (1 << 32) if v & 0x80000000 else v
            elif wire_type == 2:
                n, pos = _varint(buf, pos)
                if field_no == 1:
                    if pos + n > len(buf):
                        break
                    model_id = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
                pos += n
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            else:
                break
    except (IndexError, ValueError):
        pass
    return model_id, seq_id, pos >= len(buf)


def peek_forward_backward_ids(body: bytes, content_encoding: str | None) -> tuple[str, int]:
    """(model_id, seq_id) of a forward_backward body, read without decoding the data, so the server can consume
    the seq_id even when the rest is invalid. Absent fields read as "" / 0 (proto3 defaults); an unreadable
    body raises WireError."""
    enc = (content_encoding or "identity").strip().lower()
    if enc == "zstd":
        # The SDK serialises fields in number order, so the ids sit in the first bytes; only fall back to a
        # full decompression when they are not there.
        head = _zstd_read(body, 1 << 16, must_fit=False)
        model_id, seq_id, _ = _scan_ids(head)
        if model_id is None or seq_id is None:
            model_id, seq_id, _ = _scan_ids(decompress_body(body, enc))
    else:
        model_id, seq_id, _ = _scan_ids(decompress_body(body, enc))
    return model_id or "", seq_id or 0


# --------------------------------------------------------------------------------------- forward_backward


@dataclass
class ForwardBackwardCall:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_config: dict[str, float | str]
    forward_only: bool
    data: list[TrainDatum]


def decode_forward_backward(
    body: bytes, content_encoding: str | None, *, vocab_size: int | None = None
) -> ForwardBackwardCall:
    """Decode a protobuf ForwardBackwardRequest body. With `vocab_size`, token ids and target_tokens are also
    checked against the vocabulary. The loss function's name and required inputs are the service's to check."""
    raw = decompress_body(body, content_encoding)
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(raw)
    except DecodeError as e:
        err = WireError("body", f"is not a valid ForwardBackwardRequest protobuf ({e})")
        model_id, seq_id, _ = _scan_ids(raw)
        err.model_id, err.seq_id = model_id, seq_id
        raise err from None
    try:
        return _decode_request(msg, vocab_size)
    except WireError as e:
        e.model_id, e.seq_id = msg.model_id or None, msg.seq_id or None
        raise


def _decode_request(msg: pb.ForwardBackwardRequest, vocab_size: int | None) -> ForwardBackwardCall:
    if not msg.model_id:
        raise WireError("model_id", "is missing")
    if msg.seq_id < 1:
        raise WireError("seq_id", f"must be >= 1 (got {msg.seq_id}); the SDK numbers requests from 1")
    if not msg.loss_fn:
        raise WireError("loss_fn", "is missing")
    if not msg.data:
        raise WireError("data", "is empty; send at least one datum")
    data = [_decode_datum(d, f"data[{i}]", vocab_size) for i, d in enumerate(msg.data)]
    return ForwardBackwardCall(
        model_id=msg.model_id,
        seq_id=msg.seq_id,
        loss_fn=msg.loss_fn,
        loss_config=_decode_loss_config(msg),
        forward_only=msg.forward_only,
        data=data,
    )


def _decode_loss_config(msg: pb.ForwardBackwardRequest) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    if msg.loss_fn_config_v2:  # v2 carries strings too; the SDK mirrors numbers into v1 for older servers
        for k, v in msg.loss_fn_config_v2.items():
            kind = v.WhichOneof("value")
            if kind == "text":
                out[k] = v.text
            elif kind == "number":
                out[k] = v.number
            else:
                raise WireError(f"loss_fn_config.{k}", "has neither a number nor a text value")
    else:
        out.update(msg.loss_fn_config.items())
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise WireError(f"loss_fn_config.{k}", f"must be a finite number (got {v})")
    return out


def _decode_datum(d: pb.Datum, path: str, vocab_size: int | None) -> TrainDatum:
    parts: list[np.ndarray] = []
    for j, chunk in enumerate(d.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise WireError(f"{path}.model_input[{j}]", f"is a {kind or 'empty'} chunk; {TEXT_ONLY}")
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise WireError(f"{path}.model_input[{j}].tokens", f"has {len(raw)} bytes, not a multiple of 4 (int32)")
        parts.append(np.frombuffer(raw, dtype="<i4"))
    tokens = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    if tokens.size == 0:
        raise WireError(f"{path}.model_input", "has no tokens")
    _check_token_range(tokens, f"{path}.model_input", vocab_size)

    inputs: dict[str, np.ndarray] = {}
    for name, t in d.loss_fn_inputs.items():
        field = f"{path}.loss_fn_inputs.{name}"
        arr = _decode_tensor(t, field)
        if name in _INT_INPUTS:
            if arr.dtype.kind != "i":
                raise WireError(field, f"must be int64 token ids (got {arr.dtype})")
            _check_token_range(arr, field, vocab_size)
        elif name in _FLOAT_INPUTS:
            arr = arr.astype(np.float32, copy=False)
        if (name in _INT_INPUTS or name in _FLOAT_INPUTS) and (arr.ndim == 0 or arr.shape[0] != tokens.size):
            raise WireError(field, f"has shape {list(arr.shape)}; its first dimension must equal the "
                                   f"{tokens.size} model input tokens")
        inputs[name] = arr
    return TrainDatum(tokens=tokens, inputs=inputs)


def _check_token_range(ids: np.ndarray, field: str, vocab_size: int | None) -> None:
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0:
        raise WireError(field, f"contains a negative token id ({lo})")
    if vocab_size is not None and hi >= vocab_size:
        raise WireError(field, f"contains token id {hi}, outside the model's vocabulary of {vocab_size}")


def _decode_tensor(t: pb.Tensor, field: str) -> np.ndarray:
    """A proto Tensor (dense or CSR, unlisted cells 0) as a dense float32 / int64 array."""
    wire_dtype = _PROTO_DTYPES.get(t.dtype)
    if wire_dtype is None:
        raise WireError(f"{field}.dtype", f"must be float32 or int64 (got enum value {t.dtype})")
    shape = [int(s) for s in t.shape]
    if any(s < 0 for s in shape):
        raise WireError(f"{field}.shape", f"has a negative dimension: {shape}")
    encoding = t.WhichOneof("encoding")
    if encoding == "sparse_csr":
        flat = _densify_csr(t.sparse_csr, shape, wire_dtype, field)
    else:
        raw = t.dense
        if len(raw) % wire_dtype.itemsize:
            raise WireError(f"{field}.dense", f"has {len(raw)} bytes, not a multiple of {wire_dtype.itemsize}")
        flat = np.frombuffer(raw, dtype=wire_dtype)
        if not shape:
            shape = [flat.size]
        if flat.size != math.prod(shape):
            raise WireError(f"{field}.dense", f"has {flat.size} elements but shape {shape} needs {math.prod(shape)}")
    arr = _widen(flat, t.dtype).reshape(shape)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise WireError(field, "contains NaN or infinite values")
    return arr


def _widen(flat: np.ndarray, dtype: int) -> np.ndarray:
    # The SDK only writes float32 and int64; bfloat16 / int32 are widened as the SDK's own reader does.
    if dtype == pb.DTYPE_BFLOAT16:
        return (flat.astype(np.uint32) << 16).view(np.float32)
    if dtype == pb.DTYPE_INT32 or dtype == pb.DTYPE_INT64:
        return flat.astype(np.int64)
    return flat.astype(np.float32)


def _densify_csr(csr: pb.SparseCsr, shape: list[int], dtype: np.dtype, field: str) -> np.ndarray:
    f = f"{field}.sparse_csr"
    if len(shape) != 2:
        raise WireError(f"{field}.shape", f"must be 2-D for a sparse CSR tensor (got {shape})")
    rows, cols = shape
    if rows * cols > MAX_TENSOR_ELEMENTS:
        raise WireError(f"{field}.shape", f"{shape} has more than {MAX_TENSOR_ELEMENTS} cells")
    for name, raw, size in (("values", csr.values, dtype.itemsize), ("crow_indices", csr.crow_indices, 8),
                            ("col_indices", csr.col_indices, 8)):
        if len(raw) % size:
            raise WireError(f"{f}.{name}", f"has {len(raw)} bytes, not a multiple of {size}")
    values = np.frombuffer(csr.values, dtype=dtype)
    crow = np.frombuffer(csr.crow_indices, dtype="<i8")
    col = np.frombuffer(csr.col_indices, dtype="<i8")
    if crow.size != rows + 1:
        raise WireError(f"{f}.crow_indices", f"has {crow.size} entries; shape {shape} needs {rows + 1}")
    if crow[0] != 0 or (np.diff(crow) < 0).any():
        raise WireError(f"{f}.crow_indices", "must start at 0 and never decrease")
    nnz = int(crow[-1])
    if col.size != nnz or values.size != nnz:
        raise WireError(f, f"crow_indices end at {nnz} but there are {col.size} col_indices and "
                           f"{values.size} values")
    if nnz and (col.min() < 0 or col.max() >= cols):
        raise WireError(f"{f}.col_indices", f"must lie in [0, {cols})")
    row_of = np.repeat(np.arange(rows), np.diff(crow))
    # Strictly increasing columns within each row (torch's CSR invariant): no cell is listed twice.
    if nnz > 1 and ((np.diff(col) <= 0) & (row_of[1:] == row_of[:-1])).any():
        raise WireError(f"{f}.col_indices", "must be strictly increasing within each row")
    dense = np.zeros(rows * cols, dtype=dtype)
    dense[row_of * cols + col] = values
    return dense


def encode_forward_backward_output(result: ForwardBackwardResult) -> bytes:
    """A ForwardBackwardOutput proto: one ArrayRecord per run of consecutive datums whose fields share dtype
    and trailing shape (usually a single record), outputs in datum order."""
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for k, v in result.metrics.items():
        if k.count(":") != 1:
            # The SDK's chunk combiner splits every key on ':' and crashes otherwise.
            raise ValueError(f"metric key {k!r} must contain exactly one ':'")
        msg.metrics[k] = float(v)
    outputs = [{k: _as_output_array(v) for k, v in o.items()} for o in result.outputs]
    if not outputs:
        return msg.SerializeToString()
    names = sorted(outputs[0])
    for i, o in enumerate(outputs):
        if sorted(o) != names:
            raise ValueError(f"output {i} has fields {sorted(o)}, output 0 has {names}")

    def layout(o: dict[str, np.ndarray]) -> tuple:
        return tuple((n, o[n].dtype.str, o[n].shape[1:]) for n in names)

    start = 0
    while start < len(outputs):
        end = start + 1
        while end < len(outputs) and layout(outputs[end]) == layout(outputs[start]):
            end += 1
        group = outputs[start:end]
        rec = msg.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(group))
        for n in names:
            arrays = [o[n] for o in group]
            offsets = np.zeros(len(arrays) + 1, dtype="<i8")
            offsets[1:] = np.cumsum([a.nbytes for a in arrays])
            bt = rec.fields[n]
            bt.data = b"".join(a.tobytes() for a in arrays)
            bt.offsets = offsets.tobytes()
            bt.dtype = pb.DTYPE_FLOAT32 if arrays[0].dtype.kind == "f" else pb.DTYPE_INT64
            bt.trailing_shape.extend(int(s) for s in arrays[0].shape[1:])
        start = end
    return msg.SerializeToString()


def _as_output_array(v: Any) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim == 0:
        a = a.reshape(1)
    return np.ascontiguousarray(a, dtype="<f4" if a.dtype.kind in "fb" else "<i8")


# ---------------------------------------------------------------------------------------------- sampling


def encode_sample_response(result: SampleResult) -> bytes:
    msg = pb.SampleResponse(prompt_cache_hit_tokens=int(result.prompt_cache_hit_tokens))
    for s in result.sequences:
        if s.stop_reason not in ("stop", "length"):
            raise ValueError(f"unknown stop_reason {s.stop_reason!r}")
        seq = msg.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if s.stop_reason == "stop" else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(s.tokens, dtype="<i4").tobytes(),
            # Always set: the cookbook asserts sampled logprobs are present.
            logprobs=np.asarray(s.logprobs, dtype="<f4").tobytes(),
        )
        if s.topk_ids is not None and s.topk_logprobs is not None:
            _fill_topk(seq.topk_sampled_logprobs, s.topk_ids, s.topk_logprobs)
    if result.prompt_logprobs is not None:
        lp = np.array([math.nan if x is None else x for x in result.prompt_logprobs], dtype="<f4")
        msg.prompt_logprobs = lp.tobytes()
    if result.topk_prompt_ids is not None and result.topk_prompt_logprobs is not None:
        _fill_topk(msg.topk_prompt_logprobs, result.topk_prompt_ids, result.topk_prompt_logprobs)
    return msg.SerializeToString()


def _fill_topk(msg: pb.TopkLogprobs, ids: np.ndarray, logprobs: np.ndarray) -> None:
    ids = np.asarray(ids).astype(np.int64)
    lps = np.asarray(logprobs, dtype=np.float32)
    if ids.shape != lps.shape or ids.ndim != 2:
        raise ValueError(f"top-k ids {ids.shape} and logprobs {lps.shape} must be equal 2-D shapes")
    # The SDK reads (0, -99999.0) as an empty slot; normalise whatever marks emptiness on our side.
    empty = (ids < 0) | ~np.isfinite(lps)
    ids = np.where(empty, 0, ids).astype("<i4")
    lps = np.where(empty, np.float32(MASK_LOGPROB), lps).astype("<f4")
    msg.token_ids = ids.tobytes()
    msg.logprobs = lps.tobytes()
    msg.length, msg.k = ids.shape


def model_input_tokens(
    model_input: dict | ModelInput, field: str = "prompt", *, vocab_size: int | None = None
) -> list[int]:
    """Token ids of a JSON (or parsed) ModelInput; only encoded_text chunks are accepted."""
    if isinstance(model_input, ModelInput):
        chunks: list[Any] = [c.model_dump() for c in model_input.chunks]
    elif isinstance(model_input, dict) and isinstance(model_input.get("chunks"), list):
        chunks = model_input["chunks"]
    else:
        raise WireError(f"{field}.chunks", "is missing; expected {\"chunks\": [{\"type\": \"encoded_text\", ...}]}")
    tokens: list[int] = []
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, dict):
            raise WireError(f"{field}.chunks[{i}]", "must be an object")
        kind = chunk.get("type", "encoded_text")
        if kind != "encoded_text":
            raise WireError(f"{field}.chunks[{i}].type", f"{kind!r} is not supported: {TEXT_ONLY}")
        ids = chunk.get("tokens")
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
            raise WireError(f"{field}.chunks[{i}].tokens", "must be a list of integer token ids")
        _check_token_range(np.asarray(ids, dtype=np.int64), f"{field}.chunks[{i}].tokens", vocab_size)
        tokens.extend(int(t) for t in ids)
    return tokens


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _int(obj: dict, key: str, field: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = obj.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise WireError(field, f"must be an integer (got {v!r})")
    if v < lo or (hi is not None and v > hi):
        raise WireError(field, f"must be in [{lo}, {hi if hi is not None else '∞'}] (got {v})")
    return int(v)


def _float(obj: dict, key: str, field: str, default: float) -> float:
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise WireError(field, f"must be a finite number (got {v!r})")
    if v < 0:
        raise WireError(field, f"must not be negative (got {v})")
    return float(v)


def _bool(obj: dict, key: str, field: str) -> bool:
    v = obj.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise WireError(field, f"must be true or false (got {v!r})")
    return v


def sample_job_from_request(req: dict, vocab_size: int, max_context: int) -> SampleJob:
    """Map a JSON asample body (tinker_api.md 2.3) onto a SampleJob. The caller fills `adapter_key`.

    Without `sampling_params.max_tokens` the server generates up to the remaining context, capped at
    DEFAULT_MAX_TOKENS. A prompt plus max_tokens beyond the model's context is refused, not silently cut."""
    if not isinstance(req, dict):
        raise WireError("body", "must be a JSON object")
    prompt = model_input_tokens(req.get("prompt"), "prompt", vocab_size=vocab_size)
    if not prompt:
        raise WireError("prompt", "has no tokens")
    room = max_context - len(prompt)
    if room < 1:
        raise WireError("prompt", f"has {len(prompt)} tokens; the model's context is {max_context}, "
                                  "leaving no room to generate")
    sp = req.get("sampling_params") or {}
    if not isinstance(sp, dict):
        raise WireError("sampling_params", "must be an object")
    max_tokens = _int(sp, "max_tokens", "sampling_params.max_tokens", None, 1)
    if max_tokens is None:
        max_tokens = min(room, DEFAULT_MAX_TOKENS)
    elif max_tokens > room:
        raise WireError("sampling_params.max_tokens",
                        f"{max_tokens} plus the {len(prompt)} prompt tokens exceeds the model's context of "
                        f"{max_context}; use at most {room}")
    job = SampleJob(
        prompt=prompt,
        num_samples=_int(req, "num_samples", "num_samples", 1, 1, MAX_NUM_SAMPLES),
        max_tokens=max_tokens,
        temperature=_float(sp, "temperature", "sampling_params.temperature", 1.0),
        top_p=_float(sp, "top_p", "sampling_params.top_p", 1.0),
        top_k=_int(sp, "top_k", "sampling_params.top_k", -1, -1),
        seed=_int(sp, "seed", "sampling_params.seed", None, 0, 2**63 - 1),
        prompt_logprobs=_bool(req, "prompt_logprobs", "prompt_logprobs"),
        topk_prompt_logprobs=_int(req, "topk_prompt_logprobs", "topk_prompt_logprobs", 0, 0, MAX_TOPK_LOGPROBS),
        topk_sample_logprobs=_int(req, "topk_sample_logprobs", "topk_sample_logprobs", 0, 0, MAX_TOPK_LOGPROBS),
    )
    if not 0 < job.top_p <= 1:
        raise WireError("sampling_params.top_p", f"must be in (0, 1] (got {job.top_p})")
    if job.top_k == 0:  # vLLM's convention: 0 also means no limit
        job.top_k = -1
    _apply_stop(job, sp.get("stop"), vocab_size)

    last_n = _int(req, "prompt_logprobs_last_n", "prompt_logprobs_last_n", None, 1, max(1, len(prompt) - 1))
    if last_n is not None:
        if not (job.prompt_logprobs or job.topk_prompt_logprobs):
            raise WireError("prompt_logprobs_last_n", "requires prompt_logprobs or topk_prompt_logprobs")
        if len(prompt) < 2:
            raise WireError("prompt_logprobs_last_n", "needs a prompt of at least 2 tokens")
        job.prompt_logprobs_last_n = last_n

    if req.get("target_prompt_logprobs") is not None:
        raise WireError("target_prompt_logprobs", "is not supported by this server; score the tokens with "
                                                  "prompt_logprobs / topk_prompt_logprobs instead")
    if _int(req, "prompt_alt_tokens_k", "prompt_alt_tokens_k", 0, 0):
        raise WireError("prompt_alt_tokens_k", "is not supported by this server; send 0")
    # record_stability_info is accepted and ignored (tinker_api.md 8.2); unknown fields are ignored (8.17).
    return job


def _apply_stop(job: SampleJob, stop: Any, vocab_size: int) -> None:
    field = "sampling_params.stop"
    if stop is None:
        return
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise WireError(field, "must be a string, a list of strings or a list of token ids")
    if not stop:  # [] means no stopping at all, not even at EOS
        job.stop_at_eos = False
        return
    if all(isinstance(s, str) for s in stop):
        if any(s == "" for s in stop):
            raise WireError(field, "contains an empty stop string")
        job.stop_strings = list(stop)
    elif all(_is_int(s) for s in stop):
        _check_token_range(np.asarray(stop, dtype=np.int64), field, vocab_size)
        job.stop_token_ids = [int(s) for s in stop]
    else:
        raise WireError(field, "must be all strings or all token ids, not a mix")
