"""`tinkerbell router`: the router alone, over replicas started elsewhere."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("tinkerbell.router")


@dataclass
class RouterConfig:
    replicas: list[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 8000
    health_check_interval: float = 10.0

    def validate(self) -> "RouterConfig":
        from tinkerbell.config import ConfigError

        if not self.replicas:
            raise ConfigError("--replica is required (repeat it per replica, e.g. --replica http://127.0.0.1:8001)")
        for url in self.replicas:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"--replica must be an http:// or https:// URL (got {url!r})")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535 (got {self.port})")
        if not self.health_check_interval > 0:
            raise ConfigError(f"--health-check-interval must be > 0 seconds (got {self.health_check_interval})")
        return self


def run(config: RouterConfig) -> None:
    import uvicorn

    from tinkerbell.router.app import RouterApp

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    app = RouterApp(config.replicas, config.health_check_interval)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    log.info("router at http://%s:%d (TINKER_BASE_URL=http://%s:%d) over %s; health checks every %gs",
             config.host, config.port, host, config.port, ", ".join(config.replicas), config.health_check_interval)
    # No access log: it would cost more than the routing itself. Keep-alive longer than the SDK's pools idle.
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_keep_alive=75,
                access_log=False, lifespan="on")
