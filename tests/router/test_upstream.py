"""The router's proxy client (upstream.py) against real HTTP servers on loopback: framing, incremental relay,
keep-alive reuse, and the failures the router routes by (refused = never reached; cut = reached)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tinkerbell.router.app import RouterApp
from tinkerbell.router.upstream import Upstream, UpstreamError

from tests.router.fake_replicas import Answer, FakeReplicas, json_answer

EVENTS = [f"data: {i}\n\n".encode() for i in range(5)]


def handler(idx: int, method: str, path: str, body: bytes) -> Answer:
    if path == "/stats":
        return json_answer(200, {"model": "base", "outstanding": 0})
    if path == "/echo":
        return 200, [("content-type", "application/octet-stream")], body
    if path == "/sse":
        return 200, [("content-type", "text/event-stream")], EVENTS
    return json_answer(404, {"detail": "no such route"})


def run(test) -> None:
    async def main() -> None:
        reps = FakeReplicas(1, handler)
        await reps.start()
        try:
            await test(reps)
        finally:
            reps.close()

    asyncio.run(main())


def test_content_length_and_chunked_bodies_arrive_whole_over_one_kept_alive_connection():
    async def test(reps: FakeReplicas) -> None:
        up = Upstream(reps.urls[0])
        payload = bytes(range(256)) * 1000  # bigger than one read
        r = await up.request("POST", "/echo", [(b"content-type", b"application/octet-stream")], payload, 10)
        assert r.status == 200 and r.header(b"content-length") == str(len(payload))
        assert await r.aread() == payload
        await r.aclose()
        r = await up.request("GET", "/sse", [], b"", 10)
        assert r.header(b"transfer-encoding") == "chunked" and [c async for c in r.chunks()] == EVENTS
        await r.aclose()
        assert len(reps.conns[0]) == 1  # both requests went over one connection
        up.close()

    run(test)


def test_sse_chunks_are_relayed_as_they_arrive_not_when_the_stream_ends():
    async def test(reps: FakeReplicas) -> None:
        reps.gap = 0.15  # the replica flushes one event every 150 ms: the whole stream takes ~0.75 s
        up = Upstream(reps.urls[0])
        t0 = time.monotonic()
        r = await up.request("GET", "/sse", [], b"", 10)
        arrivals = [time.monotonic() - t0 async for _ in r.chunks()]
        await r.aclose()
        assert len(arrivals) == len(EVENTS)
        assert arrivals[0] < 0.5 < arrivals[-1]  # the first event came long before the last was sent
        up.close()

    run(test)


def test_refused_connect_is_not_reached_and_a_cut_response_is():
    async def test(reps: FakeReplicas) -> None:
        up = Upstream(reps.urls[0])
        reps.gap = 0.2
        r = await up.request("GET", "/sse", [], b"", 10)
        first = await r.chunks().__anext__()
        assert first == EVENTS[0]
        reps.kill(0)  # dies mid-stream
        with pytest.raises(UpstreamError) as cut:
            async for _ in r.chunks():
                pass
        assert cut.value.reached
        await r.aclose()
        with pytest.raises(UpstreamError) as refused:
            await up.request("GET", "/sse", [], b"", 10)
        assert not refused.value.reached and not refused.value.timeout
        await reps.start(0)  # back: an idle connection the old process left is not reused, a new one works
        r = await up.request("POST", "/echo", [], b"again", 10)
        assert await r.aread() == b"again"
        await r.aclose()
        up.close()

    run(test)


def test_leaving_a_stream_early_closes_the_replica_connection():
    async def test(reps: FakeReplicas) -> None:
        reps.gap = 0.1
        up = Upstream(reps.urls[0])
        r = await up.request("GET", "/sse", [], b"", 10)
        await r.chunks().__anext__()
        await r.aclose()  # the client left after one event
        for _ in range(50):
            if not reps.conns[0]:
                break
            await asyncio.sleep(0.02)
        assert not reps.conns[0]  # the replica saw its connection close (and would stop generating)
        assert not up._idle  # and it is not handed to the next request
        up.close()

    run(test)


def test_hundreds_of_concurrent_requests_through_the_router_reuse_connections():
    async def test(reps: FakeReplicas) -> None:
        app = RouterApp(reps.urls, health_interval=60)
        await app.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
                async def one(i: int) -> None:
                    r = await c.post("/echo", content=b"x%d" % i)
                    assert r.status_code == 200 and r.content == b"x%d" % i

                await asyncio.gather(*(one(i) for i in range(200)))
                conns, idle = len(reps.conns[0]), len(app.upstreams[0]._idle)
                assert 1 <= idle <= 200 and conns == idle + 1  # the proxy's, back on its stack; + health check
                await asyncio.gather(*(one(i) for i in range(200)))
                assert len(reps.conns[0]) == conns  # the second wave opened no new connection
                assert len(app.upstreams[0]._idle) == idle
        finally:
            await app.shutdown()

    run(test)


def test_a_silent_replica_times_out_per_read_and_its_connection_is_dropped():
    async def test(reps: FakeReplicas) -> None:
        reps.gap = 0.4  # longer than the read timeout below
        up = Upstream(reps.urls[0])
        r = await up.request("GET", "/sse", [], b"", 0.2)
        with pytest.raises(UpstreamError) as slow:
            await r.aread()
        assert slow.value.timeout and slow.value.reached
        await r.aclose()
        assert not up._idle
        up.close()

    run(test)


def test_connections_idle_past_the_expiry_are_closed_not_reused():
    async def test(reps: FakeReplicas) -> None:
        up = Upstream(reps.urls[0])
        rs = [await up.request("POST", "/echo", [], b"a", 10) for _ in range(3)]  # three connections at once
        for r in rs:
            await r.aread()
            await r.aclose()
        assert len(up._idle) == 3 and len(reps.conns[0]) == 3
        up._idle[0].idle_since -= 100  # the bottom one has been idle far past the expiry
        r = await up.request("POST", "/echo", [], b"b", 10)  # reuses the newest
        assert await r.aread() == b"b" and len(reps.conns[0]) == 3
        await r.aclose()  # giving it back closes the expired one at the bottom
        await asyncio.sleep(0.05)
        assert len(up._idle) == 2 and len(reps.conns[0]) == 2
        for c in up._idle:
            c.idle_since -= 100
        r = await up.request("POST", "/echo", [], b"c", 10)  # all expired: a fresh connection, the old closed
        assert await r.aread() == b"c"
        await r.aclose()
        await asyncio.sleep(0.05)
        assert len(up._idle) == 1 and len(reps.conns[0]) == 1
        up.close()

    run(test)
