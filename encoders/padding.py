"""Which prompts of an encoder call share a forward: a batch is padded to its longest member, so
one long prompt among short ones multiplies the work of all of them.

Measured here (MiniLM, torch fp32, 2 cores), a forward of n prompts padded to w tokens costs
about ``a + b * n * w`` with a ~ 12 ms and b ~ 0.24 ms per token: 16 prompts of 16 tokens take
70 ms, but one 256-token prompt among them makes the forward 1 s. Splitting the call into groups
of similar length, each its own forward, minimises the modelled cost; sorting by length then
cutting optimally is an exact 1-D dynamic program (the optimal groups are contiguous in sorted
order, as a swap argument shows), O(n^2) for the few dozen prompts of a routing batch.
"""
from __future__ import annotations

from collections.abc import Sequence


def length_groups(lengths: Sequence[int], *, overhead_tokens: float = 50.0, max_batch: int = 64) -> list[list[int]]:
    """Indices of ``lengths`` grouped for padded forwards: minimises the sum over groups of
    ``overhead_tokens + len(group) * max(length in group)``, each group at most ``max_batch``.
    Every index appears once; groups and their members are in increasing length."""
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lambda i: lengths[i])
    sl = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * n        # best[j]: cost of the first j sorted prompts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_batch), j):   # group = sorted[i:j], padded to sl[j - 1]
            c = best[i] + overhead_tokens + (j - i) * sl[j - 1]
            if c < best[j]:
                best[j], cut[j] = c, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]
