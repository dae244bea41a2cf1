"""Backends on Ray Serve: the replica side and the dispatch side of one backend deployment.

- ``BackendReplica``: the Serve deployment class, one replica of one backend: the in-process
  Backend built from the same config, streaming events ("text" / "end" / "error" tuples);
- ``RayBackend``: the Backend the router dispatches to, streaming through the deployment's handle
  with a deadline on every chunk; ``ServeHealth`` reports replica health as backend status.

The router's side of Ray mode (the ingress deployment, the Serve application, ``caprouter serve
--ray``) is ``router.adapters.ray``. Only these two modules (and the CLI) import ray.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

from backends import BACKENDS, register_builtin_backends
from backends.base import Backend, Capabilities, Finished, FinishReason, GenerationRequest, Status, TextChunk
from router.core.compute import Compute, ComputeThread
from router.core.config import BackendConfig, RayConfig
from router.core.costs import CostModel
from router.core.errors import BackendError, ConfigError, Overloaded

log = logging.getLogger(__name__)


def _request_dict(req: GenerationRequest) -> dict[str, Any]:
    """What crosses the process boundary (the cancel event does not: cancellation is the stream's).
    The deadline travels as seconds left: monotonic clocks of two processes (or machines) differ."""
    emb = None if req.embedding is None else [float(x) for x in req.embedding]
    left = None if req.deadline is None else max(0.0, req.deadline - time.monotonic())
    return {"messages": [list(m) for m in req.messages], "max_tokens": req.max_tokens,
            "temperature": req.temperature, "stop": list(req.stop), "seed": req.seed,
            "ignore_eos": req.ignore_eos, "embedding": emb, "seconds_left": left, "extra": dict(req.extra),
            "raw_messages": None if req.raw_messages is None else [dict(m) for m in req.raw_messages]}


class BackendReplica:
    """One replica of one backend: the in-process Backend, built from the same config."""

    async def __init__(self, backend: dict[str, Any], cost_unit: str, models_dir: str,  # type: ignore[misc]
                       encoder_factory: Callable[[Compute], Any] | None = None, torch_threads: int | None = None) -> None:
        """encoder_factory: builds the router's prompt encoder, for kinds that gate on the prompt
        embedding (moe); called once, on the replica's compute thread."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        register_builtin_backends()
        cfg = BackendConfig.model_validate(backend)
        self.compute = ComputeThread()
        set_threads(self.compute, torch_threads)
        enc = None if encoder_factory is None else self.compute.run(encoder_factory, self.compute)
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
        caps = self.backend.capabilities()
        return {"status": st.value, "detail": detail, "pid": os.getpid(), "kind": self.backend.kind,
                "active_parameters": active() if callable(active) else None,
                "capabilities": {"context_window": caps.context_window, "max_output_tokens": caps.max_output_tokens,
                                 "tools": caps.tools, "json_mode": caps.json_mode, "params": sorted(caps.params)}}

    def check_health(self) -> None:
        if self.backend.status()[0] != Status.READY:
            raise RuntimeError(self.backend.status()[1])

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[tuple[Any, ...]]:
        """("text", str)* then ("end", reason, prompt_tokens, completion_tokens, decode_s), or
        ("error", message) (errors travel as events: exceptions would arrive wrapped by Ray)."""
        import numpy as np

        emb = request.pop("embedding", None)
        left = request.pop("seconds_left", None)
        req = GenerationRequest(messages=[tuple(m) for m in request.pop("messages")],
                                embedding=None if emb is None else np.asarray(emb, dtype=np.float32),
                                deadline=None if left is None else time.monotonic() + left, **request)
        try:
            async for ev in self.backend.generate(req):
                if isinstance(ev, TextChunk):
                    if ev.tool_calls or ev.logprobs is not None:
                        yield ("text", ev.text, [dict(c) for c in ev.tool_calls], ev.logprobs)
                    else:
                        yield ("text", ev.text)
                else:
                    yield ("end", ev.reason.value, ev.prompt_tokens, ev.completion_tokens, ev.decode_s)
        except Overloaded as e:       # the replica's queue is full: refused, nothing started
            yield ("overloaded", str(e), e.retry_after_s)
        except BackendError as e:
            yield ("error", str(e))
        finally:
            req.cancel.set()


def set_threads(compute: Compute, n: int | None) -> None:
    """torch's thread count, set on the compute thread (where every torch call runs)."""
    if n:
        import torch

        compute.run(torch.set_num_threads, n)


class RayBackend(Backend):
    """A backend whose replicas run as a Serve deployment, called through its handle."""

    def __init__(self, cfg: BackendConfig, handle: Any, ray_cfg: RayConfig, cost_unit: str, health: ServeHealth) -> None:
        self.name = cfg.name
        self.capabilities_config = cfg.capabilities
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
        self._known = Capabilities()          # the replica's, once one answers

    async def load(self) -> None:
        try:
            info = await asyncio.wait_for(self._handle.info.remote(), self._ray.first_chunk_timeout_s * 10)
            # The same cost model as in-process mode: the config's, with the replica's weights counted.
            self._cost = CostModel.from_config(self._cfg.cost, self._cost_unit,
                                               active_parameters=info["active_parameters"])
            caps = dict(info.get("capabilities") or {})
            caps["params"] = frozenset(caps.get("params") or ())
            self._known = Capabilities(**caps)
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

    def known_capabilities(self) -> Capabilities:
        return self._known

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TextChunk | Finished]:
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
                    raise BackendError(self.name, "replica stream ended without a result",
                                       tokens_streamed=streamed) from None
                except TimeoutError:
                    raise BackendError(self.name, f"no output from the replica within {timeout:g} s",
                                       tokens_streamed=streamed) from None
                except BackendError:
                    raise
                except Exception as e:   # the replica died or was unreachable (RayActorError, ...)
                    raise BackendError(self.name, f"replica failed: {type(e).__name__}: {_short(e)}",
                                       tokens_streamed=streamed) from None
                if ev[0] == "text":
                    streamed += 1
                    yield TextChunk(ev[1]) if len(ev) == 2 else TextChunk(ev[1], tool_calls=tuple(ev[2]), logprobs=ev[3])
                elif ev[0] == "end":
                    finished = True
                    yield Finished(FinishReason(ev[1]), ev[2], ev[3], ev[4])
                    return
                elif ev[0] == "overloaded":
                    finished = True
                    raise Overloaded(ev[1], retry_after_s=ev[2])
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


def deployment_name(backend: str) -> str:
    """Serve deployment names may not hold '/', ':', '@' or '+', which backend names may."""
    return "backend-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in backend)


def deployment_names(backends: list[str]) -> dict[str, str]:
    """backend -> its deployment's name; two backends whose names differ only in the characters
    Serve does not take (``a@b``, ``a:b``, ``a_b``) would share one deployment: refused."""
    out = {b: deployment_name(b) for b in backends}
    seen: dict[str, str] = {}
    for b, d in out.items():
        if d in seen:
            raise ConfigError(f"backends {seen[d]!r} and {b!r} would both be the Ray Serve deployment {d!r}: "
                              "rename one (Serve names keep letters, digits and -_. only)")
        seen[d] = b
    return out
