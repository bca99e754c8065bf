"""OracleRouter: each sequence's tokens go to its domain's group of experts, d*E//D .. (d+1)*E//D - 1, with gate 1
spread evenly; it counts only those experts, has nothing to learn, and refuses a pass without good labels."""

import re

import pytest
import torch

from llama_expert import ExpertConfig
from llama_expert.errors import ConfigError
from llama_expert.modeling import MoEAdapter, TokenMask
from llama_expert.modeling.routing import OracleRouter

HIDDEN = 8


def _context(labels, mask=None):
    context = TokenMask()
    context.set(mask)
    context.domain_labels = labels
    return context


@pytest.mark.parametrize("experts,domains,groups", [(4, 2, [[0, 1], [2, 3]]), (5, 2, [[0, 1], [2, 3, 4]]),
                                                   (4, 3, [[0], [1], [2, 3]]), (3, 3, [[0], [1], [2]])])
def test_every_token_of_a_sequence_uses_its_domains_group(experts, domains, groups):
    router = OracleRouter(experts, domains)
    assert router.top_k == max(len(g) for g in groups)
    labels = torch.arange(domains).flip(0)
    with torch.no_grad():
        routing = router.route_sequences(torch.randn(domains, 4, HIDDEN), _context(labels))
    gates = routing.gates.view(domains, 4, experts)
    for row, label in enumerate(labels.tolist()):
        want = torch.tensor([1 / len(groups[label]) if e in groups[label] else 0.0 for e in range(experts)])
        assert torch.equal(gates[row], want.expand(4, -1))
    assert torch.equal(routing.indices, torch.arange(experts).expand(domains * 4, -1))


def test_statistics_count_the_group_and_padding_counts_nothing():
    router = OracleRouter(4, 2)
    router.record_statistics = True
    mask = torch.tensor([[False, True, True], [True, True, True]])
    with torch.no_grad():
        router.route_sequences(torch.randn(2, 3, HIDDEN), _context(torch.tensor([1, 0]), mask))
    assert router.expert_counts.tolist() == [3, 3, 2, 2] and float(router.tokens_seen) == 5


def test_nothing_to_learn_and_zero_losses():
    adapter = MoEAdapter(torch.nn.Linear(HIDDEN, HIDDEN), HIDDEN, 4,
                         ExpertConfig(router_type="oracle", num_experts=4, router_init_scale=1.0, lora_r=2))
    assert list(adapter.router.parameters()) == []
    adapter.token_mask.domain_labels = 0
    adapter.train()(torch.randn(1, 3, HIDDEN))
    assert adapter.aux_loss.item() == 0.0 and adapter.z_loss.item() == 0.0


@pytest.mark.parametrize("labels,message", [
    (None, re.escape("routes each sequence by its domain label, and this forward pass has none: run it inside "
                     "`with llama_expert.domain_labels(model, labels):`")),
    (torch.tensor([0, 1, 0]), r"got \(3,\) torch.int64 labels for a batch of 2 sequences"),
    (torch.tensor([0.0, 1.0]), "give one integer domain index per sequence"),
    (torch.tensor([0, 2]), r"domain label 2 is outside 0..1 \(--oracle-domains 2\)"),
])
def test_a_pass_without_good_labels_is_refused(labels, message):
    router = OracleRouter(4, 2)
    with pytest.raises(ConfigError, match=message):
        router.route_sequences(torch.randn(2, 3, HIDDEN), _context(labels))


def test_more_domains_than_experts_is_refused():
    with pytest.raises(ConfigError, match="--oracle-domains 3 domains its own experts, but a layer has only 2"):
        OracleRouter(2, 3)


def test_a_null_expert_is_refused_in_one_line():
    """The label decides the group, so the oracle never has a choice to give a null expert."""
    config = ExpertConfig(router_type="oracle", oracle_domains=2, num_experts=4, null_expert=True)
    with pytest.raises(ConfigError, match="never chooses a null expert: drop --null-expert"):
        MoEAdapter(torch.nn.Identity(), HIDDEN, 4, config)
