"""Progress on long work (progress.py): bars on stderr in every long loop (off with progress=False and off a
terminal), the benchmark command's report printed as it is measured, compare's stage lines. A fake terminal stands
in for stderr: an ``isatty`` StringIO. The order of the benchmark's sections: evaluation/test_benchmark.py."""

import copy
import io
import json
import sys

import pytest
import torch

from llama_expert import ExpertConfig, augment_model, save_adapter
from llama_expert.cli import main
from llama_expert.data.packing import tokenize_documents
from llama_expert.comparison.compare import CompareArguments, run_compare
from llama_expert.metrics.perplexity import evaluate_perplexity
from llama_expert.evaluation.reports import format_report
from llama_expert.metrics.routing import measure_expert_usage
from llama_expert.evaluation.throughput import ThroughputArguments, measure_interleaved
from llama_expert.integration.loading import ModelArguments

from .conftest import CharTokenizer

TEXT = "Mixture of experts routes every token to a few small networks.\n" * 12


class Terminal(io.StringIO):
    def isatty(self):
        return True


def fake_terminal(monkeypatch):
    """Replace stderr by a fake terminal and return it, to read what the bars wrote. Called in the test
    body: pytest's output capture sets sys.stderr again between fixture setup and the test."""
    fake = Terminal()
    monkeypatch.setattr(sys, "stderr", fake)
    return fake


@pytest.fixture
def text_folder(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "test.txt").write_text(TEXT)
    return folder


def augmented(model):
    return augment_model(copy.deepcopy(model), ExpertConfig(num_experts=4, top_k=2, expert_allocation="uniform"))


def windows(n=3, seq_len=16):
    return torch.randint(0, 128, (n, seq_len), generator=torch.Generator().manual_seed(0))


def run_every_loop(model, progress):
    evaluate_perplexity(model, windows(3), progress=progress)
    measure_interleaved([model, model], 2, 8, 2, (1, 2), progress)
    measure_expert_usage(model, windows(2), progress=progress)
    tokenize_documents(["ab", "cd"], CharTokenizer(), progress)


def test_progress_false_writes_nothing_even_on_a_terminal(tiny_model, monkeypatch):
    terminal = fake_terminal(monkeypatch)
    run_every_loop(augmented(tiny_model), progress=False)
    assert terminal.getvalue() == ""


def test_no_bars_when_stderr_is_not_a_terminal(tiny_model, monkeypatch):
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    run_every_loop(augmented(tiny_model), progress=True)
    assert pipe.getvalue() == ""


def test_bars_show_each_loop_with_its_total(tiny_model, monkeypatch):
    terminal = fake_terminal(monkeypatch)
    run_every_loop(augmented(tiny_model), progress=True)
    written = terminal.getvalue()
    assert "perplexity:" in written and "| 0/3 [" in written  # windows
    assert "throughput:" in written and "| 0/12 [" in written  # 2 batch sizes x (1 warm-up + 2 repeats) x 2 models
    assert "routing:" in written and "| 0/2 [" in written
    assert "tokenising 6 characters:" in written and "| 0/1 [" in written  # "ab\n\ncd": one tokenizer call


@pytest.mark.parametrize("flags", [["--no-progress"], []])
def test_cli_benchmark_prints_the_report_as_it_goes(tiny_model, text_folder, tmp_path, monkeypatch, capsys, flags):
    terminal = fake_terminal(monkeypatch)
    info = {"base_model": "tiny", "adapter": None, "fresh_adapter": True}
    monkeypatch.setattr("llama_expert.evaluation.benchmark.load_model_and_tokenizer",
                        lambda **kwargs: (augmented(tiny_model), CharTokenizer(), info))
    out = tmp_path / "report.json"
    rc = main(["benchmark", *flags, "--dataset", str(text_folder), "--seq-len", "64", "--max-tokens", "128",
               "--num-samples", "1", "--prompt-len", "8", "--new-tokens", "2", "--throughput-batch-sizes", "1",
               "--routing-windows", "1", "--output-json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    # printed piece by piece, the sections add up to exactly the full report
    assert capsys.readouterr().out == format_report(report, info) + f"\n\nwrote {out}\n"
    if flags:
        assert terminal.getvalue() == ""
    else:
        assert "perplexity:" in terminal.getvalue() and "throughput:" in terminal.getvalue()


def test_cli_benchmark_help_names_no_progress(capsys):
    with pytest.raises(SystemExit):
        main(["benchmark", "--help"])
    assert "--no-progress" in capsys.readouterr().out


@pytest.mark.parametrize("progress", [False, True])
def test_compare_prints_each_stage(tiny_model, tiny_folder, text_folder, tmp_path, monkeypatch, capsys, progress):
    terminal = fake_terminal(monkeypatch)
    adapter = save_adapter(augmented(tiny_model), tmp_path / "moe", base_model_name_or_path=str(tiny_folder))
    monkeypatch.setattr("llama_expert.comparison.compare.load_tokenizer", lambda *args, **kwargs: CharTokenizer())
    run_compare(ModelArguments(model=str(tiny_folder), adapter=str(adapter)),
                CompareArguments(output_dir=str(tmp_path / "cmp"), test_dataset=str(text_folder), eval_seq_len=64,
                                 max_tokens=128, routing_windows=1, progress=progress),
                throughput_args=ThroughputArguments(num_samples=1, prompt_len=8, new_tokens=2,
                                                    throughput_batch_sizes=[1]))
    printed = capsys.readouterr().out
    stages = ["[base] perplexity", "[moe] perplexity", "[base, moe] throughput, repeats interleaved",
              "[moe] expert usage"]
    positions = [printed.index(f"{stage} ...\n") for stage in stages]
    assert positions == sorted(positions)
    assert all(f"{stage}: done in " in printed for stage in stages)
    # compare's bars, or none (Transformers draws its own "Loading weights" bar, not ours to switch off)
    ours = [bar in terminal.getvalue() for bar in ("tokenising", "perplexity:", "throughput:", "routing:")]
    assert ours == [progress] * 4
