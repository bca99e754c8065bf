"""benchmarks/route_after_prefix.py splits the route = domain share at a position: the shares before and after it,
weighted by their tokens, must give `benchmark`'s routing health share over all tokens (counted by another path,
`metrics.routing.measure_expert_usage`), for every domain."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from llama_expert import ExpertConfig, augment_model
from llama_expert.errors import ConfigError
from llama_expert.evaluation.benchmark import ExpertModelBenchmark
from llama_expert.integration.surgery import adapters, decoder_layers

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


def _prototype_mix(folder):
    """A model routed as a mix routes: by the nearest of three random prototypes, top-1, no null."""
    torch.manual_seed(0)
    model = augment_model(LlamaForCausalLM.from_pretrained(folder),
                          ExpertConfig(num_experts=3, top_k=1, router_type="prototype",
                                       expert_type="lora_experts", expert_allocation="uniform")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(std=0.05)
    return model


def _bench(model, folder, tmp_path):
    """Two domains' windows of 64 tokens."""
    paths = []
    for name, text in {"a": "Add 12 and 30 to get 42. " * 40, "b": "def f(x):\n    return x + 1\n" * 40}.items():
        paths.append(tmp_path / f"{name}.txt")
        paths[-1].write_text(text)
    return ExpertModelBenchmark(model, AutoTokenizer.from_pretrained(folder), dataset=",".join(map(str, paths)),
                                seq_len=64, max_tokens=128, progress=False)


def test_the_raw_rule_is_the_mixs_own_choice_and_a_common_spread_changes_no_rule(script, trained_base, tmp_path):
    folder, _ = trained_base
    model = _prototype_mix(folder)
    bench = _bench(model, folder, tmp_path)
    chosen = script.shares(model, bench, 10)
    assert script.shares(model, bench, 10, "raw") == chosen
    assert len({share for pair in chosen.values() for share in pair}) > 1  # the routing varies
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.spread"):
                p.fill_(2.5)  # the same spread for every expert: dividing by it, or adding its log, ranks alike
    assert script.shares(model, bench, 10, "scaled") == chosen
    assert script.shares(model, bench, 10, "gauss") == chosen


def _distances(model, window: torch.Tensor) -> list:
    """Per layer, [T, E] the squared distance per dimension of each prefix mean of the MLP's input to each prototype,
    taken directly (float64), not from the router's logits."""
    inputs = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0][0].double()))
             for layer in decoder_layers(model)]
    with torch.no_grad():
        model(input_ids=window.view(1, -1), use_cache=False)
    for hook in hooks:
        hook.remove()
    lengths = torch.arange(1, window.numel() + 1, dtype=torch.float64).view(-1, 1)
    return [((hidden.cumsum(0) / lengths)[:, None, :] - adapter.router.weight.detach().double()[None]).pow(2).mean(-1)
            for hidden, (_, adapter) in zip(inputs, adapters(model))]


def _by_hand(model, distances: list, rule: str) -> torch.Tensor:
    """[layers, T] the expert each rule picks."""
    picks = []
    for distance, (_, adapter) in zip(distances, adapters(model)):
        lengths = torch.arange(1, distance.shape[0] + 1, dtype=torch.float64).view(-1, 1)
        spread = adapter.router.spread.detach().double() + adapter.router.spread_slope.detach().double() / lengths
        score = {"raw": distance, "scaled": distance / spread, "gauss": distance / spread + spread.log()}[rule]
        picks.append(score.argmin(-1))
    return torch.stack(picks)


def test_the_rules_pick_what_a_hand_computation_from_the_prefix_means_picks(script, trained_base, tmp_path):
    folder, _ = trained_base
    model = _prototype_mix(folder)
    window = _bench(model, folder, tmp_path).windows()[0]
    distances = _distances(model, window)  # the spreads do not move the routing of a mix without a null
    torch.manual_seed(1)
    with torch.no_grad():
        for distance, (_, adapter) in zip(distances, adapters(model)):
            adapter.router.temperature = 2.0  # the distances come back from logits divided by it
            # spreads of the distances' own size (so that their logs matter beside D / s), each shrinking with the
            # prefix's length at its own rate
            size = distance[-32:].mean(0).float()
            adapter.router.spread.copy_(size * (torch.rand(3) + 0.5))
            adapter.router.spread_slope.copy_(size * torch.rand(3) * 8)
    picks = {rule: _by_hand(model, distances, rule) for rule in ("raw", "scaled", "gauss")}
    assert not torch.equal(picks["raw"], picks["scaled"]) and not torch.equal(picks["scaled"], picks["gauss"])
    for rule, pick in picks.items():
        for expert in range(3):
            assert torch.equal(script.matches(model, window, expert, rule), pick == expert), (rule, expert)


def test_a_wider_spread_draws_more_tokens_under_the_scaled_rule(script, trained_base, tmp_path):
    folder, _ = trained_base
    model = _prototype_mix(folder)
    bench = _bench(model, folder, tmp_path)
    before = script.shares(model, bench, 10, "scaled")["a"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.spread_slope"):
                p[0] = 1e6  # expert 0's text lies far from its prototype at every length: it takes every token
    assert script.shares(model, bench, 10, "scaled")["a"] == (1.0, 1.0) != before


def test_a_rule_asks_for_a_mix(script, trained_base, tmp_path):
    folder, _ = trained_base
    model = augment_model(LlamaForCausalLM.from_pretrained(folder), ExpertConfig(num_experts=3, top_k=1)).eval()
    bench = _bench(model, folder, tmp_path)
    with pytest.raises(ConfigError, match="needs a mix"):
        script.shares(model, bench, 10, "scaled")
