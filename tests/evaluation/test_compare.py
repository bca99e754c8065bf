"""`compare` end to end on the embedded model: trains MoE and LoRA briefly, measures all three in one run."""

import json

import pytest

from llama_expert.cli import main
from llama_expert.training.lora import lora_parameters_per_rank, matched_lora_rank


def test_matched_lora_rank_is_closest_to_the_budget(tiny_model):
    per_rank = lora_parameters_per_rank(tiny_model)
    assert per_rank == 4 * (2 * (64 + 128) + (128 + 64))  # gate, up: 64->128; down: 128->64; 4 layers
    assert matched_lora_rank(tiny_model, 3 * per_rank + 10) == 3
    assert matched_lora_rank(tiny_model, 1) == 1


@pytest.mark.slow
def test_compare_with_lora_baseline_writes_report_and_charts(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--lora-baseline", "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--seq-len", "64", "--eval-every", "0", "--eval-max-tokens", "128", "--eval-seq-len", "64",
                 "--max-tokens", "256", "--num-samples", "1", "--prompt-len", "8", "--new-tokens", "2",
                 "--throughput-batch-sizes", "1", "--routing-windows", "2"])
    assert code == 0
    report = json.loads((out / "compare.json").read_text())
    rows = report["results"]
    assert set(rows) == {"base", "moe", "lora"}
    assert rows["base"]["tokens_evaluated"] == rows["moe"]["tokens_evaluated"] == rows["lora"]["tokens_evaluated"]
    assert rows["moe"]["training_steps"] == rows["lora"]["training_steps"] == 2
    budget = rows["moe"]["trainable_parameters"]
    assert abs(rows["lora"]["trainable_parameters"] - budget) / budget < 0.15  # matched budget
    assert rows["base"]["throughput"][0]["decode_ratio"] == pytest.approx(1.0)
    assert rows["moe"]["training_peak_memory_bytes"] > 0
    assert report["winner_perplexity"] in ("moe", "lora")
    for name in ("report.md", "perplexity.png", "throughput.png", "memory.png", "expert_usage.png"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    assert "Perplexity winner" in text and "| moe |" in text
    assert "| lora |" in capsys.readouterr().out
