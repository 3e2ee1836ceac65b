"""The router app against fake replicas (real HTTP servers on loopback, fake_replicas.py): tagging, stickiness, failover, answers for work
lost with a replica, and /stats."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from tinkerbell.router import ids
from tinkerbell.router.app import RouterApp

from tests.router.fake_replicas import Answer, FakeReplicas, json_answer


class Fakes:
    """The replicas' answers: r0 and r1; `dead` ones are killed (FakeReplicas.kill), as a killed process is."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, dict[str, Any]]] = []
        self.n = 0
        self.servers = FakeReplicas(2, self)
        self._dead: set[int] = set()

    @property
    def dead(self) -> "_Dead":
        return _Dead(self)

    def __call__(self, idx: int, method: str, path: str, raw: bytes) -> Answer:
        body = json.loads(raw) if raw[:1] == b"{" else {}
        self.seen.append((idx, path, body))
        if path == "/stats":
            return json_answer(200, {"model": "base", "outstanding": 0, "live_runs": [], "resident_adapters": []})
        self.n += 1
        if path == "/api/v1/create_session":
            return json_answer(200, {"session_id": f"S{self.n}"})
        if path == "/api/v1/create_model":
            mid = f"{body['session_id']}:train:{body['model_seq_id']}"
            return json_answer(200, {"request_id": f"req-{idx}-{self.n}", "model_id": mid})
        if path == "/console/api/live":
            view = {"sequences": {"running": idx + 1}, "queues": {}, "counters": {"tokens_sampled": 10}}
            return json_answer(200, {"replicas": [{"name": "local", "view": view}]})
        if path == "/add_lora":  # the original client API: the response names the adapter's new run
            return json_answer(200, {"model_id": f"A{self.n}:train:0", "status": "ok"})
        if path in ("/api/v1/optim_step", "/api/v1/asample", "/fwdbwd"):
            return json_answer(200, {"request_id": f"req-{idx}-{self.n}"})
        if path == "/api/v1/retrieve_future":
            return json_answer(200, {"metrics": {}, "served_by": idx, "rid": body["request_id"]})
        if path == "/v1/completions":
            return 200, [("content-type", "text/event-stream")], [f"data: {i}\n\n".encode() for i in range(3)]
        return json_answer(404, {"detail": "no such route"})


class _Dead:
    """`fakes.dead.add(i)` kills replica i; `fakes.dead.clear()` starts the dead ones again."""

    def __init__(self, fakes: Fakes):
        self.f = fakes

    def add(self, idx: int) -> None:
        self.f._dead.add(idx)
        self.f.servers.kill(idx)

    async def clear(self) -> None:
        for idx in sorted(self.f._dead):
            await self.f.servers.start(idx)
        self.f._dead.clear()


def _run(test) -> None:
    async def main() -> None:
        fakes = Fakes()
        await fakes.servers.start()
        app = RouterApp(fakes.servers.urls, health_interval=60)
        await app.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
                await test(app, fakes, c)
        finally:
            await app.shutdown()
            fakes.servers.close()

    asyncio.run(main())


def test_runs_futures_and_samplers_stick_and_ids_are_tagged():
    async def test(app: RouterApp, fakes: Fakes, c: httpx.AsyncClient) -> None:
        s1 = (await c.post("/api/v1/create_session", json={})).json()["session_id"]
        s2 = (await c.post("/api/v1/create_session", json={})).json()["session_id"]
        assert {app.pool.sessions.get(s1), app.pool.sessions.get(s2)} == {0, 1}  # idle: sessions spread
        owner = app.pool.sessions.get(s1)
        h = (await c.post("/api/v1/create_model", json={"session_id": s1, "model_seq_id": 0})).json()
        t = ids.untag(h["request_id"])
        assert t is not None and t.replica == owner and t.kind == "t" and t.model_id == f"{s1}:train:0"
        assert app.pool.replicas[owner].outstanding == 1
        got = (await c.post("/api/v1/retrieve_future", json={"request_id": h["request_id"]})).json()
        assert got["served_by"] == owner and got["rid"] == t.request_id  # the replica sees its own id
        assert app.pool.replicas[owner].outstanding == 0
        for _ in range(3):
            r = await c.post("/api/v1/optim_step", json={"model_id": f"{s1}:train:0", "seq_id": 1})
            assert ids.untag(r.json()["request_id"]).replica == owner
            r = await c.post("/api/v1/asample", json={"sampling_session_id": f"{s1}:sample:0", "seq_id": 3})
            assert ids.untag(r.json()["request_id"]).replica == owner
        stats = (await c.get("/stats")).json()
        assert stats["total_workers"] == 2 and stats["healthy_workers"] == 2
        w = stats["workers"][owner]
        assert set(w) >= {"index", "url", "healthy", "requests_served", "errors", "outstanding", "adapters"}
        assert w["requests_served"] >= 8

    _run(test)


