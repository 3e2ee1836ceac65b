"""The router's own operations endpoints: /stats in the existing load balancer's format (total_workers,
healthy_workers, total_requests, per worker index/url/healthy/requests_served/errors) plus each replica's
outstanding work and resident adapters, and the same figures as Prometheus text for /metrics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinkerbell.router.app import RouterApp


def stats_body(app: "RouterApp") -> dict[str, Any]:
    pool = app.pool
    return {
        **pool.summary(),
        "workers": [r.view() for r in pool.replicas],
        "router": {"uptime_seconds": round(time.time() - app.started, 1), "requests": app.requests,
                   "failovers": app.failovers, "health_check_interval": app.health_interval,
                   "health_checks": app.health.checks if app.health else 0,
                   "known_sessions": len(pool.sessions), "known_runs": len(pool.runs),
                   "known_samplers": len(pool.samplers)},
    }


def metrics_text(app: "RouterApp") -> str:
    pool = app.pool
    lines = [
        "# HELP tinkerbell_router_requests_total Requests the router received.",
        "# TYPE tinkerbell_router_requests_total counter",
        f"tinkerbell_router_requests_total {app.requests}",
        "# HELP tinkerbell_router_failovers_total Requests resent to another replica after a failure.",
        "# TYPE tinkerbell_router_failovers_total counter",
        f"tinkerbell_router_failovers_total {app.failovers}",
        "# TYPE tinkerbell_router_healthy_workers gauge",
        f"tinkerbell_router_healthy_workers {len(pool.healthy())}",
        "# TYPE tinkerbell_router_total_workers gauge",
        f"tinkerbell_router_total_workers {len(pool.replicas)}",
    ]
    series = [
        ("tinkerbell_router_worker_healthy", "gauge", lambda r: int(r.healthy)),
        ("tinkerbell_router_worker_requests_total", "counter", lambda r: r.requests_served),
        ("tinkerbell_router_worker_errors_total", "counter", lambda r: r.errors),
        ("tinkerbell_router_worker_outstanding", "gauge", lambda r: r.outstanding),
        ("tinkerbell_router_worker_adapters_resident", "gauge", lambda r: len(r.adapters)),
    ]
    for name, kind, get in series:
        lines.append(f"# TYPE {name} {kind}")
        for r in pool.replicas:
            lines.append(f'{name}{{index="{r.index}",url="{r.url}"}} {get(r)}')
    return "\n".join(lines) + "\n"
