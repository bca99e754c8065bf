import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from llama_expert import (ConfigError, ExpertConfig, ModelLoadError, TrainingArguments, augment_model,
                          load_augmented_model, load_base_model, load_tokenizer, save_adapter)
from llama_expert.files import write_cache_folder
from llama_expert.inference.generation import generate_text
from llama_expert.integration import base_models as models
from llama_expert.integration.adapter_files import weights_checksum
from llama_expert.integration.base_models import quantize_4bit_on_cpu
from llama_expert.metrics.memory import model_bytes, tensor_bytes
from llama_expert.training.arguments import DataArguments
from llama_expert.training.methods import MoEMethod
from llama_expert.training.recipe import fine_tune

from ..conftest import smollm2_shaped_base

TOKEN = "hf_TESTSECRET123"


def test_a_conversion_finished_by_another_process_first_is_kept(tmp_path, monkeypatch):
    """Two branches trained at once on a fresh machine both convert the GGUF file: the slower one must use the
    faster one's folder, not fail renaming onto it."""
    target, rename = tmp_path / "cache" / "model", os.replace

    def other_process_first(source, destination):  # the other process renames its folder in just before this one
        if Path(destination) == target and not target.exists():
            other = tmp_path / "other"
            other.mkdir()
            (other / "config.json").write_text("{}")
            (other / "tokenizer_config.json").write_text(written)
            rename(other, target)
        rename(source, destination)

    def fill(staging):
        (staging / "config.json").write_text("{}")
        (staging / "tokenizer_config.json").write_text("mine")

    monkeypatch.setattr("llama_expert.files.os.replace", other_process_first)
    written = "theirs"
    assert write_cache_folder(target, fill, models.converted) == target
    assert (target / "tokenizer_config.json").read_text() == "theirs"
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no staging folder left behind
    shutil.rmtree(target)
    with pytest.raises(OSError):  # an unfinished folder in the way is not taken for a conversion
        write_cache_folder(target, fill, lambda folder: False)


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


@pytest.mark.parametrize("load", [lambda: load_base_model("some-org/some-model"),
                                  lambda: load_tokenizer("meta-llama/Llama-3.2-1B")])
def test_a_model_not_in_the_cache_fails_fast_naming_local_forms(unreachable_hub, load):
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load()
    assert time.perf_counter() - started < 15
    message = str(info.value)
    assert "is not in the local Hugging Face cache" in message and "cannot connect to 127.0.0.1:9" in message
    assert "a local folder written by save_pretrained, a .gguf file, or 'smollm2-135m'" in message


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


# ---------------------------------------------------------------------------------------------- portable names
@pytest.fixture
def embedded_copy(tmp_path):
    """A copy of the embedded GGUF file at another path, as `/tmp/SmolLM2-135M-Instruct.Q4_1.gguf` was."""
    target = tmp_path / "copied" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir()
    shutil.copyfile(models.embedded_gguf_path(), target)
    return target


def test_a_copy_of_the_embedded_gguf_is_named_by_its_alias(embedded_copy):
    assert models.portable_name("gguf", str(embedded_copy), str(embedded_copy)) == "smollm2-135m"
    with open(embedded_copy, "r+b") as f:  # the same size, one byte different: another model
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert models.portable_name("gguf", str(embedded_copy), str(embedded_copy)) == str(embedded_copy)


