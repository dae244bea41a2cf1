import torch

from backends.pruning import mlp_neuron_importance, prune_mlp


def test_keeping_every_neuron_reproduces_the_dense_logits(tiny):
    ids = torch.randint(0, 128, (2, 10))
    with torch.inference_mode():
        dense = tiny(input_ids=ids).logits.clone()
    imp = [torch.rand(64) for _ in range(2)]
    prune_mlp(tiny, imp, keep=1.0)
    with torch.inference_mode():
        torch.testing.assert_close(tiny(input_ids=ids).logits, dense, atol=1e-5, rtol=1e-5)


def test_pruned_weights_are_really_smaller_and_keep_the_top_neurons(tiny):
    imp = [torch.arange(64, dtype=torch.float32), torch.arange(64, dtype=torch.float32).flip(0)]
    before = sum(p.numel() for p in tiny.parameters())
    kept = prune_mlp(tiny, imp, keep=0.5)
    after = sum(p.numel() for p in tiny.parameters())
    assert tiny.config.intermediate_size == 32
    assert kept[0].tolist() == list(range(32, 64)) and kept[1].tolist() == list(range(32))
    for layer in tiny.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (32, 32)
        assert layer.mlp.down_proj.weight.shape == (32, 32)
    assert before - after == 2 * 3 * 32 * 32


def test_pruning_equals_zeroing_the_dropped_neurons(tiny):
    """Slicing must compute exactly what masking the dropped neurons computes."""
    import copy

    ids = torch.randint(0, 128, (1, 12))
    imp = [torch.rand(64) for _ in range(2)]
    masked = copy.deepcopy(tiny)
    for layer, i in zip(masked.model.layers, imp):
        drop = torch.topk(i, 32, largest=False).indices
        layer.mlp.down_proj.weight.data[:, drop] = 0
    kept = prune_mlp(tiny, imp, keep=0.5)
    assert all(len(k) == 32 for k in kept)
    with torch.inference_mode():
        torch.testing.assert_close(tiny(input_ids=ids).logits, masked(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_importance_is_activation_aware(tiny):
    """A neuron whose output column is zero has zero importance, however much it fires."""
    from types import SimpleNamespace

    tiny.model.layers[0].mlp.down_proj.weight.data[:, 5] = 0
    tok = SimpleNamespace(apply_chat_template=lambda msgs, **kw: {"input_ids": torch.randint(0, 128, (1, 8))})
    imp = mlp_neuron_importance(tiny, tok, ["a", "b"])
    assert len(imp) == 2 and imp[0].shape == (64,)
    assert imp[0][5] == 0 and imp[0].sum() > 0


def test_dropping_no_layer_changes_nothing_and_dropped_models_decode_with_a_cache(tiny):
    from backends.pruning import drop_layers

    ids = torch.randint(0, 128, (1, 8))
    with torch.inference_mode():
        dense = tiny(input_ids=ids).logits.clone()
    assert drop_layers(tiny, torch.tensor([0.3, 0.7]), keep=1.0).tolist() == [0, 1]
    with torch.inference_mode():
        torch.testing.assert_close(tiny(input_ids=ids).logits, dense)
    kept = drop_layers(tiny, torch.tensor([0.3, 0.7]), keep=0.5)
    assert kept.tolist() == [1] and tiny.config.num_hidden_layers == 1 and len(tiny.model.layers) == 1
    assert tiny.model.layers[0].self_attn.layer_idx == 0
    with torch.inference_mode():
        out = tiny.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=True)
        # Cached decoding computes what a full forward over the same tokens computes.
        full = tiny(input_ids=out[:, :-1]).logits[:, -1].argmax(-1)
    assert out.shape == (1, 13) and full.item() == out[0, -1].item()


def test_block_influence_ranks_an_identity_layer_lowest(tiny):
    from types import SimpleNamespace

    from backends.pruning import layer_importance

    with torch.no_grad():                      # layer 0 writes nothing into the residual stream
        tiny.model.layers[0].self_attn.o_proj.weight.zero_()
        tiny.model.layers[0].mlp.down_proj.weight.zero_()
    tok = SimpleNamespace(apply_chat_template=lambda *a, **k: {"input_ids": torch.randint(0, 128, (1, 9))})
    bi = layer_importance(tiny, tok, ["a", "b", "c"])
    assert bi.shape == (2,) and bi[0] < 1e-6 < bi[1]


def test_distillation_brings_a_pruned_model_closer_to_the_dense_one(tiny):
    import copy

    from backends.pruning import distill, drop_layers

    torch.manual_seed(1)
    with torch.no_grad():                      # peaked next-token distributions, as a trained LM has
        tiny.lm_head.weight.mul_(30)
    teacher = copy.deepcopy(tiny).eval()
    drop_layers(tiny, torch.tensor([0.9, 0.1]), keep=0.5)
    seqs = [torch.randint(0, 128, (1, 16)) for _ in range(4)]

    def kl() -> float:
        with torch.no_grad():
            return sum(float(torch.nn.functional.kl_div(torch.log_softmax(tiny(input_ids=s).logits[0], -1),
                                                        torch.log_softmax(teacher(input_ids=s).logits[0], -1),
                                                        log_target=True, reduction="batchmean")) for s in seqs)

    before = kl()
    losses = distill(tiny, teacher, seqs, steps=150, lr=3e-3)
    assert len(losses) == 150 and kl() < 0.6 * before
    assert not tiny.training
