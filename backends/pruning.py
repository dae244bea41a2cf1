"""Structured pruning of Llama-style decoders (MLP neurons, whole layers), with genuinely smaller
weights.

Importance of MLP neuron j in a layer (activation-aware, as in Wanda, at neuron granularity):

    I_j = ||h_j||_2 * ||W_down[:, j]||_2

where h_j is the neuron's activation act(gate(x))_j * up(x)_j over the calibration tokens: a
neuron matters when it both fires and writes a large vector into the residual stream. Each layer
keeps the same number of neurons (the top ``keep`` share), so the result is a standard config
with a smaller ``intermediate_size`` and the pruned model saves and loads like any HF model, and
its matmuls are really smaller (hence really faster, not masked).

Importance of decoder layer l (Block Influence, as in ShortGPT):

    BI_l = 1 - mean_t cos(h_t^in, h_t^out)

over the calibration tokens: a layer that barely turns its input stream is the cheapest to drop.
Dropping layers shortens the sequential chain of small matmuls that bounds decode on a CPU at
batch 1 (and kernel launches on a GPU), which width pruning does not.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from backends.weights import CausalLM

log = logging.getLogger(__name__)


def calibration_texts() -> list[str]:
    p = Path(__file__).parent / "data" / "calibration.txt"
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    """(1, T) token ids of ``text`` as one user turn, with the assistant prompt after it."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def run_calibration(model: CausalLM, tokenizer, texts: Sequence[str], hooks: list,
                    after_each: Callable[[int], None] | None = None) -> None:
    """Forward every calibration text (as a chat turn) through the model, calling ``after_each(i)``
    after text i, then remove ``hooks``."""
    try:
        with torch.inference_mode():
            for i, t in enumerate(texts):
                model(input_ids=chat_ids(tokenizer, t).to(model.device))
                if after_each is not None:
                    after_each(i)
    finally:
        for h in hooks:
            h.remove()


def mlp_neuron_importance(model: CausalLM, tokenizer, texts: Sequence[str]) -> list[torch.Tensor]:
    """One float32 tensor (intermediate_size,) of importances per decoder layer."""
    layers = model.model.layers
    sq = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def hook(_mod, inputs, i=i):
            h = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sq[i] += (h * h).sum(0)
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    run_calibration(model, tokenizer, texts, hooks)
    out = []
    for layer, s in zip(layers, sq):
        wnorm = layer.mlp.down_proj.weight.detach().to(torch.float64).norm(dim=0)
        out.append((s.sqrt() * wnorm).to(torch.float32))
    return out


