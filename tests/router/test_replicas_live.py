"""Two `caprouter serve` processes on one PostgreSQL: feedback sent to replica A changes replica
B's decisions within a second, and a backend onboarded on A is routable on B. Real sockets, real
MiniLM and FAISS (the backends are route-only, so no LLM has to load)."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml

from caprouter.v1 import router_pb2 as pb
from caprouter.v1 import router_pb2_grpc

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent / "caprouter"
A, B = "smollm2-135m", "smollm2-135m-mlp75"


def _serve(tmp_path: Path, name: str, url: str, models_dir: Path) -> tuple[subprocess.Popen, str]:
    cfg = {"server": {"host": "127.0.0.1", "port": 0}, "storage": {"url": url, "follow_ms": 100},
           "datastore": {"state_dir": str(tmp_path / name)}, "cache_dir": str(models_dir),
           "auth": {"keys_file": str(tmp_path / "auth" / "keys.json")}, "artifact": None,
           "backends": [{"name": n, "kind": "route-only", "cost": {"kind": "per_request", "per_request": 1.0}}
                        for n in (A, B)]}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    ready, log = tmp_path / f"{name}.ready", tmp_path / f"{name}.log"
    proc = subprocess.Popen([str(BIN), "serve", "--config", str(tmp_path / f"{name}.yaml"), "--ready-file", str(ready)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not ready.exists() or not ready.read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"replica {name} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, ready.read_text()


def _quality(stub, prompt: str, backend: str) -> float:
    r = stub.Route(pb.RouteRequest(prompt=prompt, knobs=pb.RoutingKnobs(cost_weight=0.0)), timeout=30)
    return {c.backend: c.predicted_quality for c in r.candidates}[backend]


def test_feedback_on_one_replica_changes_the_others_decisions_within_a_second(tmp_path, pg, models_dir):
    url = pg.database()
    procs = []
    try:
        pa, addr_a = _serve(tmp_path, "a", url, models_dir)
        procs.append(pa)
        pb_, addr_b = _serve(tmp_path, "b", url, models_dir)
        procs.append(pb_)
        with grpc.insecure_channel(addr_a) as ca, grpc.insecure_channel(addr_b) as cb:
            sa, sb = router_pb2_grpc.RouterStub(ca), router_pb2_grpc.RouterStub(cb)
            lags = []
            for i in range(8):
                prompt = f"What is {17 + i} * {23 + i}? Answer with the number only."
                before = _quality(sb, prompt, A)
                t0 = time.perf_counter()
                for _ in range(3):
                    sa.Feedback(pb.FeedbackRequest(prompt=prompt, backend=A, score=0.0 if before > 0.5 else 1.0),
                                timeout=30)
                acked = time.perf_counter()
                while abs(_quality(sb, prompt, A) - before) < 1e-4:
                    assert time.perf_counter() - acked < 5.0, "replica B never saw A's feedback"
                    time.sleep(0.01)
                lags.append(time.perf_counter() - acked)
                assert t0 <= acked
            lags.sort()
            print(f"\nreplica lag after acknowledgement: p50 {statistics.median(lags) * 1e3:.0f} ms, "
                  f"max {lags[-1] * 1e3:.0f} ms over {len(lags)} trials")
            assert lags[-1] <= 1.0
            # A backend onboarded on A is routable on B.
            results = [pb.AptitudeResult(prompt=f"Write a haiku about {t}.", score=1.0) for t in "abcdefghijkl"]
            sa.Onboard(pb.OnboardRequest(backend="poet-7b", results=results,
                                         cost_model=pb.CostModel(kind="per_request", per_request=0.5)), timeout=60)
            deadline = time.time() + 5
            while True:
                names = {b.name for b in sb.ListBackends(pb.ListBackendsRequest(), timeout=30).backends}
                if "poet-7b" in names or time.time() > deadline:
                    break
                time.sleep(0.05)
            assert "poet-7b" in names
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)
