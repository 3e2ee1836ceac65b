"""A LLaDA checkpoint served by `tinkerbell serve`, through the official openai client: per-request diffusion
parameters reach the engine, an unknown algorithm is a 400 naming the field, the routes list the algorithms."""

from __future__ import annotations

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
