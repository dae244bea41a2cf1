"""Ray Serve dispatch, the router's side: every backend a Serve deployment, the router the ingress.

Layout of one Serve application (``build_application``):

- one ``BackendReplica`` deployment per configured backend (``backends.ray_serve``; same config as
  in-process mode; its replicas, autoscaling, ``max_ongoing_requests`` and Ray resources from
  ``ray.deployments``);
- one ``RouterIngress`` deployment, a single replica, built with a handle to every backend
  deployment. It runs caprouter's own gRPC server (the same servicer, health and reflection as
  in-process mode) on an event loop of its own, with the same App, whose backends are
  ``RayBackend`` adapters that stream through the handles (``handle.options(stream=True)``).

Why our gRPC server rather than Serve's gRPC proxy: the wire contract stays the very same code
(a client cannot tell the modes apart, deadlines and status codes included), standard health and
reflection keep working, and the router's durable logs (feedback, onboarded backends) keep a
single writer. The cost is that the router does not scale out by replicas; it is light (one
embedding and a kNN search per request) next to generation, which does scale out.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
from typing import Any

from backends.base import Backend
from backends.ray_serve import BackendReplica, RayBackend, ServeHealth, deployment_name, deployment_names, set_threads
from router.adapters.grpc_server import GrpcServer, start_http, warn_if_exposed
from router.core.compute import Compute
from router.core.config import AppConfig, DeploymentOptions, EncoderConfig, load_config
from router.core.logs import setup_logging
from router.serving.app import App, build_encoder

log = logging.getLogger(__name__)

# Backend kinds that gate on the prompt embedding: their replicas build the router's encoder.
NEEDS_ENCODER = {"moe"}


class RouterIngress:
    """The ingress deployment: caprouter's App and gRPC server, dispatching through handles."""

    # Serve constructs deployments with an async __init__, which plain classes cannot declare.
    async def __init__(self, config: str, handles: dict[str, Any]) -> None:  # type: ignore[misc]
        cfg = AppConfig.model_validate_json(config)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(cfg, handles), name="caprouter-grpc", daemon=True)
        self._thread.start()
        await asyncio.get_running_loop().run_in_executor(None, self._started.wait)
        if self._error is not None:
            raise RuntimeError(f"caprouter ingress failed to start: {self._error}")

    def _serve(self, cfg: AppConfig, handles: dict[str, Any]) -> None:
        # Our own loop in our own thread: the gRPC server and the App never share Serve's loop.
        asyncio.set_event_loop(self._loop)
        setup_logging(cfg.log_level, "json")
        self.health = ServeHealth(cfg.ray.app_name, {n: deployment_name(n) for n in handles}, cfg.ray.status_poll_s)

        def factory(c: AppConfig, _compute: Compute, _encoder: Any) -> dict[str, Backend]:
            return {b.name: RayBackend(b, handles[b.name], c.ray, c.routing.cost_unit, self.health) for b in c.backends}

        try:
            self.app = App(cfg, backend_factory=factory)
            set_threads(self.app.compute, cfg.ray.torch_threads)
            self.server = GrpcServer(self.app, cfg.server.host, cfg.server.port)
            self.address = self.server.address
            self._loop.run_until_complete(self.server.start())
            self._loop.run_until_complete(self.server.load_and_serve())
            self.http = self._loop.run_until_complete(start_http(self.app))
            self.http_address = self.http.address if self.http else ""
            log.info("caprouter ingress serving on %s (%s)", self.address, warn_if_exposed(self.app))
            # Replace what the poller saw while the backends were still starting, before the
            # first request can be routed on it.
            self.health.poll_once()
        except BaseException as e:
            log.exception("ingress failed to start")
            self._error = e
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    def get_address(self) -> str:
        return self.address

    def get_http_address(self) -> str:
        return getattr(self, "http_address", "")

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the gRPC server thread has stopped")

    async def __del__(self) -> None:
        http = getattr(self, "http", None)
        if http is not None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(http.stop(), self._loop))
        if hasattr(self, "server"):
            fut = asyncio.run_coroutine_threadsafe(self.server.stop(1.0), self._loop)
            await asyncio.wrap_future(fut)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if hasattr(self, "health"):
            self.health.close()


def _options(opts: DeploymentOptions) -> dict[str, Any]:
    return opts.model_dump(exclude_none=True)


def build_application(cfg: AppConfig) -> Any:
    """The Serve application for ``cfg``: backend deployments and the router ingress bound to them."""
    from ray import serve

    deployment: Any = serve.deployment      # typed as a decorator; called on a class it is a Deployment
    if cfg.ray.ingress.num_replicas not in (None, 1) or cfg.ray.ingress.autoscaling_config:
        raise ValueError("the router ingress runs one replica: it is the single writer of the durable logs")
    encoder = functools.partial(_replica_encoder, cfg.encoder.model_dump())
    names = deployment_names([b.name for b in cfg.backends])
    bound = {}
    for b in cfg.backends:
        opts = cfg.ray.deployments.get(b.name, cfg.ray.default)
        dep = deployment(BackendReplica).options(name=names[b.name], **_options(opts))
        bound[b.name] = dep.bind(b.model_dump(), cfg.routing.cost_unit, str(cfg.models_dir()),
                                 encoder if b.kind in NEEDS_ENCODER else None, cfg.ray.torch_threads)
    ingress = deployment(RouterIngress).options(name="router", **_options(cfg.ray.ingress))
    return ingress.bind(cfg.model_dump_json(), bound)


def _replica_encoder(encoder: dict[str, Any], compute: Compute) -> Any:
    """The router's prompt encoder, built inside a backend replica (a module-level function, so
    that Serve can ship it to the replica by reference)."""
    return build_encoder(AppConfig(encoder=EncoderConfig.model_validate(encoder)), compute)


def app_builder(args: dict[str, Any]) -> Any:
    """For ``serve run`` / ``serve deploy``: ``import_path: router.adapters.ray:app_builder`` with
    ``args: {config: caprouter.yaml}`` (a caprouter config; its ``ray`` section sizes the
    deployments, which a Serve config file may override per deployment)."""
    return build_application(load_config(args.get("config")))


class RayServing:
    """``caprouter serve --ray``: connect to (or start) Ray, run the application, report the
    gRPC address; ``close`` deletes the application and, for a local instance, stops Ray."""

    def __init__(self, cfg: AppConfig) -> None:
        import ray
        from ray import serve

        self.cfg = cfg
        self._local = cfg.ray.address is None
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(address=cfg.ray.address, namespace=cfg.ray.namespace,
                      num_cpus=cfg.ray.num_cpus if self._local else None, include_dashboard=False,
                      log_to_driver=False,
                      runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
            try:
                ray.init(**kw)
            except Exception as e:  # a local node can time out starting on a busy machine: once more
                if not self._local:
                    raise
                log.warning("starting Ray failed (%s); retrying once", e)
                ray.shutdown()
                ray.init(**kw)
        serve.start(proxy_location="Disabled")
        self.handle = serve.run(build_application(cfg), name=cfg.ray.app_name, route_prefix=None)
        self.address = self.handle.get_address.remote().result(timeout_s=120)
        self.http_address = self.handle.get_http_address.remote().result(timeout_s=30)

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.delete(self.cfg.ray.app_name)
        finally:
            if self._local:
                serve.shutdown()
                ray.shutdown()


def replica_actors(app_name: str, backend: str) -> list[Any]:
    """The live replica actors of a backend's deployment (for operators and tests)."""
    import ray
    from ray.util import list_named_actors

    prefix = f"SERVE_REPLICA::{app_name}#{deployment_name(backend)}#"
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]


