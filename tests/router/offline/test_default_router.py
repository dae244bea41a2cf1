"""The embedded default's router artifact is what the training pipeline makes of the bundled
aptitude outcomes (scripts/build_default_router.sh), and is not stale."""
from __future__ import annotations

import json

import numpy as np
import pytest

from router.core.config import builtin_data, load_config
from router.offline.routing_data import load_routing_data

ARTIFACT = builtin_data("default-router")


def test_default_config_serves_the_bundled_artifact():
    cfg = load_config(None)
    assert cfg.artifact == str(ARTIFACT)
    manifest = json.loads((ARTIFACT / "manifest.json").read_text())
    assert manifest["backends"] == [b.name for b in cfg.backends]


@pytest.mark.slow  # loads MiniLM
def test_bundled_artifact_is_built_from_the_bundled_outcomes():
    """Fails when the aptitude outcomes (or the embedder) changed without rerunning
    scripts/build_default_router.sh."""
    from router.prediction import artifact as art
    from router.serving.app import build_encoder

    encoder = build_encoder(load_config(None))      # the default runtime, which the script trains with

    data = load_routing_data(str(builtin_data("aptitude_outcomes.jsonl")))
    a = art.load(ARTIFACT, embedder_id=encoder.model_id, dim=encoder.dim)
    assert a.manifest["data"]["sha256"] == data.source_hash, "stale: run scripts/build_default_router.sh"
    assert a.manifest["data"]["test_share"] == 0 and len(a.records) == len(data)
    np.testing.assert_allclose(np.linalg.norm(a.embeddings, axis=1), 1.0, atol=1e-5)
    # The stored embeddings are the current encoder's.
    idx = [0, len(a.records) // 2, len(a.records) - 1]
    fresh = encoder.encode([a.records[i].prompt for i in idx])
    np.testing.assert_allclose(fresh, a.embeddings[idx], atol=1e-4)


@pytest.mark.slow
def test_rebuilding_gives_an_equivalent_router(tmp_path):
    from router.offline.training import train_command
    from router.prediction import artifact as art
    from router.prediction.predictor import Predictor, knn_store

    cfg = load_config(None)
    train_command(cfg, str(builtin_data("aptitude_outcomes.jsonl")), str(tmp_path / "r"), seed=0, test_share=0.0,
                  progress=False)
    old, new = art.load(ARTIFACT), art.load(tmp_path / "r")
    assert {k: v for k, v in new.manifest["data"].items() if k != "path"} == \
        {k: v for k, v in old.manifest["data"].items() if k != "path"}
    assert new.manifest["router"] == old.manifest["router"] and new.manifest["datastore"] == old.manifest["datastore"]
    preds = []
    for a in (old, new):
        store = knn_store(a.embeddings, a.records, cfg.datastore.model_copy(update=a.manifest["datastore"]))
        fallback = np.array([a.manifest["cost"]["mean_per_request"][b] for b in a.backends])
        preds.append(Predictor(store, a.capability()).predict(old.embeddings, a.backends, fallback).quality)
    # Same pipeline, same seed: the same router up to floating-point differences between CPUs.
    assert np.corrcoef(preds[0].ravel(), preds[1].ravel())[0, 1] > 0.95
