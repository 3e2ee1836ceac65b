"""Free loopback ports for test servers, chosen BELOW the kernel's ephemeral range.

Binding port 0 hands out an ephemeral port; by the time the server binds it (seconds later, after loading a
model), an outgoing connection of another test or process may have been given the same port, and the server
dies with "address already in use". Ports outside the ephemeral range are never handed to outgoing
connections, so a port found free here stays free unless another server takes it.
"""

from __future__ import annotations

import random
import socket

_LOW, _HIGH = 20000, 32000  # Linux's default ephemeral range starts at 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(n: int = 1) -> int:
    """A port P with P..P+n-1 all free."""
    rng = random.SystemRandom()  # independent of any test's seeded `random`
    for _ in range(500):
        base = rng.randrange(_LOW, _HIGH - n)
        if all(_bindable(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no block of {n} free loopback ports in [{_LOW}, {_HIGH})")


def free_port() -> int:
    return free_port_block(1)
