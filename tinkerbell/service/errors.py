"""Errors the service raises for the API layer to turn into HTTP answers.

The service knows nothing of HTTP; each error only says what kind of failure it is. `api/errors.py` maps the
kinds onto status codes (400/401/404/410/413, and 429 for overload), always with a JSON `detail` that names the offending field.
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


class Overloaded(ServiceError):
    """Transient: the server holds as much work as it is configured to queue. The only retryable kind (429 +
    Retry-After), so clients back off instead of being refused for good."""

    kind = "overloaded"

    def __init__(self, detail: str, retry_after: int = 1):
        super().__init__(detail)
        self.retry_after = retry_after


class ServerFault(Exception):
    """A failure of the server's own resources (disk full, unwritable data dir) whose message is safe and useful to
    show: reported through the future with category "server" and this message, not a generic internal error."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail
