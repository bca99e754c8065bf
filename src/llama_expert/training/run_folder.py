"""The output folder of a training run: checked before any model loads, locked while the run writes.

Nothing a user made is lost: a folder that already holds files is refused unless the run continues it
(``--resume``) or replaces its outputs (``--overwrite``, which deletes only the files training writes and
leaves everything else alone). An exclusive file lock keeps two runs from writing one folder (POSIX
``flock``: Linux and macOS); prune, distill and export hold it on their output folders too, and leave no lock
file behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path
from typing import List

from ..errors import ConfigError, LlamaExpertError
from ..files import LOCK_NAME, held_files_problem, unusable_output

# Everything a training run writes into its output folder (the adapter files of both methods included).
RUN_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "checkpoints", "train_log.jsonl",
               "training_summary.json", "expert_usage.json", "expert_usage.png", "domain_expert_usage.png",
               "prototypes.safetensors", "mix_report.json", "tensorboard", "wandb")


class OutputFolderLocked(LlamaExpertError):
    """Another process is writing to the same output folder."""


def check_output_folder(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that cannot be written, or that holds files and is neither resumed nor overwritten."""
    problem = unusable_output(folder)
    if problem:
        raise ConfigError(problem)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --output-dir and --overwrite replaces it; pass one of them.")
    problem = None if resume else held_files_problem(
        folder, overwrite, "pass --resume to continue that run, --overwrite to replace its training outputs, or a "
                           "new --output-dir.")
    if problem:
        raise ConfigError(problem)


def clear_run_outputs(folder: Path) -> List[str]:
    """With ``--overwrite``: delete what an earlier run wrote (RUN_OUTPUTS), nothing else."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(folder) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


class RunLock:
    """``with RunLock(folder):`` holds an exclusive ``flock`` on ``folder/.llama-expert.lock``.

    The kernel releases the lock when its process ends, however it ends (kill -9 included), so there is
    no stale lock to detect; the file only records who holds it, for the message. A training run keeps the
    file (``keep_record``) while the folder holds anything else; prune, distill and export, whose folders are
    artifacts that get uploaded, remove it when they end. A run that ends having written nothing leaves
    nothing: no lock file alone in the folder, and no folder it made. The file is flocked rather than the
    folder itself because NFSv4 refuses ``flock`` on a descriptor that is not open for writing, as a
    folder's always is.
    """

    def __init__(self, folder: Path, keep_record: bool = True):
        self.path = Path(folder) / LOCK_NAME
        self.keep_record = keep_record
        self._handle = None
        self._made: List[Path] = []

    def __enter__(self) -> "RunLock":
        folder = self.path.parent
        self._made = []  # the folders mkdir makes, deepest first
        while not folder.exists() and folder != folder.parent:
            self._made.append(folder)
            folder = folder.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self._acquire()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self._handle = handle
        return self

    def _acquire(self):
        """The lock file, opened and flocked. A holder removes the file before it lets go, so a file locked just
        as it was removed is no longer the lock: then the one now at the path is taken."""
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise OutputFolderLocked(f"another llama-expert run ({holder}) is writing to {self.path.parent}; "
                                         f"wait for it to finish, or pass another --output-dir.") from None
            try:
                if os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path)):
                    return handle
            except FileNotFoundError:
                pass
            handle.close()

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._tidy()  # before the lock is released: no other run can be starting in the folder yet
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def _tidy(self) -> None:
        folder = self.path.parent
        if self.keep_record and [p.name for p in folder.iterdir()] != [LOCK_NAME]:
            return
        self.path.unlink(missing_ok=True)
        for made in self._made:  # deepest first; stops at the first that is not empty
            try:
                made.rmdir()
            except OSError:
                break
