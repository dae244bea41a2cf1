"""Does serving MiniLM on ONNX Runtime instead of torch change routing quality on real data?

    .venv/bin/python benchmarks/encoder_runtime.py [--runtime onnx|onnx-int8|onnx,onnx-int8] [--sets llmrouter,mmlu_pro,routellm]

The served case: the router (datastore and capability encoder) is trained on the torch embeddings
of the training rows (benchmarks/out's cache, as benchmarks/routing_quality.py uses), and at
serving time each prompt is embedded by the runtime in use (``encoder.runtime``). So only the test
rows are re-embedded, by ``build_encoder`` with that runtime; everything else is
benchmarks/routing_quality.py's ``run_set``: same splits, seeds, trained routers and metrics.
One training serves every runtime: the test set handed to ``run_set`` holds each test row once
per runtime (torch's cached embedding first, then each runtime's), every prediction is per row,
and each copy is scored on its own; the torch copy is the reference, measured in the same run
(it reproduces routing_quality.py's figures). Also printed: how far the embeddings moved (max
|difference|, min / mean cosine) and the share of test prompts whose chosen backend changes
across the benchmark's lambda sweep (mean and worst lambda). A sample of test prompts is
re-embedded with torch to check that the cache is what torch computes today. The issue's rule:
adopt a runtime as the default only if every set's AIQ stays within 0.005 of torch's. Figures
also go to benchmarks/out/encoder_runtime.json (one entry per runtime); the last line is
key=value figures.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import routing_quality as rq
from common import OUT, embeddings, load  # noqa: I001

from router.core.config import AppConfig
from router.offline.evaluation import default_lambdas, evaluate, two_backend, zero_router
from router.offline.routing_data import split_indices
from router.serving.app import build_encoder

TOLERANCE = 0.005
HEADLINE = ("kNN (k=40)", "caprouter kNN datastore alone")      # besides run_set's main router


def encoder_for(runtime: str, batch_size: int):
    """The prompt encoder ``caprouter serve`` builds with ``encoder.runtime: <runtime>``."""
    return build_encoder(AppConfig.model_validate({"encoder": {"runtime": runtime, "batch_size": batch_size}}))


def embed_test(name: str, data, idx: np.ndarray, runtime: str, batch_size: int, encoders: dict) -> tuple[np.ndarray, float]:
    """(len(idx), 384) embeddings of data's prompts idx by ``runtime``, cached under benchmarks/out
    (keyed by the data, the rows, the batch size and the ONNX export's own key); seconds spent."""
    from encoders.minilm import default_model_path, onnx_cache_key

    key = f"{onnx_cache_key(default_model_path(), runtime)}-b{batch_size}-{hash_rows(idx)}"
    cache = OUT / f"emb-{name}-{data.source_hash[:12]}-{runtime}-{key}.npy"
    if cache.exists():
        return np.load(cache), 0.0
    if runtime not in encoders:
        encoders[runtime] = encoder_for(runtime, batch_size)
    t0 = time.perf_counter()
    emb = encoders[runtime].encode([data.prompts[i] for i in idx]).astype(np.float32)
    dt = time.perf_counter() - t0
    np.save(cache, emb)
    return emb, dt


def hash_rows(idx: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(idx, np.int64).tobytes()).hexdigest()[:8]


def embedding_stats(A: np.ndarray, B: np.ndarray) -> dict[str, float]:
    cos = (A * B).sum(1) / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1))
    return {"max_abs_diff": float(np.abs(A - B).max()), "min_cos": float(cos.min()), "mean_cos": float(cos.mean())}


def disagreement(Qa, Ca, Qb, Cb, lams) -> dict[str, float]:
    """Share of prompts whose argmax(Q - lambda * Chat) differs, at each lambda of the sweep."""
    share = np.array([(np.argmax(Qa - lam * Ca, 1) != np.argmax(Qb - lam * Cb, 1)).mean() for lam in lams])
    return {"mean": float(share.mean()), "max": float(share.max()), "lambda0": float(share[0])}


