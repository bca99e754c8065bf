import math

import pytest

from llama_expert import ConfigError, ExpertConfig
from llama_expert.modeling import check_config, experts_per_layer


def test_progressive_16_layers():
    assert experts_per_layer(ExpertConfig(), 16) == [4, 4, 6, 6, 7, 7, 8, 8, 6, 6, 5, 5, 5, 5, 4, 4]


def _check_progressive(depth, num_experts, top_k):
    counts = experts_per_layer(ExpertConfig(num_experts=num_experts, top_k=top_k), depth)
    low = max(top_k, math.ceil(num_experts / 2))
    assert len(counts) == depth
    assert all(isinstance(n, int) for n in counts)
    assert all(low <= n <= num_experts for n in counts), (depth, num_experts, top_k, counts)
    first_max = counts.index(max(counts))
    assert first_max < depth / 2, f"max of {counts} is not in the first half ({depth} layers)"


def test_progressive_any_depth():
    """Every depth from 3 to 40 layers, for five (num_experts, top_k) pairs: one test, 190 checks."""
    for num_experts, top_k in [(8, 2), (4, 1), (16, 4), (5, 3), (3, 3)]:
        for depth in range(3, 41):
            _check_progressive(depth, num_experts, top_k)


def test_progressive_two_layers():
    _check_progressive(2, 8, 2)


def test_uniform():
    assert experts_per_layer(ExpertConfig(expert_allocation="uniform"), 5) == [8] * 5
    assert experts_per_layer(ExpertConfig(num_experts=3, top_k=1, expert_allocation="uniform"), 2) == [3, 3]


def test_explicit_list_of_wrong_length():
    c = ExpertConfig(expert_allocation=[4, 6, 8])
    assert experts_per_layer(c, 3) == [4, 6, 8]
    with pytest.raises(ConfigError, match=r"lists 3 layers but the model has 4 decoder layers"):
        experts_per_layer(c, 4)


@pytest.mark.parametrize("kwargs, words", [
    ({"expert_allocation": "pyramid"}, ["--expert-allocation 'pyramid'", "progressive", "uniform"]),
    ({"expert_type": "dense"}, ["--expert-type 'dense'", "shared_core", "shared_down"]),
    ({"router_type": "hash"}, ["--router-type 'hash'", "noisy_top_k"]),
])
def test_unregistered_strategy_names_fail_with_the_choices(kwargs, words):
    with pytest.raises(ConfigError) as info:
        check_config(ExpertConfig(**kwargs))
    for word in words:
        assert word in str(info.value)
