"""A request's messages, and the rule for what part of them stands for the request when it is
embedded: the router's encoder, the MoE backend's pre-gate and training all embed the same text.
"""
from __future__ import annotations

from collections.abc import Sequence

# "tool": a tool's result sent back to the model (function calling); only backends with tool
# calling are eligible for requests that carry one.
ROLES = ("system", "user", "assistant", "tool")

Message = tuple[str, str]
"""(role, content), oldest first."""


def prompt_text(prompt: str | None, messages: Sequence[Message] | None, *, context_chars: int = 600) -> str:
    """The text that stands for a request when embedding it.

    Why this choice: what decides which backend answers well is the task being asked, and in a
    chat that is the last user turn. Earlier turns matter only as context (a follow-up like
    "and in French?" means nothing alone), so we append up to ``context_chars`` of the most
    recent earlier turns after the last user turn, never before it: the encoder truncates from
    the middle (see MiniLMEncoder), and the ask itself must survive. System prompts are left out:
    they are usually the same for every request of an app and would pull all its prompts together.
    """
    if messages:
        turns = [(r, c) for r, c in messages if r != "system"]
        last_user = max((i for i, (r, _) in enumerate(turns) if r == "user"), default=len(turns) - 1)
        ask = turns[last_user][1] if turns else ""
        context: list[str] = []
        budget = context_chars
        for _, content in reversed(turns[:last_user]):
            if budget <= 0:
                break
            piece = content[-budget:]
            context.append(piece)
            budget -= len(piece)
        return ask if not context else ask + "\n\n" + "\n".join(reversed(context))
    return prompt or ""
