"""The one error hierarchy of caprouter, and its one mapping table to wire status codes.

Every domain error derives from :class:`CaprouterError` and carries a :class:`ErrorCode`. Adapters
(gRPC, HTTP) translate the code with :data:`GRPC_STATUS` / :data:`HTTP_STATUS` (and
:data:`OPENAI_ERROR_TYPE` for the OpenAI-compatible body) and never inspect exception types, so a
new error needs exactly one line here. The core stays free of grpc imports: codes are names,
resolved to ``grpc.StatusCode`` members by the adapter.

=====================  ======================  ===========================================
error                  code (HTTP)             when
=====================  ======================  ===========================================
InvalidArgument        INVALID_ARGUMENT (400)  malformed request: empty prompt, bad knob...
UnknownBackend         INVALID_ARGUMENT (400)  a knob names a backend that is not configured
NotFound               NOT_FOUND (404)         unknown decision id or backend in a lookup
NoEligibleBackend      FAILED_PRECOND. (409)  constraints exclude every backend
FailedPrecondition     FAILED_PRECOND. (409)  request valid but not servable in this state
Unavailable            UNAVAILABLE (503)       not ready yet, or every backend failed
BackendError           UNAVAILABLE (503)       a backend failed while generating
DeadlineExceeded       DEADLINE_EXCEEDED (504) the caller's deadline passed
Overloaded             RESOURCE_EXHAUSTED (429) a queue is full: retry after ``retry_after_s``
RateLimited            RESOURCE_EXHAUSTED (429) a key's rate limit or spend budget is used up
Unauthenticated        UNAUTHENTICATED (401)   no API key, or an unknown or revoked one
PermissionDenied       PERMISSION_DENIED (403) the key lacks the scope the call needs
ConfigError            (not on the wire)       invalid configuration at start-up
ArtifactError          (not on the wire)       a stored artifact is missing or inconsistent
=====================  ======================  ===========================================
"""
from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INTERNAL = "INTERNAL"


class CaprouterError(Exception):
    """Base of every caprouter error. ``str(err)`` is a message that says what to fix."""

    code: ErrorCode = ErrorCode.INTERNAL


class InvalidArgument(CaprouterError):
    code = ErrorCode.INVALID_ARGUMENT


class UnknownBackend(InvalidArgument):
    """A request names a backend that is not configured."""


class NotFound(CaprouterError):
    code = ErrorCode.NOT_FOUND


class FailedPrecondition(CaprouterError):
    code = ErrorCode.FAILED_PRECONDITION


class NoEligibleBackend(FailedPrecondition):
    """The caller's constraints leave no backend; the message lists why each was excluded."""


class Unavailable(CaprouterError):
    code = ErrorCode.UNAVAILABLE


class BackendError(Unavailable):
    """A backend failed while serving a request."""

    def __init__(self, backend: str, message: str, *, tokens_streamed: int = 0) -> None:
        super().__init__(f"backend {backend!r} failed: {message}")
        self.backend = backend
        self.tokens_streamed = tokens_streamed


class DeadlineExceeded(CaprouterError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Overloaded(CaprouterError):
    """A bounded queue is full: the request is refused at once instead of waiting without bound.

    ``retry_after_s`` is the queue's expected wait, the earliest a retry is likely to be admitted;
    HTTP sends it as ``Retry-After`` and gRPC as the ``retry-after-ms`` trailer.
    """

    code = ErrorCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = max(0.0, float(retry_after_s))


class RateLimited(Overloaded):
    """A key's request rate, output-token rate or spend budget is used up until ``retry_after_s``."""


class Unauthenticated(CaprouterError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(CaprouterError):
    code = ErrorCode.PERMISSION_DENIED


class ConfigError(CaprouterError):
    """Invalid configuration; raised at start-up, never on a request."""


class ArtifactError(CaprouterError):
    """A stored artifact (weights cache, datastore snapshot) is missing or inconsistent."""


# The one mapping table: error code -> name of the grpc.StatusCode member.
GRPC_STATUS: dict[ErrorCode, str] = {
    ErrorCode.INVALID_ARGUMENT: "INVALID_ARGUMENT",
    ErrorCode.NOT_FOUND: "NOT_FOUND",
    ErrorCode.FAILED_PRECONDITION: "FAILED_PRECONDITION",
    ErrorCode.UNAVAILABLE: "UNAVAILABLE",
    ErrorCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    ErrorCode.RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    ErrorCode.UNAUTHENTICATED: "UNAUTHENTICATED",
    ErrorCode.PERMISSION_DENIED: "PERMISSION_DENIED",
    ErrorCode.INTERNAL: "INTERNAL",
}


# HTTP status of each code (the OpenAI-compatible endpoint). FAILED_PRECONDITION is 409: the
# request is valid but cannot be served as things stand (constraints exclude every backend, or
# every backend is route-only).
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.FAILED_PRECONDITION: 409,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.INTERNAL: 500,
}

# The ``error.type`` of OpenAI's error body.
OPENAI_ERROR_TYPE: dict[ErrorCode, str] = {
    ErrorCode.INVALID_ARGUMENT: "invalid_request_error",
    ErrorCode.NOT_FOUND: "invalid_request_error",
    ErrorCode.FAILED_PRECONDITION: "invalid_request_error",
    ErrorCode.UNAVAILABLE: "server_error",
    ErrorCode.DEADLINE_EXCEEDED: "timeout_error",
    ErrorCode.RESOURCE_EXHAUSTED: "rate_limit_error",
    ErrorCode.UNAUTHENTICATED: "authentication_error",
    ErrorCode.PERMISSION_DENIED: "permission_error",
    ErrorCode.INTERNAL: "server_error",
}
