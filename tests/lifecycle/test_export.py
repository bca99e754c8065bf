"""`export --merge`: a dense LoRA folded into the base, written as a Transformers folder or a GGUF file, loads
with plain Transformers and computes what base + LoRA computed; MoE adapters and bad input get one clear line."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llama_expert import ExpertConfig, augment_model, save_adapter
from llama_expert.cli import main
from llama_expert.integration.base_models import load_base_model, load_tokenizer
from llama_expert.integration.peft_lora import add_lora, load_lora_model, save_lora

PROMPT = "The quick brown fox"
TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "\n") * 20


def _byte_level_bpe(merges: bool):
    """A byte-level BPE tokenizer built here: trained on TEXT (with merges, as real ones have), or bare bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE() if merges else models.BPE(vocab={c: i for i, c in enumerate(alphabet + ["<eos>"])},
                                                             merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    if merges:
        bpe.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                            initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")


def _bpe_base(folder):
    """A tiny random Llama with a byte-level BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_level_bpe(merges=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                         max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """A LoRA on a tiny base whose B matrices are random (a fresh LoRA would change nothing)."""
    base_folder = _bpe_base(tmp_path_factory.mktemp("bpe-base") / "base")
    model = add_lora(load_base_model(str(base_folder)), rank=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    save_lora(model, folder)
    return base_folder, folder


def _unmerged(base_folder, adapter):
    return load_lora_model(load_base_model(str(base_folder)), adapter)


def _ids(base_folder):
    return load_tokenizer(str(base_folder))(PROMPT, return_tensors="pt").input_ids


@torch.no_grad()
def test_merged_export_loads_with_plain_transformers_and_equals_the_unmerged_lora(lora_folder, tmp_path):
    base_folder, adapter = lora_folder
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(adapter), "--merge", "--output-dir", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain Transformers
    assert type(merged).__name__ == "LlamaForCausalLM"
    ids = _ids(base_folder)
    want = _unmerged(base_folder, adapter)(ids).logits
    base = load_base_model(str(base_folder))(ids).logits
    assert (want - base).abs().max() > 1e-2  # the LoRA changes the model: the comparison means something
    torch.testing.assert_close(merged(ids).logits, want, rtol=0, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(PROMPT).input_ids == ids[0].tolist()
    info = json.loads((out / "export_info.json").read_text())
    assert info["base_model"] == str(base_folder) and info["format"] == "hf"
    from llama_expert.files import UMASK
    for path in out.iterdir():  # the user's usual mode, not a temp file's 0600
        assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~UMASK), path


@torch.no_grad()
def test_gguf_export_loads_back_with_the_same_logits_and_greedy_text(lora_folder, tmp_path):
    base_folder, adapter = lora_folder
    out = tmp_path / "gguf"
    assert main(["export", "--adapter", str(adapter), "--merge", "--output-dir", str(out), "--format", "gguf",
                 "--gguf-type", "f32"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    ids = _ids(base_folder)
    assert tokenizer(PROMPT).input_ids == ids[0].tolist()
    unmerged = _unmerged(base_folder, adapter)
    torch.testing.assert_close(loaded(ids).logits, unmerged(ids).logits, rtol=0, atol=1e-4)
    want = unmerged.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(loaded.generate(ids, max_new_tokens=12, do_sample=False), want)


def test_gguf_q_and_k_rows_are_permuted_to_the_interleaved_rope_layout():
    """Per head, GGUF stores row pairs (i, i + d/2) next to each other: [0, 4, 1, 5, 2, 6, 3, 7] for d = 8."""
    from llama_expert.lifecycle.gguf_file import _permute_rope_rows

    weight = torch.arange(16.0).unsqueeze(1)  # 2 heads x head_dim 8, one column
    assert _permute_rope_rows(weight, heads=2)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7,
                                                                   8, 12, 9, 13, 10, 14, 11, 15]




def test_moe_adapters_are_refused_in_one_line_naming_distill(lora_folder, tmp_path, cli_error):
    base_folder, _ = lora_folder
    moe = tmp_path / "moe"
    save_adapter(augment_model(load_base_model(str(base_folder)), ExpertConfig(num_experts=2)), moe,
                 base_model_name_or_path=str(base_folder))
    err = cli_error(["export", "--adapter", str(moe), "--merge", "--output-dir", str(tmp_path / "out")])
    assert "cannot be merged" in err and "llama-expert distill" in err
    assert not (tmp_path / "out").exists()


def test_bad_export_input_gets_one_line_and_writes_nothing(lora_folder, tmp_path, cli_error):
    _, adapter = lora_folder
    out = tmp_path / "out"
    assert "--adapter" in cli_error(["export", "--merge", "--output-dir", str(out)])
    assert "--merge" in cli_error(["export", "--adapter", str(adapter), "--output-dir", str(out)])
    assert "not found" in cli_error(["export", "--adapter", str(tmp_path / "nope"), "--merge",
                                          "--output-dir", str(out)])
    assert not out.exists()
    with pytest.raises(Exception, match="BPE without merges"):  # GGUF cannot hold a merge-less BPE
        from llama_expert.lifecycle.gguf_file import write_llama_gguf
        byte_folder = tmp_path / "bytes"
        tokenizer = _byte_level_bpe(merges=False)
        tokenizer.save_pretrained(byte_folder)
        write_llama_gguf(load_base_model(str(lora_folder[0])), tokenizer, byte_folder, tmp_path / "x.gguf")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = cli_error(["export", "--adapter", str(adapter), "--merge", "--output-dir", str(out)])
    assert "already holds files (keep.txt)" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"  # nothing of the user's is lost


def test_overwrite_replaces_the_previous_export_and_nothing_else(lora_folder, tmp_path):
    """A GGUF export, then an hf export over it: model.gguf goes (export_info.json listed it), the user's file stays."""
    _, adapter = lora_folder
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--adapter", str(adapter), "--merge", "--output-dir", str(out), "--format", "gguf",
                 "--overwrite"]) == 0
    assert json.loads((out / "export_info.json").read_text())["files"] == ["model.gguf", "export_info.json"]
    assert main(["export", "--adapter", str(adapter), "--merge", "--output-dir", str(out), "--overwrite"]) == 0
    info = json.loads((out / "export_info.json").read_text())
    assert info["format"] == "hf" and not (out / "model.gguf").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(info["files"])
    assert {p.name for p in out.iterdir()} == set(info["files"]) | {"notes.txt"}  # and no lock file
    AutoModelForCausalLM.from_pretrained(out)  # a complete Transformers folder
