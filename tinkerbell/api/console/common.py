"""What every console JSON route shares: the services, the caller's tenant, and the CSRF guard."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from tinkerbell.service.errors import BadRequest

if TYPE_CHECKING:
    from tinkerbell.api.tinker import Services

# Any non-CORS-safelisted header forces a preflight on cross-origin requests; the server never answers one with
# Access-Control-Allow-*, so only same-origin JavaScript can send a request carrying it.
CSRF_HEADER = "x-tinkerbell-console"


def services(request: Request) -> "Services":
    return request.app.state.services


def tenant(request: Request) -> str:
    """The caller's tenant, by the same Authenticator as the API (401 without a valid key, unless --no-auth)."""
    return services(request).auth.authenticate(request.headers)


def tenant_for_change(request: Request) -> str:
    """`tenant`, for routes that change state: also requires the console's own header (see CSRF_HEADER)."""
    if request.headers.get(CSRF_HEADER) != "1":
        raise BadRequest(f"header {CSRF_HEADER}: 1 is required on console actions (it proves the request came "
                         "from the console's own page)")
    return tenant(request)
