"""QuantizedEmbedding: the token table of the CPU 4-bit base (optimum-quanto), read a row at a time, gives the rows
that the table stores, in every table format."""

import pytest
import torch

from llama_expert.integration.base_models import quantize_4bit_on_cpu


@pytest.fixture
def quanto():
    """optimum-quanto, or a skip: it is part of the [quanto] extra."""
    return pytest.importorskip("optimum.quanto", reason="optimum-quanto is part of the [quanto] extra")


def _smollm2_shaped_base(folder, tied=True, vocab_size=512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # one decoder layer of SmolLM2-135M's shape, random weights
    LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                                 num_key_value_heads=3, vocab_size=vocab_size,
                                 tie_word_embeddings=tied)).save_pretrained(folder)
    return str(folder)


@pytest.mark.usefixtures("quanto")
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
