"""Router-decoupled mixture of experts (Read-ME) built from a dense Llama-style model.

Each dense MLP is split into E experts of equal size by clustering its neurons on co-activation
(neurons that fire on the same prompts form one expert). A pre-gating router, decoupled from the
backbone, maps the prompt embedding that caprouter computes anyway to the top-k experts of every
layer, once per request and before decoding, so:

- one copy of the dense weights serves every expert subset: a request's compact MLP weights are
  gathered once (and kept in a small LRU cache) instead of storing pruned copies;
- requests can be grouped by expert set before they run (``plan_batches``: expert-aware batching);
- with every expert on, the model is the dense model (neurons are only permuted).

Clustering (per layer): the neuron's profile is its RMS activation on each calibration prompt,
unit-normalized; balanced k-means whose assignment step is an exact optimal-transport problem
(POT's EMD with uniform marginals), so every expert gets exactly N/E neurons.

Expert importance of a prompt (per layer): s_e = sum_{j in e} ||h_j|| * ||W_down[:, j]|| (the
activation-aware importance of pruning.py, summed over the expert), as shares of the layer's
total. The gate is a ridge regression from the prompt embedding to these shares, one per layer;
serving keeps the k experts with the largest predicted shares.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from pydantic import Field, model_validator

from backends.base import BACKENDS, GenerationRequest
from backends.calibration import calibration_pool, split_pool
from backends.pruning import run_calibration
from backends.transformers_backend import TransformersBackend, TransformersOptions
from backends.weights import CausalLM
from router.core.errors import BackendError, ConfigError
from router.core.messages import prompt_text

log = logging.getLogger(__name__)

ExpertSet = tuple[tuple[int, ...], ...]  # per layer, the sorted expert ids that are on


# ---- building: activations, clusters, gate -------------------------------------------------------
def prompt_neuron_activity(model: CausalLM, tokenizer, texts: Sequence[str]) -> npt.NDArray[np.float32]:
    """(P, L, N): per prompt (as a chat turn), layer and MLP neuron, the RMS of the neuron's
    activation over the prompt's tokens."""
    layers = model.model.layers
    n_neurons = layers[0].mlp.down_proj.in_features
    out = np.zeros((len(texts), len(layers), n_neurons), dtype=np.float32)
    cur: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        def hook(_mod, inputs, i=i):
            h = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            cur[i] = (h * h).mean(0).sqrt()
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))

    def keep(p: int) -> None:
        for i in range(len(layers)):
            out[p, i] = cur[i].float().cpu().numpy()

    run_calibration(model, tokenizer, texts, hooks, keep)
    return out


def down_proj_norms(model: CausalLM) -> npt.NDArray[np.float32]:
    """(L, N): ||W_down[:, j]|| of every MLP neuron of every layer (the weight side of importance)."""
    return np.stack([layer.mlp.down_proj.weight.detach().norm(dim=0).cpu().numpy() for layer in model.model.layers])


def balanced_kmeans(x: npt.NDArray[np.float32], k: int, *, iters: int = 25, seed: int = 0) -> npt.NDArray[np.int64]:
    """x: (N, D) rows to cluster (cosine), N divisible by k -> labels (N,), each cluster N/k rows.

    The assignment step is exact OT with uniform marginals (POT ``emd``): the balanced assignment
    that maximizes the total similarity to the centroids."""
    import ot

    n = x.shape[0]
    if n % k:
        raise ConfigError(f"{n} neurons cannot be split into {k} equal experts")
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    # k-means++ seeding on cosine distance
    cent = [xn[rng.integers(n)]]
    for _ in range(1, k):
        d = np.maximum(1 - np.max(xn @ np.stack(cent).T, axis=1), 0) + 1e-12
        cent.append(xn[rng.choice(n, p=d / d.sum())])
    c = np.stack(cent)
    labels = np.full(n, -1)
    a, b = np.full(n, 1.0 / n), np.full(k, 1.0 / k)
    for _ in range(iters):
        plan = ot.emd(a, b, (1 - xn @ c.T).astype(np.float64))
        new = plan.argmax(1)
        if np.array_equal(new, labels):
            break
        labels = new
        c = np.stack([xn[labels == e].mean(0) for e in range(k)])
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return labels.astype(np.int64)


def expert_shares(activity: npt.NDArray[np.float32], wnorm: npt.NDArray[np.float32],
                  labels: npt.NDArray[np.int64], experts: int) -> npt.NDArray[np.float32]:
    """activity (P, L, N), wnorm (L, N), labels (L, N) (-1: shared) -> (P, L, E): each routed
    expert's share of the layer's routed activation-aware importance on each prompt (rows sum to 1)."""
    imp = activity * wnorm[None]
    out = np.zeros(activity.shape[:2] + (experts,), dtype=np.float64)
    for layer in range(activity.shape[1]):
        for e in range(experts):
            out[:, layer, e] = imp[:, layer, labels[layer] == e].sum(1)
    return (out / np.maximum(out.sum(2, keepdims=True), 1e-12)).astype(np.float32)


