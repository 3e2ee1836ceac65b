"""Which replica(s) a request may go to, and what may be retried: one `Plan` per request.

The rules (docs/router.md has the table):
- a training run's requests go to the replica holding the run, never elsewhere (its weights and optimizer
  state live in that process); if it is gone, the caller is told which run to resume from its last save_state;
- a session's new runs go to the session's replica; a sampler's samples to the replica that created it (it may
  hold the weights in a slot or in memory); both move to a healthy replica when theirs is gone, because any
  replica can load weights from the shared checkpoint store;
- polls go to the replica that issued the future (its id says which, see ids.py);
- OpenAI requests for an adapter prefer replicas that have it in a slot; everything else goes to the least busy.
A request that may already have reached a replica is only resent when doing it twice is harmless (sampling,
OpenAI, reads, session bookkeeping).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tinkerbell.router import ids
from tinkerbell.router.pool import Pool, Replica

API = "/api/v1/"
# Numbered requests of an existing run (tinker_api.md 6.1) and the run's own reads.
RUN_ENDPOINTS = frozenset({"forward_backward", "forward", "optim_step", "save_weights", "save_weights_for_sampler",
                           "save_weights_external", "get_info", "create_custom_loss", "unload_model"})
SAMPLE_ENDPOINTS = frozenset({"asample", "sample"})
SESSION_ENDPOINTS = frozenset({"session_heartbeat"})
OPENAI_ADAPTER_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions"})
OPENAI_BROADCAST = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


@dataclass
class Plan:
    name: str  # endpoint name for logs and metrics
    candidates: list[Replica] = field(default_factory=list)
    pinned: bool = False  # a training run's request: its replica or an error, never another replica
    retry_ambiguous: bool = True  # may resend after the request might have reached a replica
    tag_kind: str | None = None  # tag the response's request_id with this kind (ids.py)
    model_id: str | None = None  # the training run concerned, for tags and messages
    learn: str | None = None  # "session" | "run" | "sampler": record the response's owner
    session_id: str | None = None
    sampler_id: str | None = None
    untagged_request_id: str | None = None  # retrieve_future: the replica's own id to send on
    tagged: ids.Tagged | None = None
    strip_seq_on_failover: bool = False
    adapter: str | None = None
    broadcast: bool = False
    long_poll: bool = False


def _endpoint(path: str) -> str | None:
    return path[len(API):] if path.startswith(API) else None


def plan(pool: Pool, method: str, path: str, body: dict[str, Any] | None, raw: bytes,
         content_encoding: str | None) -> Plan:
    ep = _endpoint(path)
    body = body or {}
    if ep == "retrieve_future" and method == "POST":
        return _retrieve(pool, body)
    if ep == "create_session":
        return Plan("create_session", pool.ranked(spread_sessions=True), learn="session")
    if ep in SESSION_ENDPOINTS or (ep and ep.startswith("sessions/")):
        sid = body.get("session_id") if ep in SESSION_ENDPOINTS else ep.split("/")[1]
        return _near(pool, Plan(ep.split("/")[0], session_id=sid), pool.owner_of_session(str(sid)))
    if ep == "create_model" or (ep == "load_weights" and "session_id" in body):
        return _create_run(pool, ep, body)
    if ep == "load_weights" or ep in RUN_ENDPOINTS:
        if ep in ("forward_backward", "forward") and not body:
            model_id = ids.peek_model_id(raw, content_encoding)
        else:
            model_id = body.get("model_id") if isinstance(body.get("model_id"), str) else None
        return _run(pool, ep, model_id)
    if ep == "create_sampling_session":
        return _create_sampler(pool, body)
    if ep in SAMPLE_ENDPOINTS and method == "POST":
        return _sample(pool, ep, body)
    if path in OPENAI_BROADCAST:
        return Plan(path, [r for r in pool.replicas], broadcast=True)
    if path in OPENAI_ADAPTER_ENDPOINTS:
        return _openai(pool, path, body)
    if isinstance(body.get("request_id"), str) and (t := ids.untag(body["request_id"])) is not None:
        # Another face's poll (e.g. the original client API): same rule as retrieve_future.
        return _retrieve(pool, body, name=path)
    mid = body.get("model_id")
    if method == "POST" and ep is None and not path.startswith("/v1/"):
        # Other faces (the original client API): a named adapter sticks to the replica that first served it,
        # and their futures are tagged like the Tinker face's.
        if isinstance(mid, str) and mid and mid not in pool.base_models:
            if pool.owner_of_run(mid) is not None:
                return _run(pool, path, mid)
            return Plan(path, pool.ranked(), tag_kind=ids.TRAIN, model_id=mid, learn="run", retry_ambiguous=False)
        # `learn`: a response naming a new run (the original API's /add_lora) pins that run to its replica.
        return Plan(path, pool.ranked(), tag_kind=ids.OTHER, learn="run")
    if isinstance(mid, str) and pool.owner_of_run(mid) is not None:
        return _run(pool, path, mid)
    # Reads, checkpoint management, bootstrap, telemetry, the console: any replica (one shared store).
    return Plan(ep or path, pool.ranked())


def _near(pool: Pool, p: Plan, owner: Replica | None) -> Plan:
    """The owner first when it is healthy, then the least busy."""
    ranked = pool.ranked()
    if owner is not None and owner.healthy:
        ranked = [owner] + [r for r in ranked if r is not owner]
    p.candidates = ranked
    return p


def _retrieve(pool: Pool, body: dict[str, Any], name: str = "retrieve_future") -> Plan:
    rid = body.get("request_id")
    t = ids.untag(rid) if isinstance(rid, str) else None
    if t is None or pool.by_index(t.replica) is None:
        # Not issued through this router: any replica can answer finished futures from the shared store.
        return Plan(name, pool.ranked(), long_poll=True)
    return Plan(name, [pool.replicas[t.replica]], pinned=True, tagged=t, untagged_request_id=t.request_id,
                model_id=t.model_id, long_poll=True)


def _create_run(pool: Pool, ep: str, body: dict[str, Any]) -> Plan:
    sid = body.get("session_id")
    seq = body.get("model_seq_id")
    model_id = f"{sid}:train:{seq}" if isinstance(sid, str) and seq is not None else None
    p = Plan(ep, tag_kind=ids.TRAIN, model_id=model_id, learn="run", session_id=sid if isinstance(sid, str) else None,
             retry_ambiguous=False)
    owner = pool.owner_of_session(sid) if isinstance(sid, str) else None
    return _near(pool, p, owner)


def _run(pool: Pool, ep: str, model_id: str | None) -> Plan:
    p = Plan(ep, tag_kind=ids.TRAIN, model_id=model_id, retry_ambiguous=False)
    owner = pool.owner_of_run(model_id) if model_id else None
    if owner is None and model_id and (sid := ids.session_of(model_id)):
        owner = pool.owner_of_session(sid)
    if owner is None:
        # Unknown run (never seen by this router, and no replica reports it live): any replica answers with
        # the right error from the shared store ("not a training run", or "not loaded: resume from a save").
        p.candidates = pool.ranked()[:1]
        return p
    p.pinned = True
    p.candidates = [owner]
    return p


def _create_sampler(pool: Pool, body: dict[str, Any]) -> Plan:
    sid = body.get("session_id")
    p = Plan("create_sampling_session", learn="sampler", session_id=sid if isinstance(sid, str) else None)
    run = ids.run_of_path(body.get("model_path"))
    owner = pool.owner_of_run(run) if run else None
    if owner is None and isinstance(sid, str):
        owner = pool.owner_of_session(sid)
    return _near(pool, p, owner)


def _sample(pool: Pool, ep: str, body: dict[str, Any]) -> Plan:
    sampler_id = body.get("sampling_session_id")
    p = Plan(ep, tag_kind=ids.SAMPLE, strip_seq_on_failover=True)
    owner: Replica | None = None
    if isinstance(sampler_id, str) and sampler_id:
        p.sampler_id = sampler_id
        owner = pool.owner_of_sampler(sampler_id)
        if owner is None and (sid := ids.session_of(sampler_id)):
            # An ephemeral sampler (save_weights_and_get_sampling_client) is born on its run's replica, which
            # is its session's replica.
            owner = pool.owner_of_session(sid)
    else:
        target = body.get("model_path") or body.get("model_id")
        if isinstance(target, str):
            run = ids.run_of_path(target) or (target if ":train:" in target else None)
            owner = pool.owner_of_run(run) if run else None
    return _near(pool, p, owner)


def _openai(pool: Pool, path: str, body: dict[str, Any]) -> Plan:
    model = body.get("model")
    p = Plan(path)
    if isinstance(model, str) and model and model not in pool.base_models:
        p.adapter = model
        p.candidates = pool.ranked(prefer=pool.holders_of_adapter(model))
    else:
        p.candidates = pool.ranked()
    return p
