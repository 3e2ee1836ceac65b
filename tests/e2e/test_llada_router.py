"""`tinkerbell serve --dp 2` of the tiny LLaDA checkpoint on CPU: two diffusion replicas behind the router,
driven with the official openai client. Requests spread over both replicas (/stats), greedy answers agree
whichever replica serves them, chat streams through the router block by block, /generation/algorithms answers
from a replica and /batch/stats sums the replicas' batching figures."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.e2e.conftest import KEY_ALICE
from tests.e2e.test_router import Cluster

DIFFUSION = {"steps": 8, "block_length": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def llada_cluster(tiny_llada_dir, tmp_path_factory):
    c = Cluster(tiny_llada_dir, tmp_path_factory.mktemp("llada-dp2"))
    try:
        yield c
    finally:
        c.stop()


def _client(cluster: Cluster) -> tuple[openai.OpenAI, str]:
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key=KEY_ALICE, max_retries=0)
    return client, client.models.list().data[0].id


def test_completions_spread_over_both_replicas(llada_cluster):
    client, model = _client(llada_cluster)
    before = [w["requests_served"] for w in llada_cluster.stats()["workers"]]
    texts: list[str] = []
    errors: list[str] = []

    def one() -> None:
        try:
            r = client.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0,
                                          extra_body=DIFFUSION)
            texts.append(r.choices[0].text)
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    after = [w["requests_served"] for w in llada_cluster.stats()["workers"]]
    assert all(a > b for a, b in zip(after, before)), (before, after)
    assert len(texts) == 12 and len(set(texts)) == 1  # same weights, greedy: the replica does not matter


def test_streamed_chat_through_the_router(llada_cluster):
    client, model = _client(llada_cluster)
    kw = dict(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=16, temperature=0,
              extra_body=DIFFUSION)
    whole = client.chat.completions.create(**kw)
    parts, finish, usage = [], None, None
    for ch in client.chat.completions.create(stream=True, **kw):
        usage = ch.usage or usage
        for c in ch.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens == 16


def test_algorithms_and_batch_stats_through_the_router(llada_cluster):
    headers = {"Authorization": f"Bearer {KEY_ALICE}"}
    listing = httpx.get(llada_cluster.url + "/generation/algorithms", headers=headers, timeout=10).json()
    assert listing["default"] == "basic" and {a["name"] for a in listing["algorithms"]} >= {"basic", "dual_cache"}
    merged = httpx.get(llada_cluster.url + "/batch/stats", headers=headers, timeout=10).json()
    each = [httpx.get(llada_cluster.replica_url(i) + "/batch/stats", headers=headers, timeout=10).json()
            for i in range(2)]
    assert merged["replicas_answering"] == 2 and [r["stats"] for r in merged["replicas"]] == each
    assert merged["batches_run"] == sum(s["batches_run"] for s in each) > 0
    assert sum(merged["batch_size_histogram"].values()) == merged["batches_run"]
    assert merged["max_batch_size"] == each[0]["max_batch_size"]
