"""The original Tinkerbell client API: the routes scripts written for the first (Flask) prototype call.

A thin translation onto the same service the Tinker face uses: an adapter is a training run (one session per
adapter, so `remove_lora` can close it), training data is chat conversations rendered with the model's template
(compat_chat.py), every request goes through the run's ordered queue and the futures registry, sampling from
a `model_id` hands the run's current weights to the sampler in memory (the SDK's
`save_weights_and_get_sampling_client` path), checkpoints are the service's PEFT checkpoints. The only state
kept is an id cache (compat_state.py). Request bodies are in compat_models.py.

Three paths are shared with the Tinker face (`/api/v1/forward_backward`, `/api/v1/optim_step`,
`/api/v1/asample`); api/tinker.py hands a request here only when its form is the original client's
(`is_original_form`), so the official SDK's requests are served exactly as before.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from tinker.proto.response_conv import deserialize_forward_backward_output

from tinkerbell.api.compat_models import (  # noqa: F401 - is_original_form is api/tinker.py's entry point
    Adam,
    AddLora,
    Load,
    ModelRef,
    OptimStep,
    Sample,
    Save,
    Train,
    is_original_form,
    parse,
)
from tinkerbell.api.compat_state import REMOVED, SYNC_TIMEOUT_SECONDS, Compat, compat, fb_json
from tinkerbell.api.tinker import Services, json_body, svc, tenant_of
from tinkerbell.engine.lora import ATTN_MODULES, MLP_MODULES, UNEMBED_KEY, LoraSpec
from tinkerbell.engine.types import LOSS_FUNCTIONS, AdamParams
from tinkerbell.service.checkpoints import parse_tinker_path, tinker_path, validate_name
from tinkerbell.service.errors import BadRequest, Gone, NotFound, ServiceError

log = logging.getLogger("tinkerbell.compat")

router = APIRouter(tags=["original client API"])

# /retrieve_future holds a pending request at most this long before answering 202 (clients poll in a loop).
RETRIEVE_HOLD_SECONDS = 1.0
MAX_RETRIEVE_HOLD_SECONDS = 30.0


def handle(rid: str, model_id: str | None) -> dict[str, Any]:
    return {"request_id": rid, "model_id": model_id}


async def body_of(request: Request) -> dict[str, Any]:
    return await json_body(request)


# --------------------------------------------------------------------------------------------- submissions
# Each returns (request_id, model_id); the async routes answer that handle, the sync routes wait for it.

Submit = Callable[[Request, str, Compat, dict[str, Any]], Awaitable[tuple[str, str | None]]]


def _lora_spec(body: AddLora) -> LoraSpec:
    mods = body.target_modules
    if mods is None or mods in ("all", "all-linear") or mods == ["all-linear"]:
        return LoraSpec(rank=body.rank, alpha=body.alpha)
    names = [mods] if isinstance(mods, str) else mods
    known = {*ATTN_MODULES, *MLP_MODULES, UNEMBED_KEY}
    for i, m in enumerate(names):
        if m not in known:
            raise BadRequest(f"target_modules[{i}] {m!r} is not a module this server adapts; use any of "
                             f"{', '.join(sorted(known))} or \"all-linear\"")
    # The engine adapts module groups: naming any projection of a group trains the whole group.
    return LoraSpec(rank=body.rank, alpha=body.alpha, train_attn=any(m in ATTN_MODULES for m in names),
                    train_mlp=any(m in MLP_MODULES for m in names), train_unembed=UNEMBED_KEY in names)


async def _add_lora(request: Request, tenant: str, c: Compat, body: dict[str, Any]) -> tuple[str, str | None]:
    req = parse(AddLora, body)
    c.check_base(req.base_model)
    spec = _lora_spec(req)
    s = c.s
    session = s.sessions.create(tenant, ["original-client"], None, None, "original client adapter", None)
    meta = {"created_by": "original client API /add_lora", "alpha": req.alpha}
    if req.lora_dropout:
        meta["lora_dropout_ignored"] = req.lora_dropout  # the engine's LoRA has no dropout
    return s.runs.create_model(tenant, session, 0, s.model_name, spec, req.seed, {"type": "adamw"}, meta)


async def _remove_lora(request: Request, tenant: str, c: Compat, body: dict[str, Any]) -> tuple[str, str | None]:
    model_id = parse(ModelRef, body).ref
    row = c.run(tenant, model_id)
    s = c.s

    def start():
        fut = s.engine.drop_adapter(model_id)

        async def finish() -> dict[str, Any]:
            await asyncio.wrap_future(fut)
            return {"status": "deleted", "model_id": model_id}

        return finish()

    rid = s.runs.submit(tenant, model_id, row["next_seq"], "remove_lora", lambda: start)
    # Closed at once: later requests for this id are refused; requests already queued still run first.
    s.sessions.finish(tenant, row["session_id"], REMOVED, "removed with remove_lora")
    c.published.pop(model_id, None)
    return rid, model_id


def _train(forward_only: bool) -> Submit:
    async def submit(request: Request, tenant: str, c: Compat, body: dict[str, Any]) -> tuple[str, str | None]:
        req = parse(Train, body)
        model_id = req.ref
        row = c.run(tenant, model_id)
        if req.loss_fn not in LOSS_FUNCTIONS:
            raise BadRequest(f"loss_fn {req.loss_fn!r} is unknown; use one of {', '.join(LOSS_FUNCTIONS)}")
        if req.loss_fn != "cross_entropy":
            raise BadRequest(f"loss_fn {req.loss_fn!r} needs per-token inputs (advantages, logprobs) that a chat "
                             "conversation cannot carry; use cross_entropy here, or the tinker SDK's "
                             "forward_backward with Datum loss_fn_inputs")
        chat = c.chat()
        made = [chat.datum(conv, f"data[{i}]") for i, conv in enumerate(req.data)]
        datums = [d for d, _ in made]
        loss_tokens = sum(n for _, n in made)
        runs, seq = c.s.runs, row["next_seq"]

        def build():
            inner = runs.forward_backward_op(model_id, seq, datums, req.loss_fn, dict(req.loss_config or {}),
                                             forward_only)

            def start():
                pending = inner()

                async def finish() -> dict[str, Any]:
                    out = deserialize_forward_backward_output(await pending)
                    return fb_json(out.metrics, out.loss_fn_outputs, model_id, loss_tokens)

                return finish()

            return start

        kind = "forward" if forward_only else "forward_backward"
        return runs.submit(tenant, model_id, seq, kind, build), model_id

    return submit


async def _optim_step(request: Request, tenant: str, c: Compat, body: dict[str, Any]) -> tuple[str, str | None]:
    req = parse(OptimStep, body)
    model_id = req.ref
    row = c.run(tenant, model_id)
    # The original clients send adam_params{...}, or the same keys at top level.
    adam = req.adam_params or parse(Adam, body)
    params = AdamParams(**adam.model_dump())
    runs, seq = c.s.runs, row["next_seq"]

    def build():
        inner = runs.optim_step_op(model_id, seq, params)

        def start():
            pending = inner()

            async def finish() -> dict[str, Any]:
                out = await pending
                assert isinstance(out, dict)
                return {**out, "model_id": model_id, "status": "ok", "learning_rate": params.learning_rate}

            return finish()

        return start

    return runs.submit(tenant, model_id, seq, "optim_step", build), model_id


def _save(kind: str) -> Submit:
    async def submit(request: Request, tenant: str, c: Compat, body: dict[str, Any]) -> tuple[str, str | None]:
        req = parse(Save, body)
        model_id = req.ref
        row = c.run(tenant, model_id)
        seq = row["next_seq"]
        name = req.path or req.name or f"step-{seq}"
        if name.startswith("tinker://"):
            run, path_kind, name = parse_tinker_path(name, "path")
            if run != model_id or path_kind != kind:
                raise BadRequest(f"path {req.path!r} must name a {kind} checkpoint of model {model_id}, or be a "
                                 "plain checkpoint name")
        validate_name(name, "path")
        runs = c.s.runs
        start = runs.save_op(tenant, model_id, kind, name, req.overwrite, req.ttl_seconds, None)
        return runs.submit(tenant, model_id, seq, f"save_{kind}", lambda: _with(start, model_id, "saved")), model_id

    return submit


async def _load(request: Request, tenant: str, c: Compat, body: dict[str, Any]) -> tuple[str, str | None]:
    req = parse(Load, body)
    model_id = req.ref
    row = c.run(tenant, model_id)
    path = req.path if req.path.startswith("tinker://") else tinker_path(model_id, "weights", req.path)
    runs = c.s.runs
    _, kind, _ = parse_tinker_path(path, "path")
    start = runs.load_weights_op(tenant, model_id, path, req.optimizer and kind == "weights")
    c.published.pop(model_id, None)
    return runs.submit(tenant, model_id, row["next_seq"], "load_weights",
                       lambda: _with(start, model_id, "loaded")), model_id


def _with(start: Callable[[], Awaitable[Any]], model_id: str, status: str) -> Callable[[], Awaitable[Any]]:
    """A service op whose JSON result also carries the original client's `model_id` and `status`."""

    def wrapped():
        pending = start()

        async def finish() -> dict[str, Any]:
            out = await pending
            return {**(out if isinstance(out, dict) else {}), "model_id": model_id, "status": status}

        return finish()

    return wrapped


