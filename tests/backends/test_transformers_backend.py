"""The real SmolLM2-135M-Instruct, dense and pruned, through the Backend interface."""
from __future__ import annotations

import asyncio
import json

import pytest

from backends.base import Finished, FinishReason, GenerationRequest, Status, TextChunk
from backends.transformers_backend import TransformersBackend
from router.core.config import BackendConfig
from router.core.errors import ConfigError

pytestmark = pytest.mark.slow


def _backend(models_dir, name="dense", **options) -> TransformersBackend:
    b = TransformersBackend(BackendConfig(name=name, kind="transformers", options=options), cost_unit="GFLOP",
                            models_dir=models_dir)
    asyncio.run(b.load())
    return b


@pytest.fixture(scope="module")
def dense(models_dir):
    return _backend(models_dir)


def _run(b, **kw):
    async def go():
        text, fin = [], None
        async for ev in b.generate(GenerationRequest(**kw)):
            if isinstance(ev, TextChunk):
                text.append(ev.text)
            else:
                fin = ev
        return "".join(text), fin
    return asyncio.run(go())


def test_generates_with_the_chat_template(dense):
    text, fin = _run(dense, messages=[("user", "What is the capital of France?")], max_tokens=16)
    assert "Paris" in text and isinstance(fin, Finished) and fin.reason == FinishReason.STOP
    raw = len(dense.tokenizer("What is the capital of France?")["input_ids"])
    assert fin.prompt_tokens > raw + 5  # the template's system turn and role markers are there
    assert dense.status()[0] == Status.READY


def test_max_tokens_and_exact_count(dense):
    text, fin = _run(dense, messages=[("user", "Write a long story about a dragon.")], max_tokens=5)
    assert fin.reason == FinishReason.LENGTH and fin.completion_tokens == 5 and text
    assert len(dense.tokenizer(text, add_special_tokens=False)["input_ids"]) <= 6


def test_stop_sequence_is_not_emitted(dense):
    text, fin = _run(dense, messages=[("user", "What is the capital of France?")], max_tokens=16, stop=["Paris"])
    assert fin.reason == FinishReason.STOP_SEQUENCE and "Paris" not in text


def test_cancel_stops_between_tokens(dense):
    req = GenerationRequest(messages=[("user", "Write a long story about a dragon.")], max_tokens=200)

    async def go():
        n = 0
        async for ev in dense.generate(req):
            if isinstance(ev, TextChunk):
                n += 1
                if n == 3:
                    req.cancel.set()
            else:
                return ev
    fin = asyncio.run(go())
    assert fin.reason == FinishReason.CANCELLED and fin.completion_tokens < 10


def test_sampling_is_seeded(dense):
    kw = dict(messages=[("user", "Name an animal.")], max_tokens=8, temperature=1.0, seed=7)
    assert _run(dense, **kw)[0] == _run(dense, **kw)[0]


def test_cost_model_counts_active_parameters(dense):
    n = dense.active_parameters()
    assert 130e6 < n < 140e6  # 134.5M: every matmul weight, the tied output projection included
    assert dense.cost_model().predict(400) == pytest.approx(2 * n * (100 + 64) / 1e9)


def test_pruned_variant_is_really_smaller(dense, models_dir):
    pruned = _backend(models_dir, name="p", prune={"mlp_keep": 0.75})
    assert pruned.model.config.intermediate_size == 1152 == int(0.75 * dense.model.config.intermediate_size)
    assert pruned.total_parameters() < dense.total_parameters() - 19e6
    info = json.loads((pruned.weights_dir / "pruning.json").read_text())
    assert info["keep"] == 0.75 and info["calibration_prompts"] >= 32
    text, fin = _run(pruned, messages=[("user", "Say hello.")], max_tokens=6)
    assert fin.completion_tokens >= 1


def test_load_failure_is_reported_not_raised(tmp_path):
    b = _backend(tmp_path, name="broken", model=str(tmp_path / "nowhere"))
    st, detail = b.status()
    assert st == Status.UNAVAILABLE and "nowhere" in detail


def test_bad_options_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="invalid options"):
        TransformersBackend(BackendConfig(name="x", kind="transformers", options={"prune": {"mlp_keep": 2}}),
                            cost_unit="GFLOP", models_dir=tmp_path)


def test_concurrent_requests_batch_together_and_each_gets_its_text_alone(dense):
    """Continuous batching on the real model: 8 callers at once decode in one batch (seen in the
    queue stats), and at temperature 0 each gets the text it gets alone."""
    prompts = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
               "What is 7 + 5?", "Give me a synonym for happy.", "Explain gravity in one sentence.",
               "List two prime numbers.", "Say hello in Spanish."]
    alone = [_run(dense, messages=[("user", p)], max_tokens=24)[0] for p in prompts]

    async def together():
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, dense.queue_stats().running)
                await asyncio.sleep(0.01)

        async def one(p):
            out = []
            async for ev in dense.generate(GenerationRequest(messages=[("user", p)], max_tokens=24)):
                if isinstance(ev, TextChunk):
                    out.append(ev.text)
            return "".join(out)
        w = asyncio.create_task(watch())
        texts = await asyncio.gather(*(one(p) for p in prompts))
        w.cancel()
        return texts, peak
    texts, peak = asyncio.run(together())
    assert peak >= 4
    assert texts == alone
