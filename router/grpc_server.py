"""The gRPC adapter: caprouter.v1.Router over grpc.aio, plus standard health and reflection.

Thin by design: each RPC converts the request (router.convert), calls RouterService, converts
the answer back, and maps CaprouterError to a status code through router.errors.GRPC_STATUS.
Any other exception becomes INTERNAL with a logged traceback; no request can take the server
down or make it unhealthy.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, AsyncIterator, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from caprouter.v1 import router_pb2 as pb
from caprouter.v1 import router_pb2_grpc as pb_grpc
from router import convert
from router.app import App
from router.compute import off_loop
from router.errors import GRPC_STATUS, CaprouterError, Unavailable

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Router"].full_name  # "caprouter.v1.Router"


def _status(err: CaprouterError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, GRPC_STATUS[err.code])


def _guard_unary(fn: Callable) -> Callable:
    @functools.wraps(fn)
    async def wrapper(self: "RouterServicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except CaprouterError as e:
            await context.abort(_status(e), str(e))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:  # never crash the server on a request
            log.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
    return wrapper


class RouterServicer(pb_grpc.RouterServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    def _svc(self):
        if not self.app.ready:
            raise Unavailable(f"caprouter is starting ({self.app.loading_detail}); retry shortly")
        return self.app.service

    @_guard_unary
    async def Route(self, request: pb.RouteRequest, context: grpc.aio.ServicerContext) -> pb.RouteResponse:
        svc = self._svc()
        return convert.route_response(svc, await off_loop(svc.route, convert.query(request)))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        try:
            svc = self._svc()
            stream = svc.generate(convert.query(request), convert.gen_params(request.params))
            try:
                async for ev in stream:
                    yield convert.generate_chunk(svc, ev)
            finally:
                # On deadline or disconnect grpc cancels this task; closing the stream stops the
                # backend's decode loop between two tokens.
                await stream.aclose()
        except CaprouterError as e:
            await context.abort(_status(e), str(e))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            log.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    @_guard_unary
    async def Feedback(self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext) -> pb.FeedbackResponse:
        svc = self._svc()
        res = await off_loop(
            svc.feedback, request.decision_id, request.score, backend=request.backend, prompt=request.prompt,
            messages=convert.messages(request), cost=request.cost if request.HasField("cost") else None)
        return pb.FeedbackResponse(metadata=convert.metadata(svc), record_id=res.record_id, backend=res.backend)

    @_guard_unary
    async def ListBackends(self, request: pb.ListBackendsRequest, context: grpc.aio.ServicerContext) -> pb.ListBackendsResponse:
        svc = self._svc()
        return pb.ListBackendsResponse(metadata=convert.metadata(svc),
                                       backends=[convert.backend_info(v) for v in svc.list_backends()])

    @_guard_unary
    async def Onboard(self, request: pb.OnboardRequest, context: grpc.aio.ServicerContext) -> pb.OnboardResponse:
        svc = self._svc()
        return convert.onboard_response(svc, await off_loop(svc.onboard, convert.onboard_spec(request)))

    @_guard_unary
    async def RouteBatch(self, request: pb.RouteBatchRequest, context: grpc.aio.ServicerContext) -> pb.RouteBatchResponse:
        svc = self._svc()
        res = await off_loop(svc.route_batch, convert.batch_items(request), convert.knobs(request.knobs))
        return convert.batch_response(svc, res)


class GrpcServer:
    """Owns the grpc.aio server; health is NOT_SERVING until ``app.load()`` completes."""

    def __init__(self, app: App, host: str, port: int) -> None:
        self.app = app
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20)])
        pb_grpc.add_RouterServicer_to_server(RouterServicer(app), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")
        self.address = f"{host}:{self.port}"

    async def start(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("caprouter listening on %s (loading...)", self.address)

    async def load_and_serve(self, *, progress: bool = False) -> None:
        await self.app.load(progress=progress)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("caprouter serving on %s", self.address)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.app.close()


async def serve(app: App, *, ready_file: str | None = None, progress: bool = True) -> None:
    """Run until SIGINT/SIGTERM."""
    import signal

    cfg = app.config.server
    srv = GrpcServer(app, cfg.host, cfg.port)
    await srv.start()
    http = await start_http(app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await srv.load_and_serve(progress=progress)
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(srv.address)
    print(f"caprouter serving on {srv.address}" + (f", OpenAI-compatible HTTP on http://{http.address}/v1" if http else ""),
          flush=True)
    await stop.wait()
    log.info("shutting down")
    if http is not None:
        await http.stop()
    await srv.stop(cfg.grace_s)


async def start_http(app: App):
    """The OpenAI-compatible HTTP endpoint on ``server.http_port``, if configured."""
    if app.config.server.http_port is None:
        return None
    from router.http_server import HttpServer

    http = HttpServer(app, app.config.server.host, app.config.server.http_port, metrics=app.telemetry)
    await http.start()
    return http
