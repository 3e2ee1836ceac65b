"""A LLaDA checkpoint served by `tinkerbell serve`, through the official openai client: per-request diffusion
parameters reach the engine, an unknown algorithm is a 400 naming the field, the routes list the algorithms, and
`stream: true` sends each block's text as soon as the block is final."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.conftest import KEY_ALICE, ServerProcess


@pytest.fixture(scope="module")
def llada_server(tiny_llada_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("llada")
    srv = ServerProcess(tiny_llada_dir, root / "data", root / "server.log",
                        ["--api-key", KEY_ALICE, "--algorithm", "prefix_cache", "--batch-size", "4"]).start()
    yield srv
    srv.stop()


def test_completions_with_diffusion_parameters(llada_server):
    client = openai.OpenAI(base_url=llada_server.url + "/v1", api_key=KEY_ALICE)
    model = client.models.list().data[0].id
    extra = {"generation_algorithm": "basic", "steps": 8, "block_length": 4}
    a = client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0, extra_body=extra)
    b = client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0, extra_body=extra)
    assert a.choices[0].text == b.choices[0].text  # greedy diffusion is deterministic
    assert 1 <= a.usage.completion_tokens <= 8
    with pytest.raises(openai.BadRequestError, match="generation_algorithm"):
        client.completions.create(model=model, prompt="Hello", max_tokens=8,
                                  extra_body={"generation_algorithm": "no_such_algorithm"})


def test_algorithm_routes_are_served(llada_server):
    listing = httpx.get(llada_server.url + "/generation/algorithms", headers={"X-API-Key": KEY_ALICE}).json()
    assert listing["default"] == "prefix_cache"
    stats = httpx.get(llada_server.url + "/batch/stats", headers={"X-API-Key": KEY_ALICE}).json()
    assert stats["max_batch_size"] == 4


# --------------------------------------------------------------------------------------------- streaming
# `stream: true` sends each block's text once the block is final. The non-streamed answer's `text_offset`s say
# where each block's text starts, so the test knows which chunks per-block streaming must produce (a stream built
# from the finished result would send one chunk per token instead).

BLOCKS = {"steps": 16, "block_length": 4, "ignore_eos": True}


def _client(server) -> tuple[openai.OpenAI, str]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY_ALICE)
    return client, client.models.list().data[0].id


def _block_texts(choice, block: int) -> list[str]:
    """The text each block of `block` tokens adds, from a non-streamed choice's logprobs offsets."""
    offsets, text = choice.logprobs.text_offset, choice.text
    cuts = [offsets[i] for i in range(0, len(offsets), block)] + [len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def test_stream_chunks_are_whole_blocks(llada_server):
    client, model = _client(llada_server)
    whole = client.completions.create(model=model, prompt="Hello", max_tokens=16, temperature=0, logprobs=0,
                                      extra_body=BLOCKS)
    blocks = _block_texts(whole.choices[0], 4)
    assert all(blocks), blocks  # this prompt's four blocks all add text
    chunks, finish, usage = [], None, None
    for ch in client.completions.create(model=model, prompt="Hello", max_tokens=16, temperature=0, stream=True,
                                        extra_body=BLOCKS):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            if c.text:
                chunks.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(chunks) == whole.choices[0].text and finish == "length"
    # Each chunk is one or more whole blocks (blocks finished while the event loop was busy go out together),
    # never a token's piece: the stream is fed by finished blocks.
    ends = {len("".join(blocks[:i + 1])) for i in range(len(blocks))}
    assert all(len("".join(chunks[:i + 1])) in ends for i in range(len(chunks))), (chunks, blocks)
    assert usage.completion_tokens == whole.usage.completion_tokens == 16


def test_stream_first_block_arrives_long_before_the_last(llada_server):
    client, model = _client(llada_server)
    start = time.perf_counter()
    arrivals = []
    for ch in client.completions.create(model=model, prompt="Hello", max_tokens=256, temperature=0, stream=True,
                                        extra_body={"steps": 128, "block_length": 4, "ignore_eos": True}):
        if ch.choices and ch.choices[0].text:
            arrivals.append(time.perf_counter() - start)
    # 64 blocks: the first is final after 1/64 of the work; a stream sent after the fact has them all at once.
    assert len(arrivals) >= 16, len(arrivals)
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])


def test_stream_chat_keeps_each_choice_apart(llada_server):
    client, model = _client(llada_server)
    kw = dict(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=16, n=2, temperature=1.0,
              seed=7, extra_body=BLOCKS)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.content != whole.choices[1].message.content
    parts: dict[int, list[str]] = {0: [], 1: []}
    finish: dict[int, str] = {}
    for ch in client.chat.completions.create(stream=True, **kw):
        for c in ch.choices:
            if c.delta.content:
                parts[c.index].append(c.delta.content)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    for c in whole.choices:
        assert "".join(parts[c.index]) == c.message.content
        assert finish[c.index] == c.finish_reason


def test_stream_honours_stop_strings(llada_server):
    client, model = _client(llada_server)
    text = client.completions.create(model=model, prompt="Hello", max_tokens=16, temperature=0,
                                     extra_body=BLOCKS).choices[0].text
    # A stop string first seen in the second half of the text (so earlier blocks stream before it).
    at = next(k for k in range(len(text) // 2, len(text) - 3)
              if "\ufffd" not in text[k:k + 3] and text.find(text[k:k + 3]) == k)
    stop = text[at:at + 3]
    whole = client.completions.create(model=model, prompt="Hello", max_tokens=16, temperature=0, stop=[stop],
                                      extra_body=BLOCKS)
    chunks, finish = [], None
    for ch in client.completions.create(model=model, prompt="Hello", max_tokens=16, temperature=0, stop=[stop],
                                        stream=True, extra_body=BLOCKS):
        for c in ch.choices:
            chunks.append(c.text)
            finish = c.finish_reason or finish
    assert whole.choices[0].text == text[:at] and whole.choices[0].finish_reason == "stop"
    assert "".join(chunks) == text[:at] and finish == "stop"