async def _asample(request: Request, tenant: str, c: Compat, body: dict[str, Any]) -> tuple[str, str | None]:
    req = parse(Sample, body)
    rids = await c.submit_samples(tenant, req)
    # One future for the whole call (one per prompt underneath), completed with the JSON the client reads.
    rid, _, _ = c.s.futures.create(tenant, "sample_text")

    async def gather() -> None:
        try:
            c.s.futures.complete_json(rid, await c.collect(tenant, rids))
        except ServiceError as e:
            c.s.futures.fail(rid, e.detail, "user")
        except Exception as e:  # noqa: BLE001 - every failure goes to the request's future
            log.exception("sample %s failed", rid)
            c.s.futures.fail(rid, f"internal error ({type(e).__name__}); see the server log", "server")

    c.spawn(gather())
    return rid, req.model_id or req.adapter_id or c.s.model_name


# --------------------------------------------------------------------------------------------- route plumbing


async def run_async(request: Request, submit: Submit, body: dict[str, Any]) -> dict[str, Any]:
    tenant = tenant_of(request)
    rid, model_id = await submit(request, tenant, compat(request), body)
    return handle(rid, model_id)


async def run_sync(request: Request, submit: Submit, body: dict[str, Any]) -> JSONResponse:
    tenant = tenant_of(request)
    c = compat(request)
    rid, model_id = await submit(request, tenant, c, body)
    ans = await c.answer(tenant, rid, SYNC_TIMEOUT_SECONDS)
    if ans is None:
        return JSONResponse({"status": "pending", "request_id": rid, "model_id": model_id}, status_code=202)
    status, out = c.present(rid, ans)
    return JSONResponse(out, status_code=status)


