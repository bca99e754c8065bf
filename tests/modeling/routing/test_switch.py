"""SwitchRouter: top-1 whatever top_k says, the gate is the chosen expert's probability, capacity drops exactly
the overflow tokens in training (padding aside, never at eval), jitter in training only."""

import torch

from llama_expert import ExpertConfig
from llama_expert.modeling.routing import ROUTERS, SwitchRouter

HIDDEN = 8


def _one_hot_router(num_experts, **kw):
    """A switch router whose logit j is hidden[j]: a token's expert is set by its hidden state."""
    router = SwitchRouter(HIDDEN, num_experts, **kw)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts, HIDDEN) * 5.0)
    return router


def _tokens_for(experts):
    hidden = torch.zeros(len(experts), HIDDEN)
    hidden[torch.arange(len(experts)), torch.tensor(experts)] = 1.0
    return hidden


def test_switch_is_top_1_whatever_top_k_says():
    router = ROUTERS.get("switch").from_config(HIDDEN, 4, ExpertConfig(num_experts=4, top_k=3))
    assert router.top_k == 1
    routing = router.eval()(torch.randn(10, HIDDEN))
    assert routing.indices.shape == routing.gates.shape == (10, 1)


def test_switch_gate_is_the_softmax_probability_of_the_chosen_expert():
    router = SwitchRouter(HIDDEN, 4).eval()
    torch.nn.init.normal_(router.weight)
    routing = router(torch.randn(12, HIDDEN))
    probs = torch.softmax(routing.logits, -1)
    torch.testing.assert_close(routing.gates[:, 0], probs.gather(1, routing.indices)[:, 0])
    assert bool((routing.gates < 1).all())  # not renormalised to 1: the Switch scaling p_i


def test_switch_capacity_drops_exactly_the_overflow_tokens_in_training():
    chosen = [0, 0, 0, 1, 0, 2, 1, 1]  # 8 tokens, 4 experts, capacity_factor 1: capacity ceil(8 / 4) = 2
    router = _one_hot_router(4, jitter=0.0, capacity_factor=1.0).train()
    routing = router(_tokens_for(chosen))
    assert routing.indices[:, 0].tolist() == chosen
    dropped = (routing.gates[:, 0] == 0).nonzero()[:, 0].tolist()
    assert dropped == [2, 4, 7]  # expert 0's third and fourth token, expert 1's third
    assert bool((routing.gates[[0, 1, 3, 5, 6], 0] > 0).all())


def test_switch_capacity_ignores_padding():
    chosen = [0, 0, 0, 1, 0, 2, 1, 1]
    mask = torch.tensor([False, True, True, True, True, True, True, True])  # 7 tokens: capacity ceil(7 / 4) = 2
    router = _one_hot_router(4, jitter=0.0, capacity_factor=1.0).train()
    routing = router(_tokens_for(chosen), mask)
    assert (routing.gates[:, 0] == 0).nonzero()[:, 0].tolist() == [4, 7]


def test_switch_capacity_is_not_applied_at_eval():
    router = _one_hot_router(4, jitter=0.0, capacity_factor=1.0).eval()
    routing = router(_tokens_for([0, 0, 0, 1, 0, 2, 1, 1]))
    assert bool((routing.gates > 0).all())


def test_switch_jitter_only_in_training():
    torch.manual_seed(0)
    router = SwitchRouter(HIDDEN, 4, jitter=0.5)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(64, HIDDEN)
    router.eval()
    first, second = router(hidden), router(hidden)
    assert torch.equal(first.gates, second.gates) and torch.equal(first.indices, second.indices)
    assert torch.equal(first.indices[:, 0], first.logits.argmax(-1))
    router.train()
    noisy = router(hidden)
    torch.testing.assert_close(noisy.logits, first.logits)  # Routing.logits stay the clean ones
    assert not torch.allclose(noisy.gates, first.gates)
    router.jitter = 0.0
    clean = router(hidden)
    torch.testing.assert_close(clean.gates, first.gates)


def test_switch_losses_in_training():
    router = SwitchRouter(HIDDEN, 4).train()
    router(torch.randn(16, HIDDEN))
    assert router.aux_loss is not None and router.z_loss is not None
    assert router.aux_loss.item() >= 1.0 - 1e-6
