"""Normalised mutual information between domain and chosen expert, against hand-computed values; the expert usage
table; the per-token routing decisions against the routers' own counts."""

import math

import pytest
import torch

from llama_expert.metrics.routing import normalized_mutual_information


def test_independent_domains_and_experts_give_zero():
    assert normalized_mutual_information(torch.tensor([[10.0, 10.0], [5.0, 5.0]])) == pytest.approx(0.0, abs=1e-12)


def test_each_domain_on_its_own_expert_gives_one():
    assert normalized_mutual_information(torch.tensor([[7.0, 0.0], [0.0, 7.0]])) == pytest.approx(1.0)


def test_a_partial_case_by_hand():
    joint = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    p = joint / joint.sum()
    mutual = sum(p[i, j] * math.log(p[i, j] / (0.5 * 0.5)) for i in range(2) for j in range(2))
    assert normalized_mutual_information(joint) == pytest.approx(float(mutual) / math.log(2))


def test_one_domain_or_one_expert_gives_zero():
    assert normalized_mutual_information(torch.tensor([[4.0, 6.0]])) == 0.0
    assert normalized_mutual_information(torch.tensor([[4.0], [6.0]])) == 0.0


def test_expert_usage_reports_the_null_expert_as_a_last_column_named_null(tiny_model, tmp_path):
    """E + 1 counts per layer, the last the null's; the warnings and min/max load concern the experts only; the
    heatmaps draw the null in a column of its own."""
    from llama_expert import ExpertConfig, augment_model
    from llama_expert.integration.surgery import adapters
    from llama_expert.metrics.plots import save_domain_heatmap, save_usage_heatmap
    from llama_expert.metrics.routing import expert_usage_by_domain, routing_health

    augment_model(tiny_model, ExpertConfig(num_experts=4, top_k=1, null_expert=True, router_type="noisy_top_k",
                                           expert_allocation="uniform"))
    first = adapters(tiny_model)[0][1]
    with torch.no_grad():
        first.router.weight[4].mul_(1e4)  # layer 0: the null's logit dominates for about half the tokens
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    usage = expert_usage_by_domain(tiny_model, windows, torch.tensor([0, 0, 1, 1]), ["a", "b"], progress=False)
    for row in usage:
        assert row["experts"] == [str(e) for e in range(row["num_experts"])] + ["null"]
        assert len(row["counts"]) == len(row["fractions"]) == row["num_experts"] + 1
        assert sum(row["counts"]) == 64 and abs(sum(row["fractions"]) - 1) < 1e-9
        assert len(row["domain_fractions"][0]) == row["num_experts"] + 1
    assert 0 < usage[0]["counts"][-1] < 64
    health = routing_health(tiny_model, windows, progress=False)
    layer = health["layers"][0]
    assert layer["max_load"] == max(layer["load"][:4]) and layer["experts"][-1] == "null"
    assert save_usage_heatmap(usage, tmp_path / "usage.png").stat().st_size > 0
    assert save_domain_heatmap(usage, tmp_path / "domains.png").stat().st_size > 0


@pytest.mark.parametrize("router", ["noisy_top_k", "prototype", "sequence_aux_free", "expert_choice"])
def test_token_routing_gives_the_decisions_the_statistics_count(tiny_model, router):
    """Per token and layer, the gates of a sequence's one eval pass: their chosen experts counted are the routers'
    own counts of the same pass (``expert_usage``), each row sums to at most 1, and the recording stops after."""
    from llama_expert import ExpertConfig, augment_model
    from llama_expert.integration.surgery import adapters
    from llama_expert.metrics.routing import expert_usage, recording_routing, token_routing

    augment_model(tiny_model, ExpertConfig(num_experts=4, top_k=2, null_expert=router == "prototype",
                                           router_type=router, expert_allocation="uniform"))
    with torch.no_grad():
        for i, (_, adapter) in enumerate(adapters(tiny_model)):
            adapter.router.weight.copy_(torch.randn(adapter.router.weight.shape,
                                                    generator=torch.Generator().manual_seed(i)))
    ids = torch.randint(0, 100, (40,), generator=torch.Generator().manual_seed(1))
    rows = token_routing(tiny_model.eval(), ids)
    with torch.no_grad(), recording_routing(tiny_model):
        tiny_model(input_ids=ids[None], use_cache=False)
    for row, usage, (_, adapter) in zip(rows, expert_usage(tiny_model), adapters(tiny_model)):
        assert row["gates"].shape == (40, adapter.router.num_experts) and row["null"] == int(router == "prototype")
        assert (row["gates"] > 0).sum(0).tolist() == usage["counts"]
        assert bool((row["gates"].sum(1) <= 1 + 1e-5).all())
        assert adapter.router.decisions is None and not adapter.router.record_statistics  # switched off after
