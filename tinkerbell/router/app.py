"""The router: a plain ASGI app that forwards every request to a replica chosen by `routes.plan`.

Bodies of requests are read whole (routing needs their ids); responses stream through as the replica sends
them (SSE included), except the small JSON handles whose request ids the router tags (ids.py). Credentials pass
untouched: replicas authenticate, against the key store they share. A request that fails before the client got a
byte is tried on the next candidate when the plan allows it; otherwise the client gets an answer the tinker
SDK treats correctly: 503 (retried) when no replica could take it, 4xx (not retried) or a failed future naming
the training run when the replica holding that run is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable

import httpx

from tinkerbell.router import batch_stats, ids
from tinkerbell.router.health import HealthChecker
from tinkerbell.router.ops import metrics_text, stats_body
from tinkerbell.router.pool import Pool, Replica
from tinkerbell.router.routes import Plan, plan
from tinkerbell.router.upstream import Response, Upstream, UpstreamError

log = logging.getLogger("tinkerbell.router")

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"content-length"})
# Read timeouts (seconds without a byte from the replica): long polls are held <= 30 s by replicas; a completion
# may take minutes.
READ_TIMEOUT = 600.0
LONG_POLL_READ_TIMEOUT = 90.0
# The occasional fan-out requests (console, batch stats, adapter registration) and health checks use httpx.
TIMEOUT = httpx.Timeout(connect=5.0, read=READ_TIMEOUT, write=60.0, pool=30.0).as_dict()
MAX_JSON_PARSE = 16 << 20
RETRY_STATUSES = frozenset({429, 502, 503, 504})


def json_response(status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None,
                  ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    data = json.dumps(body).encode()
    # An explicit, non-zero Content-Length on every error: the SDK takes a 400 without one for a proxy's.
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    return status, headers + (extra or []), data


class RouterApp:
    def __init__(self, urls: list[str], health_interval: float = 10.0):
        self.pool = Pool(urls)
        # The proxy's hot path: one keep-alive connection stack per replica (upstream.py says why not httpx).
        self.upstreams = [Upstream(r.url) for r in self.pool.replicas]
        self.health_interval = health_interval
        self.started = time.time()
        self.requests = 0
        self.failovers = 0
        self.client: httpx.AsyncClient | None = None
        self.health: HealthChecker | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        # Health checks and the rare fan-outs only: a handful of connections, so httpcore's pool costs nothing.
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64,
                                                            keepalive_expiry=30.0), trust_env=False)
        self.health = HealthChecker(self.pool, self.client, self.health_interval)
        await self.health.check_all()
        self.health.start()
        up = [r.url for r in self.pool.healthy()]
        log.info("router over %d replica(s), %d healthy: %s", len(self.pool.replicas), len(up),
                 ", ".join(r.url + ("" if r.healthy else " (down)") for r in self.pool.replicas))

    async def shutdown(self) -> None:
        if self.health is not None:
            await self.health.stop()
        if self.client is not None:
            await self.client.aclose()
        for u in self.upstreams:
            u.close()

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:  # noqa: BLE001
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------------------------------ requests

    async def _http(self, scope: dict, receive: Receive, send: Send) -> None:
        self.requests += 1
        method, path = scope["method"], scope["path"]
        if method == "GET" and path in ("/healthz", "/health", "/stats", "/metrics"):
            await self._local(path, send)
            return
        body = await _read_body(receive)
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if method == "GET" and path == "/console/api/live":
            await self._console_live(headers, send)
            return
        if method == "GET" and path == "/batch/stats":  # the deployment's batching figures (batch_stats.py)
            await self._batch_stats(headers, send)
            return
        hmap = {k: v for k, v in headers}
        js = _maybe_json(method, hmap.get(b"content-type", b""), body)
        enc = hmap.get(b"content-encoding", b"").decode("latin-1") or None
        p = plan(self.pool, method, path, js, body, enc)
        target = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
        fwd = [(k, v) for k, v in headers if k not in HOP_BY_HOP]
        client_ip = (scope.get("client") or ("",))[0]
        if client_ip:
            fwd.append((b"x-forwarded-for", client_ip.encode()))
        if p.broadcast:
            await self._broadcast(p, method, target, fwd, body, send)
        else:
            await self._proxy(p, method, target, fwd, body, js, receive, send)

    async def _local(self, path: str, send: Send) -> None:
        if path == "/stats":
            await _answer(send, *json_response(200, stats_body(self)))
        elif path == "/metrics":
            data = metrics_text(self).encode()
            await _answer(send, 200, [(b"content-type", b"text/plain; version=0.0.4"),
                                      (b"content-length", str(len(data)).encode())], data)
        else:
            n = len(self.pool.healthy())
            status = "ok" if n else "unavailable"
            body: dict[str, Any] = {"status": status}
            if path == "/health":
                body.update(healthy_workers=n, total_workers=len(self.pool.replicas),
                            models=sorted(self.pool.base_models))
            await _answer(send, *json_response(200 if n else 503, body))

    async def _console_live(self, headers: list[tuple[bytes, bytes]], send: Send) -> None:
        """The console's Live page behind the router: one row per replica. Each replica answers with the caller's
        credentials, so each applies its own tenant filter; a replica that does not answer shows as down."""
        from tinkerbell.api.console.live import merge_replicas, replica_row

        assert self.client is not None
        fwd = [(k, v) for k, v in headers if k not in HOP_BY_HOP]

        async def one(rep: Replica) -> dict[str, Any]:
            if not rep.healthy:
                return replica_row(rep.url, False, None, "replica is unhealthy")
            try:
                r = await self.client.send(self._request(rep, "GET", "/console/api/live", fwd, b""))
            except httpx.HTTPError as e:
                return replica_row(rep.url, False, None, f"{type(e).__name__}: {e}")
            if r.status_code != 200:
                return replica_row(rep.url, False, None, f"HTTP {r.status_code}: {r.text[:200]}")
            return replica_row(rep.url, True, r.json())

        rows = await asyncio.gather(*(one(rep) for rep in self.pool.replicas))
        if rows and all(r["error"] and r["error"].startswith("HTTP 401") for r in rows):
            await _answer(send, *json_response(401, {"detail": rows[0]["error"].split(": ", 1)[-1]}))
            return
        await _answer(send, *json_response(200, merge_replicas(list(rows))))

    async def _batch_stats(self, headers: list[tuple[bytes, bytes]], send: Send) -> None:
        assert self.client is not None
        fwd = [(k, v) for k, v in headers if k not in HOP_BY_HOP]
        client = self.client
        rows = await batch_stats.gather(self.pool.replicas, lambda rep: client.send(
            self._request(rep, "GET", "/batch/stats", fwd, b"")))
        body = batch_stats.merge(rows)
        await _answer(send, *json_response(200 if body["replicas_answering"] else 503, body))

    def _request(self, rep: Replica, method: str, target: str, headers: list, body: bytes) -> httpx.Request:
        return httpx.Request(method, rep.url + target, headers=headers, content=body,
                             extensions={"timeout": TIMEOUT})

    async def _proxy(self, p: Plan, method: str, target: str, headers: list, body: bytes,
                     js: dict[str, Any] | None, receive: Receive, send: Send) -> None:
        assert self.client is not None and self.health is not None
        if p.untagged_request_id is not None and js is not None:
            body = json.dumps({**js, "request_id": p.untagged_request_id}).encode()
        reached: Replica | None = None  # a replica that may have received the request
        last: Replica | None = None
        error: str = "no replica is configured"
        for attempt, rep in enumerate(p.candidates):
            if attempt:
                self.failovers += 1
                log.info("%s: trying replica %d after replica %d failed (%s)", p.name, rep.index,
                         last.index if last else -1, error)
                if p.strip_seq_on_failover and js is not None and "seq_id" in js:
                    # The failed replica may have recorded this (session, seq_id) in the shared store; a fresh
                    # submission must not be matched to that orphaned future.
                    body = json.dumps({k: v for k, v in js.items() if k != "seq_id"}).encode()
            last = rep
            if not p.long_poll:
                rep.in_flight += 1
            try:
                try:
                    resp = await self.upstreams[rep.index].request(
                        method, target, headers, body, LONG_POLL_READ_TIMEOUT if p.long_poll else READ_TIMEOUT)
                except UpstreamError as e:
                    error = str(e)
                    if not e.reached:  # refused or no answer to connect: the request never left the router
                        rep.errors += 1
                        self.health.mark_down(rep, error)
                        if p.pinned:
                            break
                        continue
                    rep.errors += 1
                    reached = rep
                    if not e.timeout:
                        self.health.mark_down(rep, f"connection lost: {error}")
                    if p.pinned or not p.retry_ambiguous:
                        break
                    continue
                rep.requests_served += 1
                if resp.status >= 500:
                    rep.errors += 1
                more = attempt + 1 < len(p.candidates)
                if resp.status in RETRY_STATUSES and more and not p.pinned and p.retry_ambiguous:
                    error = f"HTTP {resp.status}"
                    await resp.aclose()
                    continue
                await self._relay(p, rep, resp, js, receive, send)
                return
            finally:
                if not p.long_poll:
                    rep.in_flight -= 1
        await _answer(send, *self._failure(p, reached or last, error, reached is not None))

    async def _relay(self, p: Plan, rep: Replica, resp: Response, js: dict[str, Any] | None,
                     receive: Receive, send: Send) -> None:
        if p.long_poll and resp.status in (200, 410) and js is not None:
            rep.pending.pop(str(js.get("request_id")), None)
        rewrite = (p.tag_kind is not None or p.learn is not None) and resp.status < 300
        ctype = resp.header(b"content-type") or ""
        if rewrite and ctype.startswith("application/json"):
            try:
                data = await resp.aread()
            except UpstreamError as e:
                # Nothing reached the client yet, but the request reached the replica: like a cut connection.
                log.warning("%s: replica %d broke off a response: %s", p.name, rep.index, e)
                rep.errors += 1
                await _answer(send, *self._failure(p, rep, str(e), True))
                return
            finally:
                await resp.aclose()
            data = self._learn(p, rep, data)
            hdrs = [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP and k != b"content-encoding"]
            await _answer(send, resp.status, hdrs + [(b"content-length", str(len(data)).encode())], data)
            return
        if p.sampler_id and p.candidates and rep is not p.candidates[0]:
            self.pool.samplers.put(p.sampler_id, rep.index)
        hdrs = [(k, v) for k, v in resp.headers if k not in HOP_BY_HOP]
        length = resp.header(b"content-length")
        if length is not None:
            hdrs.append((b"content-length", length.encode()))
        if p.adapter is not None and resp.status < 400:
            self.pool.adapter_hint.put(p.adapter, rep.index)
        await send({"type": "http.response.start", "status": resp.status, "headers": hdrs})
        gone = asyncio.Event()
        watcher = (asyncio.get_running_loop().create_task(_watch_disconnect(receive, gone))
                   if ctype.startswith("text/event-stream") else None)
        try:
            async for chunk in resp.chunks():
                if gone.is_set():
                    break  # the client left: closing the upstream connection stops the replica's generation
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (UpstreamError, OSError) as e:
            # Bytes already reached the client: nothing to retry; ending the response cuts the connection.
            log.warning("%s: replica %d broke off a response midway: %s", p.name, rep.index, e)
            rep.errors += 1
        finally:
            if watcher is not None:
                watcher.cancel()
            await resp.aclose()

    def _learn(self, p: Plan, rep: Replica, data: bytes) -> bytes:
        """Record who owns what the response names, and tag its request id; returns the body to send."""
        try:
            out = json.loads(data)
        except ValueError:
            return data
        if not isinstance(out, dict):
            return data
        if p.learn == "session" and isinstance(out.get("session_id"), str):
            self.pool.note_session(out["session_id"], rep)
        elif p.learn == "run":
            model_id = out.get("model_id") if isinstance(out.get("model_id"), str) else p.model_id
            if model_id:
                p.model_id = model_id
                self.pool.runs.put(model_id, rep.index)
            if p.session_id and self.pool.owner_of_session(p.session_id) is not rep:
                self.pool.note_session(p.session_id, rep)
        elif p.learn == "sampler" and isinstance(out.get("sampling_session_id"), str):
            self.pool.samplers.put(out["sampling_session_id"], rep.index)
        if p.sampler_id and p.candidates and rep is not p.candidates[0]:
            self.pool.samplers.put(p.sampler_id, rep.index)
        rid = out.get("request_id")
        if p.tag_kind is not None and isinstance(rid, str) and ids.untag(rid) is None:
            tagged = ids.tag(rep.index, p.tag_kind, rid, p.model_id if p.tag_kind == ids.TRAIN else None)
            out["request_id"] = tagged
            rep.pending[tagged] = time.time()
            return json.dumps(out).encode()
        return data

    def _failure(self, p: Plan, rep: Replica | None, error: str, reached: bool = False,
                 ) -> tuple[int, list, bytes]:
        where = f"replica {rep.index} ({rep.url})" if rep else "no replica"
        if p.tagged is not None:
            if p.tagged.kind == ids.TRAIN:
                # A failed future, not an HTTP error: the SDK raises it to the caller instead of polling forever.
                return json_response(200, {"error": _lost_run(p.model_id, where, error), "category": "server"})
            # 410 = "promise expired": the SDK resubmits the whole sample, which the router places elsewhere.
            return json_response(410, {"detail": f"request {p.untagged_request_id} was running on {where}, which "
                                       f"stopped answering ({error}); submit it again"})
        if p.pinned and p.tag_kind == ids.TRAIN:
            return json_response(400, {"detail": _lost_run(p.model_id, where, error)})
        if p.learn == "run" and reached:
            return json_response(400, {"detail": f"{where} stopped answering while creating training run "
                                       f"{p.model_id} ({error}); create the training client again (a new "
                                       "model_seq_id) and it will be placed on a healthy replica"})
        healthy = len(self.pool.healthy())
        return json_response(503, {"detail": f"no replica could take this request: {where} failed ({error}); "
                                   f"{healthy} of {len(self.pool.replicas)} replicas are healthy; retry shortly"},
                             [(b"retry-after", b"1")])

    async def _broadcast(self, p: Plan, method: str, target: str, headers: list, body: bytes,
                         send: Send) -> None:
        """Adapter registration (OpenAI face) goes to every healthy replica so any of them can serve it."""
        assert self.client is not None
        reps = self.pool.healthy() or self.pool.replicas

        async def one(rep: Replica) -> httpx.Response | Exception:
            try:
                r = await self.client.send(self._request(rep, method, target, headers, body))  # type: ignore
                rep.requests_served += 1
                return r
            except httpx.HTTPError as e:
                rep.errors += 1
                return e

        results = await asyncio.gather(*(one(r) for r in reps))
        answers = [r for r in results if isinstance(r, httpx.Response)]
        if not answers:
            await _answer(send, *self._failure(p, reps[0], str(results[0])))
            return
        worst = max(answers, key=lambda r: (r.status_code >= 400, r.status_code))
        hdrs = [(k, v) for k, v in worst.headers.raw if k.lower() not in HOP_BY_HOP and k.lower() != b"content-encoding"]
        await _answer(send, worst.status_code, hdrs + [(b"content-length", str(len(worst.content)).encode())],
                      worst.content)


def _lost_run(model_id: str | None, where: str, error: str) -> str:
    run = f"training run {model_id}" if model_id else "the training run of this request"
    resume = (f"ServiceClient.create_training_client_from_state_with_optimizer('tinker://{model_id}/weights/<name>')"
              if model_id else "ServiceClient.create_training_client_from_state_with_optimizer(<tinker://.../weights/...>)")
    return (f"{run} lived on {where}, which stopped answering ({error}); the run's in-memory state (weights since "
            f"its last save_state, optimizer moments) is gone. Resume from its last save_state checkpoint with "
            f"{resume}: the new run is placed on a healthy replica (RestClient.list_checkpoints lists the saves)")


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(chunks)


def _maybe_json(method: str, ctype: bytes, body: bytes) -> dict[str, Any] | None:
    if method not in ("POST", "PUT", "DELETE") or not body or len(body) > MAX_JSON_PARSE or b"json" not in ctype:
        return None
    try:
        v = json.loads(body)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            gone.set()
            return


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