def test_a_dead_replica_loses_no_retryable_request_and_names_lost_runs():
    async def test(app: RouterApp, fakes: Fakes, c: httpx.AsyncClient) -> None:
        app.pool.note_session("S", app.pool.replicas[0])
        h = (await c.post("/api/v1/create_model", json={"session_id": "S", "model_seq_id": 0})).json()
        s = (await c.post("/api/v1/asample", json={"sampling_session_id": "S:sample:0", "seq_id": 9})).json()
        fakes.dead.add(0)
        # Sampling moves to the live replica, as a fresh submission (no seq_id: the dead one may have recorded it).
        r = await c.post("/api/v1/asample", json={"sampling_session_id": "S:sample:0", "seq_id": 10})
        assert r.status_code == 200 and ids.untag(r.json()["request_id"]).replica == 1
        assert fakes.seen[-1][0] == 1 and "seq_id" not in fakes.seen[-1][2]
        assert not app.pool.replicas[0].healthy and app.pool.samplers.get("S:sample:0") == 1
        # OpenAI requests too, streamed through.
        r = await c.post("/v1/completions", json={"model": "base", "prompt": "x", "stream": True})
        assert r.status_code == 200 and r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
        # The run's own requests: a clear, permanent error naming the run and how to resume.
        r = await c.post("/api/v1/optim_step", json={"model_id": "S:train:0", "seq_id": 1})
        assert r.status_code == 400 and int(r.headers["content-length"]) > 0
        detail = r.json()["detail"]
        assert "S:train:0" in detail and "save_state" in detail and "create_training_client_from_state" in detail
        # Polls of its futures: a training future fails naming the run; a sample is "expired" (SDK resubmits).
        r = await c.post("/api/v1/retrieve_future", json={"request_id": h["request_id"]})
        assert r.status_code == 200 and r.json()["category"] == "server" and "S:train:0" in r.json()["error"]
        r = await c.post("/api/v1/retrieve_future", json={"request_id": s["request_id"]})
        assert r.status_code == 410
        # New sessions and runs go to the live replica.
        sid = (await c.post("/api/v1/create_session", json={})).json()["session_id"]
        assert app.pool.sessions.get(sid) == 1
        fakes.dead.add(1)
        r = await c.post("/api/v1/create_session", json={})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"  # transient: the SDK retries
        await fakes.dead.clear()
        await app.health.check_all()
        assert (await c.get("/stats")).json()["healthy_workers"] == 2  # back once healthy

    _run(test)


def test_a_run_created_through_the_original_api_sticks_to_its_replica():
    async def test(app: RouterApp, fakes: Fakes, c: httpx.AsyncClient) -> None:
        mid = (await c.post("/add_lora", json={"lora_id": "alice", "rank": 8})).json()["model_id"]
        owner = fakes.seen[-1][0]
        for _ in range(4):
            await c.post("/fwdbwd", json={"model_id": mid, "data": []})
            assert fakes.seen[-1][0] == owner

    _run(test)


def test_console_live_page_has_one_row_per_replica_and_marks_a_dead_one():
    async def test(app: RouterApp, fakes: Fakes, c: httpx.AsyncClient) -> None:
        doc = (await c.get("/console/api/live", headers={"X-API-Key": "tml-k"})).json()
        assert doc["total"] == 2 and doc["healthy"] == 2 and doc["totals"]["running"] == 3
        assert all(idx == 0 or idx == 1 for idx, path, _ in fakes.seen if path == "/console/api/live")
        fakes.dead.add(1)
        doc = (await c.get("/console/api/live", headers={"X-API-Key": "tml-k"})).json()
        assert doc["healthy"] == 1 and doc["replicas"][1]["error"] and doc["totals"]["running"] == 1

    _run(test)
