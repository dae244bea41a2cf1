"""Packed (ragged) forwards for the continuous batcher: every row's new tokens in one sequence.

One decode step of a running batch and the prefill of a newcomer become one forward. The rows'
new tokens are concatenated into one (1, N) sequence, each with its own position; every linear
layer (the cost on a CPU, where a decode step is bound by reading the weights) runs once over all
N tokens, and only attention is done per row, against that row's own KV cache. This is how vLLM's
transformers backend drives a transformers model: a registered attention function and no mask
(``masking_utils`` skips building one for an attention implementation it has no mask for).

Why not the padded ``DynamicCache`` batch used before: a newcomer with S prompt tokens could only
join a batch whose other rows were padded to S new columns too (B x S tokens of compute), so each
newcomer's prefill was a forward of its own and the running rows waited for it. Measured here
(2 cores, SmolLM2-135M fp32, 8 rows of 60 cached tokens, a 38-token newcomer): decode step 80 ms,
prefill alone 102-119 ms, both in one packed forward 138-146 ms; batch-1 decode 57-62 ms packed.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NAME = "caprouter_packed"
# PAD_ROWS. MKL's sgemm on this CPU (AMD EPYC, AVX-512, 2 cores) is slow for some row counts:
# SmolLM2's LM head (576 -> 49,152) took 7 ms for 1 row, 23 ms for 3, 7 or 11 rows, 15 ms for 2
# or 6, 12 ms for 4, 8 or 12. A whole decode step of 3 or 7 rows took 91-102 ms against 68-76 ms
# with one filler token (interleaved runs, medians of 3); padding 5 or 6 rows up to 8 gained
# nothing (up to 15% worse), other counts moved within the noise. So a forward of 3 mod 4 tokens
# gets one filler token, and the LM head, bound by reading its weights, takes its rows in
# multiples of 4. The tokens of one running batch change count at every arrival and departure,
# so every batch size passes through these counts.


class Prefix:
    """The cached keys and values of a token prefix, per layer (kv_heads, length, head_dim)."""

    def __init__(self, keys: list[Any], values: list[Any]) -> None:
        self.keys, self.values = keys, values
        self.length = int(keys[0].shape[1]) if keys else 0


class RowCache:
    """One request's KV cache: per layer, keys and values of shape (kv_heads, capacity, head_dim),
    the first ``used[layer]`` columns filled. Capacity grows by doubling (amortized O(1) appends, no
    per-step ``torch.cat`` of the whole cache as ``DynamicCache`` does)."""

    def __init__(self, reserve: int = 0, prefix: Prefix | None = None) -> None:
        self.reserve = reserve                  # columns to allocate at first (prompt + expected output)
        self.prefix = prefix                    # columns copied in before a layer's first append
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.used: list[int] = []

    def snapshot(self, n: int) -> Prefix:
        """Copies of the first ``n`` columns of every layer, for requests that start with the
        same ``n`` tokens (on the compute thread)."""
        return Prefix([k[:, :n].clone() for k in self.keys], [v[:, :n].clone() for v in self.values])

    def append(self, layer: int, k: Any, v: Any) -> tuple[Any, Any]:
        """k, v (kv_heads, n, head_dim) -> this layer's whole cache (kv_heads, length, head_dim)."""
        n = k.shape[1]
        if layer == len(self.keys):
            p = self.prefix.length if self.prefix else 0
            cap = max(self.reserve, p + 2 * n, 16)
            self.keys.append(k.new_empty((k.shape[0], cap, k.shape[2])))
            self.values.append(v.new_empty((v.shape[0], cap, v.shape[2])))
            self.used.append(p)
            if self.prefix:
                self.keys[layer][:, :p] = self.prefix.keys[layer]
                self.values[layer][:, :p] = self.prefix.values[layer]
        used = self.used[layer]
        if used + n > self.keys[layer].shape[1]:
            cap = max(2 * self.keys[layer].shape[1], used + n)
            for buf in (self.keys, self.values):
                grown = buf[layer].new_empty((buf[layer].shape[0], cap, buf[layer].shape[2]))
                grown[:, :used] = buf[layer][:, :used]
                buf[layer] = grown
        self.keys[layer][:, used:used + n] = k
        self.values[layer][:, used:used + n] = v
        self.used[layer] = used + n
        return self.keys[layer][:, :used + n], self.values[layer][:, :used + n]


