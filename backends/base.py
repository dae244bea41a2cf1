"""The Backend interface: something a prompt can be dispatched to, with a cost model and health."""
from __future__ import annotations

import abc
import enum
import threading
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from router.core.config import PASS_THROUGH
from router.core.costs import CostModel
from router.core.registry import Registry


@dataclass(frozen=True)
class QueueStats:
    running: int                # requests decoding or prefilling
    waiting: int                # queued, not started
    max_batch: int
    max_queue: int
    expected_wait_s: float      # how long a request arriving now would wait before it starts


class Status(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can serve, for eligibility: a request that needs more is routed elsewhere.

    ``context_window``: prompt plus output tokens it holds (None: not declared, never excluded for
    length). ``max_output_tokens``: the most it generates in one answer (None: no own limit).
    ``tools``: function calling (tools, tool messages). ``json_mode``: a JSON ``response_format``.
    ``params``: the PASS_THROUGH parameters it honours."""

    ALL_PARAMS = frozenset(PASS_THROUGH)

    context_window: int | None = None
    max_output_tokens: int | None = None
    tools: bool = False
    json_mode: bool = False
    params: frozenset[str] = frozenset()

    def merged(self, override: Any) -> Capabilities:
        """These, with every field ``override`` (a CapabilitiesConfig) sets replacing ours."""
        if override is None:
            return self
        given = override.model_dump(exclude_none=True)
        if "params" in given:
            given["params"] = frozenset(given["params"])
        return replace(self, **given)


class FinishReason(str, enum.Enum):
    STOP = "stop"                    # the model ended its answer (EOS)
    TOOL_CALLS = "tool_calls"        # the model asks the app to call tools
    LENGTH = "length"                # max_tokens reached
    STOP_SEQUENCE = "stop_sequence"  # a caller's stop string appeared
    CANCELLED = "cancelled"          # the caller went away or its deadline passed


@dataclass
class GenerationRequest:
    """messages: (role, content) pairs, oldest first. cancel: set it to stop generation early."""

    messages: Sequence[tuple[str, str]]
    max_tokens: int = 128
    temperature: float = 0.0
    stop: Sequence[str] = ()
    seed: int | None = None
    # Benchmarks only: decode exactly max_tokens, so that tokens/s compares like with like.
    ignore_eos: bool = False
    # The prompt's unit-norm embedding (d,) when the router has it (backends that gate on it).
    embedding: Any = None
    # PASS_THROUGH parameters of an OpenAI chat request, verbatim (only backends whose
    # capabilities list them get requests that carry them).
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The OpenAI messages as the app sent them (tool calls, tool results, content parts), for
    # backends that speak OpenAI; ``messages`` is their (role, text) reading. None: the same.
    raw_messages: Sequence[Mapping[str, Any]] | None = None
    # time.monotonic() after which the caller no longer wants an answer: a queued request whose
    # deadline passed never starts, a running one stops (None: no deadline).
    deadline: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    # Set by a backend that queues (time.time_ns()) when the request leaves its queue and starts:
    # the trace's queue span ends there.
    started_ns: int | None = None


@dataclass(frozen=True)
class TextChunk:
    text: str
    # OpenAI streaming deltas passed through from a remote backend: tool-call fragments (each
    # with its ``index``) and the chunk's ``logprobs`` object.
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    logprobs: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    decode_s: float  # time spent producing the completion tokens after the first

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: the tokens after the first over the time they took (0 when unknown)."""
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s > 0 and self.completion_tokens > 1 else 0.0


class Backend(abc.ABC):
    """One dispatch target. ``generate`` yields TextChunk* then exactly one Finished.

    Implementations raise router.core.errors.BackendError on failure; the caller decides on fallback
    (only possible before the first chunk was forwarded).
    """

    name: str
    kind: str
    description: str

    @abc.abstractmethod
    async def load(self) -> None:
        """Make the backend ready; on failure set status UNAVAILABLE with a reason, do not raise."""

    @abc.abstractmethod
    def status(self) -> tuple[Status, str]:
        """(status, human-readable detail)."""

    @abc.abstractmethod
    def cost_model(self) -> CostModel: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[TextChunk | Finished]: ...

    # The backend config's ``capabilities`` (set by kinds from their BackendConfig).
    capabilities_config: Any = None

    def capabilities(self) -> Capabilities:
        """What it can serve (eligibility): what the kind knows, overridden by the config."""
        return self.known_capabilities().merged(self.capabilities_config)

    def known_capabilities(self) -> Capabilities:
        """What the kind itself knows (a local model: its context window). Default: nothing
        declared, no tools, no JSON mode, no pass-through parameters."""
        return Capabilities()

    def count_tokens(self, messages: Sequence[tuple[str, str]]) -> int:
        """Prompt tokens of ``messages`` as this backend counts them. Default, for backends whose
        tokenizer caprouter does not hold: an over-estimate, so a window is not overrun: a token
        per 3 ASCII characters (English averages about 4 in OpenAI's and Llama's tokenizers) and
        one per other character (CJK text takes 1-3)."""
        text = "".join(c for _, c in messages)
        ascii_chars = sum(ch < "\x80" for ch in text)
        return ascii_chars // 3 + (len(text) - ascii_chars) + 4 * len(messages)

    def queue_stats(self) -> QueueStats | None:
        """The backend's own queue (local models), or None when it keeps none (remote APIs)."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


# A backend kind: built from its config (``cfg``) and the server's ``cost_unit``, ``models_dir``,
# ``compute`` thread and prompt ``encoder`` (keywords; a kind takes what it needs).
BACKENDS: Registry[Callable[..., Backend]] = Registry("backend kind")
