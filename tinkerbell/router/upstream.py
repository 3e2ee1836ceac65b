"""The router's HTTP/1.1 client for proxying to replicas: one keep-alive connection stack per replica.

Why not httpx here: httpcore's connection pool does O(connections²) work every time a request starts or ends
(its idle-connection check counts all connections once per idle connection, and probes each idle socket with
a poll() call), so with a few hundred concurrent requests the router spent most of its CPU in the pool and
throughput collapsed (issue 6: 256 clients through the router served a quarter of what they got direct). Here
taking and returning a connection is O(1) (a LIFO stack of idle ones), and a body is relayed as the replica's
chunks arrive, with a couple of awaits per chunk instead of httpx → httpcore → h11 → anyio layers.

Scope, on purpose: plain HTTP/1.1 (TLS when the replica URL is https) to a known replica; request bodies are
sent whole with Content-Length; response bodies framed by Content-Length, chunked encoding or connection close.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urlsplit

CONNECT_TIMEOUT = 5.0
WRITE_TIMEOUT = 60.0
# Below the replicas' keep-alive (uvicorn timeout_keep_alive=75 s), so the router, not the replica, closes an idle
# connection: a request is never written into a socket the replica is closing.
IDLE_EXPIRY = 30.0
MAX_IDLE = 1024  # per replica: every SDK future holds one long poll, so many connections may be idle at once
MAX_HEAD = 64 << 10
READ_SIZE = 64 << 10
NO_BODY_STATUSES = frozenset({204, 304})


class UpstreamError(Exception):
    """The exchange with a replica failed. `reached`: the request may have reached it (written to an open
    connection); False only when the connection could not be made. `timeout`: the replica was too slow."""

    def __init__(self, message: str, reached: bool, timeout: bool = False):
        super().__init__(message)
        self.reached, self.timeout = reached, timeout


class _Watchdog:
    """Aborts a connection whose pending read waited `limit` seconds for the replica. One timer per request,
    re-armed only when it fires, instead of a timeout context per read (an SSE stream is one read per event);
    time spent handing data to the client does not count."""

    __slots__ = ("loop", "conn", "limit", "since", "reading", "fired", "handle")

    def __init__(self, conn: "_Conn", limit: float):
        self.loop = asyncio.get_running_loop()
        self.conn, self.limit, self.reading, self.fired = conn, limit, False, False
        self.since = self.loop.time()
        self.handle = self.loop.call_at(self.since + limit, self._check)

    def start_read(self) -> None:
        self.since = self.loop.time()
        self.reading = True

    def _check(self) -> None:
        now = self.loop.time()
        if self.reading and now >= self.since + self.limit:
            self.fired = True
            self.conn.writer.transport.abort()  # the pending read ends (EOF); the caller reports a timeout
            return
        self.handle = self.loop.call_at(max(now, self.since) + self.limit, self._check)

    def stop(self) -> None:
        self.handle.cancel()


class _Conn:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.idle_since = reader, writer, 0.0

    def usable(self, now: float) -> bool:
        return (not self.reader.at_eof() and not self.writer.is_closing()
                and now - self.idle_since < IDLE_EXPIRY)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Response:
    """A replica's answer; the body is read by `chunks()` (as it arrives) or `aread()`, then `aclose()`."""

    status: int
    headers: list[tuple[bytes, bytes]]  # as received, names lower-cased
    _upstream: "Upstream"
    _conn: _Conn | None
    _framing: str  # "length" | "chunked" | "close" | "none"
    _left: int  # framing "length": body bytes still to read
    _wd: _Watchdog
    _keep: bool = True  # the connection may serve another request once this body is read
    _done: bool = False

    def header(self, name: bytes) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v.decode("latin-1")
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, piece by piece as the replica sends it (a chunk of a chunked body is one piece: an SSE
        event reaches the client as soon as the replica flushed it)."""
        conn = self._conn
        if self._done or conn is None:
            return
        reader, wd = conn.reader, self._wd
        try:
            if self._framing == "length":
                while self._left > 0:
                    wd.start_read()
                    data = await reader.read(min(self._left, READ_SIZE))
                    wd.reading = False
                    if not data:
                        raise asyncio.IncompleteReadError(b"", self._left)
                    self._left -= len(data)
                    yield data
            elif self._framing == "chunked":
                while True:
                    wd.start_read()
                    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                    data = await reader.readexactly(size + 2)
                    if size == 0:
                        if data != b"\r\n":  # trailer fields (rare; dropped), up to the final empty line
                            await reader.readuntil(b"\r\n")  # the rest of the first one
                            while await reader.readuntil(b"\r\n") != b"\r\n":
                                pass
                        wd.reading = False
                        break
                    wd.reading = False
                    yield data[:-2]
            elif self._framing == "close":
                self._keep = False
                while True:
                    wd.start_read()
                    data = await reader.read(READ_SIZE)
                    wd.reading = False
                    if not data:
                        break
                    yield data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError) as e:
            self._keep = False
            if wd.fired:
                raise UpstreamError(f"no data from the replica for {wd.limit:g} s", True, timeout=True) from e
            raise UpstreamError(f"the replica broke off the response: {type(e).__name__}: {e}", True) from e
        self._done = True

    async def aread(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def aclose(self) -> None:
        """Give the connection back when the body was read whole; otherwise close it (a replica notices a closed
        connection and stops generating for it)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._wd.stop()
        if self._done and self._keep:
            self._upstream.release(conn)
        else:
            conn.close()


