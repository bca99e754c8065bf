"""`llama-expert compare` end to end on the tiny trained base: trains MoE and LoRA briefly, measures all three in
one run, and every number in compare.json is checked against a measurement made here, independently; with
`--test-dataset a,b` each domain is measured on its own windows, with the mean of their log-perplexities and the
domain-expert mutual information per layer. Outputs that hold a run or an adapter are never written over."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from llama_expert import load_adapter_weights, load_base_model, load_tokenizer
from llama_expert.cli import main
from llama_expert.evaluation.benchmark import ExpertModelBenchmark
from llama_expert.integration.peft_lora import load_lora_model, matched_lora_rank
from llama_expert.metrics.routing import domain_specialisation

from ..conftest import moe_adapter_folder


def test_compare_with_lora_baseline_matches_independent_measurements(tmp_path, capsys, trained_base):
    folder, text = trained_base
    base, tokenizer = load_base_model(str(folder)), load_tokenizer(str(folder))
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(folder), "--lora-baseline", "--output-dir", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--seq-len", "64", "--eval-every", "0", "--eval-max-tokens", "128",
                 "--eval-seq-len", "64", "--max-tokens", "256", "--num-samples", "1", "--prompt-len", "8",
                 "--new-tokens", "2", "--throughput-batch-sizes", "1", "--routing-windows", "2", "--no-progress",
                 "--dataset", str(text), "--test-dataset", str(text)])
    assert code == 0
    report = json.loads((out / "compare.json").read_text())
    rows = report["results"]
    assert set(rows) == {"base", "moe", "lora"}

    # Perplexity of each model, measured here on the same windows from the adapters compare trained.
    models = {"base": base, "moe": load_adapter_weights(copy.deepcopy(base), out / "moe").eval(),
              "lora": load_lora_model(copy.deepcopy(base), out / "lora").eval()}
    mine = {}
    for name, model in models.items():
        ppl = ExpertModelBenchmark(model, tokenizer, dataset=str(text), split="test", seq_len=64,
                                   max_tokens=256).benchmark_perplexity()
        mine[name] = ppl["perplexity"]
        assert rows[name]["tokens_evaluated"] == ppl["tokens_evaluated"] == 4 * 63
        assert rows[name]["perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-5), name
    assert mine["moe"] != mine["base"] and mine["lora"] != mine["base"]  # both adapters trained
    assert report["winner_perplexity"] == min(("moe", "lora"), key=mine.get)

    # Trainable parameters: what the adapter files hold; LoRA's rank matched to the MoE budget.
    for name in ("moe", "lora"):
        held = sum(t.numel() for t in load_file(str(out / name / "adapter_model.safetensors")).values())
        assert rows[name]["trainable_parameters"] == held, name
    lora_rank = json.loads((out / "lora" / "adapter_config.json").read_text())["r"]
    assert lora_rank == matched_lora_rank(base, rows["moe"]["trainable_parameters"])

    # Training figures come from each child's own summary.
    for name in ("moe", "lora"):
        summary = json.loads((out / name / "training_summary.json").read_text())
        assert rows[name]["training_steps"] == summary["steps"] == 2
        assert rows[name]["training_tokens"] == summary["tokens"] == 2 * 2 * 64
        assert rows[name]["training_peak_memory_bytes"] == summary["peak_memory"]["bytes"]

    # Throughput ratios: each model's tokens/s over the base's, from the same interleaved run.
    detail = report["throughput_detail"]
    for name in ("moe", "lora"):
        row, base_row = rows[name]["throughput"][0], rows["base"]["throughput"][0]
        assert row["decode_tokens_per_s"] == detail[name]["results"][0]["decode_tokens_per_s"]
        assert base_row["decode_tokens_per_s"] == detail["base"]["results"][0]["decode_tokens_per_s"]
        assert row["decode_ratio"] == pytest.approx(row["decode_tokens_per_s"] / base_row["decode_tokens_per_s"])
        assert row["prefill_ratio"] == pytest.approx(row["prefill_tokens_per_s"] / base_row["prefill_tokens_per_s"])

    for name in ("report.md", "perplexity.png", "throughput.png", "memory.png", "expert_usage.png"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    winner = {"moe": "MoE adapters", "lora": "LoRA"}[report["winner_perplexity"]]
    assert f"**Perplexity winner: {winner}**" in text
    assert "| lora |" in capsys.readouterr().out


def test_compare_measures_each_domain_and_their_mean(trained_base, tmp_path, capsys):
    base_folder, train_text = trained_base
    text = tmp_path / "prose.txt"
    text.write_text(train_text.read_text())
    other = tmp_path / "digits.txt"
    other.write_text("0123456789 9876543210 " * 200)
    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(base_folder), "--output-dir", str(out),
                 "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0",
                 "--eval-seq-len", "32", "--max-tokens", "128", "--dataset", str(text),
                 "--test-dataset", f"{text},{other}", "--skip-throughput", "--routing-windows", "2",
                 "--no-progress"])
    assert code == 0
    report = json.loads((out / "compare.json").read_text())
    base = load_base_model(str(base_folder))
    tokenizer = load_tokenizer(str(base_folder))
    moe = load_adapter_weights(copy.deepcopy(base), out / "moe").eval()
    domains = {"prose": str(text), "digits": str(other)}
    for name, model in {"base": base, "moe": moe}.items():
        row = report["results"][name]
        assert list(row["domains"]) == list(domains)
        logs = []
        for domain, source in domains.items():
            ppl = ExpertModelBenchmark(model, tokenizer, dataset=source, seq_len=32, max_tokens=128,
                                       progress=False).benchmark_perplexity()
            assert row["domains"][domain] == pytest.approx(ppl["perplexity"], rel=1e-5), (name, domain)
            logs.append(math.log(ppl["perplexity"]))
        assert row["perplexity"] == pytest.approx(math.exp(sum(logs) / len(logs)), rel=1e-5), name
    assert report["results"]["base"]["domains"]["digits"] != report["results"]["base"]["domains"]["prose"]

    # Routing: per layer the NMI of domain and expert over both domains' first two windows.
    windows = [ExpertModelBenchmark(moe, tokenizer, dataset=s, seq_len=32, max_tokens=128).windows()[:2]
               for s in domains.values()]
    mine = domain_specialisation(moe, torch.cat(windows), torch.tensor([0, 0, 1, 1]), list(domains), progress=False)
    usage = report["expert_usage"]
    assert len(usage) == len(mine) == 2
    for layer, want in zip(usage, mine):
        assert layer["domains"] == list(domains)
        assert layer["domain_expert_nmi"] == pytest.approx(want["nmi"], abs=1e-9)
        assert layer["tokens"] == 4 * 32
    assert (out / "domain_expert_usage.png").is_file()
    markdown = (out / "report.md").read_text()
    assert "| model | trainable params | prose | digits | mean PPL (exp mean log) |" in markdown
    assert "| layer | experts | entropy | min load | max load | NMI |" in markdown
    assert "![domain_expert_usage.png](domain_expert_usage.png)" in markdown
    printed = capsys.readouterr().out
    assert "| prose | digits | mean PPL (exp mean log) |" in printed
    assert "nan" not in printed  # --skip-throughput: no speed columns filled with nan


def _tiny_compare(base_folder, text, out, *extra):
    return ["compare", "--model", str(base_folder), "--output-dir", str(out), "--max-steps", "1", "--seq-len", "32",
            "--batch-size", "2", "--eval-every", "0", "--eval-seq-len", "32", "--max-tokens", "64", "--dataset",
            str(text), "--test-dataset", str(text), "--skip-throughput", "--routing-windows", "1", "--no-progress",
            *extra]


def test_compare_never_retrains_over_a_run_it_was_not_told_to_replace(trained_base, tmp_path, cli_error):
    """`compare --output-dir runs` with the user's own run in runs/moe: refused before anything trains, run intact."""
    base_folder, text = trained_base
    runs = tmp_path / "runs"
    (runs / "moe").mkdir(parents=True)
    (runs / "moe" / "adapter_config.json").write_text('{"mine": true}')
    (runs / "moe" / "train_log.jsonl").write_text("")
    err = cli_error(_tiny_compare(base_folder, text, runs))
    assert err == (f"error: {runs / 'moe'} already holds a run (adapter_config.json, train_log.jsonl), and compare "
                   f"would train its moe adapter there: pass --adapter {runs / 'moe'} to measure that run, "
                   f"--overwrite to retrain it, or another --output-dir.")
    assert (runs / "moe" / "adapter_config.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in runs.iterdir()) == ["moe"]  # nothing trained, nothing measured, nothing written
    (runs / "lora").mkdir()
    (runs / "lora" / "adapter_model.safetensors").write_text("x")
    err = cli_error(_tiny_compare(base_folder, text, tmp_path / "other", "--adapter", str(runs / "moe"),
                                  "--lora-baseline", "--output-dir", str(runs)))
    assert f"{runs / 'lora'} already holds a run (adapter_model.safetensors)" in err and "--lora-adapter" in err


def test_compare_overwrite_retrains_its_child_runs(trained_base, tmp_path):
    base_folder, text = trained_base
    out = tmp_path / "cmp"
    (out / "moe").mkdir(parents=True)
    (out / "moe" / "train_log.jsonl").write_text("an older run's log\n")
    assert main(_tiny_compare(base_folder, text, out, "--overwrite")) == 0
    summary = json.loads((out / "moe" / "training_summary.json").read_text())
    assert summary["steps"] == 1 and "older" not in (out / "moe" / "train_log.jsonl").read_text()


def test_an_unwritable_compare_output_is_refused_before_training(trained_base, tmp_path, cli_error):
    base_folder, text = trained_base
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    err = cli_error(_tiny_compare(base_folder, text, blocker / "cmp"))
    assert err == (f"error: --output-dir {blocker / 'cmp'} is not writable ({blocker} is a file, not a folder); "
                   f"pass a folder you can write to.")


def test_compare_never_writes_its_report_into_an_adapter_it_measures(trained_base, tmp_path, cli_error):
    base_folder, text = trained_base
    run = tmp_path / "runs" / "moe"
    run.mkdir(parents=True)
    (run / "expert_usage.png").write_bytes(b"the training run's chart")
    for out in (run, run / "compare"):
        err = cli_error(_tiny_compare(base_folder, text, out, "--adapter", str(run)))
        assert err == (f"error: --output-dir {out} is or lies inside the adapter folder {run}: compare would write "
                       f"its report over that run's files; pass another --output-dir.")
    assert (run / "expert_usage.png").read_bytes() == b"the training run's chart"


def test_moe_args_are_checked_as_train_checks_them_before_anything_trains(trained_base, tmp_path, cli_error):
    """A router that does not exist, or an init the bank does not support, is one line, before any child trains."""
    base_folder, text = trained_base
    out = tmp_path / "cmp"
    err = cli_error(_tiny_compare(base_folder, text, out, "--moe-args", "--router-type nope"))
    assert err.startswith("error: --moe-args '--router-type nope': argument --router-type: invalid choice: 'nope' "
                          "(choose from ") and "aux_free" in err
    err = cli_error(_tiny_compare(base_folder, text, out, "--moe-args", "--expert-init distinct"))
    assert err == ("error: --expert-type shared_core does not support --expert-init distinct; it supports zero. Its "
                   "experts' cores are random and distinct already; use --expert-init zero.")
    err = cli_error(_tiny_compare(base_folder, text, out, "--moe-args", "--lora-r 'unclosed"))
    assert err.startswith("error: --moe-args \"--lora-r 'unclosed\": No closing quotation;")
    assert not out.exists()  # nothing trained, nothing written


def test_moe_args_with_a_trained_adapter_are_refused(trained_base, tmp_path, cli_error):
    """--adapter measures a trained run: --moe-args would be silently ignored."""
    base_folder, text = trained_base
    run = moe_adapter_folder(trained_base, tmp_path / "moe", 0.3)[2]
    err = cli_error(_tiny_compare(base_folder, text, tmp_path / "cmp", "--adapter", str(run), "--moe-args",
                                  "--lora-r 32"))
    assert err == (f"error: --moe-args sets up the MoE adapter compare trains, and --adapter {run} measures a "
                   f"trained one instead; drop one of them.")


def test_an_earlier_report_is_replaced_only_with_overwrite(trained_base, tmp_path, cli_error):
    """compare.json and report.md of an earlier compare (or the user's own) are refused before anything trains."""
    base_folder, text = trained_base
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "report.md").write_text("my notes")
    err = cli_error(_tiny_compare(base_folder, text, out))
    assert err == (f"error: --output-dir {out} already holds a compare report (report.md); pass --overwrite to "
                   f"replace it, or another --output-dir.")
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]  # nothing trained
    run = moe_adapter_folder(trained_base, tmp_path / "moe", 0.3)[2]
    assert main(_tiny_compare(base_folder, text, out, "--adapter", str(run), "--overwrite")) == 0
    assert (out / "report.md").read_text() != "my notes" and (out / "compare.json").is_file()
    err = cli_error(_tiny_compare(base_folder, text, out, "--adapter", str(run)))  # a rerun needs it too
    assert "already holds a compare report (compare.json, report.md)" in err
