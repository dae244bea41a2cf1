"""Who may call what, over real sockets, gRPC and HTTP alike: keys, scopes, revocation, rate
limits, budgets, TLS and mutual TLS (the table of issue 14). The real server (MiniLM, FAISS,
SmolLM2) is the session's; this module gives it a key file of its own for its duration."""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from caprouter.v1 import router_pb2 as pb
from caprouter.v1 import router_pb2_grpc
from router.serving.keys import KeyFile, Limits
from tests.tls_certs import make_certs

pytestmark = pytest.mark.slow

DENSE = "smollm2-135m"
SCOPED = ("route", "generate", "feedback", "onboard", "metrics")


@pytest.fixture(scope="module")
def secured(live_server, tmp_path_factory):
    """The live server with API keys on (a key per scope, an admin key, limited keys), and a plain
    HTTP port beside its gRPC port."""
    from router.adapters.http_server import HttpServer

    folder = tmp_path_factory.mktemp("auth")
    keys = KeyFile(folder / "keys.json")
    tokens: dict[str, str] = {}
    for scope in SCOPED:
        tokens[scope] = keys.create(f"{scope}-app", scopes=(scope,))[1]
    tokens["admin"] = keys.create("ops", scopes=("admin",))[1]
    tokens["revoked"] = keys.create("gone", scopes=("admin",))[1]
    for t in ("grpc", "http"):
        tokens[f"slow-{t}"] = keys.create(f"slow-{t}", scopes=("admin",), limits=Limits(requests_per_s=0.05))[1]
        tokens[f"poor-{t}"] = keys.create(f"poor-{t}", scopes=("admin",), limits=Limits(budget=1e-6))[1]
    app = live_server.app
    before = app.keys
    app.keys = keys
    http = HttpServer(app, "127.0.0.1", 0, metrics=app.telemetry)
    live_server.call(http.start())
    yield {"tokens": tokens, "keys": keys, "grpc": live_server.address, "http": http.address, "folder": folder,
           "live": live_server}
    live_server.call(http.stop())
    app.keys = before


# ---- one call of each kind, on either transport; the answer's status ------------------------------

def _grpc(address: str, op: str, token: str | None, channel: Any = None) -> str:
    md = (("authorization", f"Bearer {token}"),) if token else ()
    ch = channel or grpc.insecure_channel(address)
    stub = router_pb2_grpc.RouterStub(ch)
    try:
        if op == "route":
            stub.Route(pb.RouteRequest(prompt="What is 2 + 2?"), timeout=60, metadata=md)
        elif op == "generate":
            list(stub.Generate(pb.GenerateRequest(prompt="Say hi.", params=pb.GenerationParams(max_tokens=2),
                                                  knobs=pb.RoutingKnobs(allowed_backends=[DENSE])),
                               timeout=60, metadata=md))
        elif op == "feedback":       # an unknown decision: past the guard, NOT_FOUND, nothing written
            stub.Feedback(pb.FeedbackRequest(decision_id="no-such-decision", score=1.0), timeout=60, metadata=md)
        elif op == "onboard":        # too few results: past the guard, INVALID_ARGUMENT, nothing registered
            stub.Onboard(pb.OnboardRequest(backend="never-registered"), timeout=60, metadata=md)
        elif op == "list":
            stub.ListBackends(pb.ListBackendsRequest(), timeout=60, metadata=md)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name
    finally:
        if channel is None:
            ch.close()


def _http(address: str, op: str, token: str | None, *, scheme: str = "http",
          context: ssl.SSLContext | None = None) -> tuple[int, dict[str, Any], Any]:
    url = f"{scheme}://{address}"
    if op == "generate":
        path, body = "/v1/chat/completions", {"model": DENSE, "max_tokens": 2,
                                             "messages": [{"role": "user", "content": "Say hi."}]}
    elif op == "feedback":
        path, body = "/v1/feedback", {"decision_id": "no-such-decision", "score": 1.0}
    elif op == "list":
        path, body = "/v1/models", None
    elif op == "metrics":
        path, body = "/metrics", None
    elif op == "health":
        path, body = "/healthz", None
    else:
        raise ValueError(op)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, dict(e.headers), json.loads(raw) if raw.startswith(b"{") else raw


