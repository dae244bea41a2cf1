"""Prompt encoders: text -> unit-norm float32 vectors (``PromptEncoder``, MiniLM), and the
capability encoder (a trained model over those vectors that predicts each backend's quality).

May import: the kernel (``router.core``) only.
"""
from encoders.base import ENCODERS, PromptEncoder


def register_builtin_encoders() -> None:
    """Import the built-in encoder kinds so they register themselves (kept out of import time:
    MiniLM's module is light, but its model is not)."""
    from encoders import minilm  # noqa: F401


__all__ = ["ENCODERS", "PromptEncoder", "register_builtin_encoders"]
