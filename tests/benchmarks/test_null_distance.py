"""benchmarks/null_distance.py says which tokens a one-skill mix gives the null expert: in the first layer (whose
input no routing has touched yet) its ratio beyond D is exactly where `mix A --null-expert --null-distance D`
routes to the null, token by token, with the threshold at each prefix's length."""

import copy

import pytest
import torch

from llama_expert import ExpertConfig, augment_model, save_adapter
from llama_expert.integration.prototypes import measure_prototypes, save_prototypes
from llama_expert.integration.surgery import adapters
from llama_expert.lifecycle.mix import MixArguments, mix_branches, read_experts
from llama_expert.metrics.routing import token_routing

@pytest.fixture
def script(benchmark_script):
    return benchmark_script("null_distance")


def test_the_first_layers_share_beyond_d_is_where_the_mix_routes_to_the_null(script, tiny_model, tmp_path):
    torch.manual_seed(0)
    skill = augment_model(copy.deepcopy(tiny_model), ExpertConfig(
        expert_type="lora_experts", num_experts=1, top_k=1, expert_allocation="uniform", expert_rank=2,
        router_type="aux_free")).eval()
    with torch.no_grad():
        for _, adapter in adapters(skill):
            for p in adapter.experts.parameters():
                p.normal_(std=0.1)
    own = torch.randint(1, 60, (8, 64), generator=torch.Generator().manual_seed(1))  # the skill's text: low ids
    prototypes = measure_prototypes(skill, own)
    assert bool((prototypes.slope > 0).all())  # the threshold depends on the prefix's length here
    save_adapter(skill, tmp_path, "tiny")
    save_prototypes(prototypes, tmp_path)
    distance, positions = 1.5, [4, 8, 16, 32, 64]
    base = copy.deepcopy(tiny_model)
    mixed = mix_branches(base, read_experts(base, tmp_path), MixArguments(
        adapters=[str(tmp_path)], output_dir="unused", null_expert=True, null_distance=distance)).eval()
    windows = torch.cat([own[:2], torch.randint(64, 127, (2, 64), generator=torch.Generator().manual_seed(2))])
    found = script.ratios(skill, windows, prototypes, positions)[:, 0]  # [windows, positions], first layer
    to_null = torch.stack([token_routing(mixed, w)[0]["gates"].argmax(-1) == 1 for w in windows])
    assert torch.equal(found > distance, to_null[:, [p - 1 for p in positions]])
    assert 0 < int((found > distance).sum()) < found.numel()  # both choices occur: the test can tell them apart