def run_set(name: str, runtimes: list[str], seed: int, ablation: bool, batch_size: int, torch_check: int,
            encoders: dict) -> dict:
    t0 = time.time()
    data = load(name)
    X = embeddings(name, data)
    tr, va, te = split_indices(data, seed=seed)
    te = te[data.complete_rows()[te]]                    # run_set's evaluation rows
    n, m, R = len(data), len(te), len(runtimes)
    emb, enc_s = {}, {}
    for rt in runtimes:
        emb[rt], enc_s[rt] = embed_test(name, data, te, rt, batch_size, encoders)
    check = {}
    if torch_check:
        pick = te[np.random.default_rng(seed).permutation(m)[:torch_check]]
        if "torch" not in encoders:
            encoders["torch"] = encoder_for("torch", batch_size)
        now = encoders["torch"].encode([data.prompts[i] for i in pick])
        check = embedding_stats(X[pick], now)

    # routing_quality.run_set on data whose test rows appear once per runtime (copies of the same
    # rows: same prompts, scores, costs), embedded by torch (the cache) and then by each runtime.
    aug = data.subset(np.concatenate([np.arange(n), *([te] * R)]))
    X_aug = np.concatenate([X, *(emb[rt] for rt in runtimes)])
    te_aug = np.concatenate([te, *(n + k * m + np.arange(m) for k in range(R))])
    parts = [slice(k * m, (k + 1) * m) for k in range(R + 1)]
    scored: list[tuple[list[dict], list[tuple]]] = []
    pairs: list[list[dict]] = []

    def split_evaluate(Q, Chat, Y, C, lambdas=None):
        res = [evaluate(Q[p], Chat[p], Y[p], C[p], lambdas) for p in parts]
        scored.append((res, [(Q[p], Chat[p]) for p in parts]))
        return res[0]

    def split_two_backend(Q, Y, strong, weak):
        res = [two_backend(Q[p], Y[p], strong, weak) for p in parts]
        pairs.append(res)
        return res[0]

    patched = {"load": lambda _name: aug, "embeddings": lambda _name, _data: X_aug,
               "split_indices": lambda _data, seed: (tr, va, te_aug), "evaluate": split_evaluate,
               "zero_router": lambda Y, C: zero_router(Y[parts[0]], C[parts[0]]), "two_backend": split_two_backend}
    saved = {k: getattr(rq, k) for k in patched}
    try:
        for k, v in patched.items():
            setattr(rq, k, v)
        out = rq.run_set(name, seed, ablation)
    finally:
        for k, v in saved.items():
            setattr(rq, k, v)
    labels = [k for k in out["rows"] if k != "zero router"]
    assert len(labels) == len(scored), (labels, len(scored))
    Y, C = data.Y[te], data.C[te]
    lams = default_lambdas(C, Y)
    res = {"set": name, "n_test": m, "main": out["main"], "chosen": out["chosen"], "torch_check": check,
           "zero_aiq": out["rows"]["zero router"]["aiq"], "runtimes": {}}
    for k, rt in enumerate(runtimes, start=1):
        rows, flips = {}, {}
        for label, (ev, qc) in zip(labels, scored):
            rows[label] = {"torch": ev[0], rt: ev[k]}
            if label not in ("random", "oracle"):
                flips[label] = disagreement(*qc[0], *qc[k], lams)
        r = {"embedding": embedding_stats(X[te], emb[rt]), "encode_seconds": enc_s[rt],
             "ms_per_prompt": 1000 * enc_s[rt] / m if enc_s[rt] else None, "rows": rows, "decisions_differ": flips}
        if pairs:
            r["two_backend"] = {label: {"torch": p[0], rt: p[k]} for label, p in zip(labels, pairs)}
        res["runtimes"][rt] = r
    res["seconds"] = time.time() - t0
    return res


