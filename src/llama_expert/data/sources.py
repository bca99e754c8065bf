"""Text datasets: the Hub, local files and folders, and an embedded corpus.

Every source becomes ``{split: [document, ...]}``; ``packing`` joins documents with a blank line and turns
them into token blocks. A text file reaches the tokenizer as written: a ``.txt``/``.md``/``.text`` file is one
document (code, poetry and paragraph-separated prose keep their own line breaks), a ``.jsonl`` file holds one
document per row, and a folder of code one per file. The one exception is WikiText's ``.raw`` files, read line
by line with their newlines kept, because that is the published protocol: the Hub's ``wikitext-2-raw-v1``
rows are those lines and the perplexity papers and Transformers' perplexity guide join them with
``"\n\n"``, so a local ``wiki.test.raw`` gives the same token stream as the Hub's test split.

``embedded`` is the documentation text of the standard library module ``pydoc_data.topics``
(about 0.5 MB of English prose about Python), present in every Python install: the offline quickstart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import DataError
from ..network import hub_offline_reason, offline_mode
from .chat import row_text

EMBEDDED_DATASET = "embedded"
SPLIT_NAMES = {
    "train": ("train", "wiki.train.raw", "train.txt", "train.jsonl", "train.raw"),
    "validation": ("validation", "valid", "wiki.valid.raw", "valid.txt", "validation.txt", "valid.jsonl",
                   "validation.jsonl", "valid.raw", "dev.txt", "dev.jsonl"),
    "test": ("test", "wiki.test.raw", "test.txt", "test.jsonl", "test.raw"),
}
HUB_SPLIT_ALIASES = {"train": ("train", "train_sft"), "validation": ("validation", "valid", "test_sft"),
                     "test": ("test", "test_sft")}


def embedded_corpus() -> Dict[str, List[str]]:
    """pydoc topics split deterministically by sorted topic name: 80% train, 10% validation, 10% test."""
    from pydoc_data.topics import topics

    texts = list(dict.fromkeys(topics[key].strip() + "\n" for key in sorted(topics)))  # some topics repeat
    splits: Dict[str, List[str]] = {"train": [], "validation": [], "test": []}
    for i, text in enumerate(texts):
        split = "test" if i % 10 == 0 else "validation" if i % 10 == 5 else "train"
        splits[split].append(text)
    return splits


TEXT_SUFFIXES = (".txt", ".jsonl", ".raw", ".md", ".text")
WIKITEXT_SUFFIX = ".raw"  # WikiText's files: one document per line, as the Hub's rows (the published protocol)


def _read_text(path: Path) -> str:
    if path.suffix not in TEXT_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use a .txt, .raw or .jsonl file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); pass a UTF-8 "
                        f".txt/.raw/.jsonl file.") from None
    if not text.strip():
        raise DataError(f"{path} is empty; give a file with text in it.")
    return text


def read_documents(path: Path, tokenizer=None) -> List[str]:
    """The documents of a file: its whole text (one document), the rows of a JSON-lines file, or the lines of a
    WikiText ``.raw`` file (newlines kept; see the module docstring for why)."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n} is not valid JSON ({exc}).") from exc
            docs.append(row_text(row, tokenizer, f"{path}:{n}"))
        return docs
    return text.splitlines(keepends=True) if path.suffix == WIKITEXT_SUFFIX else [text]


def _split_of_file(path: Path) -> Optional[str]:
    name = path.name.lower()
    for split, names in SPLIT_NAMES.items():
        if name in names or path.stem.lower() in names:
            return split
    return None


def _hold_out(docs: List[str], fraction: float = 0.05) -> Dict[str, List[str]]:
    """The last ``fraction`` of the documents for validation; a single document is cut at a line boundary
    instead, so that training text + validation text is the file's text exactly."""
    units = docs[0].splitlines(keepends=True) if len(docs) == 1 else docs
    cut = max(1, int(len(units) * (1 - fraction))) if len(units) > 1 else len(units)
    train, validation = units[:cut], units[cut:]
    if len(docs) == 1:
        return {"train": ["".join(train)], "validation": ["".join(validation)] if validation else []}
    return {"train": train, "validation": validation}


SOURCE_SUFFIXES = (".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".rb", ".sh",
                   ".md", ".txt", ".rst")


def _source_folder(path: Path) -> List[str]:
    """Every code or text file under ``path`` (sorted, UTF-8 ones only), each file one document: a folder of
    code such as a repository. Files that are not UTF-8 text are skipped."""
    docs = []
    for child in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES):
        try:
            text = child.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            docs.append(text)
    return docs


