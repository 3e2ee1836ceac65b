"""The OpenAI face: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (SSE streaming) and vLLM's
`/v1/load_lora_adapter` / `/v1/unload_lora_adapter`, on the same API keys and tenants as the Tinker face.

Handlers authenticate, validate the body (openai_schemas.py), call the service (service/openai_*.py) and shape
its answer as OpenAI JSON. Every error under /v1 is OpenAI's `{"error": {"message", "type", "param", "code"}}`
(the Tinker face keeps `{"detail": ...}`): bad input is a 4xx naming the field, never a 5xx.

Streaming: the response headers, and for chat the role chunk, go out at once. Without logprobs or echo, chunks
carry text as the engine produces it: whenever the stream wakes it sends, per choice, one chunk with all the
text that became certain since the last one (holding back what a stop string could still cut). An idle server
wakes once per decode step, so each token goes out at once; a busy one wakes less often than the engine steps,
and a chunk then carries several tokens' text, so the API's work follows the number of flushes, not of tokens.
With logprobs or echo, the finished completion goes out one token's text per chunk. Either way the chunks
concatenate to exactly the non-streamed text. A client that disconnects, mid-stream or while a non-streamed
request waits, cancels the engine job, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Coroutine

import pydantic
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinkerbell.api.openai_schemas import (ChatCompletionRequest, CompletionRequest, LoadLoraRequest,
                                           UnloadLoraRequest)
from tinkerbell.api.schemas import format_loc, load_json
from tinkerbell.api.tinker import Services, read_body
from tinkerbell.service.errors import ServiceError
from tinkerbell.service.openai_adapters import AdapterRegistry
from tinkerbell.service.openai_completions import (Choice, Completion, CompletionService, LiveText, Submitted,
                                                   TokenLogprob)

try:  # several times faster than json for the many small SSE chunks; the stdlib is the fallback
    import orjson
except ImportError:  # pragma: no cover - orjson is in requirements.lock
    orjson = None  # type: ignore[assignment]

log = logging.getLogger("tinkerbell.openai")

_STATUS = {"bad_request": 400, "unauthorized": 401, "not_found": 404, "gone": 404, "too_large": 413,
           "overloaded": 429}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}
# While a non-streamed request waits for the engine, this often it checks whether the client is still there.
DISCONNECT_POLL_SECONDS = 0.5
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


# --------------------------------------------------------------------------------------------- errors


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message or "error", "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready (answered 499, which no one reads)."""


def _error_parts(exc: BaseException) -> tuple[int, str, str | None, str | None]:
    """(status, message, param, code) of any exception a handler raised."""
    if isinstance(exc, ClientGone):
        return 499, "client closed the request", None, "client_closed_request"
    if isinstance(exc, ServiceError):
        status = _STATUS.get(exc.kind, 400)
        param = getattr(exc, "param", None)
        code = {401: "invalid_api_key", 404: "model_not_found" if param == "model" else "not_found",
                429: "rate_limit_exceeded"}.get(status)
        return status, exc.detail, param, code
    if isinstance(exc, (RequestValidationError, pydantic.ValidationError)):
        err = exc.errors()[0]
        loc: list[Any] = []
        union = False
        for p in err.get("loc", ()):
            # Union members show up in the location as type tags ("str", "list[int]"): the field ends there.
            if isinstance(p, str) and ("[" in p or p.startswith("function-") or p in _TYPE_TAGS):
                union = True
                break
            if p != "body":
                loc.append(p)
        param = format_loc(loc, prefix="") or None
        msg = err.get("msg", "invalid")
        if union:
            msg = f"has the wrong type or shape (got {err.get('input')!r:.80})"
        return 400, f"{param or 'body'}: {msg}", param, None
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code, str(exc.detail), None, None
    log.error("unhandled error in the OpenAI face", exc_info=exc)
    return 500, f"internal server error ({type(exc).__name__}); see the server log", None, None


