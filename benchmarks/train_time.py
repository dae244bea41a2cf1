"""How long `caprouter train` takes on a user-sized data set: 1,000 LLMRouter prompts x 9 backends
(issue 17's target: at most 60 s on 2 cores, embedding included), end to end as a user runs it
(a subprocess: start-up, embedding, choosing on folds, the served fit, the artifact).

Reference, measured in the same run: `--router datastore`, the floor every run pays (start-up,
embedding, the datastore's neighbourhoods on the folds).

    .venv/bin/python benchmarks/train_time.py [--prompts 1000] [--seed 0]
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SHARED  # noqa: I001


def run(data: Path, out: Path, router: str, seed: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = subprocess.run([str(Path(sys.executable).parent / "caprouter"), "train", "--data", str(data), "--out", str(out),
                        "--router", router, "--seed", str(seed)], capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    print(r.stdout)
    return wall, json.loads((out / "manifest.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = [json.loads(line) for line in gzip.open(SHARED / "llmrouter.jsonl.gz", "rt")]
    rows = [r for r in rows if r["split"] == "train"]
    pick = np.random.default_rng(args.seed).choice(len(rows), args.prompts, replace=False)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "slice.jsonl.gz"
        with gzip.open(data, "wt") as f:
            for i in sorted(pick):
                f.write(json.dumps(rows[i]) + "\n")
        ref_s, _ = run(data, Path(tmp) / "datastore", "datastore", args.seed)
        auto_s, m = run(data, Path(tmp) / "auto", "auto", args.seed)
    phases = m["metrics"]["seconds"]
    print(f"caprouter train, {args.prompts} prompts x {len(m['backends'])} backends: {auto_s:.1f} s end to end "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in phases.items())}); served {m['metrics']['selection']['chosen']}")
    print(f"reference (--router datastore, same data, same run): {ref_s:.1f} s; ratio {auto_s / ref_s:.2f}")
    print(f"prompts={args.prompts} backends={len(m['backends'])} train_s={auto_s:.1f} datastore_only_s={ref_s:.1f} "
          f"ratio={auto_s / ref_s:.2f} target_s=60 served={m['router']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