class PackedStep:
    """The cache object of one packed forward: ``update`` (called by each attention layer with the
    new tokens' keys and values, (1, kv_heads, N, head_dim)) appends each row's slice to its
    RowCache and keeps the row's whole cache for the attention function."""

    is_compileable = False

    def __init__(self, caches: Sequence[RowCache], lengths: Sequence[int], pad: int = 0) -> None:
        self.caches = caches
        self.lengths = lengths
        self.pad = pad                          # trailing filler tokens of no row (see ``padding``)
        self.views: dict[int, list[tuple[Any, Any]]] = {}

    def update(self, key: Any, value: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        out, o = [], 0
        for c, n in zip(self.caches, self.lengths):
            out.append(c.append(layer_idx, key[0, :, o:o + n], value[0, :, o:o + n]))
            o += n
        self.views[layer_idx] = out
        return key, value


def packed_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention interface: query (1, heads, N, head_dim) -> (1, N, heads, head_dim).
    Each row attends to its own cache: no mask for one new token, causal when the whole prompt is
    new, and bottom-right causal for a later chunk of a long prompt."""
    import torch
    import torch.nn.functional as F

    step: PackedStep = kwargs["packed"]
    outs, o = [], 0
    for (k, v), n in zip(step.views[module.layer_idx], step.lengths):
        q = query[:, :, o:o + n]
        o += n
        t = k.shape[1]
        mask = None
        if 1 < n < t:
            mask = torch.arange(t, device=q.device)[None, :] <= torch.arange(t - n, t, device=q.device)[:, None]
        outs.append(F.scaled_dot_product_attention(q, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                                   is_causal=n > 1 and n == t, scale=scaling, enable_gqa=True))
    if step.pad:
        outs.append(query.new_zeros((1, query.shape[1], step.pad, value.shape[-1])))
    return torch.cat(outs, dim=2).transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, packed_attention)


def padding(n: int, pad: bool = True) -> int:
    """Filler tokens for a forward of ``n`` tokens: one when ``n`` is 3 more than a multiple of 4
    (MKL's slow case, see PAD_ROWS)."""
    return 1 if pad and n % 4 == 3 else 0


def head_padding(n: int, pad: bool = True) -> int:
    """Extra rows for an LM head over ``n`` rows: up to a multiple of 4 (one row stays one)."""
    return -n % 4 if pad and n > 1 else 0


def forward(model: Any, tokens: Sequence[Sequence[int]], starts: Sequence[int], caches: Sequence[RowCache],
            logits_at: Sequence[int], device: str = "cpu", pad: bool = True) -> Any:
    """One packed forward. Row i feeds ``tokens[i]`` at positions ``starts[i]``, ... after the
    ``starts[i]`` tokens already in ``caches[i]``; returns the logits (len(logits_at), vocab) at
    the last new token of each row listed in ``logits_at``. With ``pad``, MKL's slow row counts are
    avoided (PAD_ROWS): filler tokens belong to no row, attend to nothing and are dropped, and the
    LM head's extra rows repeat the last one."""
    import torch

    _register()
    lengths = [len(t) for t in tokens]
    fill = padding(sum(lengths), pad)
    ids = torch.tensor([[t for row in tokens for t in row] + [0] * fill], dtype=torch.long, device=device)
    pos = torch.tensor([[s + j for s, m in zip(starts, lengths) for j in range(m)] + [0] * fill],
                       dtype=torch.long, device=device)
    ends = torch.tensor(lengths).cumsum(0) - 1
    at = list(logits_at)
    at += at[-1:] * head_padding(len(at), pad)
    keep = ends[torch.as_tensor(at, dtype=torch.long)].to(device)
    step = PackedStep(caches, lengths, fill)
    # The packed attention is the model's only for this call: every other caller (onboarding,
    # evaluation) keeps the model's own attention and masks. transformers reads the setting at
    # each call, and all forwards run on the one compute thread.
    config = model.config
    own = config._attn_implementation
    config._attn_implementation = NAME
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, position_ids=pos, cache=step, use_cache=True, packed=step, logits_to_keep=keep)
    finally:
        config._attn_implementation = own
    return out.logits[0, :len(logits_at)]
