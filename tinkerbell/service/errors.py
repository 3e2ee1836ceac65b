"""Errors the service raises for the API layer to turn into HTTP answers.

The service knows nothing of HTTP; each error only says what kind of failure it is. `api/errors.py` maps the
kinds onto status codes (400/401/404/410/413), always with a JSON `detail` that names the offending field.
"""

from __future__ import annotations


class ServiceError(Exception):
    kind = "bad_request"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class BadRequest(ServiceError):
    kind = "bad_request"


class NotFound(ServiceError):
    kind = "not_found"


class Unauthorized(ServiceError):
    kind = "unauthorized"


class Gone(ServiceError):
    """The thing existed once (or never did) and will not come back: an unknown future or a finished session."""

    kind = "gone"


class TooLarge(ServiceError):
    kind = "too_large"
