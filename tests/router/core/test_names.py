"""One rule for backend names, from the config and Onboard to training data and artifacts."""
from __future__ import annotations

import json

import pytest

from router.core.config import AppConfig
from router.core.errors import ArtifactError, InvalidArgument
from router.core.names import invalid_backend_names, is_backend_name
from router.offline.training import train_command
from router.prediction import artifact as art
from router.serving.registrations import AptitudeResult, OnboardSpec, validate

PUBLISHED = ["Llama-3.1-405B-Inst@sambanova", "meta/llama-3-70b-instruct", "gpt-4-1106-preview", "codegemma:7b",
             "claude-3.5-sonnet+tools", "mistralai/Mixtral-8x7B-Instruct-v0.1"]
REFUSED = ["", "gpt 4", "-leading-dash", "/abs", 'quo"te', "tab\there", "x" * 129]


def test_published_names_are_backend_names_and_the_rest_are_not():
    assert invalid_backend_names(PUBLISHED) == []
    assert invalid_backend_names(REFUSED) == REFUSED
    assert is_backend_name("a") and not is_backend_name("new\nline")


def test_config_and_onboard_take_the_same_names():
    cfg = AppConfig.model_validate({"backends": [{"name": n, "kind": "route-only"} for n in PUBLISHED]})
    assert [b.name for b in cfg.backends] == PUBLISHED
    with pytest.raises(ValueError, match="String should match pattern"):
        AppConfig.model_validate({"backends": [{"name": "gpt 4", "kind": "route-only"}]})
    results = [AptitudeResult(score=1.0, prompt=f"q{i}") for i in range(10)]
    assert validate(OnboardSpec("Llama-3.1-405B-Inst@sambanova", results, {"kind": "per_request"}), {},
                    max_prompt_chars=100).backend == "Llama-3.1-405B-Inst@sambanova"
    with pytest.raises(InvalidArgument, match="letters, digits and ._:/@"):
        validate(OnboardSpec("gpt 4", results, {"kind": "per_request"}), {}, max_prompt_chars=100)


def test_train_refuses_a_name_serving_cannot_take_before_any_work(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "x", "scores": {"gpt 4 (turbo)": 1, "ok@p": 0}, "cost": {
        "gpt 4 (turbo)": 1.0, "ok@p": 0.5}}) + "\n")
    with pytest.raises(InvalidArgument, match=r"'gpt 4 \(turbo\)'.*rename them"):
        train_command(AppConfig(), str(data), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_an_artifact_with_a_name_serving_cannot_take_is_refused_with_the_fix(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": art.FORMAT, "kind": "caprouter-router",
                                                        "backends": ["ok@p", "gpt 4"]}))
    with pytest.raises(ArtifactError, match=r"'gpt 4'.*retrain with `caprouter train`"):
        art.load(tmp_path)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        art.load(tmp_path / "missing")



def test_names_serve_cannot_tell_apart_are_refused_for_ray_mode():
    from backends.ray_serve import deployment_names
    from router.core.errors import ConfigError

    assert deployment_names(["meta/llama-3", "Llama@sambanova"]) == {
        "meta/llama-3": "backend-meta_llama-3", "Llama@sambanova": "backend-Llama_sambanova"}
    with pytest.raises(ConfigError, match="'a@b' and 'a:b' would both be the Ray Serve deployment 'backend-a_b'"):
        deployment_names(["a@b", "a:b"])
