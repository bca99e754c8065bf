"""Nothing executed, nothing leaked, nothing lost: the failures a new user's probe found, each pinned.

A tiny Llama with a byte-level tokenizer, saved as a local base folder (``trained_base`` in conftest),
keeps every run here to seconds; the recipe (``fine_tune``) is the same code path as ``llama-expert train``.
"""

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_expert import ConfigError, ExpertConfig, TrainingArguments
from llama_expert.errors import LlamaExpertError
from llama_expert.files import STAGING_PREFIX
from llama_expert.training.arguments import DataArguments
from llama_expert.training.checkpoints import CheckpointError, load_training_state
from llama_expert.training.methods import MoEMethod
from llama_expert.training.recipe import fine_tune
from llama_expert.training.run_folder import LOCK_NAME, OutputFolderLocked, RunLock

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def base(trained_base):
    return trained_base


def _args(out, **kw):
    settings = dict(output_dir=str(out), max_steps=3, batch_size=2, seq_len=32, eval_every=1, eval_max_tokens=256,
                    save_every=1, progress=False, mixed_precision="no", learning_rate=1e-2)
    settings.update(kw)
    return TrainingArguments(**settings)


def _train(base, out, config=None, **kw):
    folder, text = base
    return fine_tune(MoEMethod(config or ExpertConfig(num_experts=4)), _args(out, **kw), DataArguments(dataset=str(text)),
                     model_id=str(folder))