@pytest.mark.slow
def test_adapters_trained_on_a_copy_of_the_embedded_gguf_record_its_alias(embedded_copy, tmp_path):
    """Both adapter kinds (MoE, and PEFT LoRA from `train --method lora` / `distill`) record `smollm2-135m`, not
    the path of a file that exists on one machine only; the copy reuses the embedded model's cached conversion."""
    from llama_expert.integration.peft_lora import add_lora, save_lora

    model = load_base_model(str(embedded_copy))
    assert model.name_or_path == "smollm2-135m"
    save_lora(add_lora(model, rank=2), tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "smollm2-135m"
    moe = augment_model(load_base_model(str(embedded_copy)), ExpertConfig(num_experts=2, top_k=1))
    save_adapter(moe, tmp_path / "moe")
    assert json.loads((tmp_path / "moe" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "smollm2-135m"


def _hub_cache_snapshot(cache, repo_id, source):
    """``source`` laid out as huggingface_hub caches a download of ``repo_id``: models--ORG--NAME/snapshots/REV."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot


def test_a_hub_cache_folder_is_named_by_its_hub_id(tiny_folder, tmp_path):
    snapshot = _hub_cache_snapshot(tmp_path / "hub", "acme/tiny-llama", tiny_folder)
    assert models.hub_cache_id(str(snapshot)) == "acme/tiny-llama"
    assert models.hub_cache_id(str(tiny_folder)) is None
    assert load_base_model(str(snapshot)).name_or_path == "acme/tiny-llama"


def test_an_adapter_saved_on_a_hub_cache_folder_loads_on_another_machine(trained_base, tmp_path):
    """Saved on machine A's cache folder, the adapter records the Hub id; machine B (another cache folder, reached
    through HF_HUB_CACHE) runs it by that id alone, with the same output."""
    folder, _ = trained_base
    on_a = _hub_cache_snapshot(tmp_path / "machine-a", "acme/tiny-llama", folder)
    _hub_cache_snapshot(tmp_path / "machine-b", "acme/tiny-llama", folder)
    model = load_base_model(str(on_a))
    augment_model(model, ExpertConfig(num_experts=2, top_k=1, expert_allocation="uniform"))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    adapter = save_adapter(model, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny-llama"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "machine-b"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "llama_expert.cli", "inference", "--adapter", str(adapter),
                           "--prompt", "The quick", "--max-new-tokens", "5", "--temperature", "0", "--no-chat-template"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded adapter" in done.stderr and "on acme/tiny-llama" in done.stderr
    tokenizer = load_tokenizer(str(on_a))
    expected = generate_text(model.eval(), tokenizer, "The quick", max_new_tokens=5, temperature=0,
                             use_chat_template=False)
    assert done.stdout == expected + "\n"


# ---------------------------------------------------------------------------------------------- 4-bit base on a CPU
# optimum-quanto int4 weights for the frozen base's Linear layers and its tied (or untied) embedding and head,
# adapters trained on top (QLoRA-style).
def _linear_weight_bytes(model):
    """Bytes of the projections' weights (a quanto tensor: its packed codes, scales and shifts)."""
    return sum(tensor_bytes(module.weight) for name, module in model.named_modules()
               if "proj" in name and getattr(module, "weight", None) is not None)


@pytest.mark.usefixtures("quanto")
@torch.no_grad()
def test_4_bit_linear_weights_take_at_most_035_of_bfloat16_at_smollm2_width(tmp_path):
    folder = smollm2_shaped_base(tmp_path / "base")
    plain = load_base_model(folder, dtype="bfloat16")
    # bfloat16 compute: the groups' scales and shifts are bfloat16 (5 bits per weight with groups of 32; in
    # float32 they would take 6)
    small = load_base_model(folder, dtype="bfloat16", quantization_4bit=True)
    ratio = _linear_weight_bytes(small) / _linear_weight_bytes(plain)
    assert ratio <= 0.35, ratio


@pytest.mark.usefixtures("quanto")
@pytest.mark.parametrize("tied,vocab_size", [(True, 8192), (False, 1024)])
@torch.no_grad()
def test_the_whole_4_bit_base_takes_at_most_035_of_bfloat16(tmp_path, tied, vocab_size):
    """Embedding and head included: a fifth of SmolLM2's and Llama 3.2 1B's weights; here most of the tied model's,
    and a quarter of the untied one's (two tables, as in Llama 3 8B)."""
    folder = smollm2_shaped_base(tmp_path / "base", tied=tied, vocab_size=vocab_size)
    plain = load_base_model(folder, dtype="bfloat16")
    small = load_base_model(folder, dtype="bfloat16", quantization_4bit=True)
    assert (small.get_output_embeddings().weight is small.get_input_embeddings().weight) == tied
    ratio = model_bytes(small) / model_bytes(plain)
    assert ratio <= 0.35, ratio
    ids = torch.randint(0, vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    table = small.get_input_embeddings().weight.dequantize()  # the quantised table, whole
    assert torch.equal(small.get_input_embeddings()(ids), table[ids].to(torch.bfloat16))
    if not tied:
        assert type(small.get_output_embeddings()).__name__ == "QLinear"  # the untied head is quantised too
    assert small(input_ids=ids).logits.shape == (3, 17, vocab_size)  # quality: the trained base's test below
    assert weights_checksum(small) == weights_checksum(plain)  # adapters move between the two bases


@pytest.mark.usefixtures("quanto")
@torch.no_grad()
def test_the_base_loads_in_4_bit_on_a_cpu(trained_base):
    folder, text = trained_base
    small = load_base_model(str(folder), quantization_4bit=True)
    assert type(small.model.layers[0].mlp.gate_proj).__name__ == "QLinear"
    assert type(small.lm_head).__name__ == "QLinear" and type(small.model.embed_tokens).__name__ == "QuantizedEmbedding"
    ids = load_tokenizer(str(folder))(text.read_text(), return_tensors="pt").input_ids[:, :512]
    full = load_base_model(str(folder))(input_ids=ids, labels=ids).loss.exp()
    assert small(input_ids=ids, labels=ids).loss.exp() <= 1.05 * full  # the bound: within +5%


@pytest.mark.usefixtures("quanto")
def test_adapters_train_on_the_4_bit_base(trained_base, tmp_path):
    folder, text = trained_base
    result = fine_tune(MoEMethod(ExpertConfig(num_experts=4, quantization_4bit=True)),
                       TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=20, batch_size=4, seq_len=32,
                                         eval_every=0, eval_max_tokens=256, progress=False, mixed_precision="no",
                                         learning_rate=1e-2),
                       DataArguments(dataset=str(text)), model_id=str(folder))
    assert result.final_eval["perplexity"] < result.initial_eval["perplexity"]


@pytest.mark.usefixtures("quanto")
def test_an_unknown_token_table_format_is_refused():
    with pytest.raises(ConfigError, match="unknown table format 'int3'; choose one of int4-g16"):
        quantize_4bit_on_cpu(torch.nn.Module(), "int3")