class Upstream:
    """One replica's keep-alive connections."""

    def __init__(self, url: str):
        u = urlsplit(url)
        self.https = u.scheme == "https"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.https else 80)
        self.authority = (u.netloc or self.host).encode("latin-1")
        self._idle: deque[_Conn] = deque()  # newest on the right
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if self.https else None

    def release(self, conn: _Conn) -> None:
        now = time.monotonic()
        idle = self._idle
        # The oldest idle connections sit at the bottom of the stack: close the expired ones here, or they would
        # linger until the replica drops them.
        while idle and (len(idle) >= MAX_IDLE or now - idle[0].idle_since >= IDLE_EXPIRY):
            idle.popleft().close()
        conn.idle_since = now
        idle.append(conn)

    def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()

    async def _connect(self) -> _Conn:
        now = time.monotonic()
        while self._idle:  # most recently used first: the likeliest to be alive, and the rest can expire
            conn = self._idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.host, self.port, ssl=self._ssl, server_hostname=self.host if self.https else None,
                limit=MAX_HEAD), CONNECT_TIMEOUT)
        except asyncio.TimeoutError as e:
            raise UpstreamError(f"connect timed out after {CONNECT_TIMEOUT:g} s", False, timeout=True) from e
        except OSError as e:
            raise UpstreamError(f"connect failed: {e}", False) from e
        return _Conn(reader, writer)

    async def request(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
                      read_timeout: float) -> Response:
        """Send one request; returns once the status line and headers arrived. `headers` must not hold
        hop-by-hop fields (Connection, Transfer-Encoding, Content-Length...): this sets the framing."""
        conn = await self._connect()
        parts = [b"%s %s HTTP/1.1\r\n" % (method.encode("latin-1"), target.encode("latin-1"))]
        if not any(k.lower() == b"host" for k, _ in headers):
            parts.append(b"host: %s\r\n" % self.authority)
        parts.extend(b"%s: %s\r\n" % (k, v) for k, v in headers)
        if body or method in ("POST", "PUT", "PATCH"):
            parts.append(b"content-length: %d\r\n" % len(body))
        parts.append(b"\r\n")
        wd = _Watchdog(conn, read_timeout)
        try:
            conn.writer.write(b"".join(parts) + body)
            if conn.writer.transport.get_write_buffer_size() > READ_SIZE:
                await asyncio.wait_for(conn.writer.drain(), WRITE_TIMEOUT)
            wd.start_read()
            head = await conn.reader.readuntil(b"\r\n\r\n")
            while head[9:10] == b"1" and head[9:12] != b"101":  # 100 Continue / 103 Early Hints: skip
                head = await conn.reader.readuntil(b"\r\n\r\n")
            wd.reading = False
        except asyncio.TimeoutError as e:
            wd.stop()
            conn.close()
            raise UpstreamError(f"the replica took no request body for {WRITE_TIMEOUT:g} s", True, timeout=True) from e
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as e:
            wd.stop()
            conn.close()
            if wd.fired:
                raise UpstreamError(f"no response from the replica within {read_timeout:g} s", True,
                                    timeout=True) from e
            what = "closed the connection without a response" if isinstance(e, asyncio.IncompleteReadError) \
                else f"{type(e).__name__}: {e}"
            raise UpstreamError(f"the replica {what}", True) from e
        except BaseException:
            wd.stop()
            conn.close()  # cancelled (the client left): the connection is mid-exchange
            raise
        try:
            return self._parse_head(conn, method, head, wd)
        except ValueError as e:
            wd.stop()
            conn.close()
            raise UpstreamError(f"malformed response head from the replica: {e}", True) from e

    def _parse_head(self, conn: _Conn, method: str, head: bytes, wd: _Watchdog) -> Response:
        lines = head[:-4].split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1.") or len(status_line) < 12:
            raise ValueError(f"status line {status_line[:80]!r}")
        status = int(status_line[9:12])
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = False
        keep = status_line.startswith(b"HTTP/1.1")
        for line in lines[1:]:
            k, sep, v = line.partition(b":")
            if not sep:
                raise ValueError(f"header line {line[:80]!r}")
            k, v = k.strip().lower(), v.strip()
            headers.append((k, v))
            if k == b"content-length":
                length = int(v)
            elif k == b"transfer-encoding":
                chunked = v.lower().endswith(b"chunked")
            elif k == b"connection":
                tokens = {t.strip() for t in v.lower().split(b",")}
                keep = (keep and b"close" not in tokens) or b"keep-alive" in tokens
        if method == "HEAD" or status in NO_BODY_STATUSES or 100 <= status < 200:
            framing, left = "none", 0
        elif chunked:
            framing, left = "chunked", 0
        elif length is not None:
            framing, left = ("length", length) if length else ("none", 0)
        else:
            framing, left = "close", 0
        resp = Response(status, headers, self, conn, framing, left, wd, _keep=keep)
        if framing == "none":
            resp._done = True
        return resp
