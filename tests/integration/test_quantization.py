"""--quantization-4bit on a CPU: optimum-quanto int4 weights for the frozen base's Linear layers and its tied
(or untied) embedding and head, adapters trained on top (QLoRA-style)."""

import pytest
import torch

pytest.importorskip("optimum.quanto", reason="optimum-quanto is part of the [quant] extra")

from llama_expert import ExpertConfig, TrainingArguments  # noqa: E402
from llama_expert.metrics.memory import model_bytes, tensor_bytes  # noqa: E402
from llama_expert.integration.adapter_files import weights_checksum  # noqa: E402
from llama_expert.errors import ConfigError  # noqa: E402
from llama_expert.integration.base_models import load_base_model, load_tokenizer, quantize_4bit_on_cpu  # noqa: E402
from llama_expert.training.arguments import DataArguments  # noqa: E402
from llama_expert.training.methods import MoEMethod  # noqa: E402
from llama_expert.training.recipe import fine_tune  # noqa: E402


def _linear_weight_bytes(model):
    """Bytes of the projections' weights (a quanto tensor: its packed codes, scales and shifts)."""
    return sum(tensor_bytes(module.weight) for name, module in model.named_modules()
               if "proj" in name and getattr(module, "weight", None) is not None)


def _smollm2_shaped_base(folder, tied=True, vocab_size=512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # one decoder layer of SmolLM2-135M's shape, random weights
    LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                                 num_key_value_heads=3, vocab_size=vocab_size,
                                 tie_word_embeddings=tied)).save_pretrained(folder)
    return str(folder)


@torch.no_grad()
def test_4_bit_linear_weights_take_at_most_035_of_bfloat16_at_smollm2_width(tmp_path):
    folder = _smollm2_shaped_base(tmp_path / "base")
    plain = load_base_model(folder, dtype="bfloat16")
    # bfloat16 compute: the groups' scales and shifts are bfloat16 (5 bits per weight with groups of 32; in
    # float32 they would take 6)
    small = load_base_model(folder, dtype="bfloat16", quantization_4bit=True)
    ratio = _linear_weight_bytes(small) / _linear_weight_bytes(plain)
    assert ratio <= 0.35, ratio


@pytest.mark.parametrize("tied,vocab_size", [(True, 8192), (False, 1024)])
@torch.no_grad()
def test_the_whole_4_bit_base_takes_at_most_035_of_bfloat16(tmp_path, tied, vocab_size):
    """Embedding and head included: a fifth of SmolLM2's and Llama 3.2 1B's weights; here most of the tied model's,
    and a quarter of the untied one's (two tables, as in Llama 3 8B)."""
    folder = _smollm2_shaped_base(tmp_path / "base", tied=tied, vocab_size=vocab_size)
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


@torch.no_grad()
def test_the_base_loads_in_4_bit_on_a_cpu(trained_base):
    folder, text = trained_base
    small = load_base_model(str(folder), quantization_4bit=True)
    assert type(small.model.layers[0].mlp.gate_proj).__name__ == "QLinear"
    assert type(small.lm_head).__name__ == "QLinear" and type(small.model.embed_tokens).__name__ == "QuantizedEmbedding"
    ids = load_tokenizer(str(folder))(text.read_text(), return_tensors="pt").input_ids[:, :512]
    full = load_base_model(str(folder))(input_ids=ids, labels=ids).loss.exp()
    assert small(input_ids=ids, labels=ids).loss.exp() <= 1.05 * full  # the bound: within +5%


def test_adapters_train_on_the_4_bit_base(trained_base, tmp_path):
    folder, text = trained_base
    result = fine_tune(MoEMethod(ExpertConfig(num_experts=4, quantization_4bit=True)),
                       TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=20, batch_size=4, seq_len=32,
                                         eval_every=0, eval_max_tokens=256, progress=False, mixed_precision="no",
                                         learning_rate=1e-2),
                       DataArguments(dataset=str(text)), model_id=str(folder))
    assert result.final_eval["perplexity"] < result.initial_eval["perplexity"]


@pytest.mark.parametrize("table_format", ["int8", "int4-g32", "unquantized"])
@torch.no_grad()
def test_every_token_table_format_reads_the_rows_it_stores(tmp_path, table_format):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_smollm2_shaped_base(tmp_path / "base", vocab_size=640),
                                                 dtype=torch.bfloat16)
    plain_rows = model.get_input_embeddings()(torch.arange(640)).clone()
    quantize_4bit_on_cpu(model, table_format)
    rows = model.get_input_embeddings()(torch.arange(640))
    if table_format == "unquantized":
        assert type(model.lm_head).__name__ == "Linear" and torch.equal(rows, plain_rows)
    else:
        assert torch.equal(rows, model.lm_head.weight.dequantize().to(torch.bfloat16))
        assert 0 < (rows - plain_rows).abs().max() < 0.1 * plain_rows.abs().max()


def test_an_unknown_token_table_format_is_refused():
    with pytest.raises(ConfigError, match="unknown table format 'int3'; choose one of int4-g16"):
        quantize_4bit_on_cpu(torch.nn.Module(), "int3")
