"""Backends: dispatch targets behind one interface (``base.Backend``), found in a registry by
kind: local transformers models and their pruned variants, the MoE backend, remote
OpenAI-compatible endpoints, route-only backends, and backends on Ray Serve deployments.

May import: the kernel (``router.core``) only.
"""
from backends.base import BACKENDS, Backend, Finished, FinishReason, GenerationRequest, Status, TextChunk


def register_builtin_backends() -> None:
    """Import the built-in backend kinds so they register themselves (kept out of import time)."""
    from backends import moe, openai_remote, route_only, transformers_backend  # noqa: F401


__all__ = ["BACKENDS", "Backend", "Finished", "FinishReason", "GenerationRequest", "Status", "TextChunk",
           "register_builtin_backends"]
