"""Atomic writes: a reader (or a crash) sees the old file or folder, or the new one, never half of one; and the
checks every command runs on the ``--output-dir`` it is given, written once.

One mechanism for the files the package writes that a user keeps (MoE adapter files, training checkpoints,
summaries and reports, the converted-model cache); PEFT writes the LoRA baseline's files itself. A file is written beside its final name and renamed onto it; a folder is
filled beside its final name and swapped in with two renames, the previous version parked under
``.old-<name>`` between them (``previous_version`` finds it after a crash there). A command's outputs in a
folder the user names (``write_files``) are staged inside that folder and renamed into place one by one, so
that the folder may hold other files and may be a mount point (which cannot be renamed).

The output checks return the one-line message (this floor raises nothing of the package's own): each command
raises it, and words its own hint for a folder that already holds files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple, Union

PathLike = Union[str, Path]
# What write_folder and write_files stage into; a kill can leave one behind. A name only this package writes: the
# staging that a killed run left is deleted, and a user's own hidden folders (``.tmp-*``, say) must never be.
STAGING_PREFIX = ".llama-expert-staging-"
LOCK_NAME = ".llama-expert.lock"  # the record of who holds an output folder's lock (training.run_folder.RunLock)


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
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{STAGING_PREFIX}{folder.name}-"))
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


def write_cache_folder(folder: PathLike, fill: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """``write_folder`` for a cache entry that several processes may fill at once (branches trained in parallel on
    a fresh machine): when another one put a ``complete`` folder in place first, its copy is the same, so it is kept
    and this one's is dropped."""
    try:
        return write_folder(folder, fill)
    except OSError:
        if complete(Path(folder)):
            return Path(folder)
        raise


def nearest_existing(path: PathLike) -> Path:
    """``path``, or the closest folder above it that exists (where ``mkdir -p`` would start)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_problem(folder: PathLike) -> Optional[str]:
    """Why ``folder`` (or, where it does not exist yet, the folder it would be made in) cannot be written;
    None when it can. A real write: ``os.access`` says yes to root even on a read-only mount."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        return f"{existing}: {exc.strerror or exc}"
    return None


def unusable_output(folder: PathLike) -> Optional[str]:
    """Why ``--output-dir folder`` cannot be written to, as a message that names the fix; None when it can."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"--output-dir {folder} is a file, not a folder; pass a folder."
    problem = write_problem(folder)
    return f"--output-dir {folder} is not writable ({problem}); pass a folder you can write to." if problem else None


def held_files(folder: PathLike) -> List[str]:
    """The names ``folder`` holds (none when it does not exist), but for the lock's record and this package's
    staging, which the lock's holder removes."""
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME
                  and not p.name.startswith(STAGING_PREFIX)) if folder.is_dir() else []


def shown_names(names: List[str], most: int = 5) -> str:
    """``a, b, c and 4 more``: a message names a few, not a folder of thousands."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def held_files_problem(folder: PathLike, overwrite: bool, hint: str) -> Optional[str]:
    """A folder that already holds files is written to only with ``--overwrite``: the message (ending in the
    command's own ``hint``) when it holds some and ``overwrite`` is not given, else None."""
    present = held_files(folder)
    if present and not overwrite:
        return f"--output-dir {folder} already holds files ({shown_names(present)}); {hint}"
    return None


def relation(path: PathLike, other: PathLike) -> Optional[str]:
    """How ``path`` stands to ``other`` once both are resolved: "is", "lies inside", "holds", or None."""
    path, other = Path(path).expanduser().resolve(), Path(other).expanduser().resolve()
    return ("is" if path == other else "lies inside" if path.is_relative_to(other)
            else "holds" if other.is_relative_to(path) else None)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_files(folder: PathLike, fill: Callable[[Path], None], remove: Iterable[str] = (),
                last: Optional[str] = None) -> List[str]:
    """Write what ``fill(staging)`` makes into ``folder``, leaving its other files alone; returns the names.

    Staged in a hidden folder inside ``folder`` (same file system, and ``folder`` itself is never renamed, so
    a mount point works), then each entry is renamed onto its name. ``remove``: names a previous run wrote
    that this one may not write again, deleted first. ``last`` (a summary) is deleted first and moved in
    last: where it is present, every file it belongs to is complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=STAGING_PREFIX))
    try:
        fill(staging)
        names = sorted((p.name for p in staging.iterdir()), key=lambda name: name == last)
        for f in staging.rglob("*"):
            if f.is_file():
                _usual_mode(f, directory=False)
                _fsync(f)
            elif f.is_dir():
                _usual_mode(f, directory=True)
        stale = [n for n in remove if n not in names and n == Path(n).name and not n.startswith(".")]
        for name in ([last] if last else []) + stale:
            _remove(folder / name)
        for name in names:
            if (folder / name).is_dir() and not (folder / name).is_symlink():
                shutil.rmtree(folder / name)  # os.replace cannot replace a folder that holds files
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


def remove_stale_staging(folder: PathLike, prefixes: Iterable[str] = (STAGING_PREFIX,)) -> List[Tuple[Path, int]]:
    """Delete the staging folders (names starting with one of ``prefixes``) a killed writer left in ``folder``;
    returns each with its size in bytes. Call it only while no other process can be writing there (under the
    folder's lock)."""
    removed = []
    for staging in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if staging.name.startswith(tuple(prefixes)) and staging.is_dir() and not staging.is_symlink():
            size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(staging, ignore_errors=True)
            removed.append((staging, size))
    return removed
