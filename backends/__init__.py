"""Backends: local models, pruned variants, and the registry that finds them by kind."""
from backends.base import BACKENDS, Backend, Finished, FinishReason, GenerationRequest, Status, TextChunk


def register_builtin_backends() -> None:
    """Import the built-in backend kinds so they register themselves (kept out of import time)."""
    from backends import moe, openai_remote, route_only, transformers_backend  # noqa: F401


__all__ = ["BACKENDS", "Backend", "Finished", "FinishReason", "GenerationRequest", "Status", "TextChunk",
           "register_builtin_backends"]
