"""The Backend interface: something a prompt can be dispatched to, with a cost model and health."""
from __future__ import annotations

import abc
import enum
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


class FinishReason(str, enum.Enum):
    STOP = "stop"                    # the model ended its answer (EOS)
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
    # time.monotonic() after which the caller no longer wants an answer: a queued request whose
    # deadline passed never starts, a running one stops (None: no deadline).
    deadline: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class TextChunk:
    text: str


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

    def queue_stats(self) -> QueueStats | None:
        """The backend's own queue (local models), or None when it keeps none (remote APIs)."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


# A backend kind: built from its config (``cfg``) and the server's ``cost_unit``, ``models_dir``,
# ``compute`` thread and prompt ``encoder`` (keywords; a kind takes what it needs).
BACKENDS: Registry[Callable[..., Backend]] = Registry("backend kind")
