"""Ray Serve dispatch: every backend a Serve deployment, the router the ingress deployment.

Layout of one Serve application (``build_application``):

- one ``BackendReplica`` deployment per configured backend (same config as in-process mode; its
  replicas, autoscaling, ``max_ongoing_requests`` and Ray resources from ``ray.deployments``);
- one ``RouterIngress`` deployment, a single replica, built with a handle to every backend
  deployment. It runs caprouter's own gRPC server (the same servicer, health and reflection as
  in-process mode) on an event loop of its own, with the same App, whose backends are
  ``RayBackend`` adapters that stream through the handles (``handle.options(stream=True)``).

Why our gRPC server rather than Serve's gRPC proxy: the wire contract stays the very same code
(a client cannot tell the modes apart, deadlines and status codes included), standard health and
reflection keep working, and the router's durable logs (feedback, onboarded backends) keep a
single writer. The cost is that the router does not scale out by replicas; it is light (one
embedding and a kNN search per request) next to generation, which does scale out.

Only this module (and the CLI that calls it) imports ray; the core stays pure.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, AsyncIterator

from backends.base import Backend, Finished, FinishReason, GenerationRequest, Status, TextChunk
from router.config import AppConfig, BackendConfig, DeploymentOptions
from router.costs import CostModel
from router.errors import BackendError

log = logging.getLogger(__name__)


def _request_dict(req: GenerationRequest) -> dict[str, Any]:
    """What crosses the process boundary (the cancel event does not: cancellation is the stream's)."""
    emb = None if req.embedding is None else [float(x) for x in req.embedding]
    return {"messages": [list(m) for m in req.messages], "max_tokens": req.max_tokens,
            "temperature": req.temperature, "stop": list(req.stop), "seed": req.seed,
            "ignore_eos": req.ignore_eos, "embedding": emb}


class BackendReplica:
    """One replica of one backend: the in-process Backend, built from the same config."""

    async def __init__(self, backend: dict, cost_unit: str, models_dir: str, encoder: dict | None = None,
                       torch_threads: int | None = None) -> None:
        from pathlib import Path

        from backends import BACKENDS, register_builtin_backends
        from router.compute import ComputeThread
        from router.config import EncoderConfig

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        register_builtin_backends()
        cfg = BackendConfig.model_validate(backend)
        self.compute = ComputeThread()
        _set_threads(self.compute, torch_threads)
        enc = None
        if encoder is not None:   # kinds that gate on the prompt embedding build theirs at load
            from router.app import build_encoder

            enc = self.compute.run(build_encoder, AppConfig(encoder=EncoderConfig.model_validate(encoder)), self.compute)
        self.backend: Backend = BACKENDS.get(cfg.kind)(cfg, cost_unit=cost_unit, models_dir=Path(models_dir),
                                                      compute=self.compute, encoder=enc)
        await self.backend.load()
        st, detail = self.backend.status()
        if st != Status.READY:
            # A replica that cannot serve must not count as running: Serve retries it.
            raise RuntimeError(f"backend {cfg.name} failed to load: {detail}")

    def info(self) -> dict[str, Any]:
        st, detail = self.backend.status()
        active = getattr(self.backend, "active_parameters", None)
        return {"status": st.value, "detail": detail, "pid": os.getpid(), "kind": self.backend.kind,
                "active_parameters": active() if callable(active) else None}

    def check_health(self) -> None:
        if self.backend.status()[0] != Status.READY:
            raise RuntimeError(self.backend.status()[1])

    async def generate(self, request: dict) -> AsyncIterator[tuple]:
        """("text", str)* then ("end", reason, prompt_tokens, completion_tokens, decode_s), or
        ("error", message) (errors travel as events: exceptions would arrive wrapped by Ray)."""
        import numpy as np

        emb = request.pop("embedding", None)
        req = GenerationRequest(messages=[tuple(m) for m in request.pop("messages")],
                                embedding=None if emb is None else np.asarray(emb, dtype=np.float32), **request)
        try:
            async for ev in self.backend.generate(req):
                if isinstance(ev, TextChunk):
                    yield ("text", ev.text)
                else:
                    yield ("end", ev.reason.value, ev.prompt_tokens, ev.completion_tokens, ev.decode_s)
        except BackendError as e:
            yield ("error", str(e))
        finally:
            req.cancel.set()


def _set_threads(compute: Any, n: int | None) -> None:
    """torch's thread count, set on the compute thread (where every torch call runs)."""
    if n:
        import torch

        compute.run(torch.set_num_threads, n)


class RayBackend(Backend):
    """A backend whose replicas run as a Serve deployment, called through its handle."""

    def __init__(self, cfg: BackendConfig, handle: Any, ray_cfg: Any, cost_unit: str, health: "ServeHealth") -> None:
        self.name = cfg.name
        self.kind = cfg.kind
        self.description = cfg.description
        self._cfg = cfg
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._ray = ray_cfg
        self._cost_unit = cost_unit
        self._cost = CostModel.from_config(cfg.cost, cost_unit)
        self._health = health
        self._loaded = (Status.LOADING, "waiting for a replica")

    async def load(self) -> None:
        try:
            info = await asyncio.wait_for(self._handle.info.remote(), self._ray.first_chunk_timeout_s * 10)
            # The same cost model as in-process mode: the config's, with the replica's weights counted.
            self._cost = CostModel.from_config(self._cfg.cost, self._cost_unit,
                                               active_parameters=info["active_parameters"])
            self._loaded = (Status.READY, f"Ray Serve deployment; replica: {info['detail']}")
        except Exception as e:  # a deployment that never came up is reported, not fatal
            log.exception("backend %s: no replica answered", self.name)
            self._loaded = (Status.UNAVAILABLE, f"no replica answered: {type(e).__name__}: {e}")

    def status(self) -> tuple[Status, str]:
        if self._loaded[0] != Status.READY:
            return self._loaded
        return self._health.status(self.name) or self._loaded

    def cost_model(self) -> CostModel:
        return self._cost

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TextChunk | Finished]:
        gen = self._stream.generate.remote(_request_dict(request))
        it = gen.__aiter__()
        streamed = 0
        finished = False
        try:
            while True:
                timeout = self._ray.chunk_timeout_s if streamed else self._ray.first_chunk_timeout_s
                try:
                    ev = await asyncio.wait_for(it.__anext__(), timeout)
                except StopAsyncIteration:
                    raise BackendError(self.name, "replica stream ended without a result", tokens_streamed=streamed)
                except asyncio.TimeoutError:
                    raise BackendError(self.name, f"no output from the replica within {timeout:g} s",
                                       tokens_streamed=streamed) from None
                except BackendError:
                    raise
                except Exception as e:   # the replica died or was unreachable (RayActorError, ...)
                    raise BackendError(self.name, f"replica failed: {type(e).__name__}: {_short(e)}",
                                       tokens_streamed=streamed) from None
                if ev[0] == "text":
                    streamed += 1
                    yield TextChunk(ev[1])
                elif ev[0] == "end":
                    finished = True
                    yield Finished(FinishReason(ev[1]), ev[2], ev[3], ev[4])
                    return
                else:
                    raise BackendError(self.name, ev[1], tokens_streamed=streamed)
        finally:
            # Only a stream the caller abandons is cancelled: cancelling a finished one costs a
            # round trip to the replica on the request's critical path.
            if not finished:
                gen.cancel()


