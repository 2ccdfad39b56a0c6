"""Errors that reach a client, and how each maps to an OpenAI error object and an HTTP status.

The tree::

    TrioserveError                      500 server_error (base; never raised bare)
    ├── InvalidRequest                  400 invalid_request_error (param names the field)
    │   └── ContextLengthExceeded       400 invalid_request_error, code context_length_exceeded
    ├── AuthenticationFailed            401 invalid_request_error, code invalid_api_key (as OpenAI)
    ├── ModelNotFound                   404 invalid_request_error, code model_not_found
    ├── PayloadTooLarge                 413 invalid_request_error, code payload_too_large
    ├── Overloaded                      429 rate_limit_error, Retry-After (the wait queue is full)
    ├── Unavailable                     503 service_unavailable (loading failed, draining, engine down)
    ├── DeadlineExceeded                504 timeout (the request ran past its deadline)
    └── GenerationFailed                500 server_error (a forward pass raised)
        └── OutOfMemory                 503 server_error, code out_of_memory (retrying may work)

OpenAI's own API answers 400 for invalid input, 401/404/413/429 as above and 5xx for its own faults; clients
(the official SDKs included) retry 429 and 5xx with backoff and surface the rest, so the status is part of
the contract, not decoration.
"""

from __future__ import annotations

from typing import Any, ClassVar


class TrioserveError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error object."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Extra response headers this error calls for."""
        return {}


class InvalidRequest(TrioserveError):
    status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class AuthenticationFailed(TrioserveError):
    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ModelNotFound(TrioserveError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class PayloadTooLarge(TrioserveError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class Overloaded(TrioserveError):
    status = 429
    error_type = "rate_limit_error"
    default_code = "server_overloaded"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Unavailable(TrioserveError):
    status = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class DeadlineExceeded(TrioserveError):
    status = 504
    error_type = "timeout"
    default_code = "request_timeout"

    def headers(self) -> dict[str, str]:
        # The official SDKs retry 5xx unless told not to: the same request would only time out again.
        return {"x-should-retry": "false"}


class GenerationFailed(TrioserveError):
    """A forward pass raised; only the requests in that step see it."""


class OutOfMemory(GenerationFailed):
    status = 503
    default_code = "out_of_memory"
