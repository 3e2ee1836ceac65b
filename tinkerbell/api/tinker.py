"""The Tinker API (tinker_api.md section 2): HTTP in, service calls out.

Handlers authenticate, parse the body into `tinker.types` models (leniently, see schemas.py), call the service
and shape its answer; nothing here blocks on the engine. Async endpoints return a future handle at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from tinker import types

from tinkerbell.api import codec
from tinkerbell.api.schemas import MAX_JSON_BYTES, load_json, parse
from tinkerbell.engine.lora import LoraSpec
from tinkerbell.engine.types import AdamParams
from tinkerbell.service.auth import Authenticator
from tinkerbell.service.checkpoints import CheckpointManager, validate_kind
from tinkerbell.service.errors import BadRequest, NotFound, TooLarge
from tinkerbell.service.futures import FutureRegistry
from tinkerbell.service.runs import RunManager
from tinkerbell.service.samplers import SamplerManager
from tinkerbell.service.sessions import SessionManager
from tinkerbell.service.store import Store

if TYPE_CHECKING:
    from tinkerbell.config import ServeConfig
    from tinkerbell.engine.engine import Engine

log = logging.getLogger("tinkerbell.api")

MAX_FORWARD_BACKWARD_BYTES = 256 << 20


@dataclass
class Services:
    config: "ServeConfig"
    engine: "Engine"
    store: Store
    auth: Authenticator
    futures: FutureRegistry
    sessions: SessionManager
    checkpoints: CheckpointManager
    runs: RunManager
    samplers: SamplerManager
    model_name: str
    arch: str


router = APIRouter(prefix="/api/v1")


def svc(request: Request) -> Services:
    return request.app.state.services


def tenant_of(request: Request) -> str:
    return svc(request).auth.authenticate(request.headers)


async def read_body(request: Request, limit: int = MAX_JSON_BYTES) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {declared} bytes exceeds this endpoint's limit of {limit} bytes")
    # Read chunk by chunk: a chunked upload has no Content-Length, and must not be buffered whole before it is
    # found too large.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"body of more than {limit} bytes exceeds this endpoint's limit of {limit} bytes")
    return bytes(body)


async def json_body(request: Request) -> dict[str, Any]:
    return load_json(await read_body(request))


def handle(request_id: str, model_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"request_id": request_id}
    if model_id is not None:
        out["model_id"] = model_id
    return out


def not_supported(what: str) -> NotFound:
    return NotFound(f"{what} is not supported by this server")


# --------------------------------------------------------------------------------------------- bootstrap


@router.post("/client/config")
async def client_config(request: Request) -> dict[str, Any]:
    tenant_of(request)
    # Every flag that would call an endpoint we do not implement stays off.
    return {"pjwt_auth_enabled": False, "proto_compress_fwdbwd": False, "sample_use_retrieve_futures": False,
            "sample_join_sampling_session": False, "custom_loss_server_side": False}


@router.post("/client/dynamic_config")
async def dynamic_config(request: Request) -> dict[str, Any]:
    tenant_of(request)
    # An abandoned sampling future (client timeout or cancel) then sends cancel_future, freeing its KV blocks.
    return {"sample_cancel_enabled": True}


@router.post("/telemetry")
async def telemetry(request: Request) -> dict[str, Any]:
    await read_body(request)
    return {"status": "accepted"}


@router.get("/get_server_capabilities")
async def capabilities(request: Request) -> dict[str, Any]:
    tenant_of(request)
    s = svc(request)
    return {"supported_models": [{"model_name": s.model_name, "max_context_length": s.engine.max_context,
                                  "trainable": True, "sampleable": True}]}


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


# --------------------------------------------------------------------------------------------- sessions


@router.post("/create_session")
async def create_session(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    req = parse(types.CreateSessionRequest, await json_body(request))
    sid = svc(request).sessions.create(tenant, req.tags, req.user_metadata, req.project_id, req.display_name,
                                       req.sdk_version)
    return {"session_id": sid}


@router.post("/session_heartbeat")
async def session_heartbeat(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    req = parse(types.SessionHeartbeatRequest, await json_body(request))
    svc(request).sessions.heartbeat(tenant, req.session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    body = await json_body(request)
    reason = body.get("reason")
    reason_type = reason.get("type") if isinstance(reason, dict) else (reason if isinstance(reason, str) else None)
    detail = body.get("detail")
    svc(request).sessions.finish(tenant, session_id, reason_type, detail if isinstance(detail, str) else None)
    return {}


@router.get("/sessions")
async def list_sessions(request: Request, limit: int = 20, offset: int = 0) -> dict[str, Any]:
    tenant = tenant_of(request)
    return {"sessions": svc(request).sessions.list(tenant, max(1, min(limit, 1000)), _offset(offset))}


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, request: Request) -> dict[str, Any]:
    return svc(request).sessions.describe(tenant_of(request), session_id)


# --------------------------------------------------------------------------------------------- training


def _spec(lora: types.LoraConfig | None) -> tuple[LoraSpec, int | None]:
    lora = lora or types.LoraConfig(rank=32)
    return LoraSpec(rank=lora.rank, train_attn=lora.train_attn, train_mlp=lora.train_mlp,
                    train_unembed=lora.train_unembed), lora.seed


def _optimizer_dict(cfg: Any) -> dict[str, Any] | None:
    if cfg is None:
        return None
    return cfg.model_dump() if hasattr(cfg, "model_dump") else dict(cfg)


@router.post("/create_model")
async def create_model(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    req = parse(types.CreateModelRequest, await json_body(request))
    spec, seed = _spec(req.lora_config)
    rid, model_id = svc(request).runs.create_model(
        tenant, req.session_id, req.model_seq_id, req.base_model, spec, seed,
        _optimizer_dict(req.optimizer_config) or {"type": "adamw"}, req.user_metadata)
    return handle(rid, model_id)


@router.post("/load_weights")
async def load_weights(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    body = await json_body(request)
    runs = svc(request).runs
    if body.get("model_id") and "session_id" not in body:
        model_id, seq_id = _ids(body)
        try:
            req = parse(types.LoadWeightsRequest, body)
        except BadRequest as e:
            return handle(runs.reject(tenant, model_id, seq_id, "load_weights", e.detail), model_id)
        rid = runs.submit(tenant, model_id, seq_id, "load_weights",
                          lambda: runs.load_weights_op(tenant, model_id, req.path, req.optimizer))
        return handle(rid, model_id)
    req = parse(types.LoadWeightsRequest, body)
    if req.session_id is None or req.model_seq_id is None:
        raise BadRequest("load_weights needs either session_id + model_seq_id (create a training client from a "
                         "checkpoint) or model_id + seq_id (load into an existing one)")
    rid, model_id = runs.create_from_checkpoint(tenant, req.session_id, req.model_seq_id, req.path, req.optimizer,
                                                req.base_model, _optimizer_dict(req.optimizer_config),
                                                req.user_metadata)
    return handle(rid, model_id)


@router.post("/get_info")
async def get_info(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    body = await json_body(request)
    model_id = body.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        raise BadRequest("body.model_id is required (the training client's model id)")
    s = svc(request)
    return s.runs.get_info(tenant, model_id, s.arch)


def _ids(body: dict[str, Any]) -> tuple[str, int | None]:
    """model_id and seq_id of a numbered training request, read before the rest so a bad body still consumes
    its seq_id."""
    model_id, seq_id = body.get("model_id"), body.get("seq_id")
    if not isinstance(model_id, str) or not model_id:
        raise BadRequest("body.model_id is required (a string like '<session_id>:train:<n>')")
    if seq_id is not None and (not isinstance(seq_id, int) or isinstance(seq_id, bool) or seq_id < 1):
        raise BadRequest(f"body.seq_id must be an integer >= 1 (got {seq_id!r})")
    return model_id, seq_id


@router.post("/forward_backward")
async def forward_backward(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    s = svc(request)
    body = await read_body(request, MAX_FORWARD_BACKWARD_BYTES)
    encoding = request.headers.get("content-encoding")
    if "json" in (request.headers.get("content-type") or ""):
        # JSON here is the original Tinkerbell client's form (chat conversations, answered synchronously);
        # the tinker SDK always sends protobuf.
        from tinkerbell.api import compat

        return await compat.forward_backward_sync(request, load_json(body))
    try:
        model_id, seq_id = codec.peek_forward_backward_ids(body, encoding)
    except codec.WireError as e:
        raise BadRequest(str(e)) from None
    if not model_id:
        raise BadRequest("model_id: is missing from the ForwardBackwardRequest")
    if seq_id < 1:
        raise BadRequest(f"seq_id: must be >= 1 (got {seq_id}); the SDK numbers requests from 1")
    runs = s.runs

    def build():
        call = codec.decode_forward_backward(body, encoding, vocab_size=s.engine.vocab_size)
        return runs.forward_backward_op(model_id, seq_id, call.data, call.loss_fn, call.loss_config,
                                        call.forward_only)

    return handle(runs.submit(tenant, model_id, seq_id, "forward_backward", build), model_id)


@router.post("/optim_step")
async def optim_step(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    body = await json_body(request)
    from tinkerbell.api import compat

    if compat.is_original_form(body):  # no seq_id / type: the original client's synchronous optim_step
        return await compat.optim_step_sync(request, body)
    model_id, seq_id = _ids(body)
    runs = svc(request).runs

    def build():
        req = parse(types.OptimStepRequest, body)
        p = req.optim_params
        if not isinstance(p, types.AdamParams):
            raise BadRequest(f"optimizer_params.type {getattr(p, 'type', '?')!r} is not supported by this server; "
                             "send adam_params (the model's optimizer is AdamW)")
        params = AdamParams(learning_rate=p.learning_rate, beta1=p.beta1, beta2=p.beta2, eps=p.eps,
                            weight_decay=p.weight_decay, grad_clip_norm=p.grad_clip_norm)
        return runs.optim_step_op(model_id, seq_id, params)

    return handle(runs.submit(tenant, model_id, seq_id, "optim_step", build), model_id)


@router.post("/save_weights")
async def save_weights(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    body = await json_body(request)
    model_id, seq_id = _ids(body)
    runs = svc(request).runs

    def build():
        req = parse(types.SaveWeightsRequest, body)
        return runs.save_op(tenant, model_id, "weights", req.path, req.overwrite, req.ttl_seconds,
                            req.user_metadata)

    return handle(runs.submit(tenant, model_id, seq_id, "save_weights", build), model_id)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    body = await json_body(request)
    model_id, seq_id = _ids(body)
    runs = svc(request).runs

    def build():
        req = parse(types.SaveWeightsForSamplerRequest, body)
        if req.path:
            return runs.save_op(tenant, model_id, "sampler_weights", req.path, False, req.ttl_seconds,
                                req.user_metadata)
        if req.sampling_session_seq_id is None:
            raise BadRequest("save_weights_for_sampler needs path (a checkpoint name) or sampling_session_seq_id "
                             "(for save_weights_and_get_sampling_client)")
        return runs.ephemeral_sampler_op(tenant, model_id, req.sampling_session_seq_id)

    return handle(runs.submit(tenant, model_id, seq_id, "save_weights_for_sampler", build), model_id)


@router.post("/save_weights_external")
async def save_weights_external(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    body = await json_body(request)
    model_id, seq_id = _ids(body)
    runs = svc(request).runs

    def build():
        req = parse(types.SaveWeightsExternalRequest, body)
        return runs.save_op(tenant, model_id, "external_weights", req.path, False, req.ttl_seconds, None,
                            recipients=req.age_encryption_recipients)

    return handle(runs.submit(tenant, model_id, seq_id, "save_weights_external", build), model_id)


# --------------------------------------------------------------------------------------------- sampling


@router.post("/create_sampling_session")
async def create_sampling_session(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    req = parse(types.CreateSamplingSessionRequest, await json_body(request))
    sid = svc(request).samplers.create(tenant, req.session_id, req.sampling_session_seq_id, req.base_model,
                                       req.model_path)
    return {"sampling_session_id": sid}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, request: Request) -> dict[str, Any]:
    return svc(request).samplers.describe(tenant_of(request), sampler_id)


@router.post("/asample")
async def asample(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    s = svc(request)
    body = await json_body(request)
    from tinkerbell.api import compat

    if compat.is_original_form(body):  # prompts / model_id, no seq_id / type: the original client's asample
        return await compat.asample(request, body)

    def make_job(req: dict[str, Any]):
        try:
            return codec.sample_job_from_request(req, s.engine.vocab_size, s.engine.max_context)
        except codec.WireError as e:
            raise BadRequest(str(e)) from None

    return s.samplers.sample(tenant, body, make_job)


# --------------------------------------------------------------------------------------------- futures


@router.post("/retrieve_future")
async def retrieve_future(request: Request) -> Response:
    tenant = tenant_of(request)
    body = await json_body(request)
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise BadRequest("body.request_id is required (the request_id of a submitted request)")
    s = svc(request)
    answer = await s.futures.wait(rid, tenant, s.config.long_poll_seconds)
    if answer is None:
        return JSONResponse({"type": "try_again", "request_id": rid, "queue_state": "active"}, status_code=408)
    return Response(content=answer.body, media_type=answer.content_type)


@router.post("/cancel_future")
async def cancel_future(request: Request) -> dict[str, Any]:
    """Stop an unfinished sample (the SDK sends this for futures it abandons): its engine work and KV blocks are
    freed and its future fails with a reason. Training requests run in seq_id order and are not cancelled."""
    tenant = tenant_of(request)
    body = await json_body(request)
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise BadRequest("body.request_id is required (the request_id of a submitted request)")
    s = svc(request)
    row = s.store.get_future(rid)
    if row is None or row["tenant"] != tenant:
        raise NotFound(f"request_id {rid!r} is unknown to this server (or belongs to another API key)")
    return {"cancelled": s.samplers.cancel(tenant, rid)}


# --------------------------------------------------------------------------------------------- runs & checkpoints


def _limit(limit: int, default: int) -> int:
    return max(1, min(limit if limit > 0 else default, 1000))


def _offset(offset: int) -> int:
    # Clamped below SQLite's INTEGER range: an offset of 10**30 is an empty page, not an overflow (a 500).
    return max(0, min(offset, 2**62))


@router.get("/training_runs")
async def list_training_runs(request: Request, limit: int = 20, offset: int = 0) -> dict[str, Any]:
    return svc(request).runs.list_runs(tenant_of(request), _limit(limit, 20), _offset(offset))


@router.get("/training_runs/{run}")
async def get_training_run(run: str, request: Request) -> dict[str, Any]:
    return svc(request).runs.training_run(tenant_of(request), run)


@router.get("/training_runs/{run}/checkpoints")
async def list_run_checkpoints(run: str, request: Request) -> dict[str, Any]:
    s = svc(request)
    s.runs.require(tenant_of(request), run)
    items = s.checkpoints.list_for_run(run)
    return {"checkpoints": items, "cursor": {"offset": 0, "limit": len(items), "total_count": len(items)}}


@router.get("/checkpoints")
async def list_user_checkpoints(request: Request, limit: int = 100, offset: int = 0) -> dict[str, Any]:
    limit, offset = _limit(limit, 100), _offset(offset)
    items, total = svc(request).checkpoints.list_for_tenant(tenant_of(request), limit, offset)
    return {"checkpoints": items, "cursor": {"offset": offset, "limit": limit, "total_count": total}}


def _owned_checkpoint(request: Request, run: str, kind: str) -> tuple[Services, str]:
    tenant = tenant_of(request)
    s = svc(request)
    validate_kind(kind)
    s.runs.require(tenant, run)
    return s, tenant


@router.delete("/training_runs/{run}/checkpoints/{kind}/{name}")
async def delete_checkpoint(run: str, kind: str, name: str, request: Request) -> dict[str, Any]:
    s, tenant = _owned_checkpoint(request, run, kind)
    s.checkpoints.delete(tenant, run, kind, name)
    s.samplers.invalidate(f"tinker://{run}/{kind}/{name}")
    return {}


@router.post("/training_runs/{run}/checkpoints/{kind}/{name}/publish")
async def publish_checkpoint(run: str, kind: str, name: str, request: Request) -> dict[str, Any]:
    s, tenant = _owned_checkpoint(request, run, kind)
    s.checkpoints.set_public(tenant, run, kind, name, True)
    return {}


@router.delete("/training_runs/{run}/checkpoints/{kind}/{name}/publish")
async def unpublish_checkpoint(run: str, kind: str, name: str, request: Request) -> dict[str, Any]:
    s, tenant = _owned_checkpoint(request, run, kind)
    s.checkpoints.set_public(tenant, run, kind, name, False)
    return {}


@router.put("/training_runs/{run}/checkpoints/{kind}/{name}/ttl")
async def set_checkpoint_ttl(run: str, kind: str, name: str, request: Request) -> dict[str, Any]:
    s, tenant = _owned_checkpoint(request, run, kind)
    body = await json_body(request)
    ttl = body.get("ttl_seconds")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool)):
        raise BadRequest(f"body.ttl_seconds must be an integer number of seconds or null (got {ttl!r})")
    s.checkpoints.set_ttl(tenant, run, kind, name, ttl)
    return {}


@router.get("/training_runs/{run}/checkpoints/external_weights/{name}/external_weights_urls")
async def external_weights_urls(run: str, name: str, request: Request) -> dict[str, Any]:
    s, tenant = _owned_checkpoint(request, run, "external_weights")
    return s.checkpoints.external_urls(tenant, run, name, str(request.base_url))


@router.get("/download/{run}/{name}/{file:path}")
async def download(run: str, name: str, file: str, request: Request, expires: int = 0,
                   sig: str = "") -> FileResponse:
    # No API key: the signature authorises (the cookbook fetches these with urllib, without credentials).
    path = svc(request).checkpoints.verify_download(run, name, file, expires, sig)
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.post("/weights_info")
async def weights_info(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    body = await json_body(request)
    return svc(request).runs.weights_info(tenant, body.get("tinker_path"))


@router.post("/copy_weights")
async def copy_weights(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    req = parse(types.CopyWeightsRequest, await json_body(request))
    if req.weights_access_token:
        raise BadRequest("body.weights_access_token is not supported by this server (published checkpoints are "
                         "readable by every API key; publish the source checkpoint instead)")
    return svc(request).runs.copy_weights(tenant, req.source_path, req.session_id, req.model_seq_id,
                                          req.ttl_seconds)


# --------------------------------------------------------------------------------------------- not supported

_UNSUPPORTED = {
    ("PUT", "/sessions/{session_id}/project"): "moving sessions between projects",
    ("GET", "/sessions/{session_id}/trace_export"): "session trace export",
    ("POST", "/sessions/search"): "session search",
    ("GET", "/audit"): "the audit log",
    ("GET", "/billing/usage/events"): "billing usage",
    ("GET", "/billing/usage/checkpoints/current"): "billing usage",
    ("POST", "/auth/token"): "JWT auth (this server uses static API keys; pjwt_auth_enabled is false)",
    ("POST", "/retrieve_futures"): "retrieve_futures (sample_use_retrieve_futures is off; poll retrieve_future)",
    ("POST", "/join_sampling_session"): "join_sampling_session (sample_join_sampling_session is off)",
    ("POST", "/create_custom_loss"): "server-side custom losses (custom_loss_server_side is off; "
                                     "forward_backward_custom runs the loss client-side)",
    ("GET", "/auth/apikey/me"): "API key introspection (manage keys with `tinkerbell keys`)",
    ("DELETE", "/auth/apikey/me"): "API key deletion (manage keys with `tinkerbell keys`)",
}


def _unsupported(what: str):
    async def endpoint(request: Request) -> None:
        tenant_of(request)
        raise not_supported(what)

    return endpoint


for (_method, _path), _what in _UNSUPPORTED.items():
    router.add_api_route(_path, _unsupported(_what), methods=[_method], include_in_schema=False)