def report(results: list[dict], runtimes: list[str]) -> dict[str, str]:
    figures: dict[str, str] = {}
    for rt in runtimes:
        worst = 0.0
        print(f"\n## {rt} against torch (test rows embedded by {rt}; training rows by torch)\n")
        print("| set | router | AIQ torch (reference) | AIQ " + rt + " | delta | quality at best single's cost, torch / "
              + rt + " | decisions differ, mean / worst lambda |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            x = r["runtimes"][rt]
            for label in (r["main"], *HEADLINE):
                a, b = x["rows"][label]["torch"], x["rows"][label][rt]
                d, f = b["aiq"] - a["aiq"], x["decisions_differ"][label]
                worst = max(worst, abs(d))
                print(f"| {r['set']} | {label} | {a['aiq']:.4f} | {b['aiq']:.4f} | {d:+.6f} | "
                      f"{a['q_at_best_cost']:.4f} / {b['q_at_best_cost']:.4f} | {f['mean']:.3%} / {f['max']:.3%} |")
            e, s = x["embedding"], r["set"]
            a, b = x["rows"][r["main"]]["torch"]["aiq"], x["rows"][r["main"]][rt]["aiq"]
            ka, kb = x["rows"]["kNN (k=40)"]["torch"]["aiq"], x["rows"]["kNN (k=40)"][rt]["aiq"]
            figures.update({f"{s}_aiq_torch": f"{a:.4f}", f"{s}_aiq_{rt}": f"{b:.4f}", f"{s}_aiq_delta_{rt}": f"{b - a:+.6f}",
                            f"{s}_knn_aiq_torch": f"{ka:.4f}", f"{s}_knn_aiq_{rt}": f"{kb:.4f}",
                            f"{s}_max_abs_diff_{rt}": f"{e['max_abs_diff']:.2e}", f"{s}_min_cos_{rt}": f"{e['min_cos']:.6f}",
                            f"{s}_decisions_differ_{rt}": f"{x['decisions_differ'][r['main']]['mean']:.6f}"})
        print("\n| set | test prompts | max abs embedding difference | cosine to torch, min / mean | "
              "encode ms per prompt | torch today vs cache (sample), max abs diff / min cosine |")
        print("|---|---|---|---|---|---|")
        for r in results:
            x, c = r["runtimes"][rt], r["torch_check"]
            ms = "cached" if x["ms_per_prompt"] is None else f"{x['ms_per_prompt']:.2f}"
            tc = f"{c['max_abs_diff']:.2e} / {c['min_cos']:.7f}" if c else "-"
            print(f"| {r['set']} | {r['n_test']} | {x['embedding']['max_abs_diff']:.2e} | "
                  f"{x['embedding']['min_cos']:.6f} / {x['embedding']['mean_cos']:.6f} | {ms} | {tc} |")
        verdict = "yes" if worst <= TOLERANCE else "no"
        print(f"\n{rt}: largest |AIQ delta| over sets and routers {worst:.6f}; within {TOLERANCE}: {verdict}")
        figures[f"worst_abs_aiq_delta_{rt}"] = f"{worst:.6f}"
        figures[f"within_{TOLERANCE}_{rt}"] = verdict
    return figures


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", default="onnx", help="onnx, onnx-int8, or both comma-separated (one training)")
    ap.add_argument("--sets", default="llmrouter,mmlu_pro,routellm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="encoder batch size (onnx-int8 runs batch 1 anyway)")
    ap.add_argument("--torch-check", type=int, default=64, help="test prompts re-embedded by torch to check the cache")
    ap.add_argument("--ablation", action="store_true", help="also score routing_quality.py's ablation rows")
    args = ap.parse_args()
    runtimes = args.runtime.split(",")
    bad = [rt for rt in runtimes if rt not in ("onnx", "onnx-int8")]
    if bad:
        ap.error(f"--runtime: unknown {', '.join(bad)}")
    t0 = time.time()
    encoders: dict = {}
    results = []
    for s in args.sets.split(","):
        results.append(run_set(s, runtimes, args.seed, args.ablation, args.batch_size, args.torch_check, encoders))
        print(f"{s}: {results[-1]['seconds']:.0f} s", flush=True)
    figures = report(results, runtimes)
    figures["seconds"] = f"{time.time() - t0:.0f}"
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "encoder_runtime.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    for rt in runtimes:
        saved[rt] = {"sets": args.sets, "seed": args.seed, "batch_size": args.batch_size,
                     "results": [{**{k: v for k, v in r.items() if k != "runtimes"}, **r["runtimes"][rt]} for r in results]}
    path.write_text(json.dumps(saved, indent=2))
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
