"""Prompt-tailored architecture codes (APTP), built by alternating assignment and pruning.

K codes are MLP-pruned sub-networks of one dense model, code k keeping the share keep_k of every
layer's neurons, with a target traffic share b_k (so the average compute is sum_k b_k keep_k of
the MLP: the total compute budget). Rounds alternate:

1. measure each calibration prompt's quality under each code: q[p, k] = exp(-NLL) of the dense
   model's own answer to p (the mean per-token probability the code gives it);
2. train the capability encoder (encoders/capability.py: prediction + contrastive + Sinkhorn
   terms, its code marginal = the traffic shares) on q, and predict q for every prompt;
3. assign prompts to codes by exact optimal transport: the plan between the prompts (uniform) and
   the codes (marginal b) that maximizes the total predicted quality, so the codes cannot
   collapse onto one and hold the budget;
4. recompute each code's mask from the dense activations of the prompts assigned to it
   (activation-aware importance, as in pruning.py): code k specializes to its prompts.

Round 0 starts from the static masks (importance on every prompt). Each code is then materialized
as genuinely smaller dense weights (an HF folder) next to a manifest, and served by the
``transformers`` kind (``options: {model: DIR/<code>}``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from backends.calibration import calibration_pool, split_pool, subsample
from backends.moe import down_proj_norms, prompt_neuron_activity, to_experts
from backends.pruning import chat_ids, prune_mlp_rows, teacher_sequences
from backends.weights import CausalLM
from encoders.capability import CapabilityConfig, predict, train
from router.core.errors import ConfigError

log = logging.getLogger(__name__)

VERSION = 1


@dataclass(frozen=True)
class CodeSpec:
    name: str
    mlp_keep: float   # share of each layer's MLP neurons kept
    share: float      # target share of traffic (the OT marginal)


def code_importance(activity: npt.NDArray[np.float32], wnorm: npt.NDArray[np.float32],
                    members: npt.NDArray[np.bool_], tailoring: float = 1.0) -> npt.NDArray[np.float32]:
    """activity (P, L, N) per-prompt RMS activations, wnorm (L, N), members (P,) -> (L, N):

        sqrt(t * mean_{members} r^2 + (1 - t) * mean_{all} r^2) * ||W_down[:, j]||

    t = ``tailoring``: 1 uses the code's own prompts only; less shrinks toward the static
    importance, which steadies the estimate when a code has few prompts."""
    sq = activity.astype(np.float64) ** 2
    own = sq[members].mean(0) if members.any() else sq.mean(0)
    return (np.sqrt(tailoring * own + (1 - tailoring) * sq.mean(0)) * wnorm).astype(np.float32)


def top_rows(importance: npt.NDArray[np.float32], keep: float) -> list[npt.NDArray[np.int64]]:
    """(L, N) importances -> per layer the sorted indices of the top ``keep`` share."""
    n = max(1, int(round(keep * importance.shape[1])))
    return [np.sort(np.argsort(-imp, kind="stable")[:n]) for imp in importance]


def ot_assign(quality: npt.NDArray[np.float64], shares: Sequence[float] | npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """quality (P, K) -> code of each prompt: the exact OT plan between prompts (uniform) and codes
    (marginal ``shares``) for cost -quality, read row-wise. Column counts match shares * P up to
    the rounding of the few prompts the plan splits."""
    import ot

    p, k = quality.shape
    b = np.asarray(shares, dtype=np.float64)
    b = b / b.sum()
    cost = -(quality - quality.min())
    plan = ot.emd(np.full(p, 1.0 / p), b, cost)
    return plan.argmax(1).astype(np.int64)


class MaskedMLPs:
    """Evaluate any neuron subset of a dense model's MLPs without copying the model: each layer's
    MLP computes with compact weights gathered from the dense ones (the ExpertMLP machinery of
    backends/moe.py with every neuron in one shared block)."""

    def __init__(self, model: CausalLM) -> None:
        n = model.config.intermediate_size
        self.mlps = to_experts(model, np.full((len(model.model.layers), n), -1), 1)

    def use(self, rows: Sequence[npt.NDArray[np.int64]] | None) -> None:
        for m, r in zip(self.mlps, rows if rows is not None else [None] * len(self.mlps)):
            if r is None:
                m.active = (m.gate, m.up, m.down)
            else:
                m.active = m.weights_rows(r)


def answer_nll(model: CausalLM, seqs: Sequence[torch.Tensor], prompt_lens: Sequence[int]) -> npt.NDArray[np.float64]:
    """Per sequence, the mean NLL of its answer tokens (after prompt_lens) under ``model``."""
    out = []
    with torch.inference_mode():
        for seq, pl in zip(seqs, prompt_lens):
            lp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
            tgt = seq[0, 1:]
            out.append(float(-lp[torch.arange(len(tgt)), tgt][pl - 1:].mean()))
    return np.asarray(out)


def prompt_lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    return [int(chat_ids(tokenizer, t).shape[1]) for t in texts]


@dataclass
class JointResult:
    rows: list[list[npt.NDArray[np.int64]]]   # per code, per layer kept neuron indices
    assignment: npt.NDArray[np.int64]          # (P,) code of each fit prompt
    capability: Any                            # the last round's trained capability model
    history: list[dict]


def joint_codes(masks: MaskedMLPs, model: CausalLM, activity: npt.NDArray[np.float32], wnorm: npt.NDArray[np.float32],
                emb: npt.NDArray[np.float32], seqs: Sequence[torch.Tensor], prompt_lens: Sequence[int],
                specs: Sequence[CodeSpec], *, rounds: int = 3, seed: int = 0, categories: Sequence[str] = (),
                tailoring: float = 1.0, progress: bool = False) -> JointResult:
    """The alternation of the module docstring on the fit prompts.

    masks/model: the dense model, its MLPs made maskable (MaskedMLPs);
    activity (P, L, N) its per-prompt RMS activations; emb (P, d) the prompts' embeddings;
    seqs/prompt_lens: each prompt followed by the dense model's answer."""
    from tqdm import tqdm


    shares = np.asarray([s.share for s in specs], dtype=np.float64)
    shares /= shares.sum()
    everything = np.ones(len(activity), dtype=bool)
    rows = [top_rows(code_importance(activity, wnorm, everything), s.mlp_keep) for s in specs]
    rng = np.random.default_rng(seed)
    val = rng.random(len(emb)) < 0.15
    history: list[dict] = []
    assign = np.zeros(len(emb), dtype=np.int64)
    cap = None
    for r in tqdm(range(rounds), desc="joint rounds", disable=not progress):
        t0 = time.perf_counter()
        q = np.stack([np.exp(-answer_nll_with(masks, model, rw, seqs, prompt_lens)) for rw in rows], 1)
        cfg = CapabilityConfig(codes=len(specs), code_marginal=list(shares), knn_scales=None, seed=seed + r,
                               max_epochs=200, patience=15, batch_size=64)
        cap = train(emb[~val], q[~val].astype(np.float32), emb[val], q[val].astype(np.float32), cfg).model
        pred = predict(cap, emb).astype(np.float64)
        new = ot_assign(np.log(pred / (1 - pred)), shares)
        changed = float((new != assign).mean()) if r else 1.0
        assign = new
        rows = [top_rows(code_importance(activity, wnorm, assign == k, tailoring), s.mlp_keep)
                for k, s in enumerate(specs)]
        entry: dict[str, Any] = {"round": r, "changed": changed, "seconds": round(time.perf_counter() - t0, 1),
                 "mean_quality_assigned": float(q[np.arange(len(q)), assign].mean()),
                 "codes": {s.name: {"share": float((assign == k).mean()),
                                    "top_categories": Counter(c for c, a in zip(categories, assign) if a == k)
                                    .most_common(3)} for k, s in enumerate(specs)}}
        history.append(entry)
        log.info("joint round %d: %.0f%% of prompts changed code; shares %s", r, 100 * changed,
                 {s.name: round(entry["codes"][s.name]["share"], 2) for s in specs})
    masks.use(None)
    return JointResult(rows, assign, cap, history)