def _async_route(submit: Submit):
    async def endpoint(request: Request) -> dict[str, Any]:
        return await run_async(request, submit, await body_of(request))

    return endpoint


def _sync_route(submit: Submit):
    async def endpoint(request: Request) -> JSONResponse:
        return await run_sync(request, submit, await body_of(request))

    return endpoint


ROUTES: list[tuple[str, str, Submit | None, str]] = [
    # (path, sync|async, submission, what)
    ("/api/v1/add_lora", "sync", _add_lora, "create a LoRA adapter: {base_model, rank, alpha, target_modules}"),
    ("/add_lora", "async", _add_lora, "create a LoRA adapter (returns a future)"),
    ("/api/v1/add_lora_async", "async", _add_lora, "create a LoRA adapter (returns a future)"),
    ("/api/v1/remove_lora", "sync", _remove_lora, "remove an adapter: {model_id}"),
    ("/remove_lora", "async", _remove_lora, "remove an adapter (returns a future)"),
    ("/api/v1/remove_lora_async", "async", _remove_lora, "remove an adapter (returns a future)"),
    ("/api/v1/forward", "sync", _train(True), "loss without training: {model_id, data: [conversation, ...]}"),
    ("/fwd", "async", _train(True), "forward only (returns a future)"),
    ("/api/v1/forward_async", "async", _train(True), "forward only (returns a future)"),
    ("/fwdbwd", "async", _train(False), "forward + backward on conversations (returns a future)"),
    ("/api/v1/forward_backward_async", "async", _train(False), "forward + backward (returns a future)"),
    ("/optim_step", "async", _optim_step, "AdamW step: {model_id, adam_params{learning_rate, ...}}"),
    ("/api/v1/optim_step_async", "async", _optim_step, "AdamW step (returns a future)"),
    ("/save_weights", "async", _save("weights"), "save adapter + optimizer state: {model_id, path?}"),
    ("/save_weights_async", "async", _save("weights"), "save adapter + optimizer state (returns a future)"),
    ("/api/v1/save_weights_async", "async", _save("weights"), "save adapter + optimizer state (a future)"),
    ("/save_weights_for_sampler", "async", _save("sampler_weights"), "save sampler weights: {model_id, path?}"),
    ("/save_weights_for_sampler_async", "async", _save("sampler_weights"), "save sampler weights (a future)"),
    ("/api/v1/save_weights_for_sampler_async", "async", _save("sampler_weights"), "save sampler weights"),
    ("/load_weights", "async", _load, "load a checkpoint into an adapter: {model_id, path}"),
    ("/load_weights_async", "async", _load, "load a checkpoint into an adapter (returns a future)"),
    ("/api/v1/load_weights_async", "async", _load, "load a checkpoint into an adapter (returns a future)"),
    ("/api/v1/sample", "sync", _asample, "sample: {model_id|adapter_id|base_model, prompts, sampling_params}"),
]
# Served by api/tinker.py, which hands the original client's form of the request here.
SHARED_ROUTES = {
    "/api/v1/forward_backward": ("sync", "forward + backward on conversations: {model_id, data, loss_fn}"),
    "/api/v1/optim_step": ("sync", "AdamW step: {model_id, adam_params}"),
    "/api/v1/asample": ("async", "sample (returns a future): {model_id|adapter_id, prompts, sampling_params}"),
}

