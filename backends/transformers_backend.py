"""A local causal LM served in-process with transformers, streaming token by token.

Decoding is continuous-batched by ``backends.batching.DecodeScheduler`` (why not ``generate``
or transformers' own manager: see there): exact token counts, stop strings, per-request seeds,
cancellation between any two tokens; requests join and leave the running batch between steps.
This class supplies the model operations (tokenize, forward, pick, decode); tokens cross to the
event loop through a queue.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from backends.base import BACKENDS, Backend, Capabilities, Finished, GenerationRequest, QueueStats, Status, TextChunk
from backends.batching import DecodeScheduler, seeded_generator
from backends.packed import Prefix, RowCache
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
    # Requests decoding together (continuous batching); more wait in a queue of max_queue, and
    # beyond that a request is refused at once (RESOURCE_EXHAUSTED). Sizing: docs/serving.md.
    max_batch: int = Field(16, ge=1, le=1024, validation_alias=AliasChoices("max_batch", "max_concurrency"))
    max_queue: int = Field(32, ge=0, le=100_000)
    # Prompt tokens prefilled per scheduler iteration: a long newcomer's prompt is fed in chunks
    # of this many tokens between decode steps of the running batch.
    prefill_chunk: int = Field(256, ge=16, le=32_768)
    # Filler rows where MKL's matrix products are slow for a row count (backends/packed.py,
    # PAD_ROWS): up to 25% off a decode step of 3 or 7 rows on 2 AVX-512 cores.
    pad_rows: bool = True
    # Prompt tokens kept (the most recent); SmolLM2 was trained at 8k, CPU latency argues shorter.
    max_prompt_tokens: int = Field(2048, ge=16)
    # A width-pruned code of a base backend served here decodes in the base's batch
    # (backends/shared_base.py); false keeps a scheduler of its own.
    share_batch: bool = True


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
        self.capabilities_config = cfg.capabilities
        self.description = cfg.description
        self._cost_cfg = cfg.cost
        self._cost_unit = cost_unit
        self._models_dir = models_dir
        self._status = (Status.LOADING, "not loaded yet")
        self._cost: CostModel = CostModel.from_config(cfg.cost, cost_unit)
        self.model: Any = None
        self.tokenizer: Any = None
        self.weights_dir: Path | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"load-{self.name}")
        # Every torch call goes through here (see router/core/compute.py); the scheduler's driver
        # thread only orchestrates, one forward at a time.
        self._compute = compute or Inline()
        self._scheduler: DecodeScheduler | None = None
        self._warm_s = 1.0
        # Test hook: a callable run before each decode step (lets tests inject faults on the real path).
        self.step_hook: Callable[[int], None] | None = None
        # Codes decoding in this backend's batch, or the base whose batch this one decodes in
        # (backends/shared_base.py).
        self._masks: Any = None
        self._base: TransformersBackend | None = None

    # ---- lifecycle ------------------------------------------------------------------------
    async def load(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._compute.run, self._load_sync)
            assert self._scheduler is not None
            self._scheduler.start(service_s=self._warm_s)
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
        self.eos = {int(t) for t in eos if t is not None}
        self._cost = CostModel.from_config(self._cost_cfg, self._cost_unit, active_parameters=self.active_parameters())
        o = self.opts
        self._scheduler = DecodeScheduler(self.name, self, self._compute, max_batch=o.max_batch,
                                          max_queue=o.max_queue, prefill_chunk=o.prefill_chunk)
        # Warm-up: the first forwards pay one-off allocation and kernel selection costs that
        # would otherwise land on the first requests; two prompts of unequal length take the
        # padded path too. Their time seeds the queue's expected wait.
        t_warm = time.monotonic()
        self._scheduler.run_until_idle([GenerationRequest(messages=[("user", "Hi")], max_tokens=4, ignore_eos=True),
                                        GenerationRequest(messages=[("user", "Say hello to the world.")], max_tokens=4,
                                                          ignore_eos=True)])
        self._warm_s = (time.monotonic() - t_warm) * 16    # ~64 tokens at the warm-up's rate

    def _prepare_model(self, base: Path) -> None:
        """Hook for kinds that reshape the loaded model (the MoE split)."""

    def known_capabilities(self) -> Capabilities:
        """The model's context window from its config (``max_position_embeddings``, 8192 for
        SmolLM2); no tools, no JSON mode, no pass-through parameters but ``user`` (an end-user id
        for the provider's abuse monitoring: nothing to do locally)."""
        window = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return Capabilities(context_window=int(window) if window else None, params=frozenset({"user"}))

    def count_tokens(self, messages: Sequence[tuple[str, str]]) -> int:
        """The chat-templated prompt's tokens, uncut (``max_prompt_tokens`` is not applied)."""
        if self.tokenizer is None:
            return super().count_tokens(messages)
        return len(self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                      add_generation_prompt=True, return_dict=True)["input_ids"])

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
        if self._scheduler is not None and self._base is None:      # a shared one is its base's to close
            await asyncio.get_running_loop().run_in_executor(None, self._scheduler.close)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def adopt(self, code: TransformersBackend, kept: Sequence[Any]) -> None:
        """Decode ``code``'s requests in this backend's batch from now on; ``kept``: per layer,
        the neurons of this model that it keeps (backends/shared_base.py)."""
        from backends.shared_base import NeuronMasks

        assert self._scheduler is not None and code._scheduler is not None
        if self._masks is None:
            self._masks = self._compute.run(NeuronMasks, self.model)
        self._compute.run(self._masks.add, code, kept)
        own, code._scheduler, code._base = code._scheduler, self._scheduler, self
        own.close()
        code._status = (code._status[0], f"{code._status[1]}; decodes in the batch of {self.name}")

    # ---- generation: the model operations the scheduler calls (backends/batching.py) --------------
    def tokenize(self, messages: Any) -> list[int]:
        """The chat-templated prompt's token ids, the most recent ``max_prompt_tokens`` (plain
        lists: this runs on the scheduler's thread, which must not touch torch)."""
        ids = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                 add_generation_prompt=True, return_dict=True)["input_ids"]
        return [int(t) for t in ids[-self.opts.max_prompt_tokens:]]

    def prompt_ids(self, messages: Any) -> Any:
        """``tokenize`` as a (1, n) tensor on the model's device."""
        import torch

        return torch.tensor([self.tokenize(messages)], dtype=torch.long, device=self.opts.device)

    def prepare(self, req: GenerationRequest) -> tuple[Hashable, Callable[[], None] | None]:
        """(batch key, setup): requests with equal keys decode in one batch; setup runs on the
        compute thread before each forward of that batch (the MoE kind installs expert weights)."""
        return None, None

    def generator(self, req: GenerationRequest) -> Any:
        return seeded_generator(req, self.opts.device)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def new_cache(self, reserve: int, prefix: Prefix | None = None) -> RowCache:
        """A KV cache for one request, sized at first for ``reserve`` tokens, holding ``prefix``."""
        return RowCache(reserve, prefix)

    def prompt_head(self) -> list[int]:
        """The tokens every chat-templated user prompt starts with (the template's system prompt
        and role markers): the scheduler caches their keys and values once."""
        a, b = self.tokenize([("user", "a")]), self.tokenize([("user", "b")])
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return a[:n]

    def forward(self, tokens: Sequence[Sequence[int]], starts: Sequence[int], caches: Sequence[RowCache],
                setup: Callable[[], None] | None, members: Sequence[Any] = (),
                logits_at: Sequence[int] = ()) -> Any:
        """One packed forward (backends/packed.py): row i feeds ``tokens[i]`` after the
        ``starts[i]`` tokens in ``caches[i]`` -> logits (len(logits_at), V) at the last new token
        of the rows ``logits_at``. ``members``: per row, the code that submitted it (None: this
        backend), when codes share this backend's batch: rows all of one code run that code's
        model, mixed rows this model with each row's neurons masked."""
        import contextlib

        from backends import packed

        if setup is not None:
            setup()
        model, scope = self.model, contextlib.nullcontext()
        if self._masks is not None and any(m is not None for m in members):
            distinct = {m or self for m in members}
            if len(distinct) == 1:
                model = distinct.pop().model
            else:
                lengths = [len(t) for t in tokens]
                scope = self._masks.rows(members, lengths, packed.padding(sum(lengths), self.opts.pad_rows))
        with scope:
            return packed.forward(model, tokens, starts, caches, logits_at, self.opts.device, self.opts.pad_rows)

    def pick(self, logits: Any, rows: Sequence[Any]) -> list[int]:
        """Each row's next token: argmax when greedy, else a draw from its own generator."""
        import torch

        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, r in enumerate(rows):
            if r.gen is None:
                out.append(int(greedy[i]))
            else:
                probs = torch.softmax(logits[i].float() / r.req.temperature, dim=-1)
                out.append(int(torch.multinomial(probs, 1, generator=r.gen)))
        return out

    def queue_stats(self) -> QueueStats | None:
        return None if self._scheduler is None else self._scheduler.stats()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TextChunk | Finished]:
        if self._scheduler is None or self.model is None:
            raise BackendError(self.name, f"not loaded ({self._status[1]})")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        # Overloaded at once when the queue is full; a code sharing its base's batch names itself.
        self._scheduler.submit(request, put, self if self._base is not None else None)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    break
        finally:
            # Caller gone (deadline, disconnect) or done: the row leaves the batch at the next step.
            request.cancel.set()
