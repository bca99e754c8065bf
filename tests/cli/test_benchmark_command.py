"""`llama-expert benchmark`: the embedded model end to end (slow), and a missing adapter as a clear error."""

import json

import pytest

from llama_expert.cli import main


@pytest.mark.slow
def test_benchmark_embedded_model_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["benchmark", "--model-path", "smollm2-135m", "--max-tokens", "150", "--seq-len", "64",
               "--batch-size", "2", "--skip-throughput", "--routing-windows", "1", "--output-json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "untrained adapters compute exactly the base model" in printed
    assert "capped by --max-tokens 150" in printed
    report = json.loads(out.read_text())
    ppl = report["perplexity"]
    assert ppl["windows"] == 2 and ppl["seq_len"] == 64 and ppl["tokens_evaluated"] == 2 * 63
    assert ppl["max_tokens"] == 150 and ppl["tokens_in_windows"] == 128
    assert ppl["dataset"] == "embedded" and ppl["split"] == "test"
    assert 1 < ppl["perplexity"] < 100  # the instruct model reads Python's documentation well
    assert report["throughput"] is None
    assert report["model"]["fresh_adapter"] and report["model"]["base_model"] == "smollm2-135m"
    assert len(report["routing_health"]["layers"]) == 30
    # SmolLM2-135M: 30 layers, 3 kv heads of 64 dims, float32
    assert report["memory"]["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 4


def test_missing_adapter_is_a_clear_error(tmp_path, capsys):
    rc = main(["benchmark", "--adapter", str(tmp_path / "no-such-adapter"), "--skip-throughput"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "adapter folder not found" in err and "Traceback" not in err
    assert str(tmp_path / "no-such-adapter") in err


def test_output_json_never_replaces_a_file_unless_asked_and_is_checked_before_loading(chat_folder, tmp_path,
                                                                                      cli_error):
    out = tmp_path / "report.json"
    out.write_text("my earlier report")
    small = ["--skip-throughput", "--max-tokens", "64", "--seq-len", "32", "--routing-windows", "1", "--no-progress"]
    err = cli_error(["benchmark", "--model", str(tmp_path / "no-model"), "--output-json", str(out), *small])
    assert err == f"error: --output-json {out} already exists; pass --overwrite to replace it, or another file."
    assert out.read_text() == "my earlier report"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    err = cli_error(["benchmark", "--model", str(tmp_path / "no-model"), "--output-json", str(blocker / "r.json"),
                     *small])
    assert f"--output-json {blocker / 'r.json'} cannot be written ({blocker} is a file, not a folder)" in err
    assert main(["benchmark", "--model", str(chat_folder), "--output-json", str(out), "--overwrite", *small]) == 0
    assert json.loads(out.read_text())["perplexity"]["seq_len"] == 32
