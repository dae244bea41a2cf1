"""Interop: the Node.js client (tests/node, @grpc/grpc-js + @grpc/proto-loader) against the real
server: the proto is usable outside Python."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NODE_DIR = Path(__file__).resolve().parents[2] / "node"


def test_node_client_routes_generates_and_checks_health(live_server):
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the interop test needs Node.js (scripts/install.sh installs the packages)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.fail("Node packages missing: run `npm ci --prefix tests/node` (scripts/install.sh does)")
    out = subprocess.run([node, str(NODE_DIR / "client.js"), live_server.address], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["health"] == "SERVING"
    assert res["route"]["api_version"] == "caprouter.v1" and res["route"]["decision_id"]
    assert res["route"]["backend"] == res["route"]["candidates"][0]["backend"]
    g = res["generate"]
    assert g["chunks"] > 2 and "Paris" in g["text"] and 1 <= g["completion_tokens"] <= 12
    assert g["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH") and g["decision_id"]
    assert res["error"]["name"] == "INVALID_ARGUMENT"