# What each key gets for each call: past the guard, the call's own answer (feedback: NOT_FOUND for
# the unknown decision; onboard: INVALID_ARGUMENT for no results).
GRPC_OK = {"route": "OK", "generate": "OK", "feedback": "NOT_FOUND", "onboard": "INVALID_ARGUMENT", "list": "OK"}
HTTP_OK = {"generate": 200, "feedback": 404, "list": 200, "metrics": 200}


@pytest.mark.parametrize("op", list(GRPC_OK))
def test_grpc_keys_and_scopes(secured, op):
    t, addr = secured["tokens"], secured["grpc"]
    assert _grpc(addr, op, None) == "UNAUTHENTICATED"
    assert _grpc(addr, op, "crk_0123456789ab_" + "x" * 43) == "UNAUTHENTICATED"
    assert _grpc(addr, op, "not-even-a-caprouter-key") == "UNAUTHENTICATED"
    assert _grpc(addr, op, t["admin"]) == GRPC_OK[op]
    for scope in SCOPED:
        # ListBackends takes any valid key; every other call its own scope.
        allowed = op == "list" or op == scope
        assert _grpc(addr, op, t[scope]) == (GRPC_OK[op] if allowed else "PERMISSION_DENIED"), (op, scope)


@pytest.mark.parametrize("op", list(HTTP_OK))
def test_http_keys_and_scopes(secured, op):
    t, addr = secured["tokens"], secured["http"]
    status, _, body = _http(addr, op, None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    assert _http(addr, op, "crk_0123456789ab_" + "x" * 43)[0] == 401
    assert _http(addr, op, t["admin"])[0] == HTTP_OK[op]
    for scope in SCOPED:
        allowed = op == "list" or op == scope
        status, _, body = _http(addr, op, t[scope])
        if allowed:
            assert status == HTTP_OK[op], (op, scope)
        else:
            assert status == 403 and body["error"]["type"] == "permission_error", (op, scope)
            assert f"'{op}' scope" in body["error"]["message"]


def test_a_permission_error_names_the_scope_and_never_the_key(secured):
    t = secured["tokens"]
    with grpc.insecure_channel(secured["grpc"]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            router_pb2_grpc.RouterStub(ch).Route(pb.RouteRequest(prompt="hi"), timeout=30,
                                                 metadata=(("authorization", f"Bearer {t['feedback']}"),))
    assert "lacks the 'route' scope" in e.value.details() and t["feedback"] not in e.value.details()


def test_revocation_takes_effect_on_the_next_call_without_a_restart(secured):
    t = secured["tokens"]
    assert _grpc(secured["grpc"], "list", t["revoked"]) == "OK"
    assert _http(secured["http"], "list", t["revoked"])[0] == 200
    KeyFile(secured["keys"].path).revoke("gone")            # what `caprouter keys revoke gone` does
    assert _grpc(secured["grpc"], "list", t["revoked"]) == "UNAUTHENTICATED"
    status, _, body = _http(secured["http"], "list", t["revoked"])
    assert status == 401 and "revoked" in body["error"]["message"]


def test_health_and_reflection_stay_open(secured):
    with grpc.insecure_channel(secured["grpc"]) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    assert _http(secured["http"], "health", None)[0] == 200


def test_over_the_rate_limit_is_resource_exhausted_with_the_time_to_retry(secured):
    t = secured["tokens"]
    md = (("authorization", f"Bearer {t['slow-grpc']}"),)
    with grpc.insecure_channel(secured["grpc"]) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        stub.Route(pb.RouteRequest(prompt="What is 2 + 2?"), timeout=60, metadata=md)
        with pytest.raises(grpc.RpcError) as e:
            stub.Route(pb.RouteRequest(prompt="What is 2 + 2?"), timeout=60, metadata=md)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in e.value.details()
    hint = dict(e.value.trailing_metadata())["retry-after-ms"]
    assert 10_000 < int(hint) <= 20_000                      # 0.05 requests/s: one every 20 s
    assert _http(secured["http"], "feedback", t["slow-http"])[0] == 404
    status, headers, body = _http(secured["http"], "feedback", t["slow-http"])
    assert status == 429 and body["error"]["type"] == "rate_limit_error" and 10 < int(headers["Retry-After"]) <= 20


def test_over_budget_is_resource_exhausted_until_the_period_ends(secured):
    t = secured["tokens"]
    assert _grpc(secured["grpc"], "route", t["poor-grpc"]) == "OK"          # charged its predicted cost
    with grpc.insecure_channel(secured["grpc"]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            router_pb2_grpc.RouterStub(ch).Route(pb.RouteRequest(prompt="hi"), timeout=30,
                                                 metadata=(("authorization", f"Bearer {t['poor-grpc']}"),))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "spent its budget" in e.value.details()
    assert _http(secured["http"], "generate", t["poor-http"])[0] == 200     # charged its realized cost
    status, headers, body = _http(secured["http"], "generate", t["poor-http"])
    assert status == 429 and "spent its budget" in body["error"]["message"] and int(headers["Retry-After"]) >= 1
    # What they spent is in the durable ledger (a kill -9 of the ledger is tested in test_access.py).
    led = secured["live"].app.service.access.ledger
    for name in ("poor-grpc", "poor-http"):
        kid = next(k.id for k in secured["keys"].keys() if k.name == name)
        assert any(kk == kid and v > 1e-6 for (kk, _), v in led._spent.items())


# ---- TLS ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_servers(secured, tmp_path_factory):
    """A TLS port pair and a mutual-TLS port pair on the same app."""
    from router.adapters.grpc_server import GrpcServer
    from router.adapters.http_server import HttpServer

    live = secured["live"]
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    base = live.app.config.server
    tls = base.model_copy(update={"tls_cert": str(certs.server_cert), "tls_key": str(certs.server_key)})
    mtls = tls.model_copy(update={"tls_client_ca": str(certs.ca)})
    out: dict[str, Any] = {"certs": certs}
    started = []
    for label, cfg in (("tls", tls), ("mtls", mtls)):
        g = live.call(_make(GrpcServer, live.app, cfg))
        live.call(_start_serving(g))
        h = HttpServer(live.app, "127.0.0.1", 0, tls=cfg)
        live.call(h.start())
        out[label] = (g.address, h.address)
        started.append((g, h))
    yield out
    for g, h in started:
        live.call(h.stop())
        live.call(g.server.stop(0))


async def _make(cls, app, cfg):
    return cls(app, "127.0.0.1", 0, tls=cfg)


async def _start_serving(g):
    """Start a second server on an app that is already loaded: health SERVING at once."""
    from router.adapters.grpc_server import SERVICE_NAME

    await g.start()
    for name in ("", SERVICE_NAME):
        await g.health.set(name, health_pb2.HealthCheckResponse.SERVING)


def _ctx(ca, cert=None, key=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def test_tls_serves_verified_clients_and_refuses_plain_text(tls_servers, secured):
    from router.client import Client, Tls

    c = tls_servers["certs"]
    gaddr, haddr = tls_servers["tls"]
    admin = secured["tokens"]["admin"]
    with Client(gaddr, api_key=admin, tls=Tls(ca=str(c.ca), server_name="localhost"), timeout=60) as client:
        assert client.route("What is 2 + 2?").backend
        assert {b.name for b in client.list_backends()} >= {DENSE}
    with Client(gaddr, tls=Tls(ca=str(c.ca), server_name="localhost"), timeout=60) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.list_backends()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED        # TLS is not a key
    # Plain text against the TLS port, and TLS trusting another CA: no connection.
    assert _grpc(gaddr, "list", admin, channel=grpc.insecure_channel(gaddr)) == "UNAVAILABLE"
    wrong = grpc.secure_channel(gaddr, grpc.ssl_channel_credentials(c.other_ca.read_bytes()),
                                (("grpc.ssl_target_name_override", "localhost"),))
    assert _grpc(gaddr, "list", admin, channel=wrong) == "UNAVAILABLE"
    assert _http(haddr, "list", admin, scheme="https", context=_ctx(c.ca))[0] == 200
    with pytest.raises(urllib.error.URLError):
        _http(haddr, "list", admin, scheme="https", context=_ctx(c.other_ca))
    with pytest.raises((urllib.error.URLError, ConnectionError, http_client_errors())):
        _http(haddr, "list", admin)                               # plain HTTP to the TLS port


def http_client_errors():
    import http.client

    return http.client.HTTPException


def test_mutual_tls_requires_a_client_certificate(tls_servers, secured):
    from router.client import Client, Tls

    c = tls_servers["certs"]
    gaddr, haddr = tls_servers["mtls"]
    admin = secured["tokens"]["admin"]
    with Client(gaddr, api_key=admin, timeout=60,
                tls=Tls(ca=str(c.ca), cert=str(c.client_cert), key=str(c.client_key), server_name="localhost")) as cl:
        assert cl.list_backends()
    no_cert = grpc.secure_channel(gaddr, grpc.ssl_channel_credentials(c.ca.read_bytes()),
                                  (("grpc.ssl_target_name_override", "localhost"),))
    assert _grpc(gaddr, "list", admin, channel=no_cert) == "UNAVAILABLE"
    assert _http(haddr, "list", admin, scheme="https", context=_ctx(c.ca, c.client_cert, c.client_key))[0] == 200
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        _http(haddr, "list", admin, scheme="https", context=_ctx(c.ca))


def test_the_node_client_connects_with_mutual_tls_and_a_key(tls_servers, secured):
    import os
    import shutil
    import subprocess
    from pathlib import Path

    node = shutil.which("node")
    node_dir = Path(__file__).resolve().parents[2] / "node"
    if node is None or not (node_dir / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.fail("Node.js and tests/node's packages are needed (scripts/install.sh installs them)")
    c = tls_servers["certs"]
    env = dict(os.environ, CAPROUTER_API_KEY=secured["tokens"]["admin"], CAPROUTER_TLS_CA=str(c.ca),
               CAPROUTER_TLS_CERT=str(c.client_cert), CAPROUTER_TLS_KEY=str(c.client_key),
               CAPROUTER_TLS_SERVER_NAME="localhost")
    out = subprocess.run([node, str(node_dir / "client.js"), tls_servers["mtls"][0]], capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["health"] == "SERVING" and res["route"]["decision_id"] and res["generate"]["completion_tokens"] >= 1
    assert res["error"]["name"] == "INVALID_ARGUMENT"          # the empty prompt: past the guard
    env.pop("CAPROUTER_API_KEY")
    out = subprocess.run([node, str(node_dir / "client.js"), tls_servers["mtls"][0]], capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr


def test_feedback_names_its_key_and_an_admin_retracts_it(secured):
    """Provenance end to end: feedback sent with a key is audited under its name, and an admin
    withdraws it by that name (`caprouter datastore retract --key feedback-app`)."""
    from router.client import Client

    t, live = secured["tokens"], secured["live"]
    svc = live.app.service
    audit = svc.access.audit.path
    with Client(secured["grpc"], api_key=t["feedback"], timeout=60) as c:
        rec = c.feedback("", 0.0, prompt="What is 123 + 456?", backend=DENSE)
        with pytest.raises(grpc.RpcError) as e:
            c.retract_feedback("feedback-app")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    line = json.loads(audit.read_text().splitlines()[-1])
    assert line["action"] == "feedback" and line["key"] == "feedback-app" and line["record_id"] == rec.record_id
    with Client(secured["grpc"], api_key=t["admin"], timeout=60) as c:
        assert c.retract_feedback("feedback-app") == 1
        assert c.retract_feedback("feedback-app") == 0
    line = json.loads(audit.read_text().splitlines()[-1])
    assert line["action"] == "feedback.retract" and line["key"] == "ops" and line["retracted_key"] == "feedback-app"


def test_the_cli_connects_with_tls_and_a_key_from_the_environment(tls_servers, secured, capsys, monkeypatch,
                                                                   tmp_path):
    from router.cli import main

    c = tls_servers["certs"]
    gaddr = tls_servers["mtls"][0]
    tls = ["--tls-ca", str(c.ca), "--tls-cert", str(c.client_cert), "--tls-key", str(c.client_key),
           "--tls-server-name", "localhost"]
    monkeypatch.setenv("CAPROUTER_API_KEY", secured["tokens"]["route"])
    assert main(["backends", "--address", gaddr, *tls]) == 0
    assert DENSE in capsys.readouterr().out
    assert main(["route", "--address", gaddr, *tls, "What is 2 + 2?"]) == 0
    assert "backend:" in capsys.readouterr().out
    assert main(["generate", "--address", gaddr, *tls, "Hi", "--max-tokens", "1"]) == 2      # route-only key
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    monkeypatch.delenv("CAPROUTER_API_KEY")
    keyfile = tmp_path / "key"
    keyfile.write_text(secured["tokens"]["admin"] + "\n")
    assert main(["datastore", "retract", "--key", "nobody", "--address", gaddr, *tls,
                 "--api-key-file", str(keyfile)]) == 0
    assert "retracted 0 feedback record(s) of key nobody" in capsys.readouterr().out
