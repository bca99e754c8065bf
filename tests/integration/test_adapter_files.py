import contextlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llama_expert import (AdapterError, ConfigError, ExpertConfig, adapter_parameters, augment_model,
                          load_adapter_weights, load_augmented_model, load_base_model, save_adapter)
from llama_expert.integration.adapter_files import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from llama_expert.integration.surgery import is_augmented
from llama_expert.modeling import MoEAdapter


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


REGRESSION = Path(__file__).resolve().parents[1] / "regression"
FROZEN = sorted(REGRESSION.glob("adapters/v*/*.reference.safetensors"))


def test_every_format_version_is_frozen():
    """One folder per format version that was ever written, this one included (tests/regression/write_adapters.py
    says how each was made: by the version of its time)."""
    assert sorted({f.parent.name for f in FROZEN}) == [f"v{n}" for n in range(1, FORMAT_VERSION + 1)]


@pytest.mark.parametrize("reference", FROZEN, ids=lambda f: f"{f.parent.name}/{f.name.split('.')[0]}")
def test_a_frozen_adapter_of_each_format_loads_to_the_logits_its_version_computed(reference, monkeypatch):
    """Real files written by each past version (format 1: ``scale`` and ``extra``, no router recorded; format 2:
    0-d residual scales), loaded by today's reader onto the base they record, give the logits that version
    computed (float32, one rounding step of the fused decode path at most)."""
    monkeypatch.chdir(REGRESSION.parent.parent)  # the adapters record their base relative to the repository
    expected = load_file(str(reference))
    folder = reference.parent / reference.name.split(".")[0]
    model, config = load_augmented_model(adapter_path=folder)
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, load_base_model(str(REGRESSION / "base"))(input_ids=expected["input_ids"]).logits,
                              atol=1e-3)  # the adapter is not a no-op: the comparison above means something


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