def _cli(*argv, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llama_expert.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _cli_train(base, out, *extra):
    folder, text = base
    return ["train", "--model", str(folder), "--dataset", str(text), "--output-dir", str(out), "--seq-len", "32",
            "--batch-size", "2", "--eval-every", "0", "--save-every", "1", "--no-progress", "--mixed-precision", "no",
            "--num-experts", "4", *extra]


# ---------------------------------------------------------------------------------------------- 1 security
class Exploit:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("where", ["training_state.pt", "training_state.safetensors"])
def test_a_malicious_pickle_as_the_state_file_is_refused_and_runs_nothing(base, tmp_path, where):
    out = tmp_path / "run"
    _train(base, out, max_steps=2)
    marker = tmp_path / "pwned"
    last = out / "checkpoints" / "last"
    if where == "training_state.pt":  # an attacker's folder in the old format: a pickle only
        for name in ("training_state.json", "training_state.safetensors"):
            (last / name).unlink()
    shutil.rmtree(out / "checkpoints" / "best")
    (last / where).write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(CheckpointError) as info:
        _train(base, out, max_steps=4, resume=True)
    assert not marker.exists()
    assert ("no longer loads" in str(info.value)) if where.endswith(".pt") else "cannot be read" in str(info.value)


# ---------------------------------------------------------------------------------------------- 3 modes
def test_written_files_get_the_users_usual_mode(base, tmp_path):
    """Not tempfile's 0600/0700: the mode every other file of the user gets (umask read at import)."""
    from llama_expert.files import UMASK

    out = tmp_path / "run"
    _train(base, out, max_steps=1)
    (tmp_path / "plain").write_text("x")
    (tmp_path / "plain-dir").mkdir()
    file_mode, dir_mode = (tmp_path / "plain").stat().st_mode & 0o777, (tmp_path / "plain-dir").stat().st_mode & 0o777
    assert file_mode == 0o666 & ~UMASK and dir_mode == 0o777 & ~UMASK
    for path in [out / "adapter_model.safetensors", out / "adapter_config.json", out / "training_summary.json",
                 out / "checkpoints" / "last" / "training_state.json"]:
        assert oct(path.stat().st_mode & 0o777) == oct(file_mode), path
    assert oct((out / "checkpoints" / "last").stat().st_mode & 0o777) == oct(dir_mode)


# ---------------------------------------------------------------------------------------------- 4 overwrite
def test_a_folder_with_files_is_refused_without_resume_or_overwrite(base, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"already holds files \(notes.txt\); pass --resume .* --overwrite"):
        _train(base, out)
    _train(base, out, max_steps=1, overwrite=True)
    first = load_file(str(out / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match="already holds files"):
        _train(base, out, max_steps=1)
    _train(base, out, max_steps=2, overwrite=True, learning_rate=5e-2)
    assert (out / "notes.txt").read_text() == "mine"  # never touch what the project did not write
    assert not torch.equal(first["model.layers.0.mlp.experts.up"], load_file(str(out / "adapter_model.safetensors"))[
        "model.layers.0.mlp.experts.up"])
    new_log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in new_log].count("start") == 1  # the old log was replaced, not appended to
    assert max(r["step"] for r in new_log) == 2


def test_resume_and_overwrite_together_are_refused(base, tmp_path):
    with pytest.raises(ConfigError, match="pass one of them"):
        _train(base, tmp_path / "run", resume=True, overwrite=True)


def test_resume_without_a_checkpoint_is_refused_in_one_line(base, tmp_path, cli_error):
    """Not a new run from step 0 that exits 0: the user asked to continue something that is not there."""
    out = tmp_path / "run"
    err = cli_error(_cli_train(base, out, "--max-steps", "1", "--resume"))
    assert err == (f"error: --resume: there is no checkpoint in {out / 'checkpoints'}; drop --resume to start a new "
                   f"run there, or pass the --output-dir of the run to continue.")
    assert not out.exists()
    out.mkdir()
    (out / "train_log.jsonl").write_text("")  # a run that never reached its first checkpoint
    with pytest.raises(ConfigError, match="there is no checkpoint in"):
        _train(base, out, resume=True)


def test_a_run_that_fails_before_writing_leaves_no_folder_it_made(base, tmp_path):
    folder, _ = base
    out = tmp_path / "new" / "runs" / "run"
    with pytest.raises(LlamaExpertError, match="missing.txt"):
        fine_tune(MoEMethod(), _args(out), DataArguments(dataset=str(tmp_path / "missing.txt")), model_id=str(folder))
    assert not (tmp_path / "new").exists()  # no lock-only folder, and none of the folders above it
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(LlamaExpertError, match="missing.txt"):
        fine_tune(MoEMethod(), _args(mine), DataArguments(dataset=str(tmp_path / "missing.txt")), model_id=str(folder))
    assert mine.is_dir() and not list(mine.iterdir())  # the user's folder stays, as empty as it was


# ---------------------------------------------------------------------------------------------- 5 lock
def test_a_second_run_on_the_same_folder_is_refused_and_the_first_survives(base, tmp_path):
    out = tmp_path / "run"
    first = _cli(*_cli_train(base, out, "--max-steps", "60"))
    try:
        deadline = time.time() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.time() < deadline
            time.sleep(0.1)
        second = _cli(*_cli_train(base, out, "--max-steps", "2", "--resume"))
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1
        assert f"another llama-expert run (pid {first.pid}" in err and err.count("\n") == 1, err
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    with RunLock(out):  # released at the end of the run
        pass
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 60  # the first run's adapter and summary, untouched by the second
    events = [json.loads(line).get("event") for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and "resume" not in events  # one run's log, not two interleaved


def test_the_lock_of_a_killed_run_is_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from llama_expert.training.run_folder "
                               "import RunLock; lock = RunLock(sys.argv[1]).__enter__(); print('held', flush=True); "
                               "time.sleep(600)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputFolderLocked, match=f"pid {holder.pid} on"):
            RunLock(tmp_path).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path):  # the kernel released the lock with the process: nothing stale to clean
        with pytest.raises(OutputFolderLocked, match=f"pid {os.getpid()} on"):
            RunLock(tmp_path).__enter__()


# ---------------------------------------------------------------------------------------------- 6 NaN
@pytest.mark.parametrize("rate", [float("inf"), float("nan"), 0.0, -1e-3])
def test_a_learning_rate_that_cannot_work_is_refused_before_loading(rate, tmp_path):
    with pytest.raises(ConfigError, match="--learning-rate must be"):
        fine_tune(MoEMethod(), _args(tmp_path / "run", learning_rate=rate), model_id="/nonexistent/model")


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0."),
    (["--epochs", "0"], "--epochs must be > 0, got 0.0."),
    (["--gradient-accumulation", "0"], "--gradient-accumulation must be >= 1, got 0."),
    (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1), got 1.0."),
    (["--test-seq-len", "1"], "--test-seq-len must be an integer >= 2 (or unset), got 1."),
    (["--lora-r", "0"], "--lora-r must be a positive integer (the rank of the experts), got 0."),
    (["--dynamic-interval", "0"], "--dynamic-interval must be an integer >= 1, got 0."),
])
def test_validation_messages_name_the_flag_not_the_field(flags, message, tmp_path, cli_error):
    err = cli_error(["train", "--output-dir", str(tmp_path / "run"), *flags])
    assert err.startswith(f"error: {message}"), err


