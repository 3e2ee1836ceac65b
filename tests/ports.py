"""Free loopback ports for test servers (below the kernel's ephemeral range: tinkerbell/router/ports.py says
why)."""

from __future__ import annotations

from tinkerbell.router.ports import free_port_block

__all__ = ["free_port", "free_port_block"]


def free_port() -> int:
    return free_port_block(1)