def layer_importance(model: CausalLM, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """float32 (num_layers,): Block Influence of every decoder layer on the calibration texts."""
    layers = model.model.layers
    tot = torch.zeros(len(layers), dtype=torch.float64)
    count = torch.zeros(len(layers), dtype=torch.float64)
    hooks = []
    for i, layer in enumerate(layers):
        def hook(_mod, args, kwargs, output, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.reshape(-1, h_in.shape[-1]).double(),
                                                        h_out.reshape(-1, h_out.shape[-1]).double(), dim=-1)
            tot[i] += (1 - cos).sum()
            count[i] += cos.numel()
        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    run_calibration(model, tokenizer, texts, hooks)
    return (tot / count.clamp(min=1)).to(torch.float32)


def drop_layers(model: CausalLM, importance: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep the ``keep`` share of decoder layers with the highest importance, in their order, in
    place; returns the kept layer indices. Attention layers are renumbered so the KV cache
    indexes them densely."""
    layers = model.model.layers
    n = max(1, int(round(keep * len(layers))))
    idx = torch.topk(importance, n).indices.sort().values
    model.model.layers = torch.nn.ModuleList([layers[int(i)] for i in idx])
    for new_i, layer in enumerate(model.model.layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_i
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[int(i)] for i in idx]
    cfg.num_hidden_layers = n
    return idx


def _slice_linear(lin: torch.nn.Linear, idx: torch.Tensor, dim: int) -> torch.nn.Linear:
    w = lin.weight.detach().index_select(dim, idx).clone()
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        b = lin.bias.detach() if dim == 1 else lin.bias.detach().index_select(0, idx)
        new.bias.data.copy_(b)
    return new


def prune_mlp(model: CausalLM, importances: Sequence[torch.Tensor], keep: float) -> list[torch.Tensor]:
    """Keep the top ``keep`` share of MLP neurons in every layer, in place; returns kept indices."""
    kept_n = max(1, int(round(keep * model.config.intermediate_size)))
    kept = [torch.topk(imp, kept_n).indices.sort().values for imp in importances]
    prune_mlp_rows(model, kept)
    return kept


def prune_mlp_rows(model: CausalLM, kept: Sequence[torch.Tensor]) -> None:
    """Keep the MLP neurons ``kept[l]`` (the same count in every layer) of each layer l, in place."""
    sizes = {len(k) for k in kept}
    if len(sizes) != 1 or len(kept) != len(model.model.layers):
        raise ValueError("prune_mlp_rows needs one index list per layer, all of the same length")
    for layer, idx in zip(model.model.layers, kept):
        mlp = layer.mlp
        mlp.gate_proj = _slice_linear(mlp.gate_proj, idx, 0)
        mlp.up_proj = _slice_linear(mlp.up_proj, idx, 0)
        mlp.down_proj = _slice_linear(mlp.down_proj, idx, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(idx)
    model.config.intermediate_size = sizes.pop()


def teacher_sequences(teacher: CausalLM, tokenizer, texts: Sequence[str], *, max_new_tokens: int = 48,
                      batch: int = 8) -> list[torch.Tensor]:
    """Each calibration prompt (as a chat turn) followed by the teacher's greedy answer: the
    sequences a pruned code is distilled on, so it learns to answer as the dense model does."""
    tokenizer.padding_side = "left"
    out: list[torch.Tensor] = []
    for s in range(0, len(texts), batch):
        chat = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                for t in texts[s:s + batch]]
        enc = tokenizer(chat, return_tensors="pt", padding=True)
        with torch.inference_mode():
            gen = teacher.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
        for row, mask in zip(gen, torch.cat([enc["attention_mask"], torch.ones_like(gen[:, enc["input_ids"].shape[1]:])], 1)):
            out.append(row[mask.bool()].clone()[None])
    return out


def distill(student: CausalLM, teacher: CausalLM, sequences: Sequence[torch.Tensor], *, steps: int,
            lr: float = 5e-5, seed: int = 0) -> list[float]:
    """Recovery step: train ``student`` in place to match the teacher's next-token distributions
    (KL(teacher || student), mean over tokens) on ``sequences``, one sequence a step. Returns the
    loss of every step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    student.train()
    losses = []
    for _ in range(steps):
        seq = sequences[int(torch.randint(len(sequences), (1,), generator=gen))]
        with torch.no_grad():
            t = torch.log_softmax(teacher(input_ids=seq).logits[0].float(), -1)
        s = torch.log_softmax(student(input_ids=seq).logits[0].float(), -1)
        loss = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
    student.eval()
    return losses


def pruned_weights(base_dir: Path, keep: float, cache: Path, *, layers_keep: float = 1.0,
                   recover_steps: int = 0) -> Path:
    """A cached HF folder with the pruned variant of ``base_dir`` (built once): the ``layers_keep``
    share of decoder layers by Block Influence, then the ``keep`` share of MLP neurons of each
    remaining layer by activation-aware importance (both measured on the dense model)."""
    texts = calibration_texts()
    spec: list = [str(base_dir.name), keep, texts] + ([layers_keep] if layers_keep < 1 else []) + \
        ([recover_steps] if recover_steps else [])
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]
    name = f"{base_dir.name}-mlp{int(round(keep * 100))}"
    if layers_keep < 1:
        name += f"-layers{int(round(layers_keep * 100))}"
    if recover_steps:
        name += f"-kd{recover_steps}"
    out = cache / f"{name}-{key}"
    if (out / "pruning.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("pruning %s to %.0f%% of layers and %.0f%% of MLP neurons on %d calibration prompts", base_dir.name,
             layers_keep * 100, keep * 100, len(texts))
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    imp = mlp_neuron_importance(model, tok, texts)
    kept_layers = list(range(len(model.model.layers)))
    if layers_keep < 1:
        kept_layers = drop_layers(model, layer_importance(model, tok, texts), layers_keep).tolist()
        imp = [imp[i] for i in kept_layers]
    if keep < 1:
        prune_mlp(model, imp, keep)
    losses: list[float] = []
    if recover_steps:
        teacher = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        losses = distill(model, teacher, teacher_sequences(teacher, tok, texts), steps=recover_steps)
        log.info("recovery: KL %.3f -> %.3f over %d steps", float(np.mean(losses[:10])),
                 float(np.mean(losses[-10:])), recover_steps)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "pruning.json").write_text(json.dumps({
        "base": str(base_dir), "method": "layers-block-influence+mlp-activation-aware", "keep": keep,
        "layers_keep": layers_keep, "kept_layers": kept_layers, "recover_steps": recover_steps,
        "recovery_kl_first_last": [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))] if losses else None, "num_hidden_layers": model.config.num_hidden_layers,
        "intermediate_size": model.config.intermediate_size, "calibration_prompts": len(texts)}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
