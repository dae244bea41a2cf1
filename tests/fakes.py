"""Fakes for unit-testing a layer in isolation: scripted backends and a bag-of-words encoder. The
real path is covered by tests that run the real parts (tests/router/adapters/test_grpc_integration.py with
MiniLM and SmolLM2; the service and datastore tests run with MiniLM too, under the slow marker)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from aiohttp import web

from backends.base import Backend, Finished, FinishReason, GenerationRequest, Status, TextChunk
from router.core.config import CostModelConfig
from router.core.costs import CostModel
from router.core.errors import BackendError


class ScriptedBackend(Backend):
    kind = "scripted"

    def __init__(self, name: str, words=("hello", " world"), *, fail_at: int | None = None,
                 per_request: float = 1.0, status=Status.READY, delay: float = 0.0) -> None:
        self.name, self.description = name, f"scripted {name}"
        self.words, self.fail_at, self.delay = list(words), fail_at, delay
        self._status = (status, "scripted")
        self._cost = CostModel.from_config(CostModelConfig(kind="per_request", per_request=per_request), "USD")
        self.calls = 0
        self.cancelled = False

    async def load(self) -> None:
        pass

    def status(self):
        return self._status

    def cost_model(self) -> CostModel:
        return self._cost

    async def generate(self, request: GenerationRequest):
        self.calls += 1
        n = 0
        for i, w in enumerate(self.words[: request.max_tokens]):
            if self.fail_at == i:
                raise BackendError(self.name, f"injected failure at token {i}")
            if request.cancel.is_set():
                self.cancelled = True
                yield Finished(FinishReason.CANCELLED, 3, n, 0.0)
                return
            if self.delay:
                await asyncio.sleep(self.delay)
            n += 1
            yield TextChunk(w)
        if self.fail_at is not None and self.fail_at >= len(self.words):
            raise BackendError(self.name, "injected failure at the end")
        yield Finished(FinishReason.STOP, 3, n, 0.01)


class WordEncoder:
    """A PromptEncoder for the fast loop: hashed counts of a prompt's words and symbols, L2-normalized
    (384-d, like MiniLM). Prompts that share words are close and prompts that share none are
    orthogonal, which is all the service and datastore tests ask of an encoder; MiniLM runs the same
    tests under the slow marker."""

    model_id = "tests/word-hash"
    dim = 384

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """texts: n strings -> float32 (n, 384), unit rows."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for token in re.findall(r"[a-z]+|\d+|[^\sa-z\d]", text.lower()) or ["<empty>"]:
                out[i, zlib.crc32(token.encode()) % self.dim] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def write_outcomes(path: Path, rows) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


# Two backends with opposite strengths: "mathy" answers arithmetic, "wordy" answers writing tasks.
OUTCOMES = (
    [{"id": f"m{i}", "prompt": f"What is {i} + {i + 3}?", "scores": {"mathy": 1.0, "wordy": 0.0}} for i in range(12)]
    + [{"id": f"w{i}", "prompt": f"Write a short poem about {t}.", "scores": {"mathy": 0.0, "wordy": 1.0}}
       for i, t in enumerate(["the sea", "autumn", "a cat", "the moon", "rain", "mountains", "love", "bread",
                              "trains", "winter", "a garden", "the city"])]
)


async def serve_openai(handler: Any) -> tuple[web.AppRunner, str]:
    """A loopback OpenAI-compatible server on a free port: ``handler.models`` answers GET /v1/models,
    ``handler.chat`` POST /v1/chat/completions. Returns the runner (``cleanup()`` stops it) and
    the base URL."""
    app = web.Application()
    app.add_routes([web.get("/v1/models", handler.models), web.post("/v1/chat/completions", handler.chat)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"


@contextlib.asynccontextmanager
async def openai_server(handler: Any) -> AsyncIterator[str]:
    """``serve_openai`` for the length of a block; yields the base URL."""
    runner, url = await serve_openai(handler)
    try:
        yield url
    finally:
        await runner.cleanup()
