"""Tokenising documents and packing the ids into blocks: documents joined by blank lines, the tail dropped, the
caps honoured."""

import pytest
import torch

from llama_expert.data import pack_blocks, tokenize_documents
from llama_expert.errors import DataError


def test_pack_blocks_drops_the_tail_and_caps():
    ids = torch.arange(25)
    assert pack_blocks(ids, 10).tolist() == [list(range(10)), list(range(10, 20))]
    assert pack_blocks(ids, 10, max_blocks=1).shape == (1, 10)
    assert pack_blocks(ids, 5, max_tokens=12).shape == (2, 5)
    with pytest.raises(DataError, match="fewer than one block"):
        pack_blocks(ids, 30)


def test_tokenize_joins_documents_with_blank_lines(embedded_tokenizer):
    tokenizer = embedded_tokenizer
    ids = tokenize_documents(["a\n", "b\n"], tokenizer)
    assert tokenizer.decode(ids) == "a\n\n\nb\n"
