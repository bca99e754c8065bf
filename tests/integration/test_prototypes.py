"""Prototypes: the mean router input per layer and the spread of the prefix means around it, checked against a
direct computation (the output of each layer's post-attention norm, prefix means in a loop), written and read back
exactly, and refused with a one-line reason when missing or made for another base."""

import pytest
import torch

from llama_expert import ExpertConfig, augment_model
from llama_expert.errors import AdapterError
from llama_expert.integration.prototypes import (PROTOTYPES_NAME, SPREAD_FROM, Prototypes, load_prototypes,
                                                 measure_prototypes, save_prototypes)


def _mlp_inputs(model, blocks):
    """[L] tensors [n, T, d]: each layer's MLP input, read as the output of its post-attention norm (Llama)."""
    captured = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: captured.append(out.double()))
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=blocks, use_cache=False)
    for hook in hooks:
        hook.remove()
    return captured


def test_prototypes_are_the_mean_router_input_and_the_spread_of_the_prefix_means(tiny_model):
    model = augment_model(tiny_model, ExpertConfig(num_experts=2, top_k=1, expert_allocation="uniform")).train()
    blocks = torch.randint(0, 128, (3, SPREAD_FROM + 8), generator=torch.Generator().manual_seed(0))
    measured = measure_prototypes(model, blocks, batch_size=2)
    assert model.training  # measured in eval mode (no dropout), the model's mode given back
    model.eval()
    for layer, hidden in enumerate(_mlp_inputs(model, blocks)):
        prototype = hidden.mean(dim=(0, 1))
        torch.testing.assert_close(measured.prototype[layer], prototype.float(), rtol=1e-5, atol=1e-6)
        distances = [float((hidden[b, :t + 1].mean(dim=0) - prototype).pow(2).mean())
                     for b in range(3) for t in range(SPREAD_FROM - 1, SPREAD_FROM + 8)]
        assert measured.spread[layer].item() == pytest.approx(sum(distances) / len(distances), rel=1e-5)
    assert measured.tokens == blocks.numel()


def test_prototypes_round_trip_exactly(tmp_path):
    prototypes = Prototypes(torch.randn(4, 64), torch.rand(4), 1234)
    save_prototypes(prototypes, tmp_path)
    loaded = load_prototypes(tmp_path, 4, 64)
    assert torch.equal(loaded.prototype, prototypes.prototype) and torch.equal(loaded.spread, prototypes.spread)
    assert loaded.tokens == 1234


def test_missing_or_foreign_prototypes_are_refused_with_the_reason(tmp_path):
    with pytest.raises(AdapterError, match="records no prototypes.*mix --prototype-data"):
        load_prototypes(tmp_path, 4, 64)
    save_prototypes(Prototypes(torch.randn(4, 32), torch.rand(4), 10), tmp_path)
    with pytest.raises(AdapterError, match=r"not prototype \[4, 64\].*another base"):
        load_prototypes(tmp_path, 4, 64)
    assert (tmp_path / PROTOTYPES_NAME).is_file()
