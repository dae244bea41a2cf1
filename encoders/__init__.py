"""Prompt encoders: text -> unit-norm float32 vectors."""
from encoders.base import ENCODERS, PromptEncoder, prompt_text

__all__ = ["ENCODERS", "PromptEncoder", "prompt_text"]
