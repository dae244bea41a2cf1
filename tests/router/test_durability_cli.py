"""The server as users run it: `caprouter serve` in its own process, killed with SIGKILL."""
from __future__ import annotations

import json
import os
import signal
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


def _start(cfg: Path, ready: Path, log: Path) -> subprocess.Popen:
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([str(BIN), "serve", "--config", str(cfg), "--ready-file", str(ready)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not ready.exists() or not ready.read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path) -> str:
    """The system of record the server writes to: the embedded SQLite default, or PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'caprouter.db'}"
    return request.getfixturevalue("pg").database()


@pytest.fixture
def server_config(tmp_path, models_dir, storage) -> Path:
    cfg = {
        "server": {"host": "127.0.0.1", "port": 0},
        "storage": {"url": storage},
        "auth": {"keys_file": str(tmp_path / "auth" / "keys.json")},
        "datastore": {"state_dir": str(tmp_path / "state")},
        "cache_dir": str(models_dir),
        "backends": [{"name": "smollm2-135m", "kind": "transformers", "description": "dense",
                      "cost": {"kind": "compute"}, "options": {"model": "smollm2-135m-instruct"}}],
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _outcomes(stub) -> int:
    return {b.name: b.outcomes for b in stub.ListBackends(pb.ListBackendsRequest(), timeout=30).backends}["smollm2-135m"]


def test_acknowledged_feedback_survives_sigkill_and_cli_works(tmp_path, server_config, storage):
    ready, log = tmp_path / "ready", tmp_path / "server.log"
    proc = _start(server_config, ready, log)
    address = ready.read_text()
    try:
        # The CLI against the real server.
        out = subprocess.run([str(BIN), "route", "--address", address, "What is 2 + 2?", "--cost-weight", "0.01"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "smollm2-135m" in out.stdout and "quality" in out.stdout and "timings" in out.stdout
        bad = subprocess.run([str(BIN), "route", "--address", address, ""], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr
        gen = subprocess.run([str(BIN), "generate", "--address", address, "Say hello.", "--max-tokens", "4"],
                             capture_output=True, text=True, timeout=120)
        assert gen.returncode == 0 and "finish: FINISH_REASON_" in gen.stdout, gen.stderr
        # `caprouter route ... | head`: a reader gone before the answer arrives ends it quietly.
        piped = subprocess.Popen([str(BIN), "route", "--address", address, "What is 2 + 2?"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        piped.stdout.close()
        _, err = piped.communicate(timeout=60)
        assert piped.returncode == 141 and err == b"", err.decode()[-2000:]
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("What is 12 + 30?\nWrite a haiku about snow.\n"
                           + json.dumps({"messages": [{"role": "user", "content": "Name a prime number."}]}) + "\n")
        batch = subprocess.run([str(BIN), "route-batch", "--address", address, str(prompts), "--budget", "1000"],
                               capture_output=True, text=True, timeout=60)
        assert batch.returncode == 0 and batch.stdout.count("smollm2-135m") == 3, batch.stderr
        assert "batch: 3 prompts" in batch.stdout
        fb = subprocess.run([str(BIN), "feedback", "--address", address, "--prompt", "What is 12 + 30?", "--backend",
                             "smollm2-135m", "--score", "1", "--cost", "2.5"], capture_output=True, text=True, timeout=60)
        assert fb.returncode == 0 and "for backend smollm2-135m" in fb.stdout, fb.stderr

        # Onboard a route-only backend from aptitude results with the CLI (before the kill: it must survive).
        results = tmp_path / "apt.jsonl"
        results.write_text("".join(json.dumps({"item_id": f"arithmetic-{i:03d}", "score": 1.0}) + "\n" for i in range(10))
                           + "".join(json.dumps({"prompt": f"Name a colour, number {i}.", "score": 0.0}) + "\n"
                                     for i in range(10)))
        ob = subprocess.run([str(BIN), "onboard", "calc-9b", "--address", address, "--results", str(results),
                             "--cost-per-request", "50", "--description", "a calculator model"],
                            capture_output=True, text=True, timeout=120)
        assert ob.returncode == 0 and "registered calc-9b" in ob.stdout and "20 aptitude results" in ob.stdout, ob.stderr
        ls = subprocess.run([str(BIN), "backends", "--address", address], capture_output=True, text=True, timeout=60)
        assert "calc-9b" in ls.stdout and "route-only" in ls.stdout
        # Generate never dispatches to a route-only backend; it is listed as excluded.
        gen = subprocess.run([str(BIN), "generate", "--address", address, "What is 2 + 3?", "--max-tokens", "2",
                              "--cost-weight", "0"], capture_output=True, text=True, timeout=120)
        assert gen.returncode == 0 and "calc-9b" in gen.stdout and "route-only" in gen.stdout, gen.stderr

        with grpc.insecure_channel(address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            base = _outcomes(stub)
            acked = []
            for i in range(20):
                r = stub.Feedback(pb.FeedbackRequest(prompt=f"durability probe {i}", backend="smollm2-135m",
                                                     score=(i % 5) / 4), timeout=30)
                acked.append(r.record_id)
        os.kill(proc.pid, signal.SIGKILL)  # right after the last acknowledgement
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = _start(server_config, ready, log)
    try:
        with grpc.insecure_channel(ready.read_text()) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            assert _outcomes(stub) == base + 20
            listed = {b.name: b for b in stub.ListBackends(pb.ListBackendsRequest(), timeout=30).backends}
            assert listed["calc-9b"].outcomes == 20 and listed["calc-9b"].cost_model.per_request == 50
            r = stub.Route(pb.RouteRequest(prompt="What is 3 + 4? Answer with just the number.",
                                           knobs=pb.RoutingKnobs(cost_weight=0.0)), timeout=30)
            assert r.backend == "calc-9b"
            r = stub.Route(pb.RouteRequest(prompt="durability probe 3"), timeout=30)
            assert {c.backend: c.support for c in r.candidates}["smollm2-135m"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    from datastore.storage import open_storage

    db = open_storage(storage)
    logged = {r["id"] for r in db.stream("feedback").replayed}
    assert set(acked) <= logged and len(db.stream("registry").replayed) == 1
    db.close()
