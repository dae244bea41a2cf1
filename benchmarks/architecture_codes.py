"""Static architecture codes of SmolLM2-135M-Instruct against the dense model, in one run.

    .venv/bin/python benchmarks/architecture_codes.py [--tokens 48] [--rounds 3] [--batch 8]

First version for issue 4: structured codes pruned once with static masks (MLP neurons by
activation-aware importance, whole layers by Block Influence; backends/pruning.py), no recovery
step yet. For each code and the dense model, side by side: parameters (SmolLM2 ties its output
projection to the embedding table, so every parameter is used by every token: parameters are the
per-token compute), decode tokens/s at batch 1 through the serving decode loop
(TransformersBackend, EOS ignored, codes alternating on the same prompts, median after a warm-up
round), and with --recover-steps N the layer-pruned codes again after N steps of distillation from
the dense model (backends.pruning.distill), tokens/s at batch --batch with HF generate, and perplexity on held-out prose
(../shared/docs/background.md, not used for calibration). The last line is key=value figures.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import time

import numpy as np
from common import ROOT  # noqa: I001

CODES: dict[str, dict | None] = {
    "dense": None,
    "mlp75": {"mlp_keep": 0.75},
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--recover-steps", type=int, default=0,
                    help="also measure the layer-pruned codes after this many distillation steps (built once, cached)")
    args = ap.parse_args()
    codes = dict(CODES)
    if args.recover_steps:
        for name in ("layers67-mlp75", "layers50"):
            codes[f"{name}-kd{args.recover_steps}"] = {**CODES[name], "recover_steps": args.recover_steps}

    from backends.transformers_backend import TransformersBackend
    from router.compute import ComputeThread
    from router.config import BackendConfig, caprouter_home

    text = (ROOT.parent / "shared" / "docs" / "background.md").read_text()
    compute = ComputeThread()
    backends = {}

    async def load_all() -> None:
        for name, prune in codes.items():
            opts = {"model": "smollm2-135m-instruct", **({"prune": prune} if prune else {})}
            b = TransformersBackend(BackendConfig(name=name, kind="transformers", options=opts), cost_unit="GFLOP",
                                    models_dir=caprouter_home() / "models", compute=compute)
            await b.load()
            backends[name] = b

    asyncio.run(load_all())
    tps1 = asyncio.run(decode_tps(backends, args.tokens, args.rounds))
    rows = {}
    for name, b in backends.items():
        model, tok = b.model, b.tokenizer
        total = sum(p.numel() for p in model.parameters())
        rows[name] = {"params": total, "layers": model.config.num_hidden_layers,
                      "mlp": model.config.intermediate_size, "tps1": tps1[name],
                      "tpsB": compute.run(batch_tps, model, tok, args.batch, args.tokens),
                      "ppl": compute.run(perplexity, model, tok, text)}
    compute.shutdown()
    d = rows["dense"]
    print(f"{'code':<16}{'layers':>7}{'MLP':>6}{'params':>9}{'compute':>9}{'tok/s b1':>10}{'x':>6}"
          f"{f'tok/s b{args.batch}':>11}{'x':>6}{'perplexity':>12}")
    for n, r in rows.items():
        print(f"{n:<16}{r['layers']:>7}{r['mlp']:>6}{r['params'] / 1e6:>8.1f}M"
              f"{r['params'] / d['params']:>9.2f}{r['tps1']:>10.1f}{r['tps1'] / d['tps1']:>6.2f}"
              f"{r['tpsB']:>11.1f}{r['tpsB'] / d['tpsB']:>6.2f}{r['ppl']:>12.1f}")
    print(" ".join(f"{n}_{k}={v:.3g}" for n, r in rows.items() for k, v in r.items()
                   if k in ("tps1", "tpsB", "ppl")) + " " +
          " ".join(f"{n}_speedup_b1={r['tps1'] / d['tps1']:.2f}" for n, r in rows.items() if n != "dense"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
