"""Every error is a JSON `{"detail": "..."}` with an explicit Content-Length.

Status-code discipline (tinker_api.md 1.6/1.7/8.8): the SDK retries 408/409/429/5xx for minutes and pauses an
hour on 402, and treats a 4xx without a body as a dropped connection. So permanent errors are 400/401/404/410/
413/422 with a message that names the field; only truly unexpected failures are 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinkerbell.api.schemas import format_errors
from tinkerbell.service.errors import Overloaded, ServiceError

log = logging.getLogger("tinkerbell.api")

STATUS = {"bad_request": 400, "unauthorized": 401, "not_found": 404, "gone": 410, "too_large": 413, "overloaded": 429}


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # JSONResponse renders the body up front and sets Content-Length: never chunked, never empty.
    return JSONResponse({"detail": detail or "error"}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        if isinstance(exc, Overloaded):  # the one transient kind: let the SDK back off and retry
            return error_response(429, exc.detail, {"Retry-After": str(exc.retry_after)})
        headers = {"x-should-retry": "false"}
        if exc.kind == "unauthorized":
            headers["WWW-Authenticate"] = 'Bearer realm="tinkerbell"'
        return error_response(STATUS.get(exc.kind, 400), exc.detail, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, format_errors(list(exc.errors()), prefix=""), {"x-should-retry": "false"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"{request.method} {request.url.path} is not an endpoint of this server"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, detail, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__}); see the server log")
