"""Active health checks: every interval, each replica's /stats (health, load, resident adapters and live runs in
one request). Passive detection (a refused or cut connection while proxying) lives in the app; either takes a
replica out, and only a successful check puts it back."""

from __future__ import annotations

import asyncio
import logging

import httpx

from tinkerbell.router.pool import Pool, Replica

log = logging.getLogger("tinkerbell.router.health")


class HealthChecker:
    def __init__(self, pool: Pool, client: httpx.AsyncClient, interval: float):
        self.pool, self.client, self.interval = pool, client, interval
        # A killed replica refuses at once; the timeout only matters for a hung one.
        self.timeout = max(1.0, min(5.0, interval))
        self._task: asyncio.Task | None = None
        self.checks = 0

    async def check(self, replica: Replica) -> bool:
        try:
            resp = await self.client.get(replica.url + "/stats", timeout=self.timeout)
            resp.raise_for_status()
            stats = resp.json()
        except (httpx.HTTPError, ValueError) as e:
            self.mark_down(replica, f"health check: {type(e).__name__}: {e}".rstrip(": "))
            return False
        if self.pool.apply_stats(replica, stats if isinstance(stats, dict) else {}):
            log.warning("replica %d (%s) restarted: its training runs' in-memory state is gone (their requests get "
                        "an error saying to resume from the last save_state); its futures failed", replica.index,
                        replica.url)
        if replica.mark_up():
            log.info("replica %d (%s) is healthy", replica.index, replica.url)
        return True

    def mark_down(self, replica: Replica, why: str) -> None:
        if replica.mark_down(why):
            log.warning("replica %d (%s) taken out: %s", replica.index, replica.url, why)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.pool.replicas))
        self.checks += 1

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_all()
            except Exception:  # noqa: BLE001 - the loop must survive anything a check throws
                log.exception("health check round failed")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