def _local_dataset(path: Path, tokenizer) -> Dict[str, List[str]]:
    if path.is_file():
        return _hold_out(read_documents(path, tokenizer))  # one file: its last 5% of rows become validation
    splits: Dict[str, List[str]] = {}
    for child in sorted(path.iterdir()):
        split = _split_of_file(child) if child.is_file() else None
        if split and split not in splits:
            splits[split] = read_documents(child, tokenizer)
    if not splits:  # no files named by split: a folder of code or text, its last 5% of files for validation
        docs = _source_folder(path)
        if len(docs) >= 2:
            return _hold_out(docs)
        raise DataError(f"{path} holds no train/valid/test files (train.txt, valid.jsonl, wiki.test.raw, ...) and "
                        f"fewer than two code or text files ({', '.join(SOURCE_SUFFIXES)}). Name the files by split "
                        f"or pass one file with --dataset.")
    return splits


def hub_name_and_config(name: str, config: Optional[str]) -> Tuple[str, Optional[str]]:
    """``openai/gsm8k:main`` -> (``openai/gsm8k``, ``main``): each source of a mixture can name its own Hub
    configuration; without one, ``config`` (``--dataset-config``) applies."""
    if ":" in name and not Path(name).expanduser().exists():
        base, _, own = name.rpartition(":")
        if base and own and "/" not in own:
            return base, own
    return name, config


def _hub_dataset(name: str, config: Optional[str], tokenizer) -> Dict[str, List[str]]:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"'{name}' is not a local file or folder, and loading Hub datasets needs the 'datasets' "
                        f"package: pip install datasets. Or pass a local .txt/.jsonl file, or --dataset "
                        f"{EMBEDDED_DATASET}.") from exc
    offline = hub_offline_reason()
    try:
        with offline_mode(offline is not None):
            loaded = datasets.load_dataset(name, config)
    except Exception as exc:  # offline, missing, or a bad config name all land here
        why = f"the Hub cannot be used ({offline}) and it is not in the local cache" if offline else \
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise DataError(f"cannot load dataset '{name}'{f' ({config})' if config else ''}: {why}. Pass a local "
                        f".txt/.jsonl file or folder, or --dataset {EMBEDDED_DATASET} for the offline "
                        f"corpus.") from None
    splits = {}
    for split, aliases in HUB_SPLIT_ALIASES.items():
        hub_split = next((a for a in aliases if a in loaded), None)
        if hub_split is not None:
            rows = loaded[hub_split]
            splits[split] = [row_text(r, tokenizer, f"{name}[{hub_split}]") for r in rows]
    return splits


def load_text_dataset(name: Optional[str] = None, config: Optional[str] = None,
                      tokenizer=None) -> Dict[str, List[str]]:
    """Resolve ``name`` to ``{split: documents}``: ``embedded``, a local file or folder, or a Hub dataset."""
    if name in (None, "", EMBEDDED_DATASET):
        return embedded_corpus()
    path = Path(name).expanduser()
    if path.exists():
        return _local_dataset(path, tokenizer)
    if name.startswith((".", "/", "~")) or Path(name).suffix in (".txt", ".jsonl", ".raw") or os.sep * 2 in name:
        raise DataError(f"dataset path not found: {name}. Check the path.")
    return _hub_dataset(*hub_name_and_config(name, config), tokenizer)


def select_split(splits: Dict[str, List[str]], split: str, source: str) -> List[str]:
    docs = splits.get(split)
    if not docs or not "".join(docs).strip():
        have = ", ".join(k for k, v in splits.items() if "".join(v).strip()) or "none"
        fix = ("pass --eval-dataset FILE for validation text, or a file long enough to hold out its last 5%"
               if split == "validation" else "pass a file or folder that has one")
        raise DataError(f"dataset '{source}' has no (or an empty) '{split}' split (splits with text: {have}); "
                        f"{fix}.")
    return docs


def load_split(name: Optional[str], config: Optional[str], tokenizer, split: str,
               hold_out: bool = False) -> List[str]:
    """Documents of one split; a single local file counts whole (it is the split), unless ``hold_out``: then its
    ``train`` and ``validation`` are the parts ``train --dataset FILE`` trains and validates on (its last 5% held
    out) and its ``test`` is the whole file. ``validation`` falls back to ``test`` for datasets without one."""
    if name and Path(name).expanduser().is_file():
        if hold_out and split != "test":
            return select_split(_local_dataset(Path(name).expanduser(), tokenizer), split, name)
        return read_documents(Path(name).expanduser(), tokenizer)
    splits = load_text_dataset(name, config, tokenizer)
    if split == "validation" and not splits.get("validation") and splits.get("test"):
        split = "test"
    return select_split(splits, split, name or EMBEDDED_DATASET)
