"""QuantizedEmbedding: the token table of the CPU 4-bit base (optimum-quanto), read a row at a time, gives the rows
that the table stores, in every table format."""

import pytest
import torch

from llama_expert.integration.base_models import quantize_4bit_on_cpu

from ..conftest import smollm2_shaped_base


@pytest.mark.usefixtures("quanto")
@pytest.mark.parametrize("table_format", ["int8", "int4-g32", "unquantized"])
@torch.no_grad()
def test_every_token_table_format_reads_the_rows_it_stores(tmp_path, table_format):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_shaped_base(tmp_path / "base", vocab_size=640),
                                                 dtype=torch.bfloat16)
    plain_rows = model.get_input_embeddings()(torch.arange(640)).clone()
    quantize_4bit_on_cpu(model, table_format)
    rows = model.get_input_embeddings()(torch.arange(640))
    if table_format == "unquantized":
        assert type(model.lm_head).__name__ == "Linear" and torch.equal(rows, plain_rows)
    else:
        assert torch.equal(rows, model.lm_head.weight.dequantize().to(torch.bfloat16))
        assert 0 < (rows - plain_rows).abs().max() < 0.1 * plain_rows.abs().max()
