"""The output folder of a training run: checked before any model loads, locked while the run writes.

Nothing a user made is lost: a folder that already holds files is refused unless the run continues it
(``--resume``) or replaces its outputs (``--overwrite``, which deletes only the files training writes and
leaves everything else alone). A lock file holding the owner's pid keeps two runs from writing one
folder; a lock whose process is gone (a kill -9) is stale and taken over.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import List

from ..errors import ConfigError, LlamaExpertError

LOCK_NAME = ".llama-expert.lock"
# Everything a training run writes into its output folder (the adapter files of both methods included).
RUN_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "checkpoints", "train_log.jsonl",
               "training_summary.json", "expert_usage.json", "expert_usage.png", "tensorboard", "wandb")


class OutputFolderLocked(LlamaExpertError):
    """Another process is writing to the same output folder."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that cannot be written, or that holds files and is neither resumed nor overwritten."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output-dir {folder} is a file, not a folder; pass a folder.")
    existing = _nearest_existing(folder)
    try:  # a real write: os.access says yes to root even on read-only mounts
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise ConfigError(f"--output-dir {folder} is not writable ({existing}: {exc.strerror or exc}); pass a "
                          f"folder you can write to.") from None
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --output-dir and --overwrite replaces it; pass one of them.")
    if not folder.is_dir() or resume:
        return
    present = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
    if present and not overwrite:
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        raise ConfigError(f"--output-dir {folder} already holds files ({shown}); pass --resume to continue that run, "
                          f"--overwrite to replace its training outputs, or a new --output-dir.")


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


class RunLock:
    """``with RunLock(folder):`` holds ``folder/.llama-expert.lock`` (O_EXCL) for this process."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if not self._take_over_stale():
                    break
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(owner, handle)
            self.held = True
            return self
        holder = self._holder()
        raise OutputFolderLocked(f"another llama-expert run (pid {holder.get('pid')} on {holder.get('host')}) is "
                                 f"writing to {self.path.parent}; wait for it to finish, or pass another "
                                 f"--output-dir (if that run is gone, delete {self.path}).")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _take_over_stale(self) -> bool:
        """Remove the lock when its owner is a process of this machine that no longer runs."""
        holder = self._holder()
        if not holder:  # being written right now, or unreadable: not ours to judge
            return False
        if holder.get("host") != socket.gethostname() or _alive(int(holder.get("pid", -1))):
            return False
        try:
            self.path.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                return False
        return True

    def __exit__(self, *exc) -> None:
        if self.held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.held = False
