"""The one guard of the adapters: readiness and the exception ladder, shared by gRPC (unary and
streaming) and HTTP.

Every adapter handler first names its caller with ``authorize`` (the API key in the request and
the scope the call needs; an open server lets everyone in), then runs its body through ``ready``
(the service, or Unavailable while it loads) and turns whatever escapes into a wire error with
``failure``: a CaprouterError keeps its code
(mapped by ``router.core.errors``' tables), anything else becomes INTERNAL with a logged
traceback. Cancellation and the framework's own control flow pass through untouched; no request
can take the server down or make it unhealthy.
"""
from __future__ import annotations

import logging

from router.core.errors import CaprouterError, ErrorCode, Overloaded, Unavailable
from router.serving.app import App
from router.serving.keys import OPEN, Caller, require
from router.serving.service import RouterService

log = logging.getLogger(__name__)


def bearer(header: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header (gRPC: ``authorization`` metadata)."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def authorize(app: App, authorization: str | None, scope: str | None) -> Caller:
    """Who calls, checked before anything else: Unauthenticated without a valid key,
    PermissionDenied when its key lacks ``scope`` (None: any valid key will do). On a server
    without a key file everyone may do everything."""
    if not app.keys.enabled():
        return OPEN
    caller = app.keys.authenticate(bearer(authorization))
    if scope is not None:
        require(caller, scope)
    return caller


def ready(app: App) -> RouterService:
    """The service, once loaded; Unavailable (retryable) with what is loading until then."""
    if app.service is None:
        raise Unavailable(f"caprouter is starting ({app.loading_detail}); retry shortly")
    return app.service


def failure(e: Exception, where: str) -> tuple[ErrorCode, str]:
    """The code and message an exception goes on the wire with; unexpected ones are logged with
    their traceback (call from an ``except`` block)."""
    if isinstance(e, CaprouterError):
        return e.code, str(e)
    log.exception("%s failed", where)
    return ErrorCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"


def retry_after_s(e: Exception) -> float | None:
    """Seconds a refused caller should wait before retrying (overload only)."""
    return e.retry_after_s if isinstance(e, Overloaded) else None