class OpenAIRoute(APIRoute):
    """Routes whose errors come back in OpenAI's shape, whatever raised them."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await inner(request)
            except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
                status, message, param, code = _error_parts(exc)
                headers = {"WWW-Authenticate": 'Bearer realm="tinkerbell"'} if status == 401 else None
                if status == 429:  # overload is the one transient refusal: tell clients when to come back
                    headers = {"Retry-After": str(getattr(exc, "retry_after", 1))}
                return openai_error(status, message, param, code, headers)

        return handler


router = APIRouter(prefix="/v1", route_class=OpenAIRoute)


class OpenAIServices:
    def __init__(self, s: Services):
        self.core = s
        self.adapters = AdapterRegistry(s.store, s.checkpoints, s.samplers, s.engine, s.config.data_dir,
                                        s.config.max_lora_rank, s.model_name)
        self.completions = CompletionService(s.engine, s.samplers, self.adapters, s.model_name)
        self.started = int(time.time())


def install(app: FastAPI) -> None:
    """Serve the OpenAI face on `app` (after `app.state.services` is set)."""
    app.state.openai = OpenAIServices(app.state.services)
    app.include_router(router)


def _svc(request: Request) -> tuple[OpenAIServices, str]:
    s: OpenAIServices = request.app.state.openai
    return s, s.core.auth.authenticate(request.headers)


async def _body(request: Request, model: type[pydantic.BaseModel]) -> Any:
    return model.model_validate(load_json(await read_body(request)))


# --------------------------------------------------------------------------------------------- models


def _card(model_id: str, created: float, owned_by: str, root: str, parent: str | None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(created), "owned_by": owned_by, "root": root,
            "parent": parent}


def _model_cards(s: OpenAIServices, tenant: str) -> list[dict[str, Any]]:
    base = s.core.model_name
    cards = [_card(base, s.started, "tinkerbell", base, None) | {"max_model_len": s.core.engine.max_context}]
    for row in s.adapters.list(tenant):
        cards.append(_card(row["name"], row["created"], tenant, row["path"], base))
    s.core.checkpoints.expire()
    rows, _ = s.core.store.list_checkpoints_of_tenant(tenant, 1000, 0)
    for row in rows:
        if row["kind"] == "sampler_weights":
            cards.append(_card(row["tinker_path"], row["created"], tenant, row["tinker_path"], base))
    return cards


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    s, tenant = _svc(request)
    return {"object": "list", "data": _model_cards(s, tenant)}


@router.get("/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    s, tenant = _svc(request)
    for card in _model_cards(s, tenant):
        if card["id"] == model:
            return card
    await s.completions.resolve_model(tenant, model)  # a readable checkpoint not listed (published, weights)
    return _card(model, s.started, "tinkerbell", model, s.core.model_name)


# --------------------------------------------------------------------------------------------- adapters


@router.post("/load_lora_adapter")
async def load_lora_adapter(request: Request) -> dict[str, Any]:
    s, tenant = _svc(request)
    req = await _body(request, LoadLoraRequest)
    done = await s.adapters.load(tenant, req.lora_name, req.lora_path)
    return {"object": "lora_adapter", "status": "loaded", **done,
            "message": f"Success: LoRA adapter '{done['lora_name']}' added successfully."}


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> dict[str, Any]:
    s, tenant = _svc(request)
    req = await _body(request, UnloadLoraRequest)
    await s.adapters.unload(tenant, req.lora_name)
    return {"object": "lora_adapter", "status": "unloaded", "lora_name": req.lora_name,
            "message": f"Success: LoRA adapter '{req.lora_name}' removed successfully."}


# --------------------------------------------------------------------------------------------- completions


async def _wait(request: Request, s: OpenAIServices, sub: Submitted) -> Completion:
    """The finished completion; cancels the engine jobs if the client disconnects while waiting."""
    task = asyncio.ensure_future(s.completions.results(sub))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client went away; cancelling its sampling request")
                task.cancel()
                sub.cancel()
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _completion_logprobs(lps: list[TokenLogprob], pieces: list[str], start: int) -> dict[str, Any]:
    offsets, pos = [], start
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [None if t.logprob is None else {**dict(t.top), t.token: t.logprob} for t in lps],
            "text_offset": offsets}


def _choice_logprobs(c: Choice) -> dict[str, Any] | None:
    if c.logprobs is None:
        return None
    echo = _completion_logprobs(c.echo_logprobs or [], c.echo_pieces, 0) if c.echo_logprobs else None
    out = _completion_logprobs(c.logprobs, c.pieces, len("".join(c.echo_pieces)))
    if echo:
        out = {k: echo[k] + out[k] for k in out}
    return out


def _chat_logprob(t: TokenLogprob) -> dict[str, Any]:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
            "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())} for a, b in t.top]}


def _dumps(obj: Any) -> str:
    if orjson is not None:
        return orjson.dumps(obj).decode()
    return json.dumps(obj, separators=(",", ":"))


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {_dumps(obj)}\n\n"


class _Stream:
    """SSE for one request: the opening chunks at once, then the finished completion token by token."""

    def __init__(self, request: Request, s: OpenAIServices, sub: Submitted, kind: str, model: str,
                 include_usage: bool):
        self.request, self.s, self.sub, self.kind, self.model = request, s, sub, kind, model
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        # The live text chunk, the stream's most frequent, is formatted from this prefix: only the index and
        # the text change (same JSON as chunk([piece(index, text, None, None)])).
        self._head = "data: " + _dumps({"id": self.id, "object": self.object, "created": self.created,
                                        "model": self.model})[:-1] + ',"choices":[{"index":'
        self._text_key = ',"delta":{"content":' if kind == "chat" else ',"text":'
        self._text_tail = ('},"logprobs":null,"finish_reason":null}]}\n\n' if kind == "chat"
                           else ',"logprobs":null,"finish_reason":null}]}\n\n')

    def text_chunk(self, index: int, content: str) -> str:
        return f"{self._head}{index}{self._text_key}{_dumps(content)}{self._text_tail}"

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse({"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                     "choices": choices, **extra})

    def piece(self, index: int, content: str, lp: TokenLogprob | None, finish: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            delta = {"content": content} if content or finish is None else {}
            return {"index": index, "delta": delta, "logprobs": {"content": [_chat_logprob(lp)]} if lp else None,
                    "finish_reason": finish}
        lps = _completion_logprobs([lp], [content], 0) if lp else None
        return {"index": index, "text": content, "logprobs": lps, "finish_reason": finish}

    async def events(self) -> AsyncIterator[str]:
        results: asyncio.Future[Completion] | None = None
        try:
            if self.kind == "chat":
                yield "".join(self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}])
                              for i in range(self.sub.options.n * len(self.sub.prompts)))
            sent: dict[int, str] = {}  # choice index -> text already streamed live
            results = asyncio.ensure_future(self.s.completions.results(self.sub))
            if self.sub.live is not None:
                async for chunk in self._live(results, sent):
                    yield chunk
            try:
                done = await results
            except Exception as exc:  # noqa: BLE001 - the status line is gone: report the error in the stream
                status, message, param, code = _error_parts(exc)
                yield _sse({"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                                      "param": param, "code": code}})
                yield "data: [DONE]\n\n"
                return
            # One write per choice (a logprobs stream has a chunk per token), the usage and [DONE] in the last.
            for c in done.choices[:-1]:
                yield "".join(self._choice_pieces(c, sent.get(c.index, "")))
            last = [p for c in done.choices[-1:] for p in self._choice_pieces(c, sent.get(c.index, ""))]
            if self.include_usage:
                last.append(self.chunk([], usage=_usage(done)))
            yield "".join(last) + "data: [DONE]\n\n"
        finally:
            self.sub.cancel()  # a no-op once finished; frees the KV blocks of a request the client abandoned
            if results is not None and not results.done():
                results.cancel()

    async def _live(self, results: "asyncio.Future[Completion]", sent: dict[int, str]) -> AsyncIterator[str]:
        """Text as the engine produces it: each wake-up sends, per choice, what became certain since the last."""
        feed = self.sub.live
        assert feed is not None
        results.add_done_callback(lambda _f: feed.event.set())
        n = self.sub.options.n
        texts: dict[int, LiveText] = {}
        try:
            while not results.done():
                await feed.event.wait()
                out = []
                for index, tokens in feed.take().items():
                    live = texts.get(index)
                    if live is None:
                        live = texts[index] = self.s.completions.live_text(self.sub.prompts[index // n],
                                                                            self.sub.options)
                    live.append(tokens)
                    new = live.take()
                    if new:
                        out.append(self.text_chunk(index, new))
                if out:
                    yield "".join(out)  # one write for every choice that got text
        finally:
            for index, live in texts.items():
                sent[index] = live.text[:live.sent]

    def _choice_pieces(self, c: Choice, already: str = "") -> list[str]:
        """The rest of a finished choice after the `already` streamed text, then its finish chunk."""
        out = []
        if already:
            if not c.text.startswith(already):  # the live decode and the final one disagree: should not happen
                log.warning("streamed text of choice %d is not a prefix of its final text", c.index)
            rest = c.text[len(already):] if c.text.startswith(already) else c.text
            if rest:
                out.append(self.chunk([self.piece(c.index, rest, None, None)]))
            out.append(self.chunk([self.piece(c.index, "", None, c.finish_reason)]))
            return out
        if c.echo_pieces:
            out.append(self.chunk([self.piece(c.index, "".join(c.echo_pieces), None, None)]))
        lps = c.logprobs or [None] * len(c.pieces)  # type: ignore[list-item]
        for text, lp in zip(c.pieces, lps):
            if text or lp is not None:
                out.append(self.chunk([self.piece(c.index, text, lp, None)]))
        out.append(self.chunk([self.piece(c.index, "", None, c.finish_reason)]))
        return out


def _stream_response(stream: _Stream) -> StreamingResponse:
    return StreamingResponse(stream.events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/completions", response_model=None)
async def completions(request: Request) -> Response | dict[str, Any]:
    s, tenant = _svc(request)
    req: CompletionRequest = await _body(request, CompletionRequest)
    opts = req.sampling_options()
    key = await s.completions.resolve_model(tenant, req.model)
    sub = s.completions.submit(s.completions.encode_prompts(req.prompt), opts, key, stream=req.stream)
    if req.stream:
        return _stream_response(_Stream(request, s, sub, "completion", req.model, req.include_usage()))
    done = await _wait(request, s, sub)
    return {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
            "model": req.model, "system_fingerprint": None,
            "choices": [{"index": c.index, "text": c.text, "logprobs": _choice_logprobs(c),
                         "finish_reason": c.finish_reason} for c in done.choices],
            "usage": _usage(done)}


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response | dict[str, Any]:
    s, tenant = _svc(request)
    req: ChatCompletionRequest = await _body(request, ChatCompletionRequest)
    opts = req.sampling_options()
    key = await s.completions.resolve_model(tenant, req.model)
    prompt = s.completions.render_chat(req.template_messages(), req.chat_template_kwargs)
    sub = s.completions.submit([prompt], opts, key, stream=req.stream)
    if req.stream:
        return _stream_response(_Stream(request, s, sub, "chat", req.model, req.include_usage()))
    done = await _wait(request, s, sub)
    choices = []
    for c in done.choices:
        lps = {"content": [_chat_logprob(t) for t in c.logprobs]} if c.logprobs is not None else None
        choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": lps, "finish_reason": c.finish_reason})
    return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "system_fingerprint": None, "choices": choices, "usage": _usage(done)}


# --------------------------------------------------------------------------------------------- the rest of /v1

_ROUTES = {"/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST",
           "/v1/load_lora_adapter": "POST", "/v1/unload_lora_adapter": "POST"}


@router.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unknown(rest: str, request: Request) -> JSONResponse:
    path = "/v1/" + rest
    if path in _ROUTES:
        return openai_error(405, f"{request.method} is not allowed on {path}; use {_ROUTES[path]}",
                            code="method_not_allowed")
    return openai_error(404, f"{request.method} {path} is not an endpoint of this server (OpenAI face: "
                             f"{', '.join(sorted(_ROUTES))})", code="unknown_url")
