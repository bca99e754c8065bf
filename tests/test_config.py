import dataclasses
import json
import math

import pytest

from llama_expert import ConfigError, ExpertConfig


def test_defaults_match_spec():
    c = ExpertConfig()
    assert c.num_experts == 8
    assert c.top_k == 2
    assert c.lora_r == 16
    assert c.lora_alpha == 32
    assert c.lora_dropout == pytest.approx(0.05)
    assert c.router_aux_loss_coef == pytest.approx(0.01)
    assert c.router_z_loss_coef == pytest.approx(0.001)
    assert c.expert_allocation == "progressive"
    assert c.expert_type == "shared_core"
    assert c.scaling == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs, fix_words", [
    ({"num_experts": 4, "top_k": 5}, ["top_k=5", "num_experts=4", "Lower --top-k or raise --num-experts"]),
    ({"lora_r": 0}, ["lora_r", "positive integer", "got 0"]),
    ({"lora_r": -3}, ["lora_r", "positive integer", "got -3"]),
    ({"expert_allocation": "pyramid"}, ["'pyramid'", "progressive", "uniform", "list"]),
    ({"expert_type": "dense"}, ["'dense'", "shared_core", "shared_down"]),
    ({"expert_allocation": [2, 9, 4, 1]}, ["[9, 1]", "top_k=2", "num_experts=8"]),
    ({"expert_allocation": [4, "4"]}, ["list of integers"]),
    ({"expert_allocation": []}, ["list of integers"]),
])
def test_invalid_config_raises_with_fix(kwargs, fix_words):
    with pytest.raises(ConfigError) as info:
        ExpertConfig(**kwargs)
    for word in fix_words:
        assert word in str(info.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        ExpertConfig(top_k=0)


def test_explicit_list_of_wrong_length():
    c = ExpertConfig(expert_allocation=[4, 6, 8])
    assert c.experts_per_layer(3) == [4, 6, 8]
    with pytest.raises(ConfigError, match=r"lists 3 layers but the model has 4 decoder layers"):
        c.experts_per_layer(4)


def test_tuple_allocation_becomes_list():
    assert ExpertConfig(expert_allocation=(2, 3)).expert_allocation == [2, 3]


@pytest.mark.parametrize("config", [
    ExpertConfig(),
    ExpertConfig(num_experts=6, top_k=3, lora_r=4, lora_alpha=8.0, expert_allocation=[3, 6, 5, 4],
                 expert_type="shared_down", expert_hidden_size=7, router_noise=False, scale_init=0.5,
                 extra={"note": "hello"}),
])
def test_json_round_trip(config, tmp_path):
    path = tmp_path / "config.json"
    config.to_json_file(path)
    loaded = ExpertConfig.from_json_file(path)
    assert loaded == config
    assert isinstance(loaded.expert_allocation, type(config.expert_allocation))
    assert ExpertConfig.from_dict(config.to_dict()) == config
    assert json.loads(path.read_text()) == config.to_dict()
    assert ExpertConfig.from_dict(json.loads(config.to_json_string())) == config


def test_from_dict_rejects_unknown_fields():
    data = ExpertConfig().to_dict()
    data["num_routers"] = 3
    with pytest.raises(ConfigError, match=r"unknown ExpertConfig fields \['num_routers'\]"):
        ExpertConfig.from_dict(data)


def test_from_dict_validates():
    data = ExpertConfig().to_dict()
    data["top_k"] = 9
    with pytest.raises(ConfigError):
        ExpertConfig.from_dict(data)


def test_progressive_16_layers():
    assert ExpertConfig().experts_per_layer(16) == [4, 4, 6, 6, 7, 7, 8, 8, 6, 6, 5, 5, 5, 5, 4, 4]


def _check_progressive(depth, num_experts, top_k):
    counts = ExpertConfig(num_experts=num_experts, top_k=top_k).experts_per_layer(depth)
    low = max(top_k, math.ceil(num_experts / 2))
    assert len(counts) == depth
    assert all(isinstance(n, int) for n in counts)
    assert all(low <= n <= num_experts for n in counts), counts
    first_max = counts.index(max(counts))
    assert first_max < depth / 2, f"max of {counts} is not in the first half"


@pytest.mark.parametrize("depth", range(3, 41))
@pytest.mark.parametrize("num_experts, top_k", [(8, 2), (4, 1), (16, 4), (5, 3), (3, 3)])
def test_progressive_any_depth(depth, num_experts, top_k):
    _check_progressive(depth, num_experts, top_k)


def test_progressive_two_layers():
    _check_progressive(2, 8, 2)


def test_uniform():
    assert ExpertConfig(expert_allocation="uniform").experts_per_layer(5) == [8] * 5
    assert ExpertConfig(num_experts=3, top_k=1, expert_allocation="uniform").experts_per_layer(2) == [3, 3]


def test_core_size_defaults_to_rank():
    assert ExpertConfig(lora_r=8).core_size == 8
    assert ExpertConfig(lora_r=8, expert_hidden_size=32).core_size == 32


def test_config_is_a_dataclass_with_every_field_in_dict():
    assert set(ExpertConfig().to_dict()) == {f.name for f in dataclasses.fields(ExpertConfig)}
