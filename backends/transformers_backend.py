"""A local causal LM served in-process with transformers, streaming token by token.

The decode loop is our own (prefill, then one token at a time over the KV cache) rather than
``generate`` with a streamer: it gives exact token counts, stop strings, cancellation between
any two tokens, and less per-token overhead on a small model, where overhead is a large share.
Generation runs in a worker thread (torch releases the GIL); tokens cross to the event loop
through a queue.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.base import BACKENDS, Backend, Finished, FinishReason, GenerationRequest, Status, TextChunk
from backends.weights import CausalLM, resolve_weights
from router.core.compute import Inline
from router.core.config import BackendConfig
from router.core.costs import CostModel
from router.core.errors import BackendError, ConfigError

log = logging.getLogger(__name__)


class PruneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Share of MLP neurons kept in every layer (activation-aware importance).
    mlp_keep: float = Field(1.0, gt=0, le=1)
    # Share of decoder layers kept (Block Influence).
    layers_keep: float = Field(1.0, gt=0, le=1)
    # Recovery: steps of distillation from the dense model on the calibration prompts (0: none).
    recover_steps: int = Field(0, ge=0, le=100_000)


class TransformersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = "smollm2-135m-instruct"   # a weight source name or a HF folder
    prune: PruneOptions | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_concurrency: int = Field(1, ge=1)
    # Prompt tokens kept (the most recent); SmolLM2 was trained at 8k, CPU latency argues shorter.
    max_prompt_tokens: int = Field(2048, ge=16)


_DONE = object()


@BACKENDS.register("transformers")
class TransformersBackend(Backend):
    kind = "transformers"
    options_model: type[TransformersOptions] = TransformersOptions

    def __init__(self, cfg: BackendConfig, *, cost_unit: str, models_dir: Path, compute: Any = None,
                 encoder: Any = None) -> None:
        try:
            self.opts = self.options_model.model_validate(cfg.options)
        except ValidationError as e:
            raise ConfigError(f"backend {cfg.name!r}: invalid options:\n{e}") from None
        self.name = cfg.name
        self.description = cfg.description
        self._cost_cfg = cfg.cost
        self._cost_unit = cost_unit
        self._models_dir = models_dir
        self._status = (Status.LOADING, "not loaded yet")
        self._cost: CostModel = CostModel.from_config(cfg.cost, cost_unit)
        self.model: Any = None
        self.tokenizer: Any = None
        self.weights_dir: Path | None = None
        self._pool = ThreadPoolExecutor(max_workers=self.opts.max_concurrency, thread_name_prefix=f"gen-{self.name}")
        self._slots = threading.BoundedSemaphore(self.opts.max_concurrency)
        # Every torch call goes through here (see router/core/compute.py); the pool threads only
        # orchestrate a generation, one decode step at a time.
        self._compute = compute or Inline()
        # Test hook: a callable run before each decode step (lets tests inject faults on the real path).
        self.step_hook: Callable[[int], None] | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    async def load(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._compute.run, self._load_sync)
            self._status = (Status.READY, f"{self.active_parameters() / 1e6:.1f}M active parameters on {self.opts.device}")
        except Exception as e:  # a backend that cannot load is reported, not fatal to the server
            log.exception("backend %s failed to load", self.name)
            self._status = (Status.UNAVAILABLE, f"failed to load: {e}")

    def _load_sync(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from backends.pruning import pruned_weights  # imports torch: kept out of import time

        hf_logging.disable_progress_bar()  # per-tensor bars would interleave with structured logs
        base = resolve_weights(self.opts.model, self._models_dir)
        p = self.opts.prune
        path = pruned_weights(base, p.mlp_keep, self._models_dir, layers_keep=p.layers_keep,
                              recover_steps=p.recover_steps) if p else base
        dtype = getattr(torch, self.opts.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        model: CausalLM = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        self.model = model.to(self.opts.device).eval()
        self.weights_dir = path
        self._prepare_model(base)
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        for t in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                eos.add(tid)
        self._eos = {int(t) for t in eos if t is not None}
        self._cost = CostModel.from_config(self._cost_cfg, self._cost_unit, active_parameters=self.active_parameters())
        # Warm-up: the first forward pays one-off allocation and kernel selection costs that
        # would otherwise land on the first request.
        self.generate_sync(GenerationRequest(messages=[("user", "Hi")], max_tokens=2), lambda _t: None)

    def _prepare_model(self, base: Path) -> None:
        """Hook for kinds that reshape the loaded model (the MoE split)."""

    def _request_setup(self, req: GenerationRequest) -> Callable[[], None] | None:
        """Hook: per request, something to run on the compute thread before each of its forwards
        (the MoE kind installs the request's expert weights)."""
        return None

    def active_parameters(self) -> int:
        """Parameters used in matmuls per token: every weight but the input embedding table, plus
        the output projection (counted even when tied to the embedding, since it is a matmul)."""
        if self.model is None:
            return 0
        emb = self.model.get_input_embeddings().weight
        total = sum(p.numel() for p in self.model.parameters() if p is not emb)
        out = self.model.get_output_embeddings()
        if out is not None and out.weight is emb:
            total += emb.numel()
        return int(total)

    def total_parameters(self) -> int:
        return 0 if self.model is None else int(sum(p.numel() for p in self.model.parameters()))

    def status(self) -> tuple[Status, str]:
        return self._status

    def cost_model(self) -> CostModel:
        return self._cost

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- generation -----------------------------------------------------------------------
    def prompt_ids(self, messages) -> Any:
        ids = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                 add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        if ids.shape[1] > self.opts.max_prompt_tokens:
            ids = ids[:, -self.opts.max_prompt_tokens:]
        return ids.to(self.opts.device)

    def _pick(self, logits: Any, temperature: float, gen: Any) -> int:
        import torch

        if gen is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=gen))

    def _cache_kw(self) -> str:
        # transformers renamed past_key_values to cache (5.2x; the old name goes in 5.40).
        if not hasattr(self, "_cache_name"):
            import inspect

            self._cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
                else "past_key_values"
        return self._cache_name

    def _prefill(self, ids: Any, temperature: float, gen: Any, setup: Callable[[], None] | None = None
                 ) -> tuple[Any, int]:
        import torch

        if setup is not None:
            setup()
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True)
            return getattr(out, self._cache_kw()), self._pick(out.logits[0, -1], temperature, gen)

    def _step(self, token: int, past: Any, temperature: float, gen: Any, setup: Callable[[], None] | None = None
              ) -> tuple[Any, int]:
        import torch

        if setup is not None:
            setup()
        kw = self._cache_kw()
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([[token]], device=self.opts.device), use_cache=True, **{kw: past})
            return getattr(out, kw), self._pick(out.logits[0, -1], temperature, gen)

    def generate_sync(self, req: GenerationRequest, emit: Callable[[Any], None]) -> Finished:
        """Decode on the calling thread's behalf, one compute-thread call per token;
        ``emit(text)`` for each new piece of text."""
        import torch

        if self.model is None:
            raise BackendError(self.name, f"not loaded ({self._status[1]})")
        ids = self.prompt_ids(req.messages)
        gen = None
        if req.temperature > 0:
            gen = torch.Generator(device=self.opts.device)
            gen.manual_seed(req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little"))
        stops = [s for s in req.stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        out_ids: list[int] = []
        sent = 0
        reason = FinishReason.LENGTH
        t_first = None
        setup = self._request_setup(req)
        past, nxt = self._compute.run(self._prefill, ids, req.temperature, gen, setup)
        for step in range(req.max_tokens):
            if req.cancel.is_set():
                reason = FinishReason.CANCELLED
                break
            if self.step_hook is not None:
                self.step_hook(step)
            if nxt in self._eos and not req.ignore_eos:
                reason = FinishReason.STOP
                break
            out_ids.append(nxt)
            if t_first is None:
                t_first = time.perf_counter()
            text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut > sent:
                    emit(text[sent:cut])
                reason = FinishReason.STOP_SEQUENCE
                break
            # Hold back a possible start of a stop string, and a half-decoded UTF-8 character.
            safe = len(text) - hold
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
            if safe > sent:
                emit(text[sent:safe])
                sent = safe
            if step + 1 == req.max_tokens:
                break
            past, nxt = self._compute.run(self._step, nxt, past, req.temperature, gen, setup)
        if reason != FinishReason.CANCELLED and out_ids:
            text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            if reason != FinishReason.STOP_SEQUENCE and len(text) > sent:
                emit(text[sent:])
        decode_s = time.perf_counter() - t_first if t_first else 0.0
        return Finished(reason, int(ids.shape[1]), len(out_ids), decode_s)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TextChunk | Finished]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            with self._slots:
                try:
                    put(self.generate_sync(request, lambda t: put(TextChunk(t))))
                except BackendError as e:
                    put(e)
                except Exception as e:  # surfaced to the caller as a backend failure
                    log.exception("backend %s failed during generation", self.name)
                    put(BackendError(self.name, f"{type(e).__name__}: {e}"))
                finally:
                    put(_DONE)

        loop.run_in_executor(self._pool, run)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Caller gone (deadline, disconnect) or done: stop the decode loop between two tokens.
            request.cancel.set()
