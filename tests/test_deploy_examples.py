"""The deployment examples in docs/deploy parse, and the configs they carry are valid caprouter
configs for the topology docs/deployment.md describes (replicas on one PostgreSQL, keys required,
TLS, models on Ray)."""
from __future__ import annotations

from pathlib import Path

import yaml

from caprouter.v1 import router_pb2 as pb
from router.core.config import AppConfig, load_config

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy"


def _shared(cfg: AppConfig) -> None:
    assert cfg.storage.url and cfg.storage.url.startswith("postgresql://") and ":" not in cfg.storage.url.split("@")[0][13:]
    assert cfg.auth.required and cfg.server.tls and cfg.ray.address and cfg.server.host == "0.0.0.0"


def test_the_replica_config_is_valid():
    _shared(load_config(DEPLOY / "caprouter.yaml"))


def test_the_kubernetes_manifests_parse_and_carry_a_valid_config():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "Deployment", "Service"}
    _shared(AppConfig.model_validate(yaml.safe_load(kinds["ConfigMap"]["data"]["caprouter.yaml"])))
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["grpc"]["service"] == pb.DESCRIPTOR.services_by_name["Router"].full_name
    assert kinds["Deployment"]["spec"]["replicas"] > 1
    mounted = {v["name"] for v in pod["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= mounted
    ports = {p["name"] for p in c["ports"]}
    assert {p["targetPort"] for p in kinds["Service"]["spec"]["ports"]} <= ports
    assert not any("value" in e and "PASSWORD" in e["name"] for e in c["env"])      # secrets by reference


def test_the_compose_file_runs_two_replicas_on_one_database():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    routers = [s for n, s in compose["services"].items() if n.startswith("router-")]
    assert len(routers) == 2 and "postgres" in compose["services"]
    for s in routers:
        assert "postgres" in s["depends_on"] and "--config /etc/caprouter/caprouter.yaml" in s["command"]
        assert any(v.startswith("./caprouter.yaml:") for v in s["volumes"])
