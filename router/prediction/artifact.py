"""Versioned router artifacts: what `caprouter train` writes and `caprouter serve --artifact` loads,
the one contract between the two (backend names included: ``router.core.names``).

    DIR/manifest.json        format, code version, embedder (id, dim, max_tokens), backends, cost facts,
                             data (path, sha256, split sizes), the router chosen ("router":
                             "capability", "ensemble" or "datastore") and the candidates' scores,
                             training config, blend weight, the datastore's k and temperature, metrics;
                             an ensemble's members ("ensemble": their configs and weight files),
                             neighbourhoods and cluster tables
    DIR/model.safetensors    the capability encoder's weights (absent when the datastore alone serves)
    DIR/member-<i>.safetensors  an ensemble's learned members, instead
    DIR/clusters-<i>.safetensors  an ensemble's cluster tables (centroids, quality, prior_mean)
    DIR/outcomes.jsonl.gz    the training outcomes (the datastore served next to the encoder)
    DIR/embeddings.npy       their embeddings, row-aligned
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datastore.records import OutcomeRecord, read_outcomes
from encoders.capability import CapabilityConfig, build_model
from router import __version__
from router.core.compute import Compute
from router.core.errors import ArtifactError
from router.core.names import BACKEND_NAME_RULE, invalid_backend_names
from router.prediction.clusters import ClusterTable
from router.prediction.predictor import Capability, Ensemble, Scale

FORMAT = 1


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    models: list[Any]           # the learned members: none when the datastore alone serves, one for a model
    configs: list[CapabilityConfig]
    embeddings: np.ndarray
    records: list[OutcomeRecord]
    neighbourhoods: list[Scale] = field(default_factory=list)     # an ensemble's datastore members
    tables: list[ClusterTable] = field(default_factory=list)      # an ensemble's cluster tables

    @property
    def backends(self) -> list[str]:
        return list(self.manifest["backends"])

    @property
    def model(self) -> Any:
        """The one capability model served (None: the datastore alone, or an ensemble)."""
        return self.models[0] if self.manifest.get("router", "capability") == "capability" else None

    def capability(self, compute: Compute | None = None) -> Capability | Ensemble | None:
        """What serving blends with the datastore (None: the datastore alone)."""
        return served_capability(self.models, self.configs, self.backends, self.neighbourhoods, compute,
                                 tables=self.tables)


def served_capability(models: Sequence[Any], configs: Sequence[CapabilityConfig], backends: Sequence[str],
                      neighbourhoods: Sequence[Scale] = (), compute: Compute | None = None, *,
                      tables: Sequence[ClusterTable] = ()) -> Capability | Ensemble | None:
    """``caprouter train``'s chosen router as serving runs it: no model, one capability model, or
    the ensemble of the models, datastore neighbourhoods and cluster tables."""
    caps = [Capability(m, backends, compute, config=c) for m, c in zip(models, configs)]
    if not caps:
        return None
    if len(caps) == 1 and not neighbourhoods and not tables:
        return caps[0]
    return Ensemble(caps, neighbourhoods, tables)


def capability_config(manifest: dict[str, Any]) -> CapabilityConfig:
    capability = dict(manifest["capability"])
    capability.setdefault("knn_scales", None)      # artifacts from before several neighbourhoods
    return CapabilityConfig(**capability)


def _state(model: Any) -> dict[str, Any]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save(out: Path, *, models: list[Any], manifest: dict[str, Any], records: list[OutcomeRecord],
         embeddings: np.ndarray, tables: Sequence[ClusterTable] = ()) -> Path:
    """``models``: none (the datastore alone: manifest "router": "datastore"), one ("capability")
    or an ensemble's learned members, in the order of the manifest's "ensemble" "members";
    ``tables``: an ensemble's cluster tables, in the order of its "clusters"."""
    from safetensors.numpy import save_file as save_arrays
    from safetensors.torch import save_file

    bad = invalid_backend_names(manifest["backends"])
    if bad:
        raise ArtifactError(f"backend name(s) {', '.join(map(repr, bad))} cannot be served: use {BACKEND_NAME_RULE}")
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if manifest.get("router") == "ensemble":
        for i, m in enumerate(models):
            save_file(_state(m), str(tmp / f"member-{i}.safetensors"))
        for i, t in enumerate(tables):
            save_arrays({"centroids": t.centroids, "quality": t.quality, "prior_mean": t.prior_mean},
                        str(tmp / f"clusters-{i}.safetensors"))
    elif models:
        save_file(_state(models[0]), str(tmp / "model.safetensors"))
    np.save(tmp / "embeddings.npy", embeddings.astype(np.float32))
    # mtime 0: the same outcomes give the same bytes (the bundled default artifact is in git).
    with gzip.GzipFile(tmp / "outcomes.jsonl.gz", "wb", mtime=0) as gz, io.TextIOWrapper(gz, "utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    full = {"format": FORMAT, "kind": "caprouter-router", "code_version": __version__,
            "created_unix": time.time(), **manifest}
    (tmp / "manifest.json").write_text(json.dumps(full, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load(path: Path, *, embedder_id: str | None = None, dim: int | None = None) -> Artifact:
    """Load an artifact; refuse one made for another embedder or dimension, or another format."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is not a caprouter artifact (no manifest.json)") from None
    if manifest.get("format") != FORMAT or manifest.get("kind") != "caprouter-router":
        raise ArtifactError(f"{path}: unsupported artifact format {manifest.get('format')!r}")
    bad = invalid_backend_names(manifest.get("backends", []))
    if bad:
        raise ArtifactError(f"{path} names backend(s) {', '.join(map(repr, bad))} that cannot be served (a backend "
                            f"name is {BACKEND_NAME_RULE}); rename them in the data and retrain with `caprouter train`")
    emb = manifest["embedder"]
    if embedder_id is not None and emb["id"] != embedder_id:
        raise ArtifactError(f"{path} was trained on embeddings of {emb['id']!r}, but the configured encoder is "
                            f"{embedder_id!r}; retrain with `caprouter train` or configure that encoder")
    if dim is not None and emb["dim"] != dim:
        raise ArtifactError(f"{path} expects {emb['dim']}-d embeddings, the configured encoder gives {dim}-d")
    kind = manifest.get("router", "capability")
    if kind == "ensemble":
        ens = manifest["ensemble"]
        files = [(path / m["weights"], capability_config(m)) for m in ens["members"]]
        neighbourhoods: list[Scale] = [(float(k), float(t)) for k, t in ens.get("neighbourhoods", [])]
        tables = [_table(path / c["weights"], manifest["backends"]) for c in ens.get("clusters", [])]
    else:
        files = [(path / "model.safetensors", capability_config(manifest))] if kind == "capability" else []
        neighbourhoods, tables = [], []
    models = []
    for file, cfg in files:
        model = build_model(emb["dim"], len(manifest["backends"]), cfg)
        state = load_file(str(file))
        if state["w"].ndim == 1:          # artifacts before per-neighbourhood weights: one neighbourhood
            state["w"] = state["w"][:, None]
        model.load_state_dict(state)
        model.eval()
        models.append(model)
    embeddings = np.load(path / "embeddings.npy")
    records = list(read_outcomes(path / "outcomes.jsonl.gz"))
    if len(records) != len(embeddings):
        raise ArtifactError(f"{path}: {len(records)} outcomes but {len(embeddings)} embeddings")
    return Artifact(path, manifest, models, [c for _, c in files], embeddings, records, neighbourhoods, tables)


def _table(file: Path, backends: Sequence[str]) -> ClusterTable:
    from safetensors.numpy import load_file as load_arrays

    a = load_arrays(str(file))
    if a["quality"].shape != (len(a["centroids"]), len(backends)):
        raise ArtifactError(f"{file}: a cluster table of shape {a['quality'].shape} for {len(backends)} backends")
    return ClusterTable(a["centroids"], a["quality"], a["prior_mean"], tuple(backends))
