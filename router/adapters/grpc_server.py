"""The gRPC adapter: caprouter.v1.Router over grpc.aio, plus standard health and reflection.

Thin by design: each RPC converts the request (``proto_convert``), calls RouterService, converts
the answer back. One decorator, ``guarded``, wraps unary and streaming RPCs alike: readiness and
the exception ladder come from ``router.adapters.guard``, the status code from
``router.core.errors.GRPC_STATUS``.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import ipaddress
import logging
import math
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from caprouter.v1 import router_pb2 as pb
from caprouter.v1 import router_pb2_grpc as pb_grpc
from router.adapters import guard
from router.adapters import proto_convert as convert
from router.adapters.http_server import HttpServer
from router.core.compute import off_loop
from router.core.config import ServerConfig
from router.core.errors import GRPC_STATUS, ConfigError, InvalidArgument
from router.serving.app import App
from router.serving.keys import Caller
from router.serving.service import RouterService

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Router"].full_name  # "caprouter.v1.Router"

F = TypeVar("F", bound=Callable[..., Any])


async def _abort(context: grpc.aio.ServicerContext, e: Exception, rpc: str) -> None:
    code, message = guard.failure(e, rpc)
    wait = guard.retry_after_s(e)
    trailers = () if wait is None else (("retry-after-ms", str(math.ceil(wait * 1e3))),)
    await context.abort(getattr(grpc.StatusCode, GRPC_STATUS[code]), message, trailing_metadata=trailers)


class Undecodable:
    """A request payload that is not the method's message (random bytes, a truncated frame,
    invalid UTF-8 in a string field): handed to the handler, whose guard answers INVALID_ARGUMENT.
    With grpc's own deserializer it answered UNKNOWN and logged a traceback every time."""

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Undecodable(f"the request is not a valid {cls.DESCRIPTOR.full_name} message ({e})")
    return parse


def add_router(servicer: RouterServicer, server: grpc.aio.Server) -> None:
    """``router_pb2_grpc.add_RouterServicer_to_server`` with lenient request parsing."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["Router"].methods:
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=_lenient(getattr(pb, m.input_type.name)),
                                response_serializer=getattr(pb, m.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _admit(app: App, request: Any, context: grpc.aio.ServicerContext, scope: str | None) -> Caller:
    """The guard's checks before a handler runs: who calls, then whether the payload parsed."""
    caller = guard.authorize(app, _authorization(context), scope)
    if isinstance(request, Undecodable):
        raise InvalidArgument(request.message)
    return caller


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == "authorization":
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


