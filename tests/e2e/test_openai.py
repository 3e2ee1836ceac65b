"""The official `openai` client against the real server: plain, chat and streamed completions, a checkpoint
trained through the tinker SDK used as `model` (by tinker:// path and by a registered name), 32 concurrent
requests, and greedy outputs equal to the Tinker face's greedy sample for the same prompt tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from tinker import types

from tests.e2e.conftest import KEY_ALICE, KEY_BOB, service_client, train_until_memorised
from tests.e2e.test_sdk_training import _completion_datum


def client(server, key: str = KEY_ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def base_model(server) -> str:
    return client(server).models.list().data[0].id


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_plain_chat_and_streamed_completions(llama_server):
    oa = client(llama_server)
    model = base_model(llama_server)
    out = oa.completions.create(model=model, prompt="Hello! My name", max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens >= 1

    chunks = list(oa.completions.create(model=model, prompt="Hello! My name", max_tokens=12, temperature=0,
                                        stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == out.usage.completion_tokens

    messages = [{"role": "user", "content": "What is your name?"}]
    chat = oa.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                      top_logprobs=2)
    msg = chat.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert len(chat.choices[0].logprobs.content) <= chat.usage.completion_tokens
    stream = oa.chat.completions.create(model=model, messages=messages, max_completion_tokens=12, temperature=0,
                                        stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == msg.content

    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=model, prompt="x", max_tokens=2, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.AuthenticationError):
        client(llama_server, "tml-unknown-key").models.list()


def test_greedy_equals_the_tinker_face_and_32_concurrent_requests(llama_server):
    sc = service_client(llama_server)
    model = base_model(llama_server)
    tok = sc.create_lora_training_client(base_model=model, rank=4).result().get_tokenizer()
    prompts = [tok.encode(f"Alice, Bob and Carol {i}", add_special_tokens=False) for i in range(4)]
    sampler = sc.create_sampling_client(base_model=model).result()
    params = types.SamplingParams(max_tokens=10, temperature=0.0)
    tinker_tokens = [sampler.sample(types.ModelInput.from_ints(p), 1, params).result().sequences[0].tokens
                     for p in prompts]

    oa = client(llama_server)

    def one(i: int):
        return oa.completions.create(model=model, prompt=prompts[i % 4], max_tokens=10, temperature=0)

    with ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(one, range(32)))
    for i, out in enumerate(outs):
        expected = tinker_tokens[i % 4]
        assert out.choices[0].text == decode(tok, expected), i
        assert out.usage.completion_tokens == len(expected)
    sc.close("success").result()


def test_trained_checkpoint_as_model_by_path_and_by_name(llama_server):
    sc = service_client(llama_server)
    model = base_model(llama_server)
    tc = sc.create_lora_training_client(base_model=model, rank=8, seed=0).result()
    tok = tc.get_tokenizer()
    datum, prompt_ids, answer_ids = _completion_datum(tok)
    train_until_memorised(tc, datum)
    path = tc.save_weights_for_sampler("openai-e2e").result().path
    answer = decode(tok, answer_ids)

    oa = client(llama_server)
    ids = [m.id for m in oa.models.list().data]
    assert path in ids
    by_path = oa.completions.create(model=path, prompt=prompt_ids, max_tokens=len(answer_ids), temperature=0)
    assert by_path.choices[0].text == answer

    # The same folder, registered under a name (vLLM's convention), by its place in the server's data dir.
    run, _, name = path[len("tinker://"):].split("/")
    folder = llama_server.data_dir / "checkpoints" / run / "sampler_weights" / name
    r = oa.post("/load_lora_adapter", cast_to=object, body={"lora_name": "tinkerbell-e2e", "lora_path": str(folder)})
    assert r["lora_name"] == "tinkerbell-e2e"
    assert "tinkerbell-e2e" in [m.id for m in oa.models.list().data]
    by_name = oa.completions.create(model="tinkerbell-e2e", prompt=prompt_ids, max_tokens=len(answer_ids),
                                    temperature=0)
    assert by_name.choices[0].text == answer
    streamed = oa.completions.create(model="tinkerbell-e2e", prompt=prompt_ids, max_tokens=len(answer_ids),
                                     temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == answer

    # Another tenant sees neither the name nor the private checkpoint.
    bob = client(llama_server, KEY_BOB)
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model="tinkerbell-e2e", prompt=prompt_ids, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model=path, prompt=prompt_ids, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        bob.post("/load_lora_adapter", cast_to=object, body={"lora_name": "steal", "lora_path": str(folder)})

    oa.post("/unload_lora_adapter", cast_to=object, body={"lora_name": "tinkerbell-e2e"})
    assert "tinkerbell-e2e" not in [m.id for m in oa.models.list().data]
    sc.close("success").result()


def test_streamed_text_arrives_while_the_completion_is_generated(llama_server):
    """Text streams token by token as the engine produces it (not the finished result chopped up afterwards),
    a stop string is never streamed, and the chunks still add up to the non-streamed text."""
    import time

    oa = client(llama_server)
    model = base_model(llama_server)
    kw = dict(model=model, prompt="One, two, three", max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
    full = oa.completions.create(**kw).choices[0].text
    t0 = time.perf_counter()
    arrivals, parts = [], []
    for c in oa.completions.create(stream=True, **kw):
        if c.choices and c.choices[0].text:
            arrivals.append(time.perf_counter() - t0)
            parts.append(c.choices[0].text)
    total = time.perf_counter() - t0
    assert "".join(parts) == full
    assert len(parts) > 10 and arrivals[0] < 0.5 * total, (arrivals[:3], total)

    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = oa.completions.create(stop=[stop], **kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in oa.completions.create(stream=True, stop=[stop], **kw) if c.choices)
    assert streamed == cut and stop not in streamed