def answer_nll_with(masks: MaskedMLPs, model: CausalLM, rows, seqs, prompt_lens) -> npt.NDArray[np.float64]:
    masks.use(rows)
    try:
        return answer_nll(model, seqs, prompt_lens)
    finally:
        masks.use(None)


def materialize(base_dir: Path, rows: Sequence[npt.NDArray[np.int64]], out: Path) -> None:
    """Save ``base_dir``'s model keeping the MLP neurons ``rows`` (per layer) as an HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    prune_mlp_rows(model, [torch.as_tensor(r) for r in rows])
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out))


def build_codes(base_dir: Path, out: Path, specs: Sequence[CodeSpec], *, encoder, rounds: int = 3, seed: int = 0,
                answer_tokens: int = 48, max_prompts: int | None = None, tailoring: float = 0.5,
                cache: Path | None = None, progress: bool = False) -> dict:
    """The whole pipeline on the calibration pool: teacher answers, activations, joint rounds,
    held-out evaluation against static masks of the same sizes, materialized codes and a manifest.
    Returns the manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if len({s.name for s in specs}) != len(specs) or not specs:
        raise ConfigError("codes need distinct names")
    fit, held = split_pool(subsample(calibration_pool(), max_prompts))
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    t0 = time.perf_counter()
    texts = [p.text for p in fit + held]
    seqs = _teacher_answers(model, tok, texts, answer_tokens, base_dir, cache)
    plens = prompt_lengths(tok, texts)
    activity = prompt_neuron_activity(model, tok, texts)
    wnorm = down_proj_norms(model)
    emb = encoder.encode(texts)
    nf = len(fit)
    masks = MaskedMLPs(model)
    res = joint_codes(masks, model, activity[:nf], wnorm, emb[:nf], seqs[:nf], plens[:nf], specs, rounds=rounds, seed=seed,
                      categories=[p.category for p in fit], tailoring=tailoring, progress=progress)
    # Held out: route by the capability encoder and the same OT marginals; compare each code with
    # the static mask of its size on the prompts routed to it, and the mix with one static mask
    # of the same average size on all of them.
    pred = predict(res.capability, emb[nf:]).astype(np.float64)
    h_assign = ot_assign(np.log(pred / (1 - pred)), [s.share for s in specs])
    everything = np.ones(nf, dtype=bool)
    evaluation: dict[str, Any] = {"held_out": len(held), "dense_nll": float(answer_nll(model, seqs[nf:], plens[nf:]).mean())}
    mix = np.zeros(len(held))
    for k, s in enumerate(specs):
        sel = np.flatnonzero(h_assign == k)
        sq, sp = [seqs[nf + i] for i in sel], [plens[nf + i] for i in sel]
        tailored = answer_nll_with(masks, model, res.rows[k], sq, sp)
        static = answer_nll_with(masks, model, top_rows(code_importance(activity[:nf], wnorm, everything), s.mlp_keep),
                                 sq, sp)
        mix[sel] = tailored
        evaluation[s.name] = {"prompts": int(len(sel)), "tailored_nll": float(tailored.mean()) if len(sel) else None,
                              "static_nll": float(static.mean()) if len(sel) else None,
                              "categories": Counter(held[i].category for i in sel).most_common(3)}
    avg_keep = float(sum(s.mlp_keep * (h_assign == k).mean() for k, s in enumerate(specs)))
    static_avg = answer_nll_with(masks, model, top_rows(code_importance(activity[:nf], wnorm, everything), avg_keep),
                                 seqs[nf:], plens[nf:])
    evaluation["mix"] = {"avg_mlp_keep": avg_keep, "routed_nll": float(mix.mean()),
                         "static_same_average_nll": float(static_avg.mean())}
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k, s in enumerate(specs):
        materialize(base_dir, res.rows[k], tmp / s.name)
    manifest = {"version": VERSION, "kind": "caprouter-architecture-codes", "base": base_dir.name,
                "embedder": encoder.model_id, "dim": int(emb.shape[1]), "seed": seed, "rounds": rounds,
                "tailoring": tailoring,
                "codes": [{"name": s.name, "mlp_keep": s.mlp_keep, "share": s.share,
                           "intermediate_size": int(len(res.rows[k][0]))} for k, s in enumerate(specs)],
                "calibration": {"fit": nf, "held_out": len(held), "answer_tokens": answer_tokens,
                                "max_prompts": max_prompts},
                "history": res.history, "evaluation": evaluation,
                "build_seconds": round(time.perf_counter() - t0, 1)}
    (tmp / "codes.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def _teacher_answers(model, tok, texts: list[str], tokens: int, base_dir: Path, cache: Path | None) -> list:
    """The dense model's greedy answers (the slow part of a build), cached by model and prompts."""
    f = None
    if cache is not None:
        key = hashlib.sha256(json.dumps([base_dir.name, tokens, texts]).encode()).hexdigest()[:12]
        f = cache / f"teacher-answers-{key}.pt"
        if f.exists():
            return torch.load(f)
    log.info("dense answers to %d calibration prompts", len(texts))
    seqs = teacher_sequences(model, tok, texts, max_new_tokens=tokens)
    if cache is not None and f is not None:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f.name + f".tmp-{os.getpid()}")
        torch.save(seqs, tmp)
        tmp.rename(f)
    return seqs


def load_manifest(path: Path) -> dict:
    f = path / "codes.json"
    if not f.exists():
        raise ConfigError(f"{path} is not a codes artifact (no codes.json); build one with `caprouter codes`")
    m = json.loads(f.read_text())
    if m.get("version") != VERSION:
        raise ConfigError(f"{path}: codes artifact version {m.get('version')} is not supported (want {VERSION})")
    return m
