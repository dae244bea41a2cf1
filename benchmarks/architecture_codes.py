"""Architecture codes of SmolLM2-135M-Instruct and the MoE backend against the dense model, in one run.

    .venv/bin/python benchmarks/architecture_codes.py [--codes DIR] [--aptitude FILE] [--tokens 48]
        [--rounds 3] [--batch 8] [--recover-steps N] [--plot docs/img/architecture_codes.png]

Rows: static codes (MLP neurons by activation-aware importance, whole layers by Block Influence;
backends/pruning.py), the prompt-tailored codes of ``caprouter codes`` (--codes; built there with
the defaults if missing), and the Read-ME MoE backend (backends/moe.py; 4 of 8 routed experts, half
of each MLP shared). For each, side by side: parameters held and active per token (SmolLM2 ties its
output projection to the embedding table, counted once as held and as a matmul when active),
decode tokens/s at batch 1 through the serving decode loop (EOS ignored, rows alternating on the
same prompts, median after a warm-up round), tokens/s at batch --batch with HF generate (the MoE:
its requests grouped by expert set, each group on the union of its experts), perplexity on
held-out prose (../shared/docs/background.md, not used for calibration), the mean NLL of the
dense model's answers to the held-out calibration prompts, and, with --aptitude (outcomes of
``caprouter aptitude`` on docs/examples/architecture-codes.yaml), aptitude-suite accuracy and
routing across the tailored codes under a compute budget against the static code of equal
compute. Writes a PNG of quality against compute. The last line is key=value figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import time

import numpy as np
from common import ROOT  # noqa: I001

CODES: dict[str, dict | None] = {
    "dense": None,
    "mlp90": {"mlp_keep": 0.9},
    "mlp75": {"mlp_keep": 0.75},
    "mlp60": {"mlp_keep": 0.6},
    "mlp50": {"mlp_keep": 0.5},
    "layers67-mlp75": {"layers_keep": 0.67, "mlp_keep": 0.75},
    "layers50": {"layers_keep": 0.5},
}
PROMPTS = ["Explain why the sky is blue.", "Write a haiku about autumn.", "What is 12 * 7?",
           "Name three rivers in Europe.", "Give me a tip for learning to cook.", "What does a compiler do?",
           "Describe a cat in one sentence.", "Why do leaves change colour?"]


def perplexity(model, tok, text: str, max_tokens: int = 4096) -> float:
    import torch

    ids = tok(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    nll, n = 0.0, 0
    with torch.inference_mode():
        for s in range(0, ids.shape[1] - 1, 512):
            chunk = ids[:, s:s + 513]
            logits = model(input_ids=chunk[:, :-1]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            n += chunk.shape[1] - 1
    return math.exp(nll / n)


def batch_tps(model, tok, batch: int, tokens: int) -> float:
    import torch

    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                     add_generation_prompt=True) for i in range(batch)]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)     # warm-up
        t = time.perf_counter()
        model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        dt = time.perf_counter() - t
    return batch * tokens / dt


async def decode_tps(backends: dict, tokens: int, rounds: int) -> dict[str, float]:
    from backends.base import Finished, GenerationRequest

    res: dict[str, list[float]] = {n: [] for n in backends}
    for r in range(rounds + 1):
        for p in PROMPTS[:4]:
            for n, b in backends.items():
                async for ev in b.generate(GenerationRequest(messages=[("user", p)], max_tokens=tokens, ignore_eos=True)):
                    if isinstance(ev, Finished) and r > 0:
                        res[n].append((ev.completion_tokens - 1) / ev.decode_s)
    return {n: float(np.median(v)) for n, v in res.items()}


def heldout_nll(model, tok, seqs_plens) -> float:
    from router.offline.codes import answer_nll

    seqs, plens = seqs_plens
    return float(answer_nll(model, seqs, plens).mean())


def moe_heldout_nll(b, seqs_plens, texts) -> float:
    from router.offline.codes import answer_nll

    seqs, plens = seqs_plens
    sets = b.expert_sets(b.encoder.encode(texts))
    vals = []
    for s, sq, pl in zip(sets, seqs, plens):
        b.install(b.weights(s))
        vals.append(answer_nll(b.model, [sq], [pl])[0])
    return float(np.mean(vals))


def moe_batch_tps(b, batch: int, tokens: int, cap: float) -> tuple[float, float, int]:
    """Expert-aware batching: the batch's requests grouped by backends.moe.plan_batches, each group
    decoded by HF generate on the union of its members' experts. Returns (tokens/s, mean experts
    on per layer, groups)."""
    import torch

    from backends.moe import plan_batches, union

    tok = b.tokenizer
    tok.padding_side = "left"
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    sets = b.expert_sets(b.encoder.encode(prompts))
    groups = plan_batches(sets, batch, cap)
    on = []
    t = 0.0
    for g in groups:
        u = union([sets[i] for i in g])
        on.append(np.mean([len(x) for x in u]))
        b.install(b.weights(u))
        texts = [tok.apply_chat_template([{"role": "user", "content": prompts[i]}], tokenize=False,
                                         add_generation_prompt=True) for i in g]
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            b.model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)     # warm-up
            t0 = time.perf_counter()
            b.model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            t += time.perf_counter() - t0
    return batch * tokens / t, float(np.mean(on)), len(groups)


def aptitude_figures(paths, names: dict[str, str], static_equal: str, tailored: list[str], seed: int = 0) -> dict:
    """From aptitude outcomes (files merged by item id): accuracy and mean cost of every backend,
    and routing across the tailored codes with the budget = the static code's mean cost: 10-fold
    cross-validated kNN predictions, the batch assignment of router.policy.budget (the RouteBatch solver)."""
    import dataclasses

    from datastore.records import read_outcomes
    from datastore.store import FaissKnnDatastore
    from encoders.minilm import MiniLMEncoder
    from router.policy.budget import assign

    merged: dict = {}
    for path in paths:
        for r in read_outcomes(path):
            m = merged.setdefault(r.id, r)
            if m is not r:
                merged[r.id] = dataclasses.replace(m, scores={**m.scores, **r.scores}, cost={**m.cost, **r.cost})
    rows = [r for r in merged.values() if all(n in r.scores and n in r.cost for n in names.values())]
    Y = {k: np.array([r.scores[n] for r in rows]) for k, n in names.items()}
    C = {k: np.array([r.cost[n] for r in rows]) for k, n in names.items()}
    out = {"items": len(rows), "accuracy": {k: float(v.mean()) for k, v in Y.items()},
           "cost": {k: float(v.mean()) for k, v in C.items()}}
    cols = [names[t] for t in tailored]
    emb = MiniLMEncoder().encode([r.prompt for r in rows])
    fold = np.random.default_rng(seed).permutation(len(rows)) % 10
    Q = np.zeros((len(rows), len(cols)))
    Chat = np.zeros((len(rows), len(cols)))
    Cm = np.stack([C[t] for t in tailored], 1)
    for f in range(10):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        store = FaissKnnDatastore.from_records(emb[tr], [rows[i] for i in tr], k=32, prior_strength=2.0, temperature=0.05)
        est = store.estimate(emb[te])
        idx = [est.column(c) for c in cols]
        Q[te] = est.quality[:, idx]
        # predicted cost (neighbours' recorded costs), never the item's own: that would leak
        # how long the code's answer to it was
        Chat[te] = np.where(np.isnan(est.cost[:, idx]), Cm[tr].mean(0), est.cost[:, idx])
    budget = float(C[static_equal].mean())
    pick, _ = assign(Q, Chat, budget)
    n = np.arange(len(rows))
    Ym = np.stack([Y[t] for t in tailored], 1)
    out["routed"] = {"budget": budget, "accuracy": float(Ym[n, pick].mean()), "cost": float(Cm[n, pick].mean()),
                     "share": {t: float((pick == j).mean()) for j, t in enumerate(tailored)},
                     "oracle_accuracy": float(Ym.max(1).mean())}
    return out


def measure(codes: dict, args, compute, encoder, models) -> dict:
    """Load every row's backend and measure it (see the module docstring)."""
    from backends.calibration import calibration_pool, split_pool
    from backends.moe import MoEBackend
    from backends.pruning import teacher_sequences
    from backends.transformers_backend import TransformersBackend
    from router.core.config import BackendConfig
    from router.offline.codes import prompt_lengths

    text = (ROOT.parent / "shared" / "docs" / "background.md").read_text()
    backends = {}

    async def load_all() -> None:
        for name, o in codes.items():
            o = dict(o)
            kind = o.pop("kind", "transformers")
            opts = {"model": "smollm2-135m-instruct", **o}
            cls = MoEBackend if kind == "moe" else TransformersBackend
            b = cls(BackendConfig(name=name, kind=kind, options=opts), cost_unit="GFLOP", models_dir=models,
                    compute=compute, encoder=encoder)
            await b.load()
            if b.status()[0].value != "ready":
                raise SystemExit(f"{name}: {b.status()[1]}")
            backends[name] = b

    asyncio.run(load_all())
    _, held = split_pool(calibration_pool())
    dense = backends["dense"]
    h_texts = [p.text for p in held]
    h_seqs = compute.run(teacher_sequences, dense.model, dense.tokenizer, h_texts)
    h = (h_seqs, prompt_lengths(dense.tokenizer, h_texts))
    tps1 = asyncio.run(decode_tps(backends, args.tokens, args.rounds))
    rows = {}
    for name, b in backends.items():
        model, tok = b.model, b.tokenizer
        r = {"params": sum(p.numel() for p in model.parameters()), "active": b.active_parameters(),
             "layers": model.config.num_hidden_layers, "tps1": tps1[name]}
        if isinstance(b, MoEBackend):
            m0 = b.mlps[0]
            r["mlp"] = m0.shared + b.opts.top_k * m0.block
            r["tpsB"], r["experts_on"], r["groups"] = compute.run(moe_batch_tps, b, args.batch, args.tokens,
                                                                  b.opts.top_k + 1)
            b.install(b.weights(b.expert_sets(encoder.encode([text[:2000]]))[0]))
            r["ppl"] = compute.run(perplexity, model, tok, text)
            r["nll"] = compute.run(moe_heldout_nll, b, h, h_texts)
            r["memory"] = b.memory_bytes()
        else:
            r["mlp"] = model.config.intermediate_size
            r["tpsB"] = compute.run(batch_tps, model, tok, args.batch, args.tokens)
            r["ppl"] = compute.run(perplexity, model, tok, text)
            r["nll"] = compute.run(heldout_nll, model, tok, h)
        rows[name] = r
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--codes", default=None, help="tailored codes folder (default: $CAPROUTER_HOME/codes; built if missing)")
    ap.add_argument("--aptitude", nargs="+", help="aptitude outcomes of docs/examples/architecture-codes.yaml's "
                    "backends (several files are merged by item id; the bundled one has the dense and mlp75 rows)")
    ap.add_argument("--plot", default="docs/img/architecture_codes.png")
    ap.add_argument("--from-json", action="store_true",
                    help="reuse the measurements of the last run (benchmarks/out/architecture_codes.json)")
    ap.add_argument("--recover-steps", type=int, default=0,
                    help="also measure the layer-pruned codes after this many distillation steps (built once, cached)")
    args = ap.parse_args()
    codes: dict[str, dict] = {n: {"prune": p} if p else {} for n, p in CODES.items()}
    if args.recover_steps:
        for name in ("layers67-mlp75", "layers50"):
            codes[f"{name}-kd{args.recover_steps}"] = {"prune": {**CODES[name], "recover_steps": args.recover_steps}}

    from pathlib import Path

    from backends.weights import resolve_weights
    from encoders.minilm import MiniLMEncoder
    from router.core.compute import ComputeThread
    from router.core.config import caprouter_home
    from router.offline.codes import CodeSpec, build_codes, load_manifest

    compute = ComputeThread()
    encoder = MiniLMEncoder(compute=compute)
    models = caprouter_home() / "models"
    codes_dir = Path(args.codes).expanduser() if args.codes else caprouter_home() / "codes"
    if not (codes_dir / "codes.json").exists():
        print(f"building the tailored codes in {codes_dir} (caprouter codes, defaults)")
        build_codes(resolve_weights("smollm2-135m-instruct", models), codes_dir,
                    [CodeSpec("mlp90-a", 0.9, 1 / 3), CodeSpec("mlp75-b", 0.75, 1 / 3), CodeSpec("mlp60-c", 0.6, 1 / 3)],
                    encoder=encoder)
    manifest = load_manifest(codes_dir)
    tailored = [f"code-{c['name']}" for c in manifest["codes"]]
    for c in manifest["codes"]:
        codes[f"code-{c['name']}"] = {"model": str(codes_dir / c["name"])}
    codes["moe-4of8"] = {"kind": "moe", "experts": 8, "top_k": 4, "shared": 0.5}

    out_json = ROOT / "benchmarks" / "out" / "architecture_codes.json"
    if args.from_json:
        rows = json.loads(out_json.read_text())["rows"]
    else:
        rows = measure(codes, args, compute, encoder, models)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({"rows": rows}, indent=1))
    compute.shutdown()
    d = rows["dense"]
    print(f"{'code':<22}{'layers':>7}{'MLP':>6}{'held':>8}{'active':>8}{'tok/s b1':>10}{'x':>6}"
          f"{f'tok/s b{args.batch}':>11}{'x':>6}{'perplexity':>12}{'answer NLL':>12}")
    for n, r in rows.items():
        print(f"{n:<22}{r['layers']:>7}{r['mlp']:>6}{r['params'] / 1e6:>7.1f}M{r['active'] / d['active']:>8.2f}"
              f"{r['tps1']:>10.1f}{r['tps1'] / d['tps1']:>6.2f}{r['tpsB']:>11.1f}{r['tpsB'] / d['tpsB']:>6.2f}"
              f"{r['ppl']:>12.1f}{r['nll']:>12.3f}")
    moe = rows["moe-4of8"]
    mem = moe["memory"]
    print(f"MoE: batch of {args.batch} in {moe['groups']} expert-aware group(s), {moe['experts_on']:.2f} of 8 routed "
          f"experts on per layer (4 per request); memory: one dense copy {mem['dense'] / 2**20:.0f} MiB + "
          f"{mem['sets_cached']} cached expert set(s) {mem['expert_sets'] / 2**20:.0f} MiB, against "
          f"{rows['mlp75']['params'] * 4 / 2**20:.0f} MiB for each materialized copy of a 75% code")
    ev = manifest["evaluation"]
    print("joint assignment (held-out calibration prompts; answer NLL, tailored vs one static mask of the same size):")
    for c in manifest["codes"]:
        e = ev[c["name"]]
        print(f"  {c['name']}: {e['prompts']} prompts ({', '.join(f'{k} {v}' for k, v in e['categories'])}) "
              f"{e['tailored_nll']:.3f} vs {e['static_nll']:.3f}")
    print(f"  routed mix at {ev['mix']['avg_mlp_keep']:.3f} of the MLP: {ev['mix']['routed_nll']:.3f} vs one static "
          f"mask of that size {ev['mix']['static_same_average_nll']:.3f}")
    figs = {f"{n}_{k}": v for n, r in rows.items() for k, v in r.items() if k in ("tps1", "tpsB", "ppl", "nll")}
    figs.update({f"{n}_speedup_b1": r["tps1"] / d["tps1"] for n, r in rows.items() if n != "dense"})
    apt = None
    if args.aptitude:
        names = {"dense": "smollm2-135m", "mlp75": "smollm2-135m-mlp75", "moe-4of8": "smollm2-135m-moe",
                 **{t: t for t in tailored}}
        apt = aptitude_figures([Path(p) for p in args.aptitude], names, "mlp75", tailored)
        print(f"aptitude suite ({apt['items']} items): " + ", ".join(f"{k} {v:.3f}" for k, v in apt["accuracy"].items()))
        ro = apt["routed"]
        print(f"routing across the tailored codes at the static mlp75's mean cost ({ro['budget']:.2f} GFLOP): accuracy "
              f"{ro['accuracy']:.3f} at {ro['cost']:.2f} GFLOP vs static mlp75 {apt['accuracy']['mlp75']:.3f} "
              f"(shares {', '.join(f'{k} {v:.0%}' for k, v in ro['share'].items())}; oracle over the codes "
              f"{ro['oracle_accuracy']:.3f})")
        figs.update({f"apt_{k}": v for k, v in apt["accuracy"].items()})
        figs["apt_routed_codes"] = ro["accuracy"]
    plot(args.plot, rows, apt, tailored)
    print(f"plot: {args.plot}")
    print(" ".join(f"{k}={v:.4g}" for k, v in figs.items()))
    return 0


def plot(path: str, rows: dict, apt: dict | None, tailored: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    d = rows["dense"]
    fig, axes = plt.subplots(1, 2 if apt else 1, figsize=(12 if apt else 6.4, 4.4), dpi=120, squeeze=False)
    ax = axes[0, 0]
    for n, r in rows.items():
        kind = "D" if n.startswith("moe") else "o" if n.startswith("code-") else "s"
        ax.plot(r["active"] / d["active"], r["nll"], kind, ms=7, label=n)
    ax.set_xlabel("compute per token (active parameters, share of dense)")
    ax.set_ylabel("NLL of the dense model's answers (held-out prompts)")
    ax.set_title("Quality against compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if apt:
        ax = axes[0, 1]
        for k, q in apt["accuracy"].items():
            ax.plot(apt["cost"][k], q, "o" if k.startswith("code-") else "D" if k.startswith("moe") else "s", ms=7, label=k)
        ro = apt["routed"]
        ax.plot(ro["cost"], ro["accuracy"], "*", ms=13, label="routed across the tailored codes")
        ax.set_xlabel("mean cost per request (GFLOP)")
        ax.set_ylabel("aptitude-suite accuracy")
        ax.set_title("Aptitude suite")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
