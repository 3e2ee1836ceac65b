"""The real `tinkerbell serve` process on the tiny model (CPU): SIGKILL mid-training and mid-sampling then a
restart on the same --data-dir, and a 1,000-request concurrent load against --max-queued-requests."""

from __future__ import annotations

import asyncio
import signal

import httpx
import psutil
import pytest

from tests.api.helpers import fb_body
from tests.e2e.conftest import KEY_ALICE, ServerProcess

H = {"X-API-Key": KEY_ALICE}


def _setup(url: str, model: str) -> tuple[str, str, str]:
    sid = httpx.post(url + "/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"},
                     headers=H
                     ).json()["session_id"]
    r = httpx.post(url + "/api/v1/create_model", headers=H, json={
        "session_id": sid, "model_seq_id": 0, "base_model": model, "lora_config": {"rank": 4}}).json()
    sampler = httpx.post(url + "/api/v1/create_sampling_session", headers=H, json={
        "session_id": sid, "sampling_session_seq_id": 0, "base_model": model}).json()["sampling_session_id"]
    return sid, r["model_id"], sampler


def _result(url: str, rid: str) -> httpx.Response:
    for _ in range(20):
        r = httpx.post(url + "/api/v1/retrieve_future", json={"request_id": rid}, headers=H, timeout=60)
        if r.status_code != 408:
            return r
    raise AssertionError(f"{rid} never finished")


def _sample_body(sampler: str, seq: int, max_tokens: int) -> dict:
    return {"sampling_session_id": sampler, "seq_id": seq, "num_samples": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 17, 33, seq % 50 + 1]}]},
            "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "stop": []}}


def test_sigkill_mid_training_and_sampling_loses_nothing_that_returned(tiny_llama_dir, tmp_path):
    srv = ServerProcess(tiny_llama_dir, tmp_path / "data", tmp_path / "server.log", ["--api-key", KEY_ALICE]).start()
    try:
        url, model = srv.url, str(tiny_llama_dir)
        sid, m, sampler = _setup(url, model)
        assert _result(url, httpx.post(url + "/api/v1/save_weights", headers=H, json={
            "model_id": m, "seq_id": 1, "path": "saved"}).json()["request_id"]).status_code == 200
        done = httpx.post(url + "/api/v1/asample", headers=H, json=_sample_body(sampler, 0, 3)).json()["request_id"]
        done_body = _result(url, done).content
        # In flight at the kill: a long sample and a pile of training steps.
        inflight = [httpx.post(url + "/api/v1/asample", headers=H, json=_sample_body(sampler, 1, 120)
                               ).json()["request_id"]]
        for seq in range(2, 40):
            r = httpx.post(url + "/api/v1/forward_backward", content=fb_body(m, seq, n=64), headers={
                **H, "Content-Type": "application/x-protobuf"})
            inflight.append(r.json()["request_id"])
    finally:
        srv.stop(signal.SIGKILL)
    srv.start()
    try:
        ckpts = httpx.get(f"{url}/api/v1/training_runs/{m}/checkpoints", headers=H).json()["checkpoints"]
        assert [c["checkpoint_id"] for c in ckpts] == ["weights/saved"]
        r = httpx.post(url + "/api/v1/load_weights", headers=H, json={
            "session_id": sid, "model_seq_id": 1, "path": ckpts[0]["tinker_path"], "optimizer": True})
        assert _result(url, r.json()["request_id"]).json()["model_id"] == f"{sid}:train:1"
        assert _result(url, done).content == done_body
        outcomes = [_result(url, rid) for rid in inflight]
        unfinished = [o.json() for o in outcomes if o.headers["content-type"].startswith("application/json")]
        assert unfinished, "the kill came too late to catch anything in flight"
        for o in unfinished:
            assert o["category"] == "server" and "restarted" in o["error"]
        assert not list((tmp_path / "data" / "checkpoints" / ".staging").iterdir())
    finally:
        srv.stop()


async def _wave(url: str, sampler: str, model: str, start: int, n: int) -> tuple[int, int]:
    """n concurrent requests, alternately Tinker asample and OpenAI /v1/completions; returns (accepted and
    finished, refused with 429)."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, headers=H, limits=limits, timeout=120) as c:
        async def openai_one(i: int) -> str:
            r = await c.post("/v1/completions", headers={"Authorization": f"Bearer {KEY_ALICE}"},
                             json={"model": model, "prompt": [5, 6, 7], "max_tokens": 2, "seed": start + i})
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["message"]
                return "refused"
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
            return "ok"

        async def one(i: int) -> str:
            if i % 2:  # half the load through the OpenAI face, half through the Tinker face
                return await openai_one(i)
            r = await c.post("/api/v1/asample", json=_sample_body(sampler, start + i, 2))
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and r.json()["detail"]
                return "refused"
            assert r.status_code == 200, r.text
            rid = r.json()["request_id"]
            while True:
                a = await c.post("/api/v1/retrieve_future", json={"request_id": rid})
                if a.status_code != 408:
                    break
            assert a.status_code == 200 and a.headers["content-type"] == "application/x-protobuf", a.text
            return "ok"

        out = await asyncio.gather(*(one(i) for i in range(n)))
    return out.count("ok"), out.count("refused")


@pytest.mark.timeout(300)
def test_1000_concurrent_requests_finish_or_are_refused_and_memory_stays_bounded(tiny_llama_dir, tmp_path):
    srv = ServerProcess(tiny_llama_dir, tmp_path / "data", tmp_path / "server.log",
                        ["--api-key", KEY_ALICE, "--max-queued-requests", "150"]).start()
    try:
        _, _, sampler = _setup(srv.url, str(tiny_llama_dir))
        proc = psutil.Process(srv.proc.pid)
        rss = []
        for wave in range(3):
            ok, refused = asyncio.run(_wave(srv.url, sampler, str(tiny_llama_dir), wave * 1000, 1000))
            assert ok + refused == 1000 and ok >= 150, (ok, refused)  # nothing dropped silently
            rss.append(proc.memory_info().rss)
        stats = httpx.get(srv.url + "/stats").json()
        assert stats["sampling"]["in_flight_requests"] == 0 and stats["futures"]["pending"] == 0
        assert stats["engine"]["sampler"]["kv_blocks_used"] <= stats["engine"]["sampler"]["kv_blocks_cached"] + 1
        # Waves 2 and 3 reuse what wave 1 grew (allocator pools, caches): no steady growth.
        assert rss[2] - rss[1] < 64 << 20, [r >> 20 for r in rss]
    finally:
        srv.stop()