for _path, _mode, _submit, _what in ROUTES:
    assert _submit is not None
    router.add_api_route(_path, _sync_route(_submit) if _mode == "sync" else _async_route(_submit),
                         methods=["POST"], summary=_what)



# For api/tinker.py, which has already read the body of a shared path (a request body can be read only once).
async def forward_backward_sync(request: Request, body: dict[str, Any]) -> JSONResponse:
    return await run_sync(request, _train(False), body)


async def optim_step_sync(request: Request, body: dict[str, Any]) -> JSONResponse:
    return await run_sync(request, _optim_step, body)


async def asample(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    return await run_async(request, _asample, body)


@router.post("/retrieve_future", summary="a future's result: 202 pending, 200 result, 404 unknown")
async def retrieve_future(request: Request) -> JSONResponse:
    tenant = tenant_of(request)
    body = await body_of(request)
    rid = body.get("request_id") or body.get("future_id")
    if not isinstance(rid, str) or not rid:
        raise BadRequest("body.request_id is required (the request_id an async route returned)")
    hold = body.get("wait_seconds", RETRIEVE_HOLD_SECONDS)
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not math.isfinite(hold) or hold < 0:
        raise BadRequest(f"body.wait_seconds must be a number of seconds >= 0 (got {hold!r})")
    c = compat(request)
    try:
        ans = await c.answer(tenant, rid, min(float(hold), MAX_RETRIEVE_HOLD_SECONDS))
    except Gone:
        raise NotFound(f"request_id {rid!r} is unknown to this server (never issued to this API key, or "
                       "expired)") from None
    if ans is None:
        return JSONResponse({"status": "pending", "request_id": rid}, status_code=202)
    status, out = c.present(rid, ans)
    if status == 200:
        out = {"status": "completed", "request_id": rid, "result": out, **out}
    return JSONResponse(out, status_code=status)


# --------------------------------------------------------------------------------------------- information


def _server_info(s: Services) -> dict[str, Any]:
    engine = s.engine
    cfg = s.config
    return {
        "model_name": s.model_name,
        "arch": s.arch,
        "vocab_size": engine.vocab_size,
        "max_context_length": engine.max_context,
        "device": str(getattr(engine, "device", "unknown")),
        "dtype": str(getattr(engine, "dtype", cfg.dtype)).replace("torch.", ""),
        "max_loras": cfg.max_loras,
        "max_lora_rank": cfg.max_lora_rank,
        "chat_template": bool(getattr(getattr(engine, "tokenizer", None), "chat_template", None)),
        "loss_functions": list(LOSS_FUNCTIONS),
        "backend": "tinkerbell (one engine: trainer and sampler share the base weights)",
    }


@router.get("/", summary="what this server is and the routes it serves")
async def index(request: Request) -> dict[str, Any]:
    s = svc(request)
    routes = {p: {"mode": mode, "what": what} for p, mode, _, what in ROUTES}
    routes.update({p: {"mode": mode, "what": what} for p, (mode, what) in SHARED_ROUTES.items()})
    routes["/retrieve_future"] = {"mode": "poll", "what": "202 pending, 200 result, 404 unknown"}
    return {
        "name": "Tinkerbell",
        "model": s.model_name,
        "faces": {
            "tinker": "/api/v1/... (the official tinker SDK: TINKER_BASE_URL=<this server>)",
            "openai": "/v1/models, /v1/completions, /v1/chat/completions",
            "original_client": routes,
            "operations": {"/healthz": "liveness", "/health": "model", "/stats": "JSON counters",
                           "/metrics": "Prometheus"},
        },
        "info": ["GET /get_server_capabilities", "GET|POST /get_info {model_id?}"],
        "pattern": {"async": "returns {request_id, model_id} at once; POST /retrieve_future {request_id}",
                    "sync": "waits and returns the result"},
    }


@router.get("/get_server_capabilities", summary="the served model")
async def server_capabilities(request: Request) -> dict[str, Any]:
    tenant_of(request)
    s = svc(request)
    info = _server_info(s)
    return {"supported_models": [{"model_name": s.model_name, "model_id": s.model_name, "arch": s.arch,
                                  "max_context_length": info["max_context_length"], "trainable": True,
                                  "sampleable": True}], **info}


async def _get_info(request: Request) -> dict[str, Any]:
    tenant = tenant_of(request)
    body = await body_of(request) if request.method == "POST" else dict(request.query_params)
    s = svc(request)
    model_id = body.get("model_id") or body.get("adapter_id")
    if not model_id or compat(request).is_base(model_id):
        return {"model_id": s.model_name, "model_data": {"model_name": s.model_name, "arch": s.arch},
                **_server_info(s)}
    compat(request).run(tenant, model_id)
    info = s.runs.get_info(tenant, model_id, s.arch)
    return {**info, "base_model": info["model_name"]}


router.add_api_route("/get_info", _get_info, methods=["GET", "POST"], summary="the served model, or an adapter")


@router.get("/list_loss_functions", summary="loss functions forward_backward accepts")
async def list_loss_functions(request: Request) -> dict[str, Any]:
    return {"available_loss_functions": list(LOSS_FUNCTIONS), "conversation_data": ["cross_entropy"]}


@router.post("/register_custom_loss", summary="refused: the server never runs client code")
async def register_custom_loss(request: Request) -> JSONResponse:
    tenant_of(request)
    raise BadRequest(
        "register_custom_loss is refused: it sends a pickled Python function, and unpickling runs arbitrary code "
        "on the server with its privileges (and other tenants' data), so this server never unpickles client code. "
        "Compute a custom loss on your side instead: the tinker SDK's TrainingClient.forward_backward_custom(data, "
        "loss_fn) runs your function on the per-token logprobs the server returns and sends back only gradients; "
        "or use a built-in loss_fn (" + ", ".join(LOSS_FUNCTIONS) + ").")

