"""Architecture codes of one base model decode in one batch.

Why: routed traffic spreads over the base model and its width-pruned codes, and backends with
different weights cannot share a forward, so every decode step paid one forward per model. On 2
cores (SmolLM2-135M, fp32) a step costs 89 ms at batch 4 for the dense model and 87 ms for the
75% MLP code, against 97 ms for the dense model at batch 8: two half batches cost 1.8x one whole
batch. Serving both from one batch, as multi-LoRA servers (Punica, S-LoRA) serve adapters of one
base, gives that back.

How: a code that only drops MLP neurons (no dropped layers, no recovery training) computes, for
its rows, exactly what the base computes with those neurons' activations zeroed. So the base
backend's scheduler takes the code's requests too: a batch whose rows are all of one model runs
that model (the code's smaller matmuls when it runs alone, as fast as before), and a mixed batch
runs the base with a per-row 0/1 mask on each layer's MLP activations (a pre-hook on
``down_proj``). Attention is untouched, so a row's KV cache means the same under either forward
and a batch may switch between them from one step to the next. A masked row sums its layer's
down projection over zeros where the code's own matmul skips them: equal up to float rounding
(tested: the logits agree within 1e-5, greedy text is the same).

Which backends: in-process ``transformers`` backends (not the MoE kind) of the same ``model``,
dtype and device, with ``share_batch`` on (the default); the one without ``prune`` is the base.
Each code's kept neurons are recovered from the weights themselves and every other parameter is
compared, so a code that is not an exact slice of its base (recovery training, other weights)
keeps its own scheduler. The shared queue and batch use the base's ``max_batch``/``max_queue``.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from backends.base import Backend, Status

log = logging.getLogger(__name__)


def kept_neurons(base: Any, code: Any) -> list[Any] | None:
    """Per decoder layer, the (K,) indices of the base's MLP neurons that ``code`` keeps, when
    ``code`` is the base with only MLP neurons removed (every other parameter equal, each kept
    neuron's gate/up rows and down column equal to the base's); else None."""
    import torch

    bl, cl = base.model.layers, code.model.layers
    if len(bl) != len(cl) or base.config.hidden_size != code.config.hidden_size:
        return None
    bp, cp = dict(base.named_parameters()), dict(code.named_parameters())
    if bp.keys() != cp.keys():
        return None
    for name, p in bp.items():
        if ".mlp." not in name and not (p.shape == cp[name].shape and torch.equal(p, cp[name])):
            return None
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(base.config.hidden_size, generator=gen, dtype=torch.float64)
    kept = []
    with torch.no_grad():
        for b, c in zip(bl, cl):
            bg, cg = b.mlp.gate_proj.weight, c.mlp.gate_proj.weight
            if cg.shape[0] > bg.shape[0]:
                return None
            # A row's projection on a random probe identifies it (equal rows, equal sums).
            where = {float(v): i for i, v in enumerate((bg.double() @ probe).tolist())}
            idx = [where.get(float(v)) for v in (cg.double() @ probe).tolist()]
            if None in idx:
                return None
            ix = torch.tensor(idx, dtype=torch.long)
            if not (torch.equal(bg.index_select(0, ix), cg)
                    and torch.equal(b.mlp.up_proj.weight.index_select(0, ix), c.mlp.up_proj.weight)
                    and torch.equal(b.mlp.down_proj.weight.index_select(1, ix), c.mlp.down_proj.weight)):
                return None
            kept.append(ix)
    return kept


def share_batches(backends: Mapping[str, Backend]) -> dict[str, str]:
    """Let every loaded code that is an exact slice of a loaded base backend decode in the base's
    batch (see the module docstring). Returns code name -> base name for each link made."""
    from backends.transformers_backend import TransformersBackend

    groups: dict[tuple[str, str, str], list[TransformersBackend]] = {}
    for b in backends.values():
        if type(b) is not TransformersBackend or not b.opts.share_batch or b.status()[0] != Status.READY:
            continue
        groups.setdefault((b.opts.model, b.opts.dtype, b.opts.device), []).append(b)
    links: dict[str, str] = {}
    for members in groups.values():
        bases = [b for b in members if b.opts.prune is None]
        if not bases:
            continue
        base = bases[0]
        for code in members:
            p = code.opts.prune
            if p is None or p.layers_keep < 1 or p.recover_steps:
                continue
            kept = kept_neurons(base.model, code.model) if code.eos == base.eos else None
            if kept is None:
                log.info("backend %s keeps its own batch: its weights are not a slice of %s's", code.name, base.name)
                continue
            base.adopt(code, kept)
            links[code.name] = base.name
            log.info("backend %s decodes in the batch of %s (%d of %d MLP neurons per layer)", code.name, base.name,
                     len(kept[0]), base.model.config.intermediate_size)
    return links


class NeuronMasks:
    """The base model's side: a pre-hook on each layer's ``down_proj`` that zeroes, per row, the
    MLP activations of the neurons the row's code drops, while ``rows`` is set."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._full: dict[Any, Any] = {}            # member backend -> (L, I) 0/1 mask
        self._active: Any = None                   # (L, R, I): the rows' masks while a mixed forward runs
        self._token_row: Any = None                # (N,) each packed token's row, None when one token each
        self._hooks = [layer.mlp.down_proj.register_forward_pre_hook(self._hook(i))
                       for i, layer in enumerate(model.model.layers)]

    def add(self, member: Any, kept: Sequence[Any]) -> None:
        import torch

        n = self.model.config.intermediate_size
        m = torch.zeros((len(kept), n), dtype=self.model.dtype, device=self.model.device)
        for i, ix in enumerate(kept):
            m[i, ix.to(m.device)] = 1
        self._full[member] = m

    def _hook(self, layer: int):
        def pre(_mod: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if self._active is None:
                return None
            m = self._active[layer]
            return (inputs[0] * (m if self._token_row is None else m.index_select(0, self._token_row)),)
        return pre

    @contextlib.contextmanager
    def rows(self, members: Sequence[Any], lengths: Sequence[int], pad: int = 0) -> Iterator[None]:
        """Mask one packed forward: row i has ``lengths[i]`` new tokens and runs as ``members[i]``
        (None or an unadopted backend: all neurons), then come ``pad`` filler tokens."""
        import torch

        ones = None
        per_row = []
        for m in members:
            full = self._full.get(m)
            if full is None:
                if ones is None:
                    ones = torch.ones_like(next(iter(self._full.values())))
                full = ones
            per_row.append(full)
        if pad:
            per_row.append(per_row[-1])                      # fillers: any mask; their output is dropped
            lengths = [*lengths, pad]
        self._active = torch.stack(per_row, dim=1)          # (L, R, I)
        if any(n != 1 for n in lengths):
            self._token_row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        try:
            yield
        finally:
            self._active = self._token_row = None
