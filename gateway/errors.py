"""Errors as values: one exception type carrying an OpenAI error envelope and its HTTP status.

Engines and handlers raise ``GatewayError`` (or a subclass); the app turns it into
``{"error": {"message", "type", "param", "code"}}`` with ``status``. Nothing else reaches the client.
"""

from __future__ import annotations

from pydantic import BaseModel


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status

    def envelope(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"


class RateLimited(GatewayError):
    """A key sent more requests than ``UNLEARN_RATE_LIMIT_RPM`` allows; the response says when to retry."""

    status = 429
    type = "rate_limit_error"


class NotInstalled(GatewayError):
    """A feature whose component is not installed in this build."""

    status = 501
    type = "not_implemented"


class UpstreamError(GatewayError):
    """The inference worker failed or could not be reached."""

    status = 502
    type = "upstream_error"


class UpstreamTimeout(UpstreamError):
    """No worker sent its first token (or next byte) in time."""

    status = 504


class Unavailable(GatewayError):
    status = 503
    type = "service_unavailable"


class ClassificationUnavailable(Unavailable):
    """A request could not be classified, so it is not served (fail closed). ``code`` says why:
    ``classifier_error``, ``classifier_timeout``, ``classifier_index_missing`` or ``targets_not_loaded``."""


class OutputWithheld(GatewayError):
    """The output guard caught the answer reproducing a forget target's facts, and that target asks for an error
    rather than the refusal. 451 (Unavailable For Legal Reasons): the content exists but may not be served; the
    client's request was valid, so no 4xx that blames it, and no 5xx that a client would retry."""

    status = 451
    type = "content_filter"
