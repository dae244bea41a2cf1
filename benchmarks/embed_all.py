"""Embed the three routing data sets once (cached in benchmarks/out): ~30 minutes on 2 cores."""
from common import embeddings, load  # noqa: I001

for name in ("llmrouter", "routellm", "mmlu_pro"):
    d = load(name)
    e = embeddings(name, d)
    print(name, e.shape, flush=True)
