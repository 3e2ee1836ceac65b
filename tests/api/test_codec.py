"""The codec against the SDK's own encoder and decoders: requests built by `tinker.proto.request_conv`, outputs
read back by `tinker.proto.response_conv`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zstandard
from tinker import types
from tinker.proto import request_conv, response_conv
from tinker.proto import tinker_public_pb2 as pb

from tinkerbell.api.codec import (
    DEFAULT_MAX_TOKENS,
    WireError,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
    model_input_tokens,
    peek_forward_backward_ids,
    sample_job_from_request,
)
from tinkerbell.engine.types import ForwardBackwardResult, SampledSequence, SampleResult


def sdk_body(data, loss_fn="cross_entropy", config=None, seq_id=3, model_id="s:train:0") -> bytes:
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id=model_id,
        seq_id=seq_id,
    )
    return request_conv.forward_backward_request_to_proto(req).SerializeToString()


def sft_datum(tokens: list[int], weights=None) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                        "weights": np.ones(n, dtype=np.float32) if weights is None else weights},
    )


def expect(field: str, fn, *args, **kw) -> WireError:
    with pytest.raises(WireError) as ei:
        fn(*args, **kw)
    assert ei.value.field == field, str(ei.value)
    assert str(ei.value).startswith(field), str(ei.value)
    return ei.value


# ------------------------------------------------------------------------------------------ decode requests


def test_decode_numpy_and_chunks_in_order():
    d0 = types.Datum(
        model_input=types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[5, 6]),
                                             types.EncodedTextChunk(tokens=[7])]),
        loss_fn_inputs={"target_tokens": np.array([6, 7, 8]), "weights": np.array([0.0, 1.0, 0.5]),
                        "my_extra": np.array([1, 2], dtype=np.int64)},
    )
    d1 = sft_datum([1, 2, 3, 4, 5])
    call = decode_forward_backward(sdk_body([d0, d1], config={"beta": 0.1, "mode": "x"}), None)
    assert (call.model_id, call.seq_id, call.loss_fn, call.forward_only) == ("s:train:0", 3, "cross_entropy", False)
    assert call.loss_config == {"beta": pytest.approx(0.1), "mode": "x"}
    t0 = call.data[0]
    assert t0.tokens.dtype == np.int64 and t0.tokens.tolist() == [5, 6, 7]
    assert t0.inputs["target_tokens"].dtype == np.int64 and t0.inputs["target_tokens"].tolist() == [6, 7, 8]
    assert t0.inputs["weights"].dtype == np.float32 and t0.inputs["weights"].tolist() == [0.0, 1.0, 0.5]
    assert t0.inputs["my_extra"].tolist() == [1, 2]  # unknown keys pass through, unchecked
    assert call.data[1].tokens.tolist() == [1, 2, 3, 4]


def test_decode_torch_2d_targets_arrive_as_csr_and_densify():
    n, k = 6, 4
    targets = torch.zeros(n, k, dtype=torch.int64)
    weights = torch.zeros(n, k, dtype=torch.float32)
    targets[1, 2], weights[1, 2] = 9, 0.25
    targets[4, 0], weights[4, 0] = 3, 1.5
    targets[4, 3], weights[4, 3] = 11, -2.0
    datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(n))),
                        loss_fn_inputs={"target_tokens": targets, "weights": weights,
                                        "advantages": torch.arange(n, dtype=torch.float32)})
    body = sdk_body([datum], loss_fn="cross_entropy")
    msg = pb.ForwardBackwardRequest.FromString(body)
    assert msg.data[0].loss_fn_inputs["target_tokens"].WhichOneof("encoding") == "sparse_csr"
    assert msg.data[0].loss_fn_inputs["weights"].WhichOneof("encoding") == "sparse_csr"
    got = decode_forward_backward(body, "identity").data[0].inputs
    np.testing.assert_array_equal(got["target_tokens"], targets.numpy())
    np.testing.assert_array_equal(got["weights"], weights.numpy())
    np.testing.assert_array_equal(got["advantages"], np.arange(n, dtype=np.float32))


def test_decode_zstd_body_and_peek():
    body = sdk_body([sft_datum([1, 2, 3])], loss_fn="ppo", config={"clip_low_threshold": 0.8}, seq_id=7)
    z = zstandard.ZstdCompressor().compress(body)
    call = decode_forward_backward(z, "zstd")
    assert call.loss_fn == "ppo" and call.seq_id == 7 and call.loss_config == {"clip_low_threshold": 0.8}
    assert peek_forward_backward_ids(z, "zstd") == ("s:train:0", 7)
    assert peek_forward_backward_ids(body, None) == ("s:train:0", 7)


def test_v1_loss_config_when_no_v2():
    msg = pb.ForwardBackwardRequest.FromString(sdk_body([sft_datum([1, 2])]))
    msg.loss_fn_config["beta"] = 0.05
    assert decode_forward_backward(msg.SerializeToString(), None).loss_config == {"beta": 0.05}


def test_vocab_check():
    body = sdk_body([sft_datum([1, 2, 300])])
    assert decode_forward_backward(body, None).data[0].tokens.tolist() == [1, 2]
    expect("data[0].loss_fn_inputs.target_tokens", decode_forward_backward, body, None, vocab_size=100)
    expect("data[0].model_input", decode_forward_backward, sdk_body([sft_datum([200, 2])]), None, vocab_size=100)


# ------------------------------------------------------------------------------------------ request errors


def _mutated(mutate) -> bytes:
    msg = pb.ForwardBackwardRequest.FromString(sdk_body([sft_datum([1, 2, 3]), sft_datum([4, 5, 6, 7])]))
    mutate(msg)
    return msg.SerializeToString()


def test_errors_name_fields_and_carry_ids():
    def bad_weights_bytes(m):
        m.data[1].loss_fn_inputs["weights"].dense = b"\0" * 10

    e = expect("data[1].loss_fn_inputs.weights.dense", decode_forward_backward, _mutated(bad_weights_bytes), None)
    assert (e.model_id, e.seq_id) == ("s:train:0", 3)

    def image(m):
        m.data[1].model_input.add().image.data = b"\x89PNG"

    e = expect("data[1].model_input[1]", decode_forward_backward, _mutated(image), None)
    assert "text-only" in str(e)

    def dmel(m):
        m.data[0].model_input[0].dmel.dmel = b"xx"

    expect("data[0].model_input[0]", decode_forward_backward, _mutated(dmel), None)

    e = expect("seq_id", decode_forward_backward, _mutated(lambda m: setattr(m, "seq_id", 0)), None)
    assert e.model_id == "s:train:0"
    expect("model_id", decode_forward_backward, _mutated(lambda m: setattr(m, "model_id", "")), None)
    expect("loss_fn", decode_forward_backward, _mutated(lambda m: setattr(m, "loss_fn", "")), None)
    expect("data", decode_forward_backward, _mutated(lambda m: m.ClearField("data")), None)

    def odd_tokens(m):
        m.data[0].model_input[0].encoded_text.tokens = b"\1\0\0"

    expect("data[0].model_input[0].tokens", decode_forward_backward, _mutated(odd_tokens), None)

    def shape_mismatch(m):
        m.data[0].loss_fn_inputs["weights"].shape[:] = [3]

    expect("data[0].loss_fn_inputs.weights.dense", decode_forward_backward, _mutated(shape_mismatch), None)

    def misaligned(m):
        t = m.data[0].loss_fn_inputs["weights"]
        t.dense = np.ones(5, np.float32).tobytes()
        t.shape[:] = [5]

    expect("data[0].loss_fn_inputs.weights", decode_forward_backward, _mutated(misaligned), None)

    def nan(m):
        m.data[0].loss_fn_inputs["weights"].dense = np.array([1, np.nan], np.float32).tobytes()

    expect("data[0].loss_fn_inputs.weights", decode_forward_backward, _mutated(nan), None)

    def float_targets(m):
        t = m.data[0].loss_fn_inputs["target_tokens"]
        t.dtype, t.dense = pb.DTYPE_FLOAT32, np.array([2, 3], np.float32).tobytes()

    expect("data[0].loss_fn_inputs.target_tokens", decode_forward_backward, _mutated(float_targets), None)

    def no_dtype(m):
        m.data[0].loss_fn_inputs["weights"].dtype = pb.DTYPE_UNSPECIFIED

    expect("data[0].loss_fn_inputs.weights.dtype", decode_forward_backward, _mutated(no_dtype), None)

    def inf_config(m):
        m.loss_fn_config_v2["beta"].number = math.inf

    expect("loss_fn_config.beta", decode_forward_backward, _mutated(inf_config), None)


def _csr_body(values, crow, col, shape) -> bytes:
    def set_csr(m):
        t = m.data[0].loss_fn_inputs["weights"]
        t.ClearField("dense")
        t.shape[:] = shape
        t.sparse_csr.values = np.asarray(values, np.float32).tobytes()
        t.sparse_csr.crow_indices = np.asarray(crow, np.int64).tobytes()
        t.sparse_csr.col_indices = np.asarray(col, np.int64).tobytes()

    return _mutated(set_csr)


def test_csr_validation():
    ok = decode_forward_backward(_csr_body([1.0, 2.0], [0, 1, 2], [0, 2], [2, 3]), None)
    np.testing.assert_array_equal(ok.data[0].inputs["weights"], [[1, 0, 0], [0, 0, 2]])
    f = "data[0].loss_fn_inputs.weights.sparse_csr"
    expect(f"{f}.crow_indices", decode_forward_backward, _csr_body([1.0], [0, 1], [0], [2, 3]), None)
    expect(f"{f}.crow_indices", decode_forward_backward, _csr_body([1.0], [0, 1, 0], [0], [2, 3]), None)
    expect(f, decode_forward_backward, _csr_body([1.0], [0, 1, 2], [0, 1], [2, 3]), None)
    expect(f"{f}.col_indices", decode_forward_backward, _csr_body([1.0, 2.0], [0, 1, 2], [0, 3], [2, 3]), None)
    expect(f"{f}.col_indices", decode_forward_backward, _csr_body([1.0, 2.0], [0, 2, 2], [1, 1], [2, 3]), None)
    expect("data[0].loss_fn_inputs.weights.shape", decode_forward_backward, _csr_body([], [0, 0], [], [2]), None)
    expect("data[0].loss_fn_inputs.weights.shape", decode_forward_backward,
           _csr_body([], [0] * 3, [], [2, 1 << 40]), None)


def test_body_errors():
    expect("body", decode_forward_backward, b"\xff\xff\xff", None)
    expect("body", decode_forward_backward, b"not zstd", "zstd")
    expect("Content-Encoding", decode_forward_backward, b"", "br")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (1 << 20))
    from tinkerbell.api import codec

    with pytest.raises(WireError, match="decompresses to more than"):
        codec.decompress_body(bomb, "zstd", limit=1 << 16)
    # ids stay readable even when the data is not
    good = sdk_body([sft_datum([1, 2])], seq_id=9)
    assert peek_forward_backward_ids(good + b"\x1a\xff\xff", None) == ("s:train:0", 9)
    with pytest.raises(WireError) as ei:
        decode_forward_backward(good + b"\x1a\xff\xff", None)
    assert (ei.value.field, ei.value.model_id, ei.value.seq_id) == ("body", "s:train:0", 9)


# ------------------------------------------------------------------------------------------ encode outputs


def test_forward_backward_output_roundtrip_through_sdk():
    outs = [
        {"logprobs": np.array([-1.0, -2.0], np.float32), "elementwise_loss": np.array([1.0, 2.0], np.float32)},
        {"logprobs": np.array([-0.5], np.float32), "elementwise_loss": np.array([0.5], np.float32)},
        {"logprobs": -np.ones((3, 2), np.float32), "elementwise_loss": np.ones((3, 2), np.float32)},
        {"logprobs": np.array([-3.0, -4.0], np.float32), "elementwise_loss": np.array([3.0, 4.0], np.float32)},
    ]
    raw = encode_forward_backward_output(ForwardBackwardResult(outputs=outs, metrics={"loss:sum": 7.5}))
    msg = pb.ForwardBackwardOutput.FromString(raw)
    assert [r.num_datums for r in msg.loss_fn_outputs] == [2, 1, 1]
    assert np.frombuffer(msg.loss_fn_outputs[0].fields["logprobs"].offsets, np.int64).tolist() == [0, 8, 12]
    got = response_conv.deserialize_forward_backward_output(raw)
    assert got.loss_fn_output_type == "ArrayRecord" and got.metrics == {"loss:sum": 7.5}
    assert len(got.loss_fn_outputs) == 4
    for want, have in zip(outs, got.loss_fn_outputs):
        for k in want:
            np.testing.assert_array_equal(have[k].to_numpy(), want[k])
            assert have[k].dtype == "float32"
    with pytest.raises(ValueError):
        encode_forward_backward_output(ForwardBackwardResult(outputs=outs, metrics={"loss": 1.0}))


def test_sample_response_roundtrip_through_sdk():
    res = SampleResult(
        sequences=[
            SampledSequence(tokens=[4, 5, 2], logprobs=[-0.1, -0.2, -0.3], stop_reason="stop",
                            topk_ids=np.array([[4, 1], [5, 2], [2, -1]]),
                            topk_logprobs=np.array([[-0.1, -3], [-0.2, -4], [-0.3, -np.inf]], np.float32)),
            SampledSequence(tokens=[7], logprobs=[-1.5], stop_reason="length",
                            topk_ids=np.array([[7, 3]]), topk_logprobs=np.array([[-1.5, -2.0]], np.float32)),
        ],
        prompt_logprobs=[math.nan, -2.0, -3.0],
        topk_prompt_ids=np.array([[-1, -1], [8, 9], [1, 0]]),
        topk_prompt_logprobs=np.array([[-np.inf, -np.inf], [-1.0, -2.0], [-3.0, -4.0]], np.float32),
        prompt_cache_hit_tokens=2,
    )
    got = response_conv.deserialize_sample_response(encode_sample_response(res))
    assert [s.stop_reason for s in got.sequences] == ["stop", "length"]
    assert got.sequences[0].tokens == [4, 5, 2]
    assert got.sequences[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert got.sequences[0].topk_logprobs[2] == [(2, pytest.approx(-0.3))]
    assert got.sequences[1].topk_logprobs == [[(7, -1.5), (3, -2.0)]]
    assert got.prompt_logprobs == [None, -2.0, -3.0]
    assert got.topk_prompt_logprobs == [None, [(8, -1.0), (9, -2.0)], [(1, -3.0), (0, -4.0)]]
    assert got.prompt_cache_hit_tokens == 2

    plain = SampleResult(sequences=[SampledSequence(tokens=[1], logprobs=[-0.5], stop_reason="length")])
    got = response_conv.deserialize_sample_response(encode_sample_response(plain))
    assert got.prompt_logprobs is None and got.topk_prompt_logprobs is None
    assert got.sequences[0].logprobs == [-0.5] and got.sequences[0].topk_logprobs is None


# ------------------------------------------------------------------------------------------ sampling JSON


def sample_body(**kw) -> dict:
    """A JSON asample body exactly as the SDK serialises it."""
    sp = kw.pop("sampling_params", types.SamplingParams(max_tokens=5, stop=["\n"], temperature=0.7, seed=3))
    req = types.SampleRequest(num_samples=kw.pop("num_samples", 2),
                              prompt=kw.pop("prompt", types.ModelInput.from_ints([1, 2, 3])),
                              sampling_params=sp, sampling_session_id="s:sample:0", seq_id=0, **kw)
    return req.model_dump(mode="json")


def test_sample_job_from_sdk_request():
    job = sample_job_from_request(sample_body(topk_sample_logprobs=3, record_stability_info=True), 100, 64)
    assert job.prompt == [1, 2, 3] and job.num_samples == 2 and job.max_tokens == 5
    assert job.temperature == pytest.approx(0.7) and job.seed == 3 and job.top_k == -1 and job.top_p == 1.0
    assert job.stop_strings == ["\n"] and job.stop_token_ids == [] and job.stop_at_eos
    assert job.topk_sample_logprobs == 3 and not job.prompt_logprobs and job.adapter_key is None

    job = sample_job_from_request(sample_body(sampling_params=types.SamplingParams(stop=[7, 9]),
                                              prompt_logprobs=True, prompt_logprobs_last_n=2,
                                              topk_prompt_logprobs=4), 100, 64)
    assert job.stop_token_ids == [7, 9] and job.stop_at_eos and job.max_tokens == 61
    assert job.prompt_logprobs and job.prompt_logprobs_last_n == 2 and job.topk_prompt_logprobs == 4

    job = sample_job_from_request(sample_body(sampling_params=types.SamplingParams(stop=[])), 100, 4096)
    assert not job.stop_at_eos and job.max_tokens == DEFAULT_MAX_TOKENS
    job = sample_job_from_request(sample_body(sampling_params=types.SamplingParams(stop="END", top_k=0)), 100, 64)
    assert job.stop_strings == ["END"] and job.top_k == -1
    # unknown fields are ignored; model_input_tokens also takes a parsed ModelInput
    body = sample_body()
    body["some_future_field"] = {"x": 1}
    assert sample_job_from_request(body, 100, 64).num_samples == 2
    assert model_input_tokens(types.ModelInput.from_ints([4, 5])) == [4, 5]


@pytest.mark.parametrize("patch,field", [
    ({"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]},
                            {"type": "image", "data": "aGk=", "format": "png"}]}}, "prompt.chunks[1].type"),
    ({"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 500]}]}}, "prompt.chunks[0].tokens"),
    ({"prompt": {"chunks": []}}, "prompt"),
    ({"prompt": None}, "prompt.chunks"),
    ({"prompt": {"chunks": [{"type": "encoded_text", "tokens": list(range(64))}]}}, "prompt"),
    ({"num_samples": 0}, "num_samples"),
    ({"num_samples": True}, "num_samples"),
    ({"sampling_params": {"max_tokens": 62}}, "sampling_params.max_tokens"),
    ({"sampling_params": {"max_tokens": 0}}, "sampling_params.max_tokens"),
    ({"sampling_params": {"temperature": float("nan")}}, "sampling_params.temperature"),
    ({"sampling_params": {"temperature": -1.0}}, "sampling_params.temperature"),
    ({"sampling_params": {"top_p": float("inf")}}, "sampling_params.top_p"),
    ({"sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
    ({"sampling_params": {"top_k": -2}}, "sampling_params.top_k"),
    ({"sampling_params": {"seed": -1}}, "sampling_params.seed"),
    ({"sampling_params": {"stop": ["a", 3]}}, "sampling_params.stop"),
    ({"sampling_params": {"stop": [1000]}}, "sampling_params.stop"),
    ({"sampling_params": {"stop": [""]}}, "sampling_params.stop"),
    ({"topk_prompt_logprobs": -1}, "topk_prompt_logprobs"),
    ({"topk_sample_logprobs": 10_000}, "topk_sample_logprobs"),
    ({"prompt_logprobs_last_n": 1}, "prompt_logprobs_last_n"),
    ({"prompt_logprobs": True, "prompt_logprobs_last_n": 3}, "prompt_logprobs_last_n"),
    ({"prompt_logprobs": "yes"}, "prompt_logprobs"),
    ({"target_prompt_logprobs": {"data": [1, 2], "dtype": "int64", "shape": [2, 1]}}, "target_prompt_logprobs"),
    ({"prompt_alt_tokens_k": 2}, "prompt_alt_tokens_k"),
])
def test_sample_request_errors(patch, field):
    body = sample_body()
    for k, v in patch.items():
        if k == "sampling_params":
            body[k] = {**body[k], **v}
        else:
            body[k] = v
    e = expect(field, sample_job_from_request, body, 100, 64)
    if field in ("target_prompt_logprobs", "prompt_alt_tokens_k"):
        assert "not supported by this server" in str(e)
    if field == "prompt.chunks[1].type":
        assert "text-only" in str(e)
