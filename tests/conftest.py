"""Session-wide fixtures (real models are loaded once per test session) and the fast loop.

``pytest --fast`` (``./scripts/test.sh --fast``) runs the tests that need no model and no server:
it leaves out every test marked ``slow``, and makes the markers honest: in a fast run, loading a
real model or starting a server refuses with a message that names the marker.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "routing"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true",
                     help="only the tests that need no model and no server (leaves out @pytest.mark.slow)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--fast"):
        return
    slow = [i for i in items if i.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if not i.get_closest_marker("slow")]


# What a test must be marked slow for: each entry point of a real model, a server or a process.
_HEAVY = [
    ("encoders.minilm", "MiniLMEncoder", "__init__", "loads the MiniLM encoder"),
    ("backends.weights", None, "resolve_weights", "resolves (and converts) real LLM weights"),
    ("backends.transformers_backend", "TransformersBackend", "_load_sync", "loads a real LLM"),
    ("router.adapters.grpc_server", "GrpcServer", "__init__", "starts the gRPC server"),
    ("router.adapters.http_server", "HttpServer", "start", "starts the HTTP server"),
    ("router.adapters.ray", "RayServing", "__init__", "starts Ray Serve"),
    ("tests.pg", "PgServer", "__init__", "starts a PostgreSQL server"),
]


@pytest.fixture(autouse=True, scope="session")
def _fast_loop_guard(request: pytest.FixtureRequest) -> Any:
    """In a fast run, the entry points of real models and servers refuse to run."""
    if not request.config.getoption("--fast"):
        yield
        return
    import importlib

    mp = pytest.MonkeyPatch()

    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"this test {what}: mark it @pytest.mark.slow (the fast loop runs only tests "
                               "that need no model and no server)")
        return refused

    for module, cls, attr, what in _HEAVY:
        owner = importlib.import_module(module)
        if cls is not None:
            owner = getattr(owner, cls)
        mp.setattr(owner, attr, refuse(what))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Converted/pruned weights are cached across sessions (conversion takes ~20 s)."""
    from router.core.config import caprouter_home

    d = caprouter_home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def encoder():
    from encoders.minilm import MiniLMEncoder

    return MiniLMEncoder()


@pytest.fixture(scope="session", params=["words", pytest.param("minilm", marks=pytest.mark.slow)])
def any_encoder(request):
    """For tests of the layers around the encoder: the bag-of-words fake in the fast loop, MiniLM
    (the same test again) in the full suite."""
    if request.param == "words":
        from tests.fakes import WordEncoder

        return WordEncoder()
    return request.getfixturevalue("encoder")


@pytest.fixture
def tiny():
    """A small random Llama: fast, and enough to check the algebra of slicing, masks and experts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def pg():
    """A throwaway PostgreSQL server for the session (tests/pg.py); ``pg.database()`` gives each
    test an empty database of its own."""
    from tests.pg import PgServer

    srv = PgServer()
    yield srv
    srv.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def db_url(request, tmp_path) -> str:
    """A system of record for one test: SQLite in its folder, then an empty PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'caprouter.db'}"
    return request.getfixturevalue("pg").database()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "llmrouter.jsonl.gz").exists():
        pytest.skip("../shared/data/routing is not present")
    return SHARED


class LiveServer:
    """The real gRPC server (real MiniLM, real SmolLM2 backends, real FAISS) on a free port, run
    by an event loop in a background thread; tests call it over a real channel."""

    def __init__(self, config, tracer_provider=None) -> None:
        import asyncio
        import threading

        from router.adapters.grpc_server import GrpcServer
        from router.serving.app import build_app

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = build_app(config, tracer_provider=tracer_provider)
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
    from router.core.config import load_config

    # The key file is the test's own (absent: an open server), never the developer's in $CAPROUTER_HOME.
    return load_config(None, {"server.port": 0, "cache_dir": str(models), "datastore.state_dir": str(tmp / "state"),
                              "auth.keys_file": str(tmp / "auth" / "keys.json"), **overrides})


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, models_dir):
    """The embedded default, except that the pruned code keeps a batch of its own: the tests on
    this server are about independent backends (their queues, fallbacks, failures). The shared
    batch is tested in tests/router/adapters/test_shared_batch.py."""
    srv = LiveServer(default_config(tmp_path_factory.mktemp("live"), models_dir,
                                    **{"backends.1.options.share_batch": False}))
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
