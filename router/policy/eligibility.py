"""Capability-aware eligibility: which backends can serve a request at all, before utility ranks
them. A prompt longer than a backend's context window, a request with tools for a model without
function calling, a JSON ``response_format`` for one without JSON mode, or an OpenAI parameter a
backend does not take: each makes that backend ineligible, with the reason in the decision's
``excluded`` (and every fallback after a failure stays among the eligible ones, as it walks the
ranking).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from backends.base import Capabilities
from router.core.messages import Message


@dataclass(frozen=True)
class Needs:
    """What a request asks of a backend. ``max_tokens``: output tokens it allows (None: a Route
    that says nothing of its answer); ``params``: the pass-through parameters it carries."""

    max_tokens: int | None = None
    tools: bool = False
    json_mode: bool = False
    params: frozenset[str] = frozenset()


class Capable(Protocol):
    """What eligibility uses of a backend."""

    def capabilities(self) -> Capabilities: ...

    def count_tokens(self, messages: Sequence[Message]) -> int: ...


# Chat templates add a few tokens per message and a few for the generation prompt (SmolLM2's:
# 5 a message, 3 at the end); 16 a message bounds every template we know.
_TEMPLATE_TOKENS_PER_MESSAGE = 16


def ineligible(needs: Needs, backends: Mapping[str, Capable], messages: Sequence[Message]) -> dict[str, str]:
    """name -> why the backend cannot serve the request, for each backend that cannot."""
    out: dict[str, str] = {}
    # Byte-level BPE tokens cover at least one UTF-8 byte each (a CJK character may be 2-3 tokens).
    size = sum(len(c.encode("utf-8")) for _, c in messages)
    for name, backend in backends.items():
        caps = backend.capabilities()
        why: list[str] = []
        if needs.tools and not caps.tools:
            why.append("no tool calling (the request has tools or tool messages)")
        if needs.json_mode and not caps.json_mode:
            why.append("no JSON mode (the request sets a JSON response_format)")
        missing = sorted(needs.params - caps.params)
        if missing:
            why.append(f"does not take {', '.join(missing)}")
        out_tokens = needs.max_tokens or 0
        if caps.max_output_tokens is not None and out_tokens > caps.max_output_tokens:
            why.append(f"max_tokens {out_tokens} > its max output {caps.max_output_tokens} tokens")
        if caps.context_window is not None:
            # No token is shorter than a byte: a prompt whose bytes (and template tokens) fit
            # needs no tokenizer call.
            bound = size + _TEMPLATE_TOKENS_PER_MESSAGE * (len(messages) + 1)
            if bound + out_tokens > caps.context_window:
                prompt = backend.count_tokens(messages)
                if prompt + out_tokens > caps.context_window:
                    why.append(f"context window {caps.context_window} tokens < {prompt} prompt + {out_tokens} "
                               "max_tokens")
        if why:
            out[name] = "; ".join(why)
    return out
