"""Prototypes: the mean router input per layer and the spread of the prefix means around it, checked against a
direct computation (the output of each layer's post-attention norm, prefix means in a loop), written and read back
exactly, and refused with a one-line reason when missing or made for another base."""

import pytest
import torch
from safetensors.torch import save_file

from llama_expert import ExpertConfig, augment_model
from llama_expert.errors import AdapterError
from llama_expert.integration.prototypes import (PROTOTYPES_NAME, SPREAD_FROM, Prototypes, fit_by_length,
                                                 load_prototypes, measure_prototypes, save_prototypes)


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
        distances = torch.tensor([[float((hidden[b, :t + 1].mean(dim=0) - prototype).pow(2).mean())
                                   for t in range(SPREAD_FROM - 1, SPREAD_FROM + 8)] for b in range(3)])
        assert measured.spread[layer].item() == pytest.approx(float(distances.mean()), rel=1e-5)
        lengths = torch.arange(SPREAD_FROM, SPREAD_FROM + 9, dtype=torch.float64)
        floor, slope = fit_by_length(lengths, distances.double().mean(dim=0))  # the fit of the mean at each length
        assert measured.floor[layer].item() == pytest.approx(floor, rel=1e-4, abs=1e-9)
        assert measured.slope[layer].item() == pytest.approx(slope, rel=1e-4, abs=1e-9)
    assert measured.tokens == blocks.numel()


def test_the_spread_by_length_is_the_least_squares_line_in_one_over_the_length():
    """``floor + slope / n``: recovered exactly from distances on that curve; never below zero: distances that do
    not shrink with the length give their mean at every length, and a line that would start below zero goes through
    the origin."""
    lengths = torch.arange(32, 257, dtype=torch.float64)
    assert fit_by_length(lengths, 0.5 + 40.0 / lengths) == (pytest.approx(0.5), pytest.approx(40.0))
    assert fit_by_length(lengths, 1.0 + lengths / 256) == (pytest.approx(float((1.0 + lengths / 256).mean())), 0.0)
    floor, slope = fit_by_length(lengths, 30.0 / lengths - 0.01)
    assert floor == 0.0 and slope == pytest.approx(float((1 / lengths * (30 / lengths - 0.01)).sum()
                                                         / (1 / lengths).pow(2).sum()))
    assert fit_by_length(lengths[:1], torch.tensor([2.0], dtype=torch.float64)) == (2.0, 0.0)  # one length


def test_prototypes_round_trip_exactly(tmp_path):
    prototypes = Prototypes(torch.randn(4, 64), torch.rand(4), 1234, torch.rand(4), torch.rand(4))
    save_prototypes(prototypes, tmp_path)
    loaded = load_prototypes(tmp_path, 4, 64)
    assert torch.equal(loaded.prototype, prototypes.prototype) and torch.equal(loaded.spread, prototypes.spread)
    assert torch.equal(loaded.floor, prototypes.floor) and torch.equal(loaded.slope, prototypes.slope)
    assert loaded.tokens == 1234


def test_prototypes_recorded_before_the_fit_have_the_same_spread_at_every_length(tmp_path):
    spread = torch.rand(4)
    save_file({"prototype": torch.randn(4, 64), "spread": spread}, str(tmp_path / PROTOTYPES_NAME))
    floor, slope = load_prototypes(tmp_path, 4, 64).by_length()
    assert torch.equal(floor, spread) and torch.equal(slope, torch.zeros(4))


def test_missing_or_foreign_prototypes_are_refused_with_the_reason(tmp_path):
    with pytest.raises(AdapterError, match="records no prototypes.*mix --prototype-data"):
        load_prototypes(tmp_path, 4, 64)
    save_prototypes(Prototypes(torch.randn(4, 32), torch.rand(4), 10), tmp_path)
    with pytest.raises(AdapterError, match=r"not prototype \[4, 64\].*another base"):
        load_prototypes(tmp_path, 4, 64)
    assert (tmp_path / PROTOTYPES_NAME).is_file()
