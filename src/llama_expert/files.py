"""Atomic writes: a reader (or a crash) sees the old file or folder, or the new one, never half of one.

One mechanism for the files the package writes that a user keeps (MoE adapter files, training checkpoints,
summaries and reports, the converted-model cache); PEFT writes the LoRA baseline's files itself. A file is written beside its final name and renamed onto it; a folder is
filled beside its final name and swapped in with two renames, the previous version parked under
``.old-<name>`` between them (``previous_version`` finds it after a crash there).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, Path]


def _read_umask() -> int:
    """The process umask. Reading it means setting it, so it is read once, at import, before any threads."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def _usual_mode(path: PathLike, directory: bool) -> None:
    """tempfile creates 0600 files and 0700 folders; what we keep gets the user's usual mode (umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~UMASK)


def _fsync(path: PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def cache_root() -> Path:
    """Where derived files live (converted GGUF models, the compiled decode kernel): ``$LLAMA_EXPERT_CACHE``,
    default ``~/.cache/llama_expert``; anything under it can be deleted and is rebuilt."""
    return Path(os.environ.get("LLAMA_EXPERT_CACHE", Path.home() / ".cache" / "llama_expert"))


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _usual_mode(tmp, directory=False)  # after writing: some writers replace the file they are given
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def previous_version(folder: PathLike) -> Path:
    """Where ``write_folder`` parks the old version of ``folder`` while it swaps the new one in."""
    folder = Path(folder)
    return folder.parent / f".old-{folder.name}"


def write_folder(folder: PathLike, fill: Callable[[Path], None]) -> Path:
    """Create or replace ``folder``: ``fill(staging)`` writes into a fresh sibling that is renamed onto it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    old = previous_version(folder)
    try:
        _usual_mode(staging, directory=True)
        fill(staging)
        for f in staging.rglob("*"):
            if f.is_file():
                _usual_mode(f, directory=False)  # some writers (safetensors shards) make private temp files
                _fsync(f)
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
