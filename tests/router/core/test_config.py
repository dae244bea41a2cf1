import pytest

from router.core.config import AppConfig, load_config
from router.core.errors import ConfigError


def test_embedded_default_is_valid_and_has_two_local_backends():
    cfg = load_config()
    assert [b.kind for b in cfg.backends] == ["transformers", "transformers"]
    assert cfg.backends[1].options["prune"]["mlp_keep"] < 1


def test_overrides_and_relative_paths(tmp_path):
    (tmp_path / "c.yaml").write_text("datastore: {outcomes: [data/o.jsonl]}\nserver: {port: 1}\n")
    cfg = load_config(tmp_path / "c.yaml", {"server.port": 7000, "routing.cost_weight": 0.5})
    assert cfg.server.port == 7000 and cfg.routing.cost_weight == 0.5
    assert cfg.datastore.outcomes == [str(tmp_path / "data" / "o.jsonl")]


@pytest.mark.parametrize("yaml_text,part", [
    ("server: {port: -1}", "port"),
    ("routing: {cost_weight: -1}", "cost_weight"),
    ("routing: {min_quality: 2}", "min_quality"),
    ("unknown_key: 1", "unknown_key"),
    ("backends: [{name: a, kind: x}, {name: a, kind: x}]", "unique"),
    ("backends: [{name: 'bad name!', kind: x}]", "name"),
    ("- just a list", "mapping"),
    ("server: {port: [}", "not valid YAML"),
])
def test_invalid_configs_are_refused_with_a_clear_message(tmp_path, yaml_text, part):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert part in str(ei.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/c.yaml")


def test_unknown_backend_kind_is_a_config_error():
    from router.serving.app import build_backends

    cfg = AppConfig.model_validate({"backends": [{"name": "a", "kind": "warp-drive"}]})
    with pytest.raises(ConfigError, match="unknown backend kind 'warp-drive'"):
        build_backends(cfg)


def test_overrides_reach_list_elements_by_index_or_all():
    import pytest

    from router.core.errors import ConfigError

    cfg = load_config(None, {"backends.*.options.max_queue": 16, "backends.0.options.max_batch": 4,
                             "routing.max_pending": 64})
    assert [b.options["max_queue"] for b in cfg.backends] == [16] * len(cfg.backends) and len(cfg.backends) >= 2
    assert cfg.backends[0].options["max_batch"] == 4 and "max_batch" not in cfg.backends[1].options
    assert cfg.routing.max_pending == 64
    with pytest.raises(ConfigError, match="not an index"):
        load_config(None, {"backends.9.options.max_queue": 1})


def test_tls_files_come_in_pairs_and_feedback_weights_are_fractions():
    import pytest as _pytest

    from router.core.config import AppConfig

    with _pytest.raises(ValueError, match="together"):
        AppConfig.model_validate({"server": {"tls_cert": "c.pem"}})
    with _pytest.raises(ValueError, match="mutual TLS"):
        AppConfig.model_validate({"server": {"tls_client_ca": "ca.pem"}})
    with _pytest.raises(ValueError, match="feedback weights"):
        AppConfig.model_validate({"auth": {"feedback_weights": {"app": 2.0}}})
    assert AppConfig.model_validate({"server": {"tls_cert": "c.pem", "tls_key": "k.pem"}}).server.tls
