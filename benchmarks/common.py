"""Shared by the benchmarks: the routing data sets in ../shared and a cache of their embeddings."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(os.environ.get("CAPROUTER_SHARED_DATA", ROOT.parent / "shared" / "data" / "routing"))
OUT = ROOT / "benchmarks" / "out"


def dataset_costs(name: str) -> dict[str, float] | None:
    """Cost facts the files themselves lack: MMLU-Pro by active parameters (billions), RouteLLM by
    price per million tokens, both from models.json. LLMRouter carries its prices per row."""
    models = json.loads((SHARED / "models.json").read_text())
    if name == "mmlu_pro":
        return {m: v["active_b"] for m, v in models["mmlu_pro"].items() if v.get("active_b")}
    if name == "routellm":
        return {m: v["price_per_m_tokens"] for m, v in models["routellm"].items()}
    return None


def load(name: str):
    """RoutingData of ../shared/data/routing/<name>.jsonl.gz, restricted to backends with costs."""
    from router.offline.routing_data import load_routing_data

    path = SHARED / f"{name}.jsonl.gz"
    costs = dataset_costs(name)
    if name == "mmlu_pro":
        # Models with no public size have no cost: left out, as the benchmark's definition says.
        # Written uncompressed: a gzip header carries a timestamp, which would change the hash
        # that keys the embedding cache.
        import gzip
        import tempfile

        keep = set(costs)
        tmp = Path(tempfile.mkstemp(suffix=".jsonl")[1])
        with gzip.open(path, "rt") as src, open(tmp, "w") as dst:
            for line in src:
                r = json.loads(line)
                r["scores"] = {k: v for k, v in r["scores"].items() if k in keep}
                r.pop("meta", None)
                dst.write(json.dumps(r) + "\n")
        data = load_routing_data(tmp, costs)
        tmp.unlink()
        return data
    return load_routing_data(path, costs)


def embeddings(name: str, data, encoder=None) -> np.ndarray:
    """(n, 384) MiniLM embeddings of the data's prompts, cached under benchmarks/out."""
    OUT.mkdir(parents=True, exist_ok=True)
    cache = OUT / f"emb-{name}-{data.source_hash[:12]}.npy"
    if cache.exists():
        return np.load(cache)
    from tqdm import tqdm

    if encoder is None:
        from encoders.minilm import MiniLMEncoder

        encoder = MiniLMEncoder(batch_size=64)
    parts = []
    step = 256
    for s in tqdm(range(0, len(data), step), desc=f"embedding {name}", unit="batch"):
        parts.append(encoder.encode(data.prompts[s:s + step]))
    emb = np.concatenate(parts).astype(np.float32)
    np.save(cache, emb)
    return emb
