import copy
import logging
import os
import time
import traceback

import pytest
import torch

from llama_expert import (ConfigError, ExpertConfig, ModelLoadError, augment_model, load_augmented_model,
                          load_base_model, load_tokenizer, save_adapter)
from llama_expert.integration import base_models as models

TOKEN = "hf_TESTSECRET123"


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_base_model(str(tmp_path / "model.gguf"))


def test_corrupt_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_EXPERT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        load_base_model(str(path))


def test_folder_without_config_json(tmp_path):
    (tmp_path / "weights-only").mkdir()
    with pytest.raises(ModelLoadError, match="holds no config.json"):
        load_base_model(str(tmp_path / "weights-only"))


def test_folder_with_corrupt_config_json(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        load_base_model(str(folder))


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder or file"):
        load_base_model(str(tmp_path / "not" / "here"))


def test_local_folder_loads_in_eval_mode_with_its_name(tiny_folder, tiny_model):
    model = load_base_model(str(tiny_folder))
    assert not model.training
    assert model.name_or_path == str(tiny_folder.resolve())
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model(ids).logits)


def test_folder_without_tokenizer(tiny_folder):
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer"):
        load_tokenizer(str(tiny_folder))


def test_unknown_dtype(tiny_folder):
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_base_model(str(tiny_folder), dtype="float8")


def test_bfloat16_dtype(tiny_folder):
    model = load_base_model(str(tiny_folder), dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_resolve_model_kinds(tiny_folder):
    assert models.resolve_model(str(tiny_folder)) == ("local", str(tiny_folder.resolve()))
    assert models.resolve_model("some-org/some-model") == ("hub", "some-org/some-model")
    assert models.resolve_model("llama-3.2-1b") == ("hub", "meta-llama/Llama-3.2-1B")
    assert models.resolve_model("Llama-3.2-3B-Instruct") == ("hub", "meta-llama/Llama-3.2-3B-Instruct")
    assert models.resolve_model("llama-3.2-3b") == ("hub", "meta-llama/Llama-3.2-3B")


def test_unreachable_hub_id_suggests_local_folder_or_embedded_model():
    with pytest.raises(ModelLoadError) as info:
        load_base_model("some-org/some-model")
    message = str(info.value)
    assert "some-org/some-model" in message
    assert "local folder" in message
    assert models.DEFAULT_MODEL in message


@pytest.fixture
def verbose_logs(caplog, monkeypatch):
    """Route Transformers and Hub logging, at DEBUG, into caplog."""
    import huggingface_hub.utils.logging as hub_logging
    import transformers.utils.logging as tf_logging

    monkeypatch.delenv("HF_TOKEN", raising=False)
    tf_verbosity = tf_logging.get_verbosity()
    tf_logging.set_verbosity_debug()
    tf_logging.enable_propagation()
    hub_logging.set_verbosity_debug()
    caplog.set_level(logging.DEBUG)
    yield caplog
    tf_logging.disable_propagation()
    tf_logging.set_verbosity(tf_verbosity)
    hub_logging.set_verbosity_warning()


def test_auth_token_never_in_errors_or_logs(verbose_logs, capfd):
    errors = []
    for call in (lambda: load_base_model("some-org/some-model", auth_token=TOKEN),
                 lambda: load_tokenizer("some-org/some-model", auth_token=TOKEN),
                 lambda: load_augmented_model("some-org/some-model", use_auth_token=TOKEN)):
        with pytest.raises(ModelLoadError) as info:
            call()
        errors.append(info.value)
    for exc in errors:
        assert TOKEN not in str(exc)
        assert TOKEN not in repr(exc)
        assert TOKEN not in "".join(traceback.format_exception(exc))
    assert TOKEN not in verbose_logs.text
    assert all(TOKEN not in str(r.args) for r in verbose_logs.records)
    out, err = capfd.readouterr()
    assert TOKEN not in out and TOKEN not in err


def test_auth_token_never_written_to_adapter_files(tiny_folder, tmp_path, verbose_logs, capfd):
    model, _ = load_augmented_model(str(tiny_folder), use_auth_token=TOKEN)
    folder = save_adapter(model, tmp_path / "adapter")
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 2
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in verbose_logs.text
    out, err = capfd.readouterr()
    assert TOKEN not in out and TOKEN not in err
    assert TOKEN not in str(vars(model.config))


# ---------------------------------------------------------------- the embedded model (slow)

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it takes a short nap in the sun."


@pytest.mark.slow
def test_embedded_model_augmented_equals_base(smollm):
    base, tokenizer = smollm
    batch = tokenizer([SENTENCE, "Hello there!"], return_tensors="pt", padding=True)
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # one row is padded
    with torch.no_grad():
        expected = base(**batch).logits
    model = augment_model(copy.deepcopy(base), ExpertConfig())
    model.eval()
    with torch.no_grad():
        got = model(**batch).logits
    assert got.shape == (2, batch["input_ids"].shape[1], base.config.vocab_size)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_embedded_model_identity(smollm):
    base, _ = smollm
    assert base.name_or_path == "smollm2-135m"
    assert base.config.model_type == "llama"
    assert base.config.num_hidden_layers == 30
    assert not base.training
    assert next(base.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_embedded_tokenizer(smollm):
    _, tokenizer = smollm
    ids = tokenizer(SENTENCE)["input_ids"]
    assert len(ids) > 10
    assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE
    assert tokenizer.pad_token is not None
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False,
                                           add_generation_prompt=True)
    assert "Hi!" in prompt


@pytest.mark.slow
def test_second_embedded_load_uses_the_cache(smollm):
    base, _ = smollm
    cached = models.gguf_cache_dir(str(models.embedded_gguf_path()))
    assert cached.is_dir()
    assert models.cache_root() in cached.parents
    assert (cached / "config.json").is_file() and (cached / "tokenizer_config.json").is_file()
    start = time.perf_counter()
    again = load_base_model("smollm2-135m")
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"second load took {elapsed:.1f} s"
    first = next(iter(base.state_dict().items()))
    assert torch.equal(again.state_dict()[first[0]], first[1])
