import numpy as np
import pytest

from encoders.base import PromptEncoder

pytestmark = pytest.mark.slow      # loads MiniLM


def test_unit_norm_float32_and_shape(encoder):
    texts = ["What is the capital of France?", "Write a haiku about rain.", "x"]
    e = encoder.encode(texts)
    assert isinstance(encoder, PromptEncoder)
    assert e.dtype == np.float32 and e.shape == (3, 384) == (3, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_batched_equals_one_by_one(encoder):
    texts = [f"question number {i} about {w}" for i, w in enumerate(["cats", "tax law", "python lists", "rome"])]
    together = encoder.encode(texts)
    alone = np.concatenate([encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_matches_sentence_transformers_reference(encoder):
    from sentence_transformers import SentenceTransformer

    from encoders.minilm import default_model_path

    st = SentenceTransformer(str(default_model_path()), device="cpu")
    text = ["How many legs does a spider have?"]
    np.testing.assert_allclose(encoder.encode(text), st.encode(text, normalize_embeddings=True), atol=1e-5)


def test_semantics_similar_prompts_are_closer(encoder):
    a, b, c = encoder.encode(["What is 12 plus 30?", "Compute 15 + 27.", "Write a love poem about the sea."])
    assert a @ b > a @ c


def test_long_prompt_keeps_the_question_at_the_end(encoder):
    filler = "The committee discussed the annual budget in great detail. " * 80
    q1 = filler + "What is the capital of Japan?"
    q2 = filler + "How do I bake sourdough bread?"
    e = encoder.encode([q1, q2, "What is the capital of Japan?"])
    # Head-only truncation would make q1 and q2 identical; the kept tail tells them apart.
    assert e[0] @ e[1] < 0.99
    assert e[0] @ e[2] > e[1] @ e[2]