def guarded(scope: str | None) -> Callable[[F], F]:
    """The guard for a servicer method, unary (a coroutine) or streaming (an async generator):
    the caller is authorized for ``scope`` (None: any valid key) and handed to the method as its
    last argument; errors become status codes; cancellation and aborts pass through."""
    def wrap(fn: F) -> F:
        rpc = fn.__name__
        if inspect.isasyncgenfunction(fn):
            @functools.wraps(fn)
            async def stream(self: RouterServicer, request: Any,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    caller = _admit(self.app, request, context, scope)
                except Exception as e:
                    await _abort(context, e, rpc)       # raises AbortError
                    return
                items = fn(self, request, context, caller)
                try:
                    async for item in items:
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as e:
                    await _abort(context, e, rpc)
                finally:
                    # Closed now, not when collected: a caller that leaves stops the work at once.
                    await items.aclose()
            return stream  # type: ignore[return-value]

        @functools.wraps(fn)
        async def unary(self: RouterServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await fn(self, request, context, _admit(self.app, request, context, scope))
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:
                await _abort(context, e, rpc)
        return unary  # type: ignore[return-value]
    return wrap


class RouterServicer(pb_grpc.RouterServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    def _svc(self) -> RouterService:
        return guard.ready(self.app)

    @guarded("route")
    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext,
                    caller: Caller) -> pb.RouteResponse:
        svc = self._svc()
        return convert.route_response(svc, await svc.route_async(convert.query(request, caller)))

    @guarded("generate")
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                       caller: Caller) -> AsyncIterator[pb.GenerateChunk]:
        svc = self._svc()
        stream = svc.generate(convert.query(request, caller),
                              convert.gen_params(request.params, context.time_remaining()))
        try:
            async for ev in stream:
                yield convert.generate_chunk(svc, ev)
        finally:
            # On deadline or disconnect grpc cancels this task; closing the stream stops the
            # backend's decode loop between two tokens.
            await stream.aclose()

    @guarded("feedback")
    async def Feedback(self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext,
                       caller: Caller) -> pb.FeedbackResponse:
        svc = self._svc()
        res = await off_loop(
            svc.feedback, request.decision_id, request.score, backend=request.backend, prompt=request.prompt,
            messages=convert.messages(request), cost=request.cost if request.HasField("cost") else None,
            caller=caller)
        return pb.FeedbackResponse(metadata=convert.metadata(svc), record_id=res.record_id, backend=res.backend)

    @guarded(None)
    async def ListBackends(self, request: pb.ListBackendsRequest, context: grpc.aio.ServicerContext,
                           caller: Caller) -> pb.ListBackendsResponse:
        svc = self._svc()
        return pb.ListBackendsResponse(metadata=convert.metadata(svc),
                                       backends=[convert.backend_info(v) for v in svc.list_backends()])

    @guarded("onboard")
    async def Onboard(self, request: pb.OnboardRequest, context: grpc.aio.ServicerContext,
                      caller: Caller) -> pb.OnboardResponse:
        svc = self._svc()
        return convert.onboard_response(svc, await off_loop(svc.onboard, convert.onboard_spec(request), caller=caller))

    @guarded("route")
    async def RouteBatch(self, request: pb.RouteBatchRequest, context: grpc.aio.ServicerContext,
                         caller: Caller) -> pb.RouteBatchResponse:
        svc = self._svc()
        res = await off_loop(svc.route_batch, convert.batch_items(request), convert.knobs(request.knobs),
                             caller=caller)
        return convert.batch_response(svc, res)


    @guarded("admin")
    async def RetractFeedback(self, request: pb.RetractFeedbackRequest, context: grpc.aio.ServicerContext,
                              caller: Caller) -> pb.RetractFeedbackResponse:
        svc = self._svc()
        n = await off_loop(svc.retract_feedback, request.key,
                           request.since_unix if request.HasField("since_unix") else None, caller=caller)
        return pb.RetractFeedbackResponse(metadata=convert.metadata(svc), retracted=n)


class GrpcServer:
    """Owns the grpc.aio server; health is NOT_SERVING until ``app.load()`` completes."""

    def __init__(self, app: App, host: str, port: int, *, tls: ServerConfig | None = None) -> None:
        """``tls``: where the TLS files come from (default: the app's server config)."""
        self.app = app
        interceptors = []
        if app.config.tracing.enabled:
            from opentelemetry.instrumentation.grpc import aio_server_interceptor

            interceptors.append(aio_server_interceptor(tracer_provider=app.tracer_provider))
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)],
                                      interceptors=interceptors)
        add_router(RouterServicer(app), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        creds = server_credentials(tls or app.config.server)
        try:
            self.port = (self.server.add_secure_port(f"{host}:{port}", creds) if creds
                         else self.server.add_insecure_port(f"{host}:{port}"))
        except RuntimeError:            # grpc raises where older versions returned 0
            self.port = 0
        if self.port == 0:
            raise ConfigError(f"cannot listen on {host}:{port} (in use, or not an address of this machine): "
                              "choose another --port or --host")
        self.address = f"{host}:{self.port}"

    async def start(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("caprouter listening on %s (loading...)", self.address)

    async def load_and_serve(self, *, progress: bool = False) -> None:
        await self.app.load(progress=progress)
        # What loading made (models, tokenizers, the datastore's records: millions of objects)
        # lives as long as the server: moved out of the garbage collector's sight, so that its
        # full collections no longer walk it. Measured under load (benchmarks/load.py, gc
        # callbacks): full collections paused the server 240-250 ms each, twice a run, and set
        # the refusals' p99 (58 and 76 ms); frozen, they take 2.3 ms and that p99 is 34 ms.
        gc.collect()
        gc.freeze()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("caprouter serving on %s", self.address)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.app.close()


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS for the gRPC port from the configured PEM files (None: plain text); with a client CA,
    callers must present a certificate it signed."""
    if not cfg.tls:
        return None
    assert cfg.tls_cert is not None and cfg.tls_key is not None
    try:
        pair = (Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())
        ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
    except OSError as e:
        raise ConfigError(f"cannot read a TLS file: {e}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(app: App) -> str:
    """Say at start-up what protects the ports; returns the line for the console."""
    cfg = app.config.server
    keys = app.keys.enabled()
    if not keys:
        log.warning("no API keys (%s does not exist): every caller may route, generate, send feedback and "
                    "onboard backends; create keys with `caprouter keys create` to require them", app.keys.path)
    if not is_loopback(cfg.host):
        if not cfg.tls:
            log.warning("serving on %s in plain text: prompts, answers and API keys cross the network readable; "
                        "set server.tls_cert and server.tls_key", cfg.host)
        if not keys:
            log.warning("serving on %s without API keys: anyone who reaches the port can steer routing with "
                        "Feedback and register backends", cfg.host)
    return (f"API keys required ({app.keys.path})" if keys else "open: no API keys") + \
        (", TLS" + (" with client certificates" if cfg.tls_client_ca else "") if cfg.tls else ", plain text")


async def serve(app: App, *, ready_file: str | None = None, progress: bool = True) -> None:
    """Run until SIGINT/SIGTERM. A failure while loading stops both servers before it propagates,
    so that the caller can report it as one line (nothing is left running on a closed loop)."""
    cfg = app.config.server
    srv = GrpcServer(app, cfg.host, cfg.port)
    await srv.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http = None
    try:
        http = await start_http(app)
        await srv.load_and_serve(progress=progress)
    except BaseException:
        if http is not None:
            await http.stop()
        await srv.stop(0)
        raise
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(srv.address)
    scheme = "https" if cfg.tls else "http"
    print(f"caprouter serving on {srv.address}" + (f", OpenAI-compatible HTTP on {scheme}://{http.address}/v1"
                                                    if http else "") + f" ({warn_if_exposed(app)})", flush=True)
    await stop.wait()
    log.info("shutting down")
    if http is not None:
        await http.stop()
    await srv.stop(cfg.grace_s)


async def start_http(app: App) -> HttpServer | None:
    """The OpenAI-compatible HTTP endpoint on ``server.http_port``, if configured."""
    if app.config.server.http_port is None:
        return None
    http = HttpServer(app, app.config.server.host, app.config.server.http_port, metrics=app.telemetry)
    await http.start()
    return http
