"""Datasets: the embedded corpus, local files and folders (WikiText names), JSON lines, Hub sources, and the
files a user can get wrong: one-line errors that name the problem and the fix, never a traceback."""

import json
import time

import pytest

from llama_expert.data import embedded_corpus, load_split, load_text_dataset, select_split, tokenize_documents
from llama_expert.errors import DataError


def test_embedded_corpus_is_deterministic_and_disjoint():
    a, b = embedded_corpus(), embedded_corpus()
    assert a == b
    assert sum(len("".join(v)) for v in a.values()) > 400_000
    assert not set(a["train"]) & set(a["test"])
    assert load_text_dataset(None) == a == load_text_dataset("embedded")


def test_single_file_holds_out_its_tail_for_validation(tmp_path):
    """One text file is one document: its last 5% of lines are validation, and the two parts put together are
    the file's text exactly."""
    path = tmp_path / "notes.txt"
    text = "".join(f"line {i}\n" for i in range(100))
    path.write_text(text)
    splits = load_text_dataset(str(path))
    assert splits["train"] == ["".join(f"line {i}\n" for i in range(95))]
    assert splits["validation"] == ["".join(f"line {i}\n" for i in range(95, 100))]


def test_a_files_validation_split_is_what_train_held_out_when_a_benchmark_asks(tmp_path):
    """`benchmark --dataset FILE --split validation` measures the 5% that `train --dataset FILE` validated on, not
    the text it trained on; `test` (and any split without ``hold_out``: an eval file given as such) is the whole."""
    path = tmp_path / "notes.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    held_out = load_text_dataset(str(path))
    assert load_split(str(path), None, None, "validation", hold_out=True) == held_out["validation"]
    assert load_split(str(path), None, None, "train", hold_out=True) == held_out["train"]
    whole = ["".join(f"line {i}\n" for i in range(100))]
    assert load_split(str(path), None, None, "test", hold_out=True) == whole
    assert load_split(str(path), None, None, "validation") == whole


CODE = "# file: a.py\nimport os\n\n\ndef f():\n    return os.sep\n\n\n# file: b.py\n\nX = 1\n"


@pytest.mark.parametrize("suffix", [".txt", ".md", ".text"])
def test_a_text_file_reaches_the_tokenizer_as_written(tmp_path, suffix):
    """Code, poetry and paragraph-separated prose keep their own line breaks: no line becomes a document
    that packing would follow with a blank line (the code domain was once trained triple-spaced)."""
    from llama_expert.data import load_split

    from ..conftest import byte_tokenizer

    tokenizer = byte_tokenizer()
    path = tmp_path / f"code{suffix}"
    path.write_text(CODE)
    for split in ("train", "test"):
        assert tokenizer.decode(tokenize_documents(load_split(str(path), None, tokenizer, split), tokenizer,
                                                   progress=False)) == CODE
    held = load_text_dataset(str(path))
    assert held["train"][0] + held["validation"][0] == CODE


def test_wikitext_raw_files_keep_the_published_line_protocol(tmp_path):
    """A WikiText ``.raw`` file is read line by line, as the Hub's rows, and packing joins the lines with a
    blank line: the token stream of the perplexity papers (``"\\n\\n".join(test["text"])``)."""
    from llama_expert.data import load_split

    path = tmp_path / "wiki.test.raw"
    path.write_text(" = A = \n\n Text .\n")
    assert load_split(str(path), None, None, "test") == [" = A = \n", "\n", " Text .\n"]


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


def test_a_folder_of_code_is_a_dataset_of_files(tmp_path):
    """A folder without split-named files (a code repository): each code or text file is one document, the
    last 5% of files (at least one) held out for validation; binary and non-UTF-8 files are skipped."""
    folder = tmp_path / "lib"
    (folder / "pkg").mkdir(parents=True)
    for i in range(3):
        (folder / "pkg" / f"m{i}.py").write_text(f"def f{i}():\n    return {i}\n")
    (folder / "notes.md").write_text("# notes\n")
    (folder / "blob.bin").write_bytes(b"\x00\x01")
    (folder / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    splits = load_text_dataset(str(folder))
    assert splits["train"] == ["# notes\n", "def f0():\n    return 0\n", "def f1():\n    return 1\n"]
    assert splits["validation"] == ["def f2():\n    return 2\n"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="fewer than two code or text files"):
        load_text_dataset(str(empty))


def test_each_hub_source_can_name_its_configuration(monkeypatch):
    """`--dataset openai/gsm8k:main,wikitext:wikitext-2-raw-v1,code/`: the part after the colon is that Hub
    dataset's configuration (the Hub itself is not reachable here: datasets.load_dataset is replaced by one
    that records its arguments and returns GSM8K-shaped rows)."""
    import datasets

    from llama_expert.data.mixture import domain_name

    calls = []

    def fake_load_dataset(name, config):
        calls.append((name, config))
        return {"train": [{"question": "1+1?", "answer": "2"}], "test": [{"question": "2+2?", "answer": "4"}]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_text_dataset("openai/gsm8k:main", config="ignored-when-the-source-names-one")
    assert calls == [("openai/gsm8k", "main")]
    assert splits["train"] == ["Question: 1+1?\nAnswer: 2"]
    load_text_dataset("wikitext", config="wikitext-2-raw-v1")
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1")
    assert domain_name("openai/gsm8k:main") == "gsm8k"


def test_a_dataset_not_in_the_cache_fails_fast_naming_local_forms(unreachable_hub):
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_text_dataset("some-org/some-data")
    assert time.perf_counter() - started < 15
    assert "the Hub cannot be used (cannot connect to 127.0.0.1:9" in str(info.value)
    assert "--dataset embedded" in str(info.value)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name, content, words", [
    ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00", ["unsupported file type '.png'", ".txt, .raw or .jsonl"]),
    ("rows.jsonl", b'[1, 2]\n', ["rows.jsonl:1", "JSON object", "got a list"]),
    ("scalar.jsonl", b'"text"\n', ["scalar.jsonl:1", "got a str"]),
    ("broken.jsonl", b'{"text": \n', ["broken.jsonl:1 is not valid JSON"]),
    ("empty.txt", b"", ["empty.txt is empty"]),
    ("blank.txt", b"  \n\n", ["blank.txt is empty"]),
    ("latin1.txt", "café\n".encode("latin-1"), ["latin1.txt is not UTF-8 text", "byte 3"]),
])
@pytest.mark.parametrize("loader", ["split", "dataset"])
def test_bad_files_give_one_line_errors(tmp_path, name, content, words, loader):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_split(str(path), None, None, "train") if loader == "split" else load_text_dataset(str(path))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_a_folder_with_an_empty_split_file_names_the_file(tmp_path):
    (tmp_path / "train.txt").write_text("some text\n")
    (tmp_path / "valid.txt").write_text("")
    with pytest.raises(DataError, match="valid.txt is empty"):
        load_text_dataset(str(tmp_path))


def test_a_one_line_file_names_eval_dataset(tmp_path):
    """A file too short to hold out a validation tail says how to give validation text."""
    from llama_expert.data import select_split

    path = tmp_path / "one.txt"
    path.write_text("just one line\n")
    with pytest.raises(DataError, match="no \\(or an empty\\) 'validation' split .*--eval-dataset"):
        select_split(load_text_dataset(str(path)), "validation", str(path))


def test_empty_rows_are_not_counted_as_splits_with_text(tmp_path):
    from llama_expert.data import select_split

    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": ""}\n' * 10)
    with pytest.raises(DataError, match="splits with text: none"):
        select_split(load_text_dataset(str(path)), "train", str(path))
