"""prune, distill and export never eat their inputs: the output folder is checked before the work (apart from
every input, writable, empty unless --overwrite), --overwrite replaces only what the command wrote, stale
staging is cleaned up, and a mount point or a read-only mount behaves (a real tmpfs, via ``unshare -m``)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama_expert.cli import main
from llama_expert.files import STAGING_PREFIX
from llama_expert.training.run_folder import LOCK_NAME, RunLock

from ..conftest import moe_adapter_folder


@pytest.fixture
def moe(trained_base, tmp_path):
    return moe_adapter_folder(trained_base, tmp_path / "moe", 0.3)


def _prune(folder, text, out, *extra):
    return ["prune", "--adapter", str(folder), "--keep", "0.5", "--calibration", str(text), "--output-dir", str(out),
            "--seq-len", "32", "--max-tokens", "128", "--no-progress", *extra]


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- outputs vs inputs
def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(moe, tmp_path, cli_error):
    base_folder, text, folder = moe
    before = _snapshot(folder)
    err = cli_error(_prune(folder, text, folder, "--overwrite"))
    assert f"--output-dir {folder} is the --adapter folder {folder}: prune would write over what it reads" in err
    err = cli_error(_prune(folder, text, folder / "pruned"))
    assert "lies inside the --adapter folder" in err
    assert _snapshot(folder) == before and not (folder / "pruned").exists()
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(text, out / "calibration.txt")
    err = cli_error(_prune(folder, out / "calibration.txt", out, "--overwrite"))
    assert f"--output-dir {out} holds the --calibration source {out / 'calibration.txt'}" in err
    err = cli_error(["distill", "--adapter", str(folder), "--output-dir", str(base_folder), "--overwrite"])
    assert f"--output-dir {base_folder} is the base model {base_folder}: distill would write over" in err


def test_prune_overwrite_replaces_only_what_prune_wrote(moe, tmp_path):
    _, text, folder = moe
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_prune(folder, text, out, "--overwrite")) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["files"] == ["adapter_config.json", "adapter_model.safetensors", "prune_report.json"]
    assert main(_prune(folder, text, out, "--overwrite", "--keep", "1")) == 0
    assert json.loads((out / "prune_report.json").read_text())["experts_after"] == [4, 4]
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt",
                                                     "prune_report.json"]  # no lock file: the folder is an artifact


def test_the_message_names_the_command_that_would_replace_the_files(moe, tmp_path, cli_error):
    _, text, folder = moe
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    err = cli_error(_prune(folder, text, out))
    assert "already holds files (mine.txt); pass --overwrite to replace what prune wrote there" in err
    err = cli_error(["distill", "--adapter", str(folder), "--output-dir", str(out)])
    assert "what distill wrote there" in err and "export" not in err
    assert (out / "mine.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------- unwritable outputs
def test_an_unwritable_output_is_refused_before_the_work(moe, tmp_path, cli_error):
    """A file where a parent folder should be: no write can succeed there, for root too."""
    _, text, folder = moe
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = blocker / "pruned"
    err = cli_error(_prune(folder, text, out))
    assert f"--output-dir {out} is not writable ({blocker} is a file, not a folder)" in err
    # checked before the calibration text is read (it is missing here, and that is not what is reported)
    err = cli_error(_prune(folder, tmp_path / "missing.txt", out))
    assert "is not writable" in err


def _unshare_available() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


needs_mounts = pytest.mark.skipif(not _unshare_available(), reason="needs `unshare -m` (root or CAP_SYS_ADMIN) "
                                                                   "to mount a tmpfs in a private namespace")


def _in_mount_namespace(mount_options, mount_point, argv):
    """Mount a fresh tmpfs on ``mount_point`` in a private mount namespace, run ``llama-expert argv`` there,
    then list the mount's contents (the mount vanishes with the namespace)."""
    script = ('mount -t tmpfs -o "$1" none "$2" || exit 99; shift 2; "$@"; code=$?; echo "--- contents:"; '
              'ls -A "$MOUNT_POINT"; exit $code')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MOUNT_POINT": str(mount_point)}
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", mount_options, str(mount_point),
                           sys.executable, "-m", "llama_expert.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=300)


@needs_mounts
def test_a_mount_point_works_as_the_output_folder(moe, tmp_path):
    _, text, folder = moe
    mount_point = tmp_path / "mounted"
    mount_point.mkdir()
    done = _in_mount_namespace("rw", mount_point, _prune(folder, text, mount_point))
    assert done.returncode == 0, done.stderr[-3000:]
    contents = done.stdout.split("--- contents:")[1].split()
    assert {"adapter_config.json", "adapter_model.safetensors", "prune_report.json"} <= set(contents)
    assert not [name for name in contents if name.startswith(STAGING_PREFIX)]


@needs_mounts
@pytest.mark.parametrize("where", ["mount point", "inside"])
def test_a_read_only_mount_is_refused_in_one_line(moe, tmp_path, where):
    _, text, folder = moe
    mount_point = tmp_path / "read-only"
    mount_point.mkdir()
    out = mount_point if where == "mount point" else mount_point / "pruned"
    done = _in_mount_namespace("ro", mount_point, _prune(folder, text, out))
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip() == (f"error: --output-dir {out} is not writable ({mount_point}: Read-only file "
                                   f"system); pass a folder you can write to.")


# ---------------------------------------------------------------------------------------------- staging and the lock
def test_stale_staging_of_a_killed_run_is_removed_and_said(moe, tmp_path, capsys):
    """What kill -9 during the write leaves: a hidden staging folder inside the output folder, and the lock file."""
    _, text, folder = moe
    out = tmp_path / "pruned"
    stale = out / f"{STAGING_PREFIX}k1ll3d"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"\0" * 3_000_000)
    (out / LOCK_NAME).write_text("pid 1 on elsewhere")
    capsys.readouterr()
    assert main(_prune(folder, text, out)) == 0
    printed = capsys.readouterr().out
    assert f"removed 1 staging folder(s) (3 MB) that an interrupted run left in {out}" in printed
    assert not list(out.glob(f"{STAGING_PREFIX}*")) and (out / "prune_report.json").is_file()
    assert not (out / LOCK_NAME).exists()  # the killed run's record goes too


def test_a_users_hidden_folder_is_a_file_the_output_holds_and_is_never_deleted(moe, tmp_path, cli_error):
    """Only staging named as this package names it is cleaned up: a user's ``.tmp-*`` folder is theirs."""
    _, text, folder = moe
    out = tmp_path / "pruned"
    mine = out / ".tmp-mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    err = cli_error(_prune(folder, text, out))
    assert "already holds files (.tmp-mine); pass --overwrite to replace what prune wrote there" in err
    assert main(_prune(folder, text, out, "--overwrite")) == 0
    assert (mine / "notes.txt").read_text() == "keep me" and (out / "prune_report.json").is_file()


@pytest.mark.parametrize("holder", ["train", "prune"])
def test_a_second_command_on_a_locked_output_is_refused(moe, tmp_path, cli_error, holder):
    _, text, folder = moe
    out = tmp_path / "pruned"
    with RunLock(out, keep_record=holder == "train"):
        err = cli_error(_prune(folder, text, out))
    assert f"another llama-expert run (pid {os.getpid()}" in err and str(out) in err
    assert not out.exists()  # the lock's holder made the folder and wrote nothing: it leaves nothing
