"""The output folder of prune, distill and export: checked before any model loads, locked while written, and
never written at the cost of an input or of a file the command did not write.

It is refused when it is, holds or lies inside something the command reads (the adapter, calibration
files, a local base model), when it cannot be written (a real write test), and when it holds files and
``--overwrite`` is not given. ``--overwrite`` replaces only what the command wrote there: its summary lists
those files. The files are staged inside the folder and renamed into place (``files.write_files``), so a
mount point works; staging that a killed run left is removed under the folder's lock, and said so.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List

from ..errors import ConfigError
from ..files import (atomic_write_text, held_files_problem, relation, remove_stale_staging, unusable_output,
                     write_files)
from ..training.run_folder import RunLock


def check_apart(folder: Path, inputs: Dict[str, Iterable[str]], command: str) -> None:
    """Refuse an output folder that is, holds or lies inside an input (``inputs``: what -> paths; paths
    that do not exist locally, such as Hub names, are skipped)."""
    for what, paths in inputs.items():
        for path in paths:
            stands = relation(folder, path) if path and Path(path).expanduser().exists() else None
            if stands:
                raise ConfigError(f"--output-dir {folder} {stands} {what} {path}: {command} would write over "
                                  f"what it reads; pass another --output-dir.")


def check_output(folder: Path, command: str, overwrite: bool, inputs: Dict[str, Iterable[str]]) -> None:
    """Everything about ``--output-dir`` that can fail, checked before the work starts."""
    check_apart(folder, inputs, command)
    problem = unusable_output(folder) or held_files_problem(
        folder, overwrite, f"pass --overwrite to replace what {command} wrote there (other files stay), or a new "
                           f"--output-dir.")
    if problem:
        raise ConfigError(problem)


@contextmanager
def locked_output(folder: Path, command: str) -> Iterator[Path]:
    """Hold the folder's lock for the whole command (a second one is refused; the lock file goes with the command:
    the folder is an artifact); remove stale staging."""
    with RunLock(folder, keep_record=False):
        removed = remove_stale_staging(folder)
        if removed:
            size = sum(bytes_ for _, bytes_ in removed)
            print(f"removed {len(removed)} staging folder(s) ({size / 1e6:,.0f} MB) that an interrupted run left "
                  f"in {folder}")
        yield Path(folder)


def recorded_outputs(summary: Path) -> List[str]:
    """The files an earlier run listed in its summary (``files``); none when there is no readable one."""
    try:
        names = json.loads(summary.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name in names if isinstance(name, str)] if isinstance(names, list) else []


def write_outputs(folder: Path, summary_name: str, summary: dict, fill: Callable[[Path], None]) -> List[str]:
    """``fill(staging)`` writes the command's files; then its summary, which lists them, goes in last.

    What an earlier run of the command wrote and this one does not write again is removed; nothing else is.
    """
    previous = recorded_outputs(Path(folder) / summary_name)

    def fill_all(staging: Path) -> None:
        fill(staging)
        summary["files"] = sorted(p.name for p in staging.iterdir()) + [summary_name]
        atomic_write_text(staging / summary_name, json.dumps(summary, indent=1) + "\n")

    return write_files(folder, fill_all, remove=previous, last=summary_name)
