"""Datasets a user can get wrong: one-line errors that name the problem and the fix, never a traceback."""

import pytest

from llama_expert.data import load_split, load_text_dataset
from llama_expert.errors import DataError


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
