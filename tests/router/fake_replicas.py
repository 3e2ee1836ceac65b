"""Fake replicas for router tests: real HTTP/1.1 servers on loopback (asyncio), answering from a handler.

A "dead" replica closes its listening socket and every open connection, as a killed process does, so the router
sees refused connects and cut keep-alive connections, not a simulated error."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any, Callable

# (status, headers, body): a bytes body goes out with Content-Length, a list of bytes as one chunk each
# (Transfer-Encoding: chunked), flushed `gap` seconds apart when the handler set one.
Answer = tuple[int, list[tuple[str, str]], "bytes | list[bytes]"]
Handler = Callable[[int, str, str, bytes], Answer]


def json_answer(status: int, body: Any) -> Answer:
    return status, [("content-type", "application/json")], json.dumps(body).encode()


class _Conn(asyncio.Protocol):
    def __init__(self, owner: "FakeReplicas", idx: int):
        self.owner, self.idx, self.buf = owner, idx, b""
        self.t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.owner.conns[self.idx].add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.conns[self.idx].discard(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            if len(self.buf) < end + 4 + length:
                return
            body, self.buf = self.buf[end + 4:end + 4 + length], self.buf[end + 4 + length:]
            method, target, _ = head[0].split(" ", 2)
            self.owner.heads.append((self.idx, head))
            asyncio.get_running_loop().create_task(self.answer(self.owner.handler(self.idx, method, target, body)))

    async def answer(self, ans: Answer) -> None:
        status, headers, body = ans
        assert self.t is not None
        lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers]
        if isinstance(body, bytes):
            self.t.write(("\r\n".join(lines + [f"content-length: {len(body)}"]) + "\r\n\r\n").encode() + body)
            return
        self.t.write(("\r\n".join(lines + ["transfer-encoding: chunked"]) + "\r\n\r\n").encode())
        for piece in body:
            if self.owner.gap:
                await asyncio.sleep(self.owner.gap)
            if self.t.is_closing():
                return
            self.t.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.t.write(b"0\r\n\r\n")


class FakeReplicas:
    """`n` replicas on free loopback ports; `urls[i]` is replica i's base URL."""

    def __init__(self, n: int, handler: Handler):
        self.handler = handler
        self.ports = [_free_port() for _ in range(n)]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.servers: list[asyncio.AbstractServer | None] = [None] * n
        self.conns: list[set[_Conn]] = [set() for _ in range(n)]
        self.heads: list[tuple[int, list[str]]] = []  # (replica, request head lines) as received
        self.gap = 0.0

    async def start(self, idx: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        for i in range(len(self.ports)) if idx is None else [idx]:
            if self.servers[i] is None:
                self.servers[i] = await loop.create_server(lambda i=i: _Conn(self, i), "127.0.0.1", self.ports[i],
                                                           reuse_address=True)

    def kill(self, idx: int) -> None:
        server, self.servers[idx] = self.servers[idx], None
        if server is not None:
            server.close()
        for c in list(self.conns[idx]):
            if c.t is not None:
                c.t.abort()

    def close(self) -> None:
        for i in range(len(self.ports)):
            self.kill(i)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
