"""Datasets: the embedded corpus, local files and folders (WikiText names), JSON lines, and errors."""

import json

import pytest
import torch

from llama_expert.data import (embedded_corpus, load_text_dataset, pack_blocks, select_split,
                               tokenize_documents)
from llama_expert.errors import DataError


def test_embedded_corpus_is_deterministic_and_disjoint():
    a, b = embedded_corpus(), embedded_corpus()
    assert a == b
    assert sum(len("".join(v)) for v in a.values()) > 400_000
    assert not set(a["train"]) & set(a["test"])
    assert load_text_dataset(None) == a == load_text_dataset("embedded")


def test_single_file_holds_out_its_tail_for_validation(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    splits = load_text_dataset(str(path))
    assert len(splits["train"]) == 95 and len(splits["validation"]) == 5
    assert splits["train"][0] == "line 0\n"


def test_wikitext_folder_uses_split_names(shared_data):
    wikitext = shared_data("wikitext-2-raw")  # skips naming the path when missing; fails on CI
    splits = load_text_dataset(str(wikitext))
    assert set(splits) == {"validation", "test"}
    assert splits["test"][1].startswith(" = Robert Boulter =")
    with pytest.raises(DataError, match="no \\(or an empty\\) 'train' split"):
        select_split(splits, "train", str(wikitext))


def test_jsonl_text_and_chat_rows(tmp_path, embedded_tokenizer):
    tokenizer = embedded_tokenizer
    path = tmp_path / "train.jsonl"
    rows = [{"text": "plain row"}, {"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "hello"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = load_text_dataset(str(tmp_path), tokenizer=tokenizer)
    assert splits["train"][0] == "plain row"
    assert "<|im_start|>user" in splits["train"][1] and "hello" in splits["train"][1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="'text' string, a 'messages' list or 'question' and 'answer' strings"):
        load_text_dataset(str(bad))


def test_missing_path_and_unreachable_hub_dataset_say_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_text_dataset(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="embedded"):
        load_text_dataset("no-such-org/no-such-dataset")


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