# ---------------------------------------------------------------------------------------------- untrusted files
@contextlib.contextmanager
def address_space_limit(extra_bytes):
    """Let this process map at most ``extra_bytes`` more memory while inside: a load that would allocate an edited
    config's 10^6 experts fails at once instead of taking the machine's memory (and the test then fails)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _edited_copy(folder, target, edit):
    """A copy of the adapter in ``folder`` whose adapter_config.json ``edit(meta)`` changed (weights kept)."""
    shutil.copytree(folder, target)
    meta = json.loads((target / CONFIG_NAME).read_text())
    edit(meta)
    (target / CONFIG_NAME).write_text(json.dumps(meta))
    return target


MEMORY_BOMBS = {  # edit of expert_config -> what the one-line error must name
    "num_experts": ({"num_experts": 10 ** 6}, "num_experts=1000000"),
    "expert_hidden_size": ({"expert_hidden_size": 10 ** 6}, "expert_hidden_size=1000000"),
    "allocation counts": ({"num_experts": 10 ** 6, "expert_allocation": [10 ** 6] * 4}, "expert_allocation="),
    "allocation of 10^6 layers": ({"expert_allocation": [4] * 10 ** 6}, "--expert-allocation lists 1000000 layers"),
    "lora_r": ({"lora_r": 10 ** 6}, "lora_r=1000000"),
}


@pytest.mark.skipif(sys.platform != "linux", reason="the address-space limit reads /proc")
@pytest.mark.parametrize("bomb", MEMORY_BOMBS, ids=list(MEMORY_BOMBS))
def test_an_edited_config_is_refused_before_any_adapter_is_built(trained, tiny_folder, tmp_path, bomb):
    """A config asking for 10^6 experts (or ranks, widths, layers) is checked against the weights' header first:
    refused in well under 5 s with no adapter built, inside 256 MiB more address space (the tiny adapter is 0.2 MiB)."""
    folder, *_ = trained
    change, named = MEMORY_BOMBS[bomb]
    edited = _edited_copy(folder, tmp_path / "edited", lambda meta: meta["expert_config"].update(change))
    model = load_base_model(str(tiny_folder))
    start = time.perf_counter()
    with address_space_limit(256 * 2 ** 20), pytest.raises(AdapterError) as info:
        load_adapter_weights(model, edited)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert named in message and "re-save" in message and "\n" not in message and len(message) < 600, message
    assert not is_augmented(model) and not any(isinstance(m, MoEAdapter) for m in model.modules())


def test_an_edited_config_is_one_line_from_the_cli(trained, tiny_folder, tmp_path, cli_error):
    folder, *_ = trained
    edited = _edited_copy(folder, tmp_path / "edited", lambda meta: meta["expert_config"].update(lora_r=10 ** 6))
    line = cli_error(["inference", "--model", str(tiny_folder), "--adapter", str(edited), "--prompt", "hi"])
    assert "lora_r=1000000 implies tensor model.layers.0.mlp.experts.down of shape (1000000, 64)" in line
    assert "the weights hold (16, 64)" in line


MOE = '{"peft_type": "LLAMA_EXPERT_MOE", '


@pytest.mark.parametrize("content, named", [
    ("[1, 2, 3]", "holds a JSON list"),
    ('"an adapter"', "holds a JSON str"),
    ('{"peft_type": ["LORA"]}', "records peft_type ['LORA']"),
    (MOE + '"format_version": "3", "expert_config": {}}', "format_version '3', not a JSON integer"),
    (MOE + '"format_version": 3, "expert_config": [8, 2]}', "expert_config [8, 2], not a JSON object"),
    (MOE + '"format_version": 3, "expert_config": {}, "base_model_architecture": [64]}', "base_model_architecture [64]"),
    (MOE + '"format_version": 3, "expert_config": {}, "base_model_name_or_path": 7}', "base_model_name_or_path 7"),
])
def test_a_config_file_of_the_wrong_shape_is_one_line(trained, tiny_folder, cli_error, content, named):
    folder, *_ = trained
    (folder / CONFIG_NAME).write_text(content)
    line = cli_error(["inference", "--model", str(tiny_folder), "--adapter", str(folder), "--prompt", "hi"])
    assert named in line and str(folder) in line, line


@pytest.mark.parametrize("change, named", [
    ({"num_experts": "8"}, "--num-experts must be a positive integer, got '8'"),
    ({"top_k": None}, "--top-k must be a positive integer, got None"),
    ({"expert_allocation": {"layer": 1}}, "--expert-allocation must be"),
    ({"expert_allocation": [10 ** 6] * 10 ** 6}, "--expert-allocation [1000000, 1000000, 1000000, 1000000, 1000000, "),
    ({"router_type": "x" * 10 ** 6}, "unknown --router-type 'xxxxxxxxxxxx...xxxxxxxxxxxxx'"),
    ({"quantization_4bit": "yes"}, "--quantization-4bit must be True or False, got 'yes'"),
    ({"router_noise": 0}, "--no-router-noise must be True or False, got 0"),
])
def test_bad_values_inside_expert_config_are_one_short_line(trained, tiny_folder, tmp_path, cli_error, change, named):
    folder, *_ = trained
    edited = _edited_copy(folder, tmp_path / "edited", lambda meta: meta["expert_config"].update(change))
    line = cli_error(["inference", "--model", str(tiny_folder), "--adapter", str(edited), "--prompt", "hi"])
    assert "invalid expert_config" in line and named in line and len(line) < 600, line[:1000]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_file_and_tensor(trained, tiny_folder, cli_error, value):
    folder, *_ = trained
    state = load_file(str(folder / WEIGHTS_NAME))
    key = "model.layers.2.mlp.experts.core_in"
    state[key][1, 0, 3] = value
    save_file(state, str(folder / WEIGHTS_NAME))
    line = cli_error(["inference", "--model", str(tiny_folder), "--adapter", str(folder), "--prompt", "hi"])
    assert f"{folder / WEIGHTS_NAME} holds non-finite values (NaN or inf) in tensor {key}" in line
    model = load_base_model(str(tiny_folder))
    with pytest.raises(AdapterError, match="non-finite"):
        load_adapter_weights(model, folder)
    assert not is_augmented(model)


def test_a_lora_with_non_finite_weights_is_refused(tiny_folder, tmp_path, cli_error):
    from llama_expert.integration.peft_lora import add_lora, save_lora

    save_lora(add_lora(load_base_model(str(tiny_folder)), rank=2), tmp_path / "lora")
    state = load_file(str(tmp_path / "lora" / WEIGHTS_NAME))
    key = sorted(k for k in state if "lora_A" in k)[0]
    state[key][0, 0] = float("nan")
    save_file(state, str(tmp_path / "lora" / WEIGHTS_NAME))
    line = cli_error(["inference", "--model", str(tiny_folder), "--adapter", str(tmp_path / "lora"), "--prompt", "hi"])
    assert f"non-finite values (NaN or inf) in tensor {key}" in line


def test_an_edited_strategy_name_is_refused_naming_it(trained, tiny_folder, tmp_path, cli_error):
    """Another router or expert bank needs other tensors: the message names the two strategy fields."""
    folder, *_ = trained
    edited = _edited_copy(folder, tmp_path / "edited", lambda meta: meta["expert_config"].update(router_type="soft"))
    line = cli_error(["inference", "--model", str(tiny_folder), "--adapter", str(edited), "--prompt", "hi"])
    assert "router_type 'soft' imply tensors the weights lack" in line and "router.noise_weight" in line, line


# ---------------------------------------------------------------------------------------------- adapters travel
ROOT = Path(__file__).resolve().parents[2]


def test_no_committed_adapter_records_a_base_that_exists_on_one_machine_only():
    configs = sorted((ROOT / "docs" / "results").rglob(CONFIG_NAME))
    assert configs
    for path in configs:
        base = json.loads(path.read_text())["base_model_name_or_path"]
        assert not os.path.isabs(base) and not base.startswith(("~", ".")), f"{path} records {base}"


@pytest.mark.parametrize("kind", ["moe", "lora"])
def test_missing_weights_are_named_before_the_recorded_base_is_looked_for(kind, cli_error, tmp_path):
    """A results folder that kept only its config, whose base is a file on another machine: the user hears
    that the weights are missing, not that the other machine's GGUF file is."""
    source = {"moe": "allocation/aux-free-dynamic-lr1e-2-seed1", "lora": "multidomain-full/lora-lr3e-3-seed1"}[kind]
    folder = tmp_path / "config-only"
    folder.mkdir()
    meta = json.loads((ROOT / "docs" / "results" / source / CONFIG_NAME).read_text())
    meta["base_model_name_or_path"] = "/elsewhere/SmolLM2-135M-Instruct.Q4_1.gguf"
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    commands = [["inference", "--adapter", str(folder), "--prompt", "hi"],
                ["benchmark", "--model", str(folder), "--skip-throughput"],
                ["prune" if kind == "moe" else "export", "--adapter", str(folder), "--output-dir", str(tmp_path / "o")]
                + (["--keep", "50%"] if kind == "moe" else ["--merge"])]
    for argv in commands:
        line = cli_error(argv)
        assert f"{folder} holds no {WEIGHTS_NAME}: the adapter's weights are not here" in line, (argv, line)
