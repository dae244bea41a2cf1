"""Session-wide fixtures: real models are loaded once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "routing"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Converted/pruned weights are cached across sessions (conversion takes ~20 s)."""
    from router.config import caprouter_home

    d = caprouter_home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def encoder():
    from encoders.minilm import MiniLMEncoder

    return MiniLMEncoder()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "llmrouter.jsonl.gz").exists():
        pytest.skip("../shared/data/routing is not present")
    return SHARED


class LiveServer:
    """The real gRPC server (real MiniLM, real SmolLM2 backends, real FAISS) on a free port, run
    by an event loop in a background thread; tests call it over a real channel."""

    def __init__(self, config) -> None:
        import asyncio
        import threading

        from router.app import build_app
        from router.grpc_server import GrpcServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = build_app(config)
        self.server = self.call(self._make(GrpcServer))
        self.address = self.server.address
        self.call(self.server.start())

    async def _make(self, cls):
        cfg = self.app.config.server
        return cls(self.app, cfg.host, cfg.port)

    def call(self, coro, timeout: float = 600):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def default_config(tmp: Path, models: Path, **overrides):
    from router.config import load_config

    return load_config(None, {"server.port": 0, "cache_dir": str(models), "datastore.state_dir": str(tmp / "state"),
                              **overrides})


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, models_dir):
    srv = LiveServer(default_config(tmp_path_factory.mktemp("live"), models_dir))
    srv.call(srv.server.load_and_serve())
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def stub(live_server):
    import grpc

    from caprouter.v1 import router_pb2_grpc

    ch = grpc.insecure_channel(live_server.address)
    yield router_pb2_grpc.RouterStub(ch)
    ch.close()
