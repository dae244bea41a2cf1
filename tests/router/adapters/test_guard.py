"""The one guard of the adapters, on unary and streaming handlers alike (the real servers run it in
test_grpc_integration.py and test_http.py; here the cases that are hard to provoke there)."""
from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import grpc
import pytest

from router.adapters import guard
from router.adapters.grpc_server import guarded
from router.core.config import AppConfig
from router.core.errors import ErrorCode, NoEligibleBackend, Overloaded, Unavailable
from router.serving.app import App
from router.serving.keys import KeyFile


class Context:
    """What the guard uses of grpc.aio.ServicerContext: ``abort`` records and raises, as grpc's does."""

    def __init__(self, metadata: tuple = ()) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.metadata = metadata

    def invocation_metadata(self) -> tuple:
        return self.metadata

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple = ()) -> None:
        self.aborted = (code, details)
        self.trailers = tuple(trailing_metadata)
        raise grpc.aio.AbortError()


class Servicer:
    def __init__(self, keys: KeyFile | None = None) -> None:
        self.closed = False
        self.app = SimpleNamespace(keys=keys or KeyFile("/nonexistent/keys.json"))   # what the guard reads

    @guarded("route")
    async def Unary(self, request, context, caller):
        raise request

    @guarded("generate")
    async def Stream(self, request, context, caller):
        try:
            yield 1
            yield 2
            if request is not None:
                raise request
            yield 3
        finally:
            self.closed = True


def _unary(err: BaseException) -> Context:
    ctx = Context()

    async def go():
        with pytest.raises(grpc.aio.AbortError):
            await Servicer().Unary(err, ctx)
    asyncio.run(go())
    return ctx


def test_unary_errors_become_their_status_and_anything_else_is_internal(caplog):
    assert _unary(NoEligibleBackend("nothing fits")).aborted == (grpc.StatusCode.FAILED_PRECONDITION, "nothing fits")
    with caplog.at_level(logging.ERROR):
        code, details = _unary(KeyError("boom")).aborted
    assert code == grpc.StatusCode.INTERNAL and "KeyError" in details and "Unary failed" in caplog.text


def test_overload_is_resource_exhausted_with_a_retry_hint():
    ctx = _unary(Overloaded("queue full", retry_after_s=0.2501))
    assert ctx.aborted == (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    assert ctx.trailers == (("retry-after-ms", "251"),)
    assert _unary(NoEligibleBackend("x")).trailers == ()


def test_cancellation_passes_through_untouched():
    ctx = Context()

    async def go():
        with pytest.raises(asyncio.CancelledError):
            await Servicer().Unary(asyncio.CancelledError(), ctx)
    asyncio.run(go())
    assert ctx.aborted is None


def test_a_stream_keeps_what_it_sent_then_ends_with_the_status():
    ctx, svc = Context(), Servicer()

    async def go():
        got = []
        with pytest.raises(grpc.aio.AbortError):
            async for x in svc.Stream(Unavailable("backend went away"), ctx):
                got.append(x)
        return got
    assert asyncio.run(go()) == [1, 2]
    assert ctx.aborted == (grpc.StatusCode.UNAVAILABLE, "backend went away")


def test_a_stream_the_caller_leaves_is_closed_at_once():
    svc = Servicer()

    async def go():
        stream = svc.Stream(None, Context())
        assert await stream.__anext__() == 1
        await stream.aclose()
        # Now, not when the loop collects it at the end: the handler's work stops with the caller.
        assert svc.closed
    asyncio.run(go())


def test_readiness_says_what_is_loading_and_failure_maps_codes():
    app = App(AppConfig())
    app.loading_detail = "loading backend smollm2"
    with pytest.raises(Unavailable, match="starting \\(loading backend smollm2\\)"):
        guard.ready(app)
    app.compute.shutdown()
    assert guard.failure(NoEligibleBackend("x"), "Route") == (ErrorCode.FAILED_PRECONDITION, "x")
    assert guard.failure(ValueError("y"), "Route") == (ErrorCode.INTERNAL, "internal error: ValueError: y")


def test_bearer_tokens_are_read_from_the_authorization_header():
    assert guard.bearer("Bearer crk_x") == "crk_x" and guard.bearer("bearer  crk_x ") == "crk_x"
    assert guard.bearer("Basic abc") is None and guard.bearer("") is None and guard.bearer(None) is None
    assert guard.bearer("Bearer") is None


def test_with_a_key_file_the_guard_refuses_before_the_handler_runs(tmp_path):
    keys = KeyFile(tmp_path / "keys.json")
    _, route_key = keys.create("app", scopes=("route",))
    _, gen_key = keys.create("gen", scopes=("generate",))
    svc = Servicer(keys)

    def unary(metadata):
        ctx = Context(metadata)

        async def go():
            with pytest.raises(grpc.aio.AbortError):
                await svc.Unary(NoEligibleBackend("reached the handler"), ctx)
        asyncio.run(go())
        return ctx.aborted
    assert unary(())[0] == grpc.StatusCode.UNAUTHENTICATED
    assert unary((("authorization", "Bearer crk_000000000000_" + "x" * 43),))[0] == grpc.StatusCode.UNAUTHENTICATED
    code, details = unary((("authorization", f"Bearer {gen_key}"),))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'route' scope" in details and gen_key not in details
    assert unary((("authorization", f"Bearer {route_key}"),)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                   "reached the handler")
    # The stream's guard too: refused before its first item.
    ctx = Context((("authorization", f"Bearer {route_key}"),))

    async def stream():
        got = []
        with pytest.raises(grpc.aio.AbortError):
            async for x in svc.Stream(None, ctx):
                got.append(x)
        return got
    assert asyncio.run(stream()) == [] and ctx.aborted[0] == grpc.StatusCode.PERMISSION_DENIED


def test_start_up_says_what_protects_the_ports(tmp_path, caplog):
    from router.adapters.grpc_server import is_loopback, warn_if_exposed

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("router.internal")
    keys = str(tmp_path / "keys.json")
    app = App(AppConfig.model_validate({"auth": {"keys_file": keys}}))
    with caplog.at_level(logging.WARNING):
        assert warn_if_exposed(app) == "open: no API keys, plain text"
    assert "no API keys" in caplog.text and "plain text" not in caplog.text      # loopback: plain text is fine
    app.compute.shutdown()
    caplog.clear()
    app = App(AppConfig.model_validate({"server": {"host": "0.0.0.0"}, "auth": {"keys_file": keys}}))
    with caplog.at_level(logging.WARNING):
        warn_if_exposed(app)
    assert "in plain text" in caplog.text and "without API keys" in caplog.text
    app.compute.shutdown()
    caplog.clear()
    KeyFile(keys).create("app")
    app = App(AppConfig.model_validate({"server": {"host": "0.0.0.0", "tls_cert": "c.pem", "tls_key": "k.pem"},
                                        "auth": {"keys_file": keys}}))
    with caplog.at_level(logging.WARNING):
        assert warn_if_exposed(app) == f"API keys required ({keys}), TLS"
    assert not caplog.text
    app.compute.shutdown()
