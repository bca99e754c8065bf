"""`load_model_and_tokenizer` (inference, serve, benchmark) resolves a base, a base with fresh adapters, or an
adapter folder with the base it records, and loads both adapter kinds: llama-expert MoE adapters and the PEFT LoRA
folders that `train --method lora` and `distill` write, the latter exactly as PEFT itself does."""

import warnings

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM

from llama_expert import ConfigError, ExpertConfig, augment_model, save_adapter
from llama_expert.cli import main
from llama_expert.inference.generation import generate_text
from llama_expert.integration.base_models import load_base_model, load_tokenizer
from llama_expert.integration.loading import load_model_and_tokenizer


def test_load_model_for_cli_resolves_bases_and_adapters(chat_folder, tmp_path):
    model, tok, info = load_model_and_tokenizer(str(chat_folder), augmented=False)
    assert info == {"base_model": str(chat_folder), "adapter": None, "augmented": False, "fresh_adapter": False}
    assert not hasattr(model, "expert_config") and len(tok) == model.config.vocab_size

    model, _, info = load_model_and_tokenizer(str(chat_folder))
    assert info["fresh_adapter"] and model.expert_config == ExpertConfig()

    trained = augment_model(LlamaForCausalLM.from_pretrained(chat_folder),
                            ExpertConfig(num_experts=4, top_k=2, expert_allocation="uniform"))
    with torch.no_grad():
        trained.model.layers[1].mlp.experts.up.fill_(0.5)
    adapter = save_adapter(trained, tmp_path / "adapter", base_model_name_or_path=str(chat_folder))
    for args in [(str(adapter),), (str(chat_folder), str(adapter)), (None, str(adapter))]:
        model, _, info = load_model_and_tokenizer(*args)
        assert info["adapter"] == str(adapter) and info["base_model"] == str(chat_folder)
        assert not info["fresh_adapter"] and model.expert_config.num_experts == 4
        assert torch.all(model.model.layers[1].mlp.experts.up == 0.5)
    with pytest.raises(ConfigError, match="is an adapter folder"):
        load_model_and_tokenizer(str(adapter), adapter=str(adapter))


@pytest.fixture(scope="module")
def trained_lora(trained_base, tmp_path_factory):
    """(base folder, the adapter folder of a real `train --method lora` run on the tiny trained base)."""
    folder, text = trained_base
    out = tmp_path_factory.mktemp("lora-run") / "adapter"
    assert main(["train", "--method", "lora", "--lora-r", "4", "--model", str(folder), "--dataset", str(text),
                 "--output-dir", str(out), "--seq-len", "32", "--batch-size", "2", "--max-steps", "3",
                 "--learning-rate", "5e-2", "--eval-every", "0", "--no-progress",
                 "--mixed-precision", "no"]) == 0
    return folder, out


def _peft_logits(base_folder, adapter, ids):
    model = PeftModel.from_pretrained(load_base_model(str(base_folder)), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("how", ["adapter", "model-path"])
def test_a_lora_folder_loads_to_the_logits_peft_gives(trained_lora, how):
    base_folder, adapter = trained_lora
    ids = load_tokenizer(str(base_folder))("The quick brown fox", return_tensors="pt").input_ids
    kwargs = {"adapter": str(adapter)} if how == "adapter" else {"model": str(adapter)}
    model, tokenizer, info = load_model_and_tokenizer(**kwargs)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert info["base_model"] == str(base_folder.resolve()) and info["augmented"] is False
    assert torch.equal(logits, _peft_logits(base_folder, adapter, ids))
    with torch.no_grad():
        base = load_base_model(str(base_folder))(input_ids=ids).logits
    assert (logits - base).abs().max() > 1e-3  # the trained LoRA does change the model


def test_inference_answers_a_prompt_with_a_lora_folder(trained_lora, capsys):
    base_folder, adapter = trained_lora
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["inference", "--adapter", str(adapter), "--prompt", "The quick", "--max-new-tokens", "6",
                     "--temperature", "0", "--no-chat-template", "--kv-cache", "int8"]) == 0
    out, err = capsys.readouterr()
    peft_model = PeftModel.from_pretrained(load_base_model(str(base_folder)), str(adapter)).eval()
    expected = generate_text(peft_model, load_tokenizer(str(base_folder)), "The quick", max_new_tokens=6,
                             temperature=0, use_chat_template=False, kv_cache="int8")
    assert out == expected + "\n" and expected.strip()
    assert f"loaded adapter {adapter}" in err
    # neither PEFT's nor the cache argument's deprecation warnings reach the user
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
