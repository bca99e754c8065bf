import json

import pytest

from llama_expert import ConfigError, ExpertConfig
from llama_expert.config import parse_allocation


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
    assert c.router_type == "aux_free"
    assert c.residual_scale_init == 1.0
    assert c.expert_init == "zero" and c.router_lr_multiplier == 1.0


@pytest.mark.parametrize("kwargs, fix_words", [
    ({"num_experts": 4, "top_k": 5}, ["--top-k 5 > --num-experts 4", "Lower --top-k or raise --num-experts"]),
    ({"lora_r": 0}, ["--lora-r", "positive integer", "got 0"]),
    ({"lora_r": -3}, ["--lora-r", "positive integer", "got -3"]),
    ({"expert_type": ""}, ["--expert-type", "registered strategy"]),
    ({"router_type": 3}, ["--router-type", "registered strategy"]),
    ({"expert_allocation": [2, 9, 4, 1]}, ["[9, 1]", "--top-k 2", "--num-experts 8"]),
    ({"expert_allocation": [4, "4"]}, ["list of integers"]),
    ({"expert_allocation": []}, ["list of integers"]),
    ({"expert_init": ""}, ["--expert-init", "'zero' or 'distinct'"]),
    ({"router_lr_multiplier": 0.0}, ["--router-lr-multiplier", "> 0"]),
    ({"router_lr_multiplier": float("inf")}, ["--router-lr-multiplier", "finite"]),
])
def test_invalid_config_raises_with_fix(kwargs, fix_words):
    with pytest.raises(ConfigError) as info:
        ExpertConfig(**kwargs)
    for word in fix_words:
        assert word in str(info.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        ExpertConfig(top_k=0)


def test_tuple_allocation_becomes_list():
    assert ExpertConfig(expert_allocation=(2, 3)).expert_allocation == [2, 3]


@pytest.mark.parametrize("config", [
    ExpertConfig(),
    ExpertConfig(num_experts=6, top_k=3, lora_r=4, lora_alpha=8.0, expert_allocation=[3, 6, 5, 4],
                 expert_type="shared_down", expert_hidden_size=7, router_noise=False,
                 residual_scale_init=0.5),
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


def test_seed_field_names_are_accepted_and_stored_under_those_names():
    seed_fields = {"num_experts": 4, "top_k": 1, "expert_hidden_size": 8, "lora_r": 4, "lora_alpha": 16.0,
                   "lora_dropout": 0.1, "router_aux_loss_coef": 0.02, "router_z_loss_coef": 0.002,
                   "use_gradient_checkpointing": True, "quantization_4bit": True}
    stored = json.loads(ExpertConfig(**seed_fields).to_json_string())
    assert {k: stored[k] for k in seed_fields} == seed_fields


@pytest.mark.parametrize("text, expected", [("progressive", "progressive"), ("uniform", "uniform"),
                                            ("4,6,8,6", [4, 6, 8, 6]), ("5", [5])])
def test_parse_allocation(text, expected):
    assert parse_allocation(text) == expected


def test_parse_allocation_error_names_the_form():
    with pytest.raises(ConfigError, match="counts like 4,6,8,6"):
        parse_allocation("4,six")


@pytest.mark.parametrize("kwargs, words", [
    ({"num_experts": True}, ["--num-experts", "positive integer", "True"]),
    ({"lora_r": True}, ["--lora-r", "positive integer", "True"]),
    ({"top_k": 2.0}, ["--top-k", "positive integer"]),
    ({"residual_scale_init": float("nan")}, ["--residual-scale-init", "finite"]),
    ({"lora_alpha": float("inf")}, ["--lora-alpha", "finite"]),
    ({"router_aux_loss_coef": float("nan")}, ["--router-aux-loss-coef", "finite"]),
    ({"lora_dropout": float("nan")}, ["--lora-dropout", "[0, 1)"]),
    ({"router_noise": "no"}, ["--no-router-noise", "True or False"]),
    ({"expert_allocation": [4, True]}, ["list of integers"]),
    ({"router_jitter": 1.0}, ["--router-jitter", "[0, 1)"]),
    ({"router_jitter": float("nan")}, ["--router-jitter", "[0, 1)"]),
    ({"capacity_factor": 0.0}, ["--capacity-factor", "None or a finite number > 0"]),
    ({"capacity_factor": float("inf")}, ["--capacity-factor", "finite"]),
    ({"capacity_factor": True}, ["--capacity-factor", "finite"]),
    ({"aux_free_bias_rate": -1e-3}, ["--aux-free-bias-rate", ">= 0"]),
    ({"aux_free_bias_rate": float("nan")}, ["--aux-free-bias-rate", "finite"]),
])
def test_booleans_and_non_finite_numbers_are_rejected(kwargs, words):
    with pytest.raises(ConfigError) as info:
        ExpertConfig(**kwargs)
    for word in words:
        assert word in str(info.value)
