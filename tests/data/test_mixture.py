"""Several datasets at once: equal tokens per unit of weight, every block labelled with its source."""

import pytest
import torch

from llama_expert.data import domain_name, mix_blocks, parse_weights, row_text, split_sources
from llama_expert.errors import DataError


def test_sources_and_names():
    assert split_sources("a.txt, math/train.jsonl") == ["a.txt", "math/train.jsonl"]
    assert split_sources(None) == [None]
    names = [domain_name(s) for s in ["x/code/train.txt", "x/math/test.jsonl", "data/wikitext-2-raw/wiki.valid.raw",
                                      "notes.txt", None]]
    assert names == ["code", "math", "wikitext-2-raw", "notes", "embedded"]  # generic file names: the folder


def test_equal_weights_take_equal_blocks_from_each_source():
    a, b, c = torch.zeros(10, 4), torch.ones(3, 4), torch.full((7, 4), 2.0)
    blocks, labels = mix_blocks([a, b, c], [1, 1, 1], ["a", "b", "c"])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # limited by the smallest source (3 blocks)
    assert torch.equal(blocks[labels == 1], b) and torch.equal(blocks[labels == 0], a[:3])


def test_weights_scale_each_share():
    blocks, labels = mix_blocks([torch.zeros(10, 2), torch.ones(10, 2)], [1, 2], ["a", "b"])
    assert (labels == 0).sum() == 5 and (labels == 1).sum() == 10


@pytest.mark.parametrize("weights, words", [("1,x", "one number per dataset"), ("1", "1 values for 2 datasets"),
                                            ("1,0", "finite number > 0"), ("1,nan", "finite number > 0")])
def test_bad_weights(weights, words):
    with pytest.raises(DataError, match=words):
        parse_weights(weights, 2)


def test_a_source_too_small_for_its_weight_is_named():
    with pytest.raises(DataError, match="dataset 'a' is too small for its weight"):
        mix_blocks([torch.zeros(1, 2), torch.ones(1, 2)], [1, 2], ["a", "b"])  # 'b' limits: half a block for 'a'


def test_question_answer_rows_are_rendered():
    assert row_text({"question": "2+2?", "answer": "4\n#### 4"}, None, "x") == "Question: 2+2?\nAnswer: 4\n#### 4"
