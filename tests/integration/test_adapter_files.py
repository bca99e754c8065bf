import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llama_expert import (AdapterError, ConfigError, ExpertConfig, adapter_parameters, augment_model,
                          load_adapter_weights, load_augmented_model, load_base_model, save_adapter)
from llama_expert.integration.adapter_files import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME


def _ids(seed=0):
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


@pytest.fixture
def trained(tiny_folder, tmp_path):
    """(adapter folder, logits of the trained model in eval mode, logits of the base, input ids)."""
    model = load_base_model(str(tiny_folder))
    ids = _ids()
    base = _logits(model, ids)
    # noisy top-k: the router of every format version (version 1 did not record it)
    augment_model(model, ExpertConfig(expert_allocation="uniform", num_experts=4, router_type="noisy_top_k"))
    model.train()
    opt = torch.optim.AdamW(adapter_parameters(model), lr=2e-2)
    for step in range(4):
        batch = _ids(seed=step + 1)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    logits = _logits(model, ids)
    folder = save_adapter(model, tmp_path / "adapter")
    return folder, logits, base, ids


def test_trained_adapter_changes_logits(trained):
    _, logits, base, _ = trained
    assert (logits - base).abs().max().item() > 1e-3


def test_round_trip_reproduces_logits_exactly(trained, tiny_folder):
    folder, logits, _, ids = trained
    model, config = load_augmented_model(model_id=str(tiny_folder), adapter_path=folder)
    model.eval()
    assert config == ExpertConfig(expert_allocation="uniform", num_experts=4, router_type="noisy_top_k")
    assert torch.equal(_logits(model, ids), logits)


def write_old_format(folder, target, version, edit_config, edit_state):
    """A copy of the adapter in ``folder`` as an older format version wrote it: config and tensors edited."""
    target.mkdir()
    meta = json.loads((folder / CONFIG_NAME).read_text())
    edit_config(meta["expert_config"])
    meta["format_version"] = version
    (target / CONFIG_NAME).write_text(json.dumps(meta))
    save_file(edit_state(load_file(str(folder / WEIGHTS_NAME))), str(target / WEIGHTS_NAME))
    return target


def test_format_version_1_adapter_loads_to_the_same_logits(trained, tiny_folder, tmp_path):
    """Adapters saved before the rename (``scale`` -> ``residual_scale``, ``extra`` dropped) still load."""
    folder, logits, _, ids = trained

    def v1_config(config):
        config["scale_init"] = config.pop("residual_scale_init")
        config.pop("router_type")  # version 1 had one router and did not record it
        config["extra"] = {}

    old = write_old_format(folder, tmp_path / "v1", 1, v1_config,
                           lambda state: {k.replace(".residual_scale", ".scale"): v for k, v in state.items()})
    model, config = load_augmented_model(model_id=str(tiny_folder), adapter_path=old)
    assert config == ExpertConfig(expert_allocation="uniform", num_experts=4, router_type="noisy_top_k")
    assert torch.equal(_logits(model, ids), logits)


def test_format_version_2_adapter_with_scalar_residual_scales_loads_to_the_same_logits(trained, tiny_folder, tmp_path):
    """Version 2 stored each residual_scale as a 0-d tensor (version 3: shape [1], which FSDP2 can shard)."""
    folder, logits, _, ids = trained
    assert all(v.shape == (1,) for k, v in load_file(str(folder / WEIGHTS_NAME)).items()
               if k.endswith(".residual_scale"))
    old = write_old_format(folder, tmp_path / "v2", 2, lambda config: None,
                           lambda state: {k: v.reshape(()) if k.endswith(".residual_scale") else v
                                          for k, v in state.items()})
    model, _ = load_augmented_model(model_id=str(tiny_folder), adapter_path=old)
    assert torch.equal(_logits(model, ids), logits)


def test_loaded_model_is_ready_for_inference(trained, tiny_folder):
    """load_augmented_model returns a model that computes the saved adapter without calling .eval()."""
    folder, logits, _, ids = trained
    model, _ = load_augmented_model(model_id=str(tiny_folder), adapter_path=folder)
    assert torch.equal(_logits(model, ids), logits)


def test_saved_files(trained, tiny_folder):
    folder, *_ = trained
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["base_model_name_or_path"] == str(tiny_folder.resolve())
    assert ExpertConfig.from_dict(meta["expert_config"]) == ExpertConfig(expert_allocation="uniform", num_experts=4,
                                                                         router_type="noisy_top_k")
    assert meta["base_model_architecture"]["hidden_size"] == 64
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())
    assert keys
    for key in keys:
        assert "base_mlp" not in key and "embed" not in key and "lm_head" not in key, key
        assert any(part in key for part in (".router.", ".experts.", ".residual_scale")), key