@pytest.mark.parametrize("flag", ["--router-type", "--expert-type", "--expert-allocation"])
def test_strategy_names_are_the_registries_choices(flag, capsys):
    """An unknown router, bank or allocation is refused by the parser, which lists the registered names."""
    from llama_expert.cli import main
    from llama_expert.modeling import ALLOCATIONS, EXPERT_BANKS, ROUTERS

    registry = {"--router-type": ROUTERS, "--expert-type": EXPERT_BANKS, "--expert-allocation": ALLOCATIONS}[flag]
    with pytest.raises(SystemExit) as info:
        main(["train", flag, "nope"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument {flag}: invalid choice: 'nope'" in err
    assert all(name in err for name in registry.names())


def test_diverging_training_never_saves_nan_weights_and_keeps_the_step_0_best(base, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(LlamaExpertError, match="NaN/inf|became"):
        _train(base, out, learning_rate=1e30, max_steps=5)
    for name in ("last", "best"):
        folder = out / "checkpoints" / name
        if folder.exists():
            weights = load_file(str(folder / "adapter_model.safetensors"))
            assert all(bool(torch.isfinite(t).all()) for t in weights.values()), name
    state = load_training_state(out / "checkpoints" / "best")
    assert state["best"]["step"] == 0  # the untrained adapter was the best one seen
    for line in (out / "train_log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c} in the log"))


def test_the_untrained_adapter_is_a_best_candidate(base, tmp_path):
    out = tmp_path / "run"
    result = _train(base, out, learning_rate=1000.0, max_steps=3)  # far too large: every step makes it worse
    assert min(h["perplexity"] for h in result.history) > result.initial_eval["perplexity"]
    assert result.best_eval["step"] == 0
    assert load_training_state(out / "checkpoints" / "best")["step"] == 0


# ---------------------------------------------------------------------------------------------- 7 resume
@pytest.mark.parametrize("change, words", [
    ({"config": ExpertConfig(num_experts=4, top_k=1)}, ["top_k: checkpoint 2, now 1"]),
    ({"config": ExpertConfig(num_experts=4, lora_alpha=8.0)}, ["lora_alpha: checkpoint 32.0, now 8.0"]),
    ({"learning_rate": 2e-2}, ["learning_rate: checkpoint 0.01, now 0.02"]),
    ({"config": ExpertConfig(num_experts=6)}, ["num_experts: checkpoint 4, now 6"]),
])
def test_resume_with_other_settings_lists_the_differences(base, tmp_path, change, words):
    out = tmp_path / "run"
    _train(base, out, max_steps=4, stop_after_steps=2)
    with pytest.raises(ConfigError) as info:
        _train(base, out, max_steps=4, resume=True, **change)
    for word in words + ["Rerun with the checkpoint's settings, or train in a new --output-dir"]:
        assert word in str(info.value)


# ---------------------------------------------------------------------------------------------- 8 signals
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_step_and_prints_the_resume_command(base, tmp_path, signum):
    out = tmp_path / "run"
    proc = _cli(*_cli_train(base, out, "--max-steps", "100000"))
    deadline = time.time() + 120
    while not (out / "checkpoints" / "last").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped training after step" in err and "--resume" in err.splitlines()[-1]
    state = load_training_state(out / "checkpoints" / "last")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "interrupted" and log[-1]["step"] == state["step"]
    resumed = _cli(*_cli_train(base, out, "--max-steps", "100000", "--resume", "--stop-after-steps", "1"))
    out_text, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"resumed from {out / 'checkpoints' / 'last'} at step {state['step']}" in out_text


# ---------------------------------------------------------------------------------------------- 9 corrupt
def test_a_corrupt_last_checkpoint_falls_back_with_a_warning(base, tmp_path, capsys):
    out = tmp_path / "run"
    _train(base, out, max_steps=4, stop_after_steps=3, eval_every=2)
    state_file = out / "checkpoints" / "last" / "training_state.safetensors"
    state_file.write_bytes(state_file.read_bytes()[:100])  # truncated
    stale = out / "checkpoints" / f"{STAGING_PREFIX}last-abc123"
    legacy = out / "checkpoints" / ".tmp-last-abc123"  # where older versions staged a checkpoint
    stale.mkdir()
    legacy.mkdir()
    result = _train(base, out, max_steps=4, eval_every=2, resume=True)
    printed = capsys.readouterr().out
    assert "cannot be read" in printed and "trying an older checkpoint" in printed
    assert "resumed from" in printed and str(out / "checkpoints" / "best") in printed
    assert result.steps == 4 and not stale.exists() and not legacy.exists()
    events = [json.loads(line).get("event") for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("resume") == 1


def test_no_readable_checkpoint_says_what_to_delete(base, tmp_path):
    out = tmp_path / "run"
    _train(base, out, max_steps=2)
    for name in ("last", "best"):
        (out / "checkpoints" / name / "training_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"Delete that folder to start again from step 0"):
        _train(base, out, max_steps=4, resume=True)


# ---------------------------------------------------------------------------------------------- 10 folders
def test_an_unwritable_output_folder_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="is not writable"):
        fine_tune(MoEMethod(), _args("/sys/llama-expert-test/run"), model_id="/nonexistent/model")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        fine_tune(MoEMethod(), _args(tmp_path / "file"), model_id="/nonexistent/model")


def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error(base, tmp_path, monkeypatch):
    import errno

    from llama_expert.training import trainer

    def full(folder, fill):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(trainer, "write_checkpoint", full)
    with pytest.raises(LlamaExpertError, match=r"cannot write the checkpoint .*No space left on device.*--resume"):
        _train(base, tmp_path / "run", max_steps=2)


# ---------------------------------------------------------------------------------------------- 14 context
def test_seq_len_above_the_context_is_refused_before_the_data_loads(base, tmp_path):
    folder, _ = base
    with pytest.raises(ConfigError, match=r"--seq-len 1024 exceeds the model's context of 128 tokens"):
        fine_tune(MoEMethod(), _args(tmp_path / "run", seq_len=1024, eval_max_tokens=2048),
                  DataArguments(dataset="/nonexistent.txt"),
                  model_id=str(folder))


def test_a_single_training_file_never_trains_on_its_validation_tail(base):
    from llama_expert.training.recipe import RecipeData

    folder, text = base
    lines = [f"line {i:04d} " + "x" * 40 + "\n" for i in range(400)]
    text.parent.joinpath("numbered.txt").write_text("".join(lines))
    from llama_expert import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    data = RecipeData(tokenizer, DataArguments(dataset=str(text.parent / "numbered.txt")), seq_len=16,
                      max_samples=None, eval_max_tokens=None, progress=False)
    def line_numbers(blocks):
        return {int(w) for w in tokenizer.decode(blocks.reshape(-1).tolist()).split() if w.isdigit()}

    trained, validated = line_numbers(data.train), line_numbers(data.eval)
    assert validated and max(trained) < min(validated) and min(validated) >= 380  # the last 5% of 400 lines


def test_a_mixture_trains_equal_tokens_per_domain_and_reports_each(base, tmp_path, capsys):
    from llama_expert.training.recipe import RecipeData
    from llama_expert import load_tokenizer

    folder, text = base
    (tmp_path / "math.jsonl").write_text("".join(f'{{"question": "What is {i} plus {i}?", "answer": "{2 * i}"}}\n'
                                                 for i in range(300)))
    (tmp_path / "prose.txt").write_text(text.read_text())
    spec = f"{tmp_path / 'math.jsonl'},{tmp_path / 'prose.txt'}"
    data = RecipeData(load_tokenizer(str(folder)), DataArguments(dataset=spec, test_dataset=spec), seq_len=32,
                      max_samples=None, eval_max_tokens=512, progress=False)
    assert data.names == ["math", "prose"]
    assert (data.domains == 0).sum() == (data.domains == 1).sum() > 0
    assert set(data.eval_domains.tolist()) == {0, 1} and set(data.tests) == {"math", "prose"}
    out = tmp_path / "run"
    result = fine_tune(MoEMethod(ExpertConfig(num_experts=4)), _args(out, max_steps=2, eval_max_tokens=512),
                       DataArguments(dataset=spec, test_dataset=spec), model_id=str(folder))
    domains = result.test["after"]["domains"]
    assert set(domains) == {"math", "prose"}
    expected = math.exp((domains["math"]["nll"] + domains["prose"]["nll"]) / 2)
    assert result.test["after"]["perplexity"] == pytest.approx(expected)
    printed = capsys.readouterr().out
    assert "mean test perplexity (exp of mean log)" in printed and "  math: " in printed
    usage = json.loads((out / "expert_usage.json").read_text())
    assert all(0.0 <= row["domain_expert_nmi"] <= 1.0 and row["domains"] == ["math", "prose"] for row in usage)
    assert (out / "domain_expert_usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_settings_a_checkpoint_predates_do_not_block_resume():
    from llama_expert.training.resume import settings_changes

    saved = {"learning_rate": 1e-3, "expert_config": {"top_k": 2}}
    now = {"learning_rate": 1e-3, "expert_config": {"top_k": 2, "router_jitter": 0.01}, "output_dir": "x"}
    assert settings_changes(saved, now) == []
    assert settings_changes(saved, {**now, "expert_config": {"top_k": 1}}) == ["top_k: checkpoint 2, now 1"]


@pytest.mark.parametrize("older, multiplier", [("one tensor fewer", 1.0), ("one tensor fewer", 4.0),
                                               ("other shapes", 1.0)])
def test_an_optimiser_state_of_other_parameters_is_refused_with_a_way_on(base, tmp_path, older, multiplier):
    """A checkpoint written by a version whose adapter had other parameters (format 4 added ``null_slope``): one
    line naming the misfit and the way on, not torch's bare ValueError or a failure at the first step; the way on
    (the same command with --init-adapter in place of the expert flags) then trains. A router learning-rate
    multiplier puts the routers in a group of their own."""
    from llama_expert.training.checkpoints import save_training_state

    out = tmp_path / "run"
    config = ExpertConfig(num_experts=4, router_lr_multiplier=multiplier)
    _train(base, out, config, max_steps=4, stop_after_steps=2)
    last = out / "checkpoints" / "last"
    state = load_training_state(last)
    optimizer = state["optimizer"]
    assert len(optimizer["param_groups"]) == (2 if multiplier != 1.0 else 1)
    if older == "one tensor fewer":
        dropped = optimizer["param_groups"][-1]["params"].pop()
        optimizer["state"].pop(dropped, None)
        misfit = "trained tensors in groups of"
    else:
        index, moments = next((i, m) for i, m in optimizer["state"].items() if m["exp_avg"].dim() == 2)
        moments["exp_avg"] = moments["exp_avg"][:, :1].contiguous()
        moments["exp_avg_sq"] = moments["exp_avg_sq"][:, :1].contiguous()
        misfit = f"its exp_avg of tensor {index} is [{moments['exp_avg'].shape[0]}, 1]"
    save_training_state(last, state)
    with pytest.raises(ConfigError) as info:
        _train(base, out, config, max_steps=4, resume=True)
    message = str(info.value)
    assert "does not fit the tensors this run trains" in message and misfit in message and "\n" not in message
    assert f"--init-adapter {last} in place of the expert flags" in message
    folder, text = base
    again = _cli("train", "--model", str(folder), "--dataset", str(text), "--output-dir", str(tmp_path / "again"),
                 "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--no-progress", "--mixed-precision",
                 "no", "--max-steps", "1", "--init-adapter", str(last))
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
