"""Ports: is one free, and if not, which process holds it (for a one-line message instead of a traceback); free
loopback ports for servers that benches and tests start.

Those are chosen BELOW the kernel's ephemeral range: binding port 0 hands out an ephemeral port, and by the
time a server binds it (seconds later, after loading a model) an outgoing connection of another process may
have been given the same port, and the server dies with "address already in use" (it happened in CI to a
bench's `serve --dp 2` replica). Ports outside the ephemeral range are never handed to outgoing connections.
"""

from __future__ import annotations

import errno
import os
import random
import socket
from pathlib import Path

_LOW, _HIGH = 20000, 32000  # Linux's default ephemeral range starts at 32768


def in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # Same option uvicorn sets: a port in TIME_WAIT after a restart is not "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    return inodes


def holder(port: int) -> str | None:
    """'pid 123 (python -m tinkerbell serve ...)' for the process listening on `port`, when /proc shows it
    (only for processes of this user, or as root)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") in targets:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    return f"pid {pid} ({cmd.strip()[:120]})"
            except OSError:
                continue
    return None


def busy_message(host: str, port: int, hint: str) -> str:
    who = holder(port) or f"another process (`ss -ltnp 'sport = :{port}'` shows which)"
    return f"port {port} on {host} is already in use by {who}; stop it, or {hint}"


def free_port_block(n: int = 1) -> int:
    """A loopback port P with P..P+n-1 all free, below the ephemeral range (`serve --dp D` takes P for the
    router and P+1..P+D for the replicas)."""
    rng = random.SystemRandom()  # independent of any caller's seeded `random`
    for _ in range(500):
        base = rng.randrange(_LOW, _HIGH - n)
        if not any(in_use("127.0.0.1", p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no block of {n} free loopback ports in [{_LOW}, {_HIGH})")