def test_adapter_tensor_count(trained):
    folder, *_ = trained
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    per_layer = {"router.weight", "router.noise_weight", "experts.down", "experts.up", "experts.core_in",
                 "experts.core_out", "residual_scale"}
    assert keys == {f"model.layers.{i}.mlp.{name}" for i in range(4) for name in per_layer}


def test_load_without_model_id_uses_recorded_base(trained):
    folder, logits, _, ids = trained
    model, _ = load_augmented_model(adapter_path=folder)
    model.eval()
    assert torch.equal(_logits(model, ids), logits)


def test_load_adapter_weights_onto_a_fresh_base(trained, tiny_folder):
    folder, logits, _, ids = trained
    model = load_adapter_weights(load_base_model(str(tiny_folder)), folder).eval()
    assert torch.equal(_logits(model, ids), logits)


def test_other_architecture_raises_naming_the_base(trained, tiny_folder, tmp_path):
    folder, *_ = trained
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(AdapterError) as info:
        load_adapter_weights(other, folder)
    assert str(tiny_folder.resolve()) in str(info.value)
    assert "hidden_size" in str(info.value)
    other_folder = tmp_path / "other-base"
    other.save_pretrained(other_folder)
    with pytest.raises(AdapterError, match="hidden_size"):
        load_augmented_model(model_id=str(other_folder), adapter_path=folder)


def test_same_architecture_other_weights_warns(trained):
    folder, *_ = trained
    torch.manual_seed(123)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.warns(UserWarning, match="different weights"):
        load_adapter_weights(other, folder)


def test_missing_folder(tmp_path):
    with pytest.raises(AdapterError, match="adapter folder not found"):
        load_augmented_model(adapter_path=tmp_path / "nope")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=f"holds no {CONFIG_NAME}"):
        load_augmented_model(adapter_path=tmp_path / "empty")


def test_corrupt_json(trained, tiny_folder):
    folder, *_ = trained
    (folder / CONFIG_NAME).write_text('{"format_version": 1, "expert_config": {')
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_augmented_model(model_id=str(tiny_folder), adapter_path=folder)


def test_json_without_expert_config(trained, tiny_folder):
    folder, *_ = trained
    (folder / CONFIG_NAME).write_text('{"format_version": 1}')
    with pytest.raises(AdapterError, match="expert_config"):
        load_augmented_model(model_id=str(tiny_folder), adapter_path=folder)


def test_newer_format_version(trained, tiny_folder):
    folder, *_ = trained
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="Upgrade"):
        load_augmented_model(model_id=str(tiny_folder), adapter_path=folder)


def test_invalid_expert_config_in_json(trained, tiny_folder):
    folder, *_ = trained
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["expert_config"]["top_k"] = 99
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="invalid expert_config"):
        load_adapter_weights(load_base_model(str(tiny_folder)), folder)


@pytest.mark.parametrize("garbage", [b"this is not a safetensors file", bytes(range(256)) * 4, b""])
def test_corrupt_safetensors(trained, tiny_folder, garbage):
    folder, *_ = trained
    (folder / WEIGHTS_NAME).write_bytes(garbage)
    with pytest.raises(AdapterError, match="corrupt"):
        load_augmented_model(model_id=str(tiny_folder), adapter_path=folder)


def test_missing_safetensors(trained, tiny_folder):
    folder, *_ = trained
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=f"holds no {WEIGHTS_NAME}"):
        load_augmented_model(model_id=str(tiny_folder), adapter_path=folder)


def test_adapter_and_config_together_raise(trained, tiny_folder):
    folder, *_ = trained
    with pytest.raises(ConfigError, match="either adapter_path or config"):
        load_augmented_model(model_id=str(tiny_folder), adapter_path=folder, config=ExpertConfig())


def test_fresh_adapters_without_adapter_path(tiny_folder):
    base = load_base_model(str(tiny_folder))
    ids = _ids()
    expected = _logits(base, ids)
    model, config = load_augmented_model(model_id=str(tiny_folder), config=ExpertConfig(top_k=1))
    assert config.top_k == 1
    assert (_logits(model, ids) - expected).abs().max().item() <= 1e-5


def test_save_requires_an_augmented_model(tiny_model, tmp_path):
    with pytest.raises(AdapterError, match="augment_model"):
        save_adapter(tiny_model, tmp_path / "a")
