"""The PromptEncoder interface (what part of a request is embedded: ``router.core.messages``)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from router.core.registry import Registry


@runtime_checkable
class PromptEncoder(Protocol):
    """Maps texts to unit-norm embeddings.

    ``encode(texts)`` returns a float32 array of shape (len(texts), dim), each row of L2 norm 1,
    so inner product equals cosine similarity everywhere downstream (FAISS IndexFlatIP).
    """

    model_id: str
    dim: int

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


# An encoder kind: built from (model_path, *, max_tokens, batch_size, device, compute), plus
# (runtime, cache_dir) when the encoder config asks for a runtime other than torch.
ENCODERS: Registry[Callable[..., PromptEncoder]] = Registry("prompt encoder")
