"""An access token reaches the Hub and nothing else: no file any command writes, no output, no child argv."""

import pytest

from llama_expert.cli import main
from llama_expert.comparison import children, compare as compare_module
from llama_expert.comparison.compare import CompareArguments, run_compare
from llama_expert.integration.loading import ModelArguments
from llama_expert.training.arguments import DataArguments, TrainingArguments

TOKEN = "hf_TESTSECRET123"


def test_no_command_writes_or_prints_the_token(trained_base, tmp_path, capfd):
    """Each command as `llama-expert` runs it (compare's training children included: they share the output)."""
    def _run(*argv):
        assert main([*argv, "--auth-token", TOKEN]) == 0
        out, err = capfd.readouterr()
        assert TOKEN not in out and TOKEN not in err

    base, text = trained_base
    out = tmp_path / "out"
    common = ["--dataset", str(text)]
    _run("train", "--model", str(base), "--output-dir", str(out / "train"), "--max-steps", "2", "--seq-len", "32",
         "--batch-size", "2", "--eval-every", "1", "--eval-max-tokens", "64", "--no-progress", *common)
    _run("benchmark", "--model", str(out / "train"), "--output-json", str(out / "bench.json"), "--skip-throughput",
         "--seq-len", "32", "--max-tokens", "64", "--routing-windows", "1", "--no-progress", *common)
    _run("compare", "--model", str(base), "--output-dir", str(out / "cmp"), "--lora-baseline", "--max-steps", "2",
         "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--eval-seq-len", "32", "--max-tokens", "64",
         "--test-dataset", str(text), "--skip-throughput", "--routing-windows", "1", "--no-progress", *common)
    _run("inference", "--model", str(out / "train"), "--prompt", "The", "--max-new-tokens", "2", "--temperature", "0")
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) > 20  # adapters, checkpoints, logs, summaries, reports, charts
    assert {p.name for p in written} >= {"compare.json", "report.md", "bench.json", "train_log.jsonl",
                                         "training_summary.json", "training_state.json"}
    leaks = [str(p) for p in written if TOKEN.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert "--auth-token ***" in (out / "cmp" / "compare.json").read_text()


def test_compare_hands_the_token_to_its_children_in_memory(monkeypatch, tmp_path):
    """Each training child is spawned by multiprocessing and gets its settings, the token included, through
    multiprocessing's pipe: a spawned child's command line is multiprocessing's own, never the token."""
    seen = []

    class Process:
        def __init__(self, target, name, kwargs):
            seen.append(kwargs)

        def start(self):
            raise SystemExit  # stop after the first child: only what it was handed matters here

    class Spawn:
        def __init__(self, method):
            seen.append(method)
            self.Process = Process

    monkeypatch.setattr(children.multiprocessing, "get_context", Spawn)
    monkeypatch.setattr(compare_module, "_check_measurement", lambda *a: None)
    with pytest.raises(SystemExit):
        run_compare(ModelArguments(model="some-base", auth_token=TOKEN), CompareArguments(output_dir=str(tmp_path)),
                    TrainingArguments(), DataArguments())
    assert seen[0] == "spawn" and seen[1]["auth_token"] == TOKEN and seen[1]["method"].name == "moe"
