"""benchmarks/route_after_prefix.py splits the route = domain share at a position: the shares before and after it,
weighted by their tokens, must give `benchmark`'s routing health share over all tokens (counted by another path,
`metrics.routing.measure_expert_usage`), for every domain."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from llama_expert import ExpertConfig, augment_model
from llama_expert.evaluation.benchmark import ExpertModelBenchmark

@pytest.fixture
def script(benchmark_script):
    return benchmark_script("route_after_prefix")


def test_the_shares_before_and_after_the_skip_make_the_routing_health_share(script, trained_base, tmp_path):
    folder, _ = trained_base
    texts = {"math": "Add 12 and 30 to get 42. " * 40, "code": "def f(x):\n    return x + 1\n" * 40,
             "prose": "The river ran north past the old mill. " * 40}
    paths = []
    for name, text in texts.items():
        paths.append(tmp_path / f"{name}.txt")
        paths[-1].write_text(text)
    torch.manual_seed(0)
    model = augment_model(LlamaForCausalLM.from_pretrained(folder), ExpertConfig(num_experts=3, top_k=1)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.normal_(std=1.0)  # decisive, varied routing: some tokens match their domain's index, some not
    bench = ExpertModelBenchmark(model, AutoTokenizer.from_pretrained(folder), dataset=",".join(map(str, paths)),
                                 seq_len=64, max_tokens=256, progress=False)
    skip = 10
    found = script.shares(model, bench, skip)
    layers = bench.routing_health()["layers"]
    assert list(found) == bench.domain_names
    for index, (before, after) in enumerate(found.values()):
        overall = sum(layer["domain_fractions"][index][index] for layer in layers) / len(layers)
        assert (skip * before + (64 - skip) * after) / 64 == pytest.approx(overall, abs=1e-6)
    assert len({round(after, 6) for _, after in found.values()}) > 1  # not a constant: the routing varies
