"""Fixtures shared by the backend tests."""
import pytest
import torch


@pytest.fixture
def tiny():
    """A small random Llama: fast, and enough to check the algebra of slicing, masks and experts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()