def _short(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else ""


class ServeHealth:
    """Backend status from Serve: a thread polls ``serve.status()`` every ``poll_s``; a backend
    whose deployment has no running replica (or is unhealthy) is UNAVAILABLE until it recovers."""

    def __init__(self, app_name: str, deployments: dict[str, str], poll_s: float) -> None:
        self._app = app_name
        self._deployments = deployments   # backend name -> deployment name
        self._poll = poll_s
        self._state: dict[str, tuple[Status, str] | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-health", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            self.poll_once()

    def poll_once(self) -> None:
        """Read every backend deployment's replica states from Serve once. Polls are serialized, so
        a snapshot taken earlier never overwrites a later one."""
        from ray import serve

        with self._lock:
            self._poll_locked(serve)

    def _poll_locked(self, serve: Any) -> None:
        try:
            app = serve.status().applications.get(self._app)
            if app is None:
                return
            for backend, dep in self._deployments.items():
                d = app.deployments.get(dep)
                if d is None:
                    continue
                running = d.replica_states.get("RUNNING", 0)
                if d.status.value == "HEALTHY" and running:
                    self._state[backend] = None
                elif running:
                    self._state[backend] = (Status.READY, f"deployment {d.status.value}, {running} replica(s) running")
                else:
                    states = ", ".join(f"{k.lower()} {v}" for k, v in d.replica_states.items()) or "none"
                    self._state[backend] = (Status.UNAVAILABLE, f"no running replica ({states}); {d.message}".strip())
        except Exception:  # the controller may be busy or restarting; keep the last state
            log.debug("serve.status() failed", exc_info=True)

    def status(self, backend: str) -> tuple[Status, str] | None:
        return self._state.get(backend)

    def close(self) -> None:
        self._stop.set()


class RouterIngress:
    """The ingress deployment: caprouter's App and gRPC server, dispatching through handles."""

    async def __init__(self, config: str, handles: dict[str, Any]) -> None:
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
        from router.app import App
        from router.grpc_server import GrpcServer, start_http
        from router.logs import setup_logging

        asyncio.set_event_loop(self._loop)
        setup_logging(cfg.log_level, "json")
        self.health = ServeHealth(cfg.ray.app_name, {n: deployment_name(n) for n in handles}, cfg.ray.status_poll_s)

        def factory(c: AppConfig, _compute: Any, _encoder: Any) -> dict:
            return {b.name: RayBackend(b, handles[b.name], c.ray, c.routing.cost_unit, self.health) for b in c.backends}

        try:
            self.app = App(cfg, backend_factory=factory)
            _set_threads(self.app.compute, cfg.ray.torch_threads)
            self.server = GrpcServer(self.app, cfg.server.host, cfg.server.port)
            self.address = self.server.address
            self._loop.run_until_complete(self.server.start())
            self._loop.run_until_complete(self.server.load_and_serve())
            self.http = self._loop.run_until_complete(start_http(self.app))
            self.http_address = self.http.address if self.http else ""
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
        if getattr(self, "http", None) is not None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.http.stop(), self._loop))
        if hasattr(self, "server"):
            fut = asyncio.run_coroutine_threadsafe(self.server.stop(1.0), self._loop)
            await asyncio.wrap_future(fut)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if hasattr(self, "health"):
            self.health.close()


