"""Data parallelism: a router that spreads the whole Tinkerbell API over N replica processes (docs/router.md).

`supervisor` starts the replicas and the router for `tinkerbell serve --dp N`; `app` is the router itself (an
ASGI app); `pool` holds replica state and the routing policy; `health` keeps that state fresh; `ids` reads and
writes the identifiers that make routing sticky.
"""
