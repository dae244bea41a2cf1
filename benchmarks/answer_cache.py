"""Semantic answer cache: hit rate on paraphrases and wrong hits, by similarity threshold.

    .venv/bin/python benchmarks/answer_cache.py [--thresholds 0.8,0.85,...] [--unrelated 2000] [--runtime R]

The cache answers a prompt from the cached answer of the most similar cached prompt (same tenant,
backend and generation parameters) when their routing embeddings' cosine reaches the deployment's
threshold (router/serving/answer_cache.py). Whether that is right depends on the threshold:

- Paraphrases, which should hit: the aptitude suite's 327 distinct prompts (arithmetic, number
  comparisons and sequences, capitals and other facts, instructions), each with its reference
  answer, are cached; each is then asked again in two to three other phrasings written for this
  benchmark (the same question, the same answer: "What is 4 + 9? Answer with just the number." ->
  "Add 4 and 9. Give just the number."). A hit is right when the cached answer's reference is the
  query's; wrong when it is another item's: the suite is full of near misses, the same template
  with other operands ("What is 4 + 8?"), which is where a semantic cache goes wrong.
- Unrelated prompts, which should not hit: real prompts of the shared routing data sets, half
  cached, the other half asked (exact duplicates of a cached text left out); every hit there
  serves another question's answer.

Embeddings are the server's (``build_encoder`` with ``--runtime``, the default's by default).
Prints one table (threshold, paraphrase hit rate, share of hits that are wrong, wrong hits per
query, unrelated-prompt hit rate) and the threshold it recommends: the lowest whose wrong hits stay
under 1% of paraphrase queries and 0.5% of unrelated prompts. (The unrelated prompts that hit at
high thresholds are near-duplicates in the data: one exam question with another option list, whose
answer letter may differ, so every such hit counts as wrong.) Figures also go to
benchmarks/out/answer_cache.json. Not a test. The last line is key=value figures.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import time
from pathlib import Path

import numpy as np
from common import OUT, SHARED  # noqa: I001

from router.core.config import AppConfig, builtin_data
from router.serving.app import build_encoder

_NUM = r"(-?\d+)"
# (pattern, paraphrases): groups of the pattern fill the paraphrases' {0}, {1}, ...
RULES: list[tuple[str, list[str]]] = [
    (rf"^What is {_NUM} \+ {_NUM}\? Answer with just the number\.$",
     ["What's {0} plus {1}? Reply with only the number.", "Add {0} and {1}. Give just the number.",
      "{0} + {1} = ? Only the number, please."]),
    (rf"^What is {_NUM} - {_NUM}\? Answer with just the number\.$",
     ["What's {0} minus {1}? Reply with only the number.", "Subtract {1} from {0}. Give just the number."]),
    (rf"^What is {_NUM} times {_NUM}\? Answer with just the number\.$",
     ["What's {0} multiplied by {1}? Reply with only the number.", "Multiply {0} by {1}. Give just the number."]),
    (rf"^What is {_NUM} divided by {_NUM}\? Answer with just the number\.$",
     ["What's {0} / {1}? Reply with only the number.", "Divide {0} by {1}. Give just the number."]),
    (r"^What number comes next in the sequence (.+)\? Answer with just the number\.$",
     ["Continue the sequence {0} with the next number. Only the number.",
      "Which number follows {0}? Reply with just the number."]),
    (rf"^Which number is (smaller|larger), {_NUM} or {_NUM}\? Answer with just the number\.$",
     ["Of {1} and {2}, which is {0}? Reply with only the number.",
      "Between {1} and {2}, give the {0} one. Just the number."]),
    (r"^What is the capital of (.+)\? Answer in a few words\.$",
     ["Name the capital city of {0}, briefly.", "Which city is the capital of {0}? A few words, please."]),
    (r"^Reply with only the word '(\w+)' and nothing else\.$",
     ["Say '{0}' and nothing more.", "Respond with just the word '{0}'."]),
    (r"^Write the word '?(\w+)'? in capital letters\.$",
     ["Give me the word {0} in uppercase letters.", "Spell {0} in all caps."]),
    (rf"^(\w+) has {_NUM} (\w+) and gets {_NUM} more\. How many \w+ does \w+ have now\? "
     r"Answer with just the number\.$",
     ["{0} starts with {1} {2} and receives {3} more. How many {2} now? Just the number."]),
    (rf"^(\w+) has {_NUM} (\w+) and gives away {_NUM}\. How many \w+ does \w+ have left\? "
     r"Answer with just the number\.$",
     ["{0} had {1} {2} and gave {3} away. How many {2} are left? Just the number."]),
    (r"^Repeat this sentence exactly: (.+)$",
     ["Say back this sentence word for word: {0}", "Copy this sentence exactly as written: {0}"]),
    (r"^(.+\?) Answer yes or no\.$",
     ["{0} Reply with yes or no only.", "Yes or no: {0}"]),
    (r"^(.+\?) Answer in a few words\.$",       # the one-off facts
     ["Quick question: {0} Keep it short.", "Briefly: {0}"]),
]


def paraphrases(prompt: str) -> list[str]:
    for pattern, outs in RULES:
        m = re.match(pattern, prompt)
        if m:
            g = m.groups()
            if pattern.startswith("^(.+\\?)"):        # lower-case the question's first letter after a lead-in
                g = (g[0][0].lower() + g[0][1:],) if outs[0].startswith("Quick") else g
            return [o.format(*g) for o in outs]
    return []


def answer_of(item: dict) -> str:
    return str(item.get("reference", item.get("accept")))


def suite() -> tuple[list[str], list[str], list[str], list[int]]:
    """(cached prompts, their answers, paraphrase queries, index of the cached prompt each paraphrases)."""
    rows = [json.loads(line) for line in open(builtin_data("aptitude_suite.jsonl"))]
    prompts: dict[str, str] = {}
    for r in rows:
        prompts.setdefault(r["prompt"], answer_of(r))
    cached = list(prompts)
    queries, source = [], []
    for i, p in enumerate(cached):
        for q in paraphrases(p):
            queries.append(q)
            source.append(i)
    return cached, [prompts[p] for p in cached], queries, source


def real_prompts(n: int, seed: int) -> list[str]:
    out: list[str] = []
    for name in ("llmrouter", "mmlu_pro", "routellm"):
        path = SHARED / f"{name}.jsonl.gz"
        if path.exists():
            with gzip.open(path, "rt") as f:
                out.extend(json.loads(line)["prompt"] for line in f)
    rng = np.random.default_rng(seed)
    out = sorted(set(out))
    rng.shuffle(out)
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--thresholds", default="0.80,0.85,0.90,0.92,0.94,0.95,0.96,0.97,0.98,0.99")
    ap.add_argument("--unrelated", type=int, default=2000, help="real prompts (half cached, half asked)")
    ap.add_argument("--runtime", help="encoder.runtime (default: the server's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(OUT / "answer_cache.json"))
    args = ap.parse_args()
    cfg = AppConfig.model_validate({"encoder": {"runtime": args.runtime}} if args.runtime else {})
    t0 = time.perf_counter()
    encoder = build_encoder(cfg)
    cached, answers, queries, source = suite()
    missing = [p for p in cached if not paraphrases(p)]
    C, Q = encoder.encode(cached), encoder.encode(queries)
    sims = Q @ C.T                                   # (queries, cached)
    best = sims.argmax(1)
    best_sim = sims[np.arange(len(queries)), best]
    right = np.array([answers[b] == answers[s] for b, s in zip(best, source)])
    real = real_prompts(args.unrelated, args.seed)
    half = len(real) // 2
    stored, asked = real[:half], [p for p in real[half:] if p not in set(real[:half])]
    R = encoder.encode(stored) @ encoder.encode(asked).T if stored and asked else np.zeros((0, 0))
    unrelated_best = R.max(0) if R.size else np.zeros(0)
    print(f"{len(cached)} cached suite prompts, {len(queries)} paraphrases ({len(missing)} prompts without a "
          f"rule), {len(asked)} unrelated real prompts against {len(stored)} cached; encoder runtime "
          f"{cfg.encoder.runtime}; {time.perf_counter() - t0:.0f} s\n")
    print("| threshold | paraphrases answered from the cache | of those hits, wrong answer | wrong hits per "
          "paraphrase query | unrelated real prompts hit |")
    print("|---|---|---|---|---|")
    table = []
    for t in (float(x) for x in args.thresholds.split(",")):
        hit = best_sim >= t
        wrong = hit & ~right
        u = float((unrelated_best >= t).mean()) if len(unrelated_best) else float("nan")
        row = {"threshold": t, "hit_rate": float(hit.mean()), "wrong_share_of_hits": float(wrong.sum() / max(hit.sum(), 1)),
               "wrong_per_query": float(wrong.mean()), "unrelated_hit_rate": u}
        table.append(row)
        print(f"| {t:.2f} | {row['hit_rate']:.1%} | {row['wrong_share_of_hits']:.1%} | {row['wrong_per_query']:.2%} "
              f"| {u:.2%} |")
    ok = [r for r in table if r["wrong_per_query"] < 0.01 and not r["unrelated_hit_rate"] >= 0.005]
    rec = min(ok, key=lambda r: r["threshold"]) if ok else None
    print()
    if rec is None:
        print("no threshold keeps wrong hits under 1% of paraphrase queries and 0.5% of unrelated prompts")
    else:
        print(f"recommended semantic_threshold: {rec['threshold']:.2f} (paraphrase hit rate {rec['hit_rate']:.1%}, "
              f"wrong hits {rec['wrong_per_query']:.2%} of queries, unrelated hits {rec['unrelated_hit_rate']:.2%})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"runtime": cfg.encoder.runtime, "table": table, "recommended": rec,
                                           "cached": len(cached), "queries": len(queries),
                                           "unrelated": len(asked)}, indent=2))
    figures = [f"t{r['threshold']:.2f}_hit={r['hit_rate']:.3f} t{r['threshold']:.2f}_wrong={r['wrong_per_query']:.4f} "
               f"t{r['threshold']:.2f}_unrelated={r['unrelated_hit_rate']:.4f}" for r in table]
    print(" ".join(figures) + f" recommended={rec['threshold'] if rec else 'none'}")


if __name__ == "__main__":
    main()
