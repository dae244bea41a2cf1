"""The embedded default over gRPC with its pruned code decoding in the dense model's batch
(backends/shared_base.py): concurrent Generate calls to both backends share forwards, and each
gets the text it gets alone at temperature 0."""
from __future__ import annotations

import threading

import grpc
import pytest

from caprouter.v1 import router_pb2 as pb
from caprouter.v1 import router_pb2_grpc
from tests.conftest import LiveServer, default_config

pytestmark = pytest.mark.slow
DENSE, CODE = "smollm2-135m", "smollm2-135m-mlp75"
PROMPTS = ["What is the capital of France?", "Name three colours.", "Count from one to five.",
           "Say something about the sea."]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, models_dir):
    srv = LiveServer(default_config(tmp_path_factory.mktemp("shared"), models_dir))
    srv.call(srv.server.load_and_serve())
    yield srv
    srv.stop()


def _text(stub, prompt: str, backend: str) -> str:
    chunks = list(stub.Generate(pb.GenerateRequest(
        prompt=prompt, knobs=pb.RoutingKnobs(allowed_backends=[backend]),
        params=pb.GenerationParams(max_tokens=12, temperature=0.0)), timeout=120))
    assert chunks[0].start.backend == backend and chunks[-1].HasField("end")
    return "".join(c.text for c in chunks)


def test_the_code_shares_the_dense_batch_and_answers_as_it_does_alone(shared):
    backends = shared.app.service.backends
    assert backends[CODE]._scheduler is backends[DENSE]._scheduler
    with grpc.insecure_channel(shared.address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        info = {b.name: b for b in stub.ListBackends(pb.ListBackendsRequest(), timeout=30).backends}
        assert f"decodes in the batch of {DENSE}" in info[CODE].status_detail
        assert info[CODE].queue.max_batch == info[DENSE].queue.max_batch
        jobs = [(p, b) for p in PROMPTS for b in (DENSE, CODE)]
        alone = {j: _text(stub, *j) for j in jobs}
        assert any(alone[(p, DENSE)] != alone[(p, CODE)] for p in PROMPTS)      # two different models

        mixed: list[int] = []
        base = backends[DENSE]
        real = base.forward

        def watch(tokens, starts, caches, setup, members=(), logits_at=()):
            mixed.append(len({m for m in members}))
            return real(tokens, starts, caches, setup, members, logits_at)
        base.forward = watch
        together: dict = {}
        try:
            threads = [threading.Thread(target=lambda j=j: together.__setitem__(j, _text(stub, *j))) for j in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
        finally:
            base.forward = real
    assert together == alone
    assert max(mixed) == 2          # some forwards held rows of both models