def deployment_name(backend: str) -> str:
    """Serve deployment names may not hold '/' or ':', which backend names may."""
    return "backend-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in backend)


def _options(opts: DeploymentOptions) -> dict[str, Any]:
    return opts.model_dump(exclude_none=True)


def build_application(cfg: AppConfig) -> Any:
    """The Serve application for ``cfg``: backend deployments and the router ingress bound to them."""
    from ray import serve

    if cfg.ray.ingress.num_replicas not in (None, 1) or cfg.ray.ingress.autoscaling_config:
        raise ValueError("the router ingress runs one replica: it is the single writer of the durable logs")
    needs_encoder = {"moe"}
    bound = {}
    for b in cfg.backends:
        opts = cfg.ray.deployments.get(b.name, cfg.ray.default)
        dep = serve.deployment(BackendReplica).options(name=deployment_name(b.name), **_options(opts))
        bound[b.name] = dep.bind(b.model_dump(), cfg.routing.cost_unit, str(cfg.models_dir()),
                                 cfg.encoder.model_dump() if b.kind in needs_encoder else None, cfg.ray.torch_threads)
    ingress = serve.deployment(RouterIngress).options(name="router", **_options(cfg.ray.ingress))
    return ingress.bind(cfg.model_dump_json(), bound)


def app_builder(args: dict[str, Any]) -> Any:
    """For ``serve run`` / ``serve deploy``: ``import_path: backends.ray_serve:app_builder`` with
    ``args: {config: caprouter.yaml}`` (a caprouter config; its ``ray`` section sizes the
    deployments, which a Serve config file may override per deployment)."""
    from router.config import load_config

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
            kw = dict(address=cfg.ray.address, namespace=cfg.ray.namespace,
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