@dataclass
class PreGate:
    """Ridge regression from the prompt embedding to every layer's expert shares.

    w: (d + 1, L * E) float32 (last row: bias); experts E; top_k on by default."""

    w: npt.NDArray[np.float32]
    experts: int
    layers: int

    @classmethod
    def fit(cls, emb: npt.NDArray[np.float32], shares: npt.NDArray[np.float32], alpha: float = 1.0) -> PreGate:
        """emb (P, d) unit-norm; shares (P, L, E)."""
        x = np.hstack([emb.astype(np.float64), np.ones((len(emb), 1))])
        y = shares.reshape(len(shares), -1).astype(np.float64)
        reg = alpha * np.eye(x.shape[1])
        reg[-1, -1] = 0.0  # the bias is not shrunk
        w = np.linalg.solve(x.T @ x + reg, x.T @ y)
        return cls(w.astype(np.float32), shares.shape[2], shares.shape[1])

    def predict(self, emb: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """emb (B, d) -> predicted shares (B, L, E)."""
        x = np.hstack([emb, np.ones((len(emb), 1), dtype=np.float32)])
        return (x @ self.w).reshape(len(emb), self.layers, self.experts)


def top_k_sets(scores: npt.NDArray[np.float32], k: int) -> list[ExpertSet]:
    """scores (B, L, E) -> per row, per layer, the k best expert ids (sorted)."""
    idx = np.argsort(-scores, axis=2, kind="stable")[:, :, :k]
    return [tuple(tuple(sorted(int(e) for e in layer)) for layer in row) for row in idx]


def captured(shares: npt.NDArray[np.float32], sets: Sequence[ExpertSet]) -> float:
    """Mean share of the activation-aware importance that ``sets`` keep (1.0: everything)."""
    tot = 0.0
    for p, s in enumerate(sets):
        tot += float(np.mean([shares[p, layer, list(on)].sum() for layer, on in enumerate(s)]))
    return tot / max(len(sets), 1)


def shared_count(neurons: int, shared: float, experts: int) -> int:
    """Neurons always on, rounded so that the rest splits into ``experts`` equal experts."""
    s = int(round(shared * neurons))
    return s + (neurons - s) % experts


def split_layer(activity: npt.NDArray[np.float32], wnorm: npt.NDArray[np.float32], experts: int, shared: float,
                seed: int) -> npt.NDArray[np.int64]:
    """activity (P, N) of one layer, wnorm (N,) -> labels (N,): -1 for the shared neurons (the
    most important on average), else the routed expert. Routed neurons are clustered on their
    z-scored profiles across prompts: what groups them is firing *more than usual* on the same
    prompts, which is what a per-request gate can exploit."""
    n = activity.shape[1]
    labels = np.full(n, -1, dtype=np.int64)
    s = shared_count(n, shared, experts)
    routed = np.argsort(-(activity * wnorm).mean(0), kind="stable")[s:]
    prof = activity[:, routed].T.astype(np.float64)
    prof = (prof - prof.mean(1, keepdims=True)) / np.maximum(prof.std(1, keepdims=True), 1e-12)
    labels[routed] = balanced_kmeans(prof.astype(np.float32), experts, seed=seed)
    return labels


def moe_folder(base_dir: Path, cache: Path, *, experts: int, shared: float, alpha: float, embedder_id: str,
               encode) -> Path:
    """Build (once) and return the folder with the expert clusters and the pre-gate of ``base_dir``
    for the given embedder. ``encode(texts) -> (P, d)`` embeds the calibration prompts."""
    pool = calibration_pool()
    spec = [base_dir.name, experts, shared, alpha, embedder_id, [(p.category, p.text) for p in pool]]
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]
    out = cache / f"{base_dir.name}-moe{experts}-shared{int(round(shared * 100))}-{key}"
    if (out / "moe.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fit, held = split_pool(pool)
    log.info("building the %d-expert MoE of %s on %d calibration prompts (%d held out)", experts, base_dir.name,
             len(fit), len(held))
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    act_fit = prompt_neuron_activity(model, tok, [p.text for p in fit])
    act_held = prompt_neuron_activity(model, tok, [p.text for p in held])
    wnorm = down_proj_norms(model)
    labels = np.stack([split_layer(act_fit[:, layer, :], wnorm[layer], experts, shared, seed=layer)
                       for layer in range(act_fit.shape[1])])
    sh_fit = expert_shares(act_fit, wnorm, labels, experts)
    sh_held = expert_shares(act_held, wnorm, labels, experts)
    gate = PreGate.fit(encode([p.text for p in fit]), sh_fit, alpha)
    emb_held = encode([p.text for p in held])
    report = {}
    for k in range(1, experts):
        static = top_k_sets(sh_fit.mean(0, keepdims=True), k) * len(held)
        report[str(k)] = {"gate": captured(sh_held, top_k_sets(gate.predict(emb_held), k)),
                          "oracle": captured(sh_held, top_k_sets(sh_held, k)),
                          "static": captured(sh_held, static)}
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.savez(tmp / "moe.npz", labels=labels.astype(np.int16), gate_w=gate.w)
    (tmp / "moe.json").write_text(json.dumps({
        "version": 1, "base": base_dir.name, "experts": experts, "shared": shared, "layers": int(labels.shape[0]),
        "neurons": int(labels.shape[1]), "embedder": embedder_id, "dim": int(gate.w.shape[0] - 1), "alpha": alpha,
        "calibration": {"fit": len(fit), "held_out": len(held)},
        "captured_importance_held_out": report}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---- serving: one copy of the weights, any expert subset --------------------------------------------
class ExpertMLP(torch.nn.Module):
    """A Llama MLP whose neurons are permuted so that the shared neurons (label -1) come first and
    routed expert e is the contiguous block after them; ``active`` holds the compact weights of
    the current expert subset (the full weights when every expert is on)."""

    def __init__(self, mlp: Any, labels: npt.NDArray[np.int64], experts: int) -> None:
        super().__init__()
        if any(getattr(m, "bias", None) is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            raise ConfigError("the MoE split supports bias-free MLPs (Llama-style) only")
        order = torch.as_tensor(np.argsort(labels, kind="stable"), device=mlp.down_proj.weight.device)
        self.order = order  # permuted neuron i is dense neuron order[i]
        self.act_fn = mlp.act_fn
        self.experts = experts
        self.shared = int((labels < 0).sum())
        self.block = (len(labels) - self.shared) // experts
        self.gate = torch.nn.Parameter(mlp.gate_proj.weight.detach()[order].contiguous(), requires_grad=False)
        self.up = torch.nn.Parameter(mlp.up_proj.weight.detach()[order].contiguous(), requires_grad=False)
        self.down = torch.nn.Parameter(mlp.down_proj.weight.detach()[:, order].contiguous(), requires_grad=False)
        self.active: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = (self.gate, self.up, self.down)

    def weights_for(self, on: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The compact (gate, up, down) weights of the experts ``on`` (copies, except for all on)."""
        if len(on) == self.experts:
            return self.gate, self.up, self.down
        s, b = self.shared, self.block
        return self.weights_rows(torch.cat([torch.arange(s)] + [torch.arange(s + e * b, s + (e + 1) * b)
                                                                for e in sorted(on)]))

    def weights_rows(self, rows: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compact weights of the (permuted) neurons ``rows``, gathered on the weights' device."""
        rows = torch.as_tensor(rows, device=self.gate.device)
        return (self.gate.index_select(0, rows), self.up.index_select(0, rows),
                self.down.index_select(1, rows).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = self.active
        f = torch.nn.functional.linear
        return f(self.act_fn(f(x, g)) * f(x, u), d)


def to_experts(model: CausalLM, labels: npt.NDArray[np.int64], experts: int) -> list[ExpertMLP]:
    """Swap every decoder layer's MLP for an ExpertMLP, in place."""
    out = []
    for layer, lab in zip(model.model.layers, labels):
        layer.mlp = ExpertMLP(layer.mlp, lab.astype(np.int64), experts)
        out.append(layer.mlp)
    return out


def union(sets: Sequence[ExpertSet]) -> ExpertSet:
    return tuple(tuple(sorted(set().union(*layer))) for layer in zip(*sets))


def plan_batches(sets: Sequence[ExpertSet], max_batch: int, max_experts: float) -> list[list[int]]:
    """Expert-aware batching: group requests (in arrival order) so that each batch runs on the
    union of its members' experts with at most ``max_experts`` experts per layer on average. A
    batch starts from the oldest waiting request and takes, greedily, the waiting request that
    grows the union least while the cap holds. Returns lists of request indices."""
    waiting = list(range(len(sets)))
    out: list[list[int]] = []
    while waiting:
        batch = [waiting.pop(0)]
        cur = [set(layer) for layer in sets[batch[0]]]
        while len(batch) < max_batch and waiting:
            def grown(i: int, cur: list[set[int]] = cur) -> float:
                return float(np.mean([len(c | set(s)) for c, s in zip(cur, sets[i])]))
            best = min(waiting, key=grown)
            if grown(best) > max_experts:
                break
            waiting.remove(best)
            batch.append(best)
            cur = [c | set(s) for c, s in zip(cur, sets[best])]
        out.append(batch)
    return out


class MoEOptions(TransformersOptions):
    experts: int = Field(8, ge=2, le=64)
    # Share of each MLP's neurons always on (the most important on average): the shared expert.
    shared: float = Field(0.5, ge=0, lt=1)
    # Experts on per layer for each request.
    top_k: int = Field(4, ge=1)
    # Expert subsets whose compact weights are kept (each costs top_k / experts of the MLP weights).
    cache_sets: int = Field(4, ge=1)
    gate_alpha: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> MoEOptions:
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds experts ({self.experts})")
        if self.prune is not None:
            raise ValueError("the moe kind splits the dense model; prune is not supported with it")
        return self


@BACKENDS.register("moe")
class MoEBackend(TransformersBackend):
    """The dense model with a pre-gated expert subset per request (see the module docstring).

    The gate reads the request's prompt embedding (``GenerationRequest.embedding``, which the
    router fills in); a request without one is embedded here with the same encoder."""

    kind = "moe"
    options_model = MoEOptions
    opts: MoEOptions

    def __init__(self, *args: Any, encoder: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.encoder = encoder
        self.mlps: list[ExpertMLP] = []
        self.gate: PreGate | None = None
        self.moe_dir: Path | None = None
        self._sets: OrderedDict[ExpertSet, list] = OrderedDict()
        self._sets_lock = threading.Lock()

    def _prepare_model(self, base: Path) -> None:
        if self.encoder is None:
            raise ConfigError(f"backend {self.name!r}: the moe kind needs the prompt encoder for its pre-gate")
        o = self.opts
        self.moe_dir = moe_folder(base, self._models_dir, experts=o.experts, shared=o.shared, alpha=o.gate_alpha,
                                  embedder_id=self.encoder.model_id, encode=self.encoder.encode)
        meta = json.loads((self.moe_dir / "moe.json").read_text())
        if meta["dim"] != self.encoder.dim:
            raise ConfigError(f"backend {self.name!r}: gate built for {meta['dim']}-d embeddings, encoder has "
                              f"{self.encoder.dim}")
        z = np.load(self.moe_dir / "moe.npz")
        self.gate = PreGate(z["gate_w"], o.experts, int(meta["layers"]))
        self.mlps = to_experts(self.model, z["labels"].astype(np.int64), o.experts)
        self.moe_report = meta["captured_importance_held_out"].get(str(o.top_k))

    def expert_sets(self, embeddings: npt.NDArray[np.float32]) -> list[ExpertSet]:
        """embeddings (B, d) -> each request's expert set (top_k per layer)."""
        assert self.gate is not None
        return top_k_sets(self.gate.predict(embeddings), self.opts.top_k)

    def weights(self, s: ExpertSet) -> list:
        """Compact per-layer weights for the expert set ``s`` (LRU-cached)."""
        with self._sets_lock:
            if s in self._sets:
                self._sets.move_to_end(s)
                return self._sets[s]
        w = self._compute.run(lambda: [m.weights_for(on) for m, on in zip(self.mlps, s)])
        with self._sets_lock:
            self._sets[s] = w
            while len(self._sets) > self.opts.cache_sets:
                self._sets.popitem(last=False)
        return w

    def install(self, w: list) -> None:
        for m, triple in zip(self.mlps, w):
            m.active = triple

    def prepare(self, req: GenerationRequest) -> tuple[Hashable, Callable[[], None] | None]:
        """Requests with the same expert set share a batch (one install of compact weights per
        forward); requests with other sets form batches of their own, decoded in turn."""
        emb = req.embedding
        if emb is None:
            emb = self.encoder.encode([prompt_text(None, req.messages)])[0]
        emb = np.asarray(emb, dtype=np.float32).reshape(1, -1)
        if self.gate is None or emb.shape[1] != self.gate.w.shape[0] - 1:
            raise BackendError(self.name, f"prompt embedding of dim {emb.shape[1]} does not fit the pre-gate")
        s = self.expert_sets(emb)[0]
        w = self.weights(s)
        return s, lambda: self.install(w)

    def active_parameters(self) -> int:
        if self.model is None:
            return 0
        routed = sum(3 * m.block * m.experts * m.gate.shape[1] for m in self.mlps)
        return int(super().active_parameters() - routed * (1 - self.opts.top_k / self.opts.experts))

    def memory_bytes(self) -> dict[str, int]:
        """The dense weights once, and the compact expert-set weights now cached."""
        dense = sum(p.numel() * p.element_size() for p in self.model.parameters())
        with self._sets_lock:
            cached = sum(t.numel() * t.element_size() for w in self._sets.values() for triple in w for t in triple
                         if not any(t is full for m in self.mlps for full in (m.gate, m.up, m.down)))
        return {"dense": int(dense), "expert_sets": int(cached), "sets_cached": len(self._sets)}
