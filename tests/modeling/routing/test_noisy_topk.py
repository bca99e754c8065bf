"""NoisyTopKGating: exactly k distinct experts per token, gated by the softmax of their logits, its losses under a
padding mask, and noise in training only."""

import pytest
import torch

from llama_expert import NoisyTopKGating, load_balancing_loss, router_z_loss

from .helpers import EXPERTS, HIDDEN, TOP_K


def test_top_k_larger_than_experts_rejected():
    with pytest.raises(ValueError):
        NoisyTopKGating(HIDDEN, 2, 3)


def test_exactly_k_distinct_experts_per_token(router, hidden):
    for mode in (router.eval, router.train):
        mode()
        r = router(hidden)
        assert r.indices.shape == (40, TOP_K)
        assert r.indices.dtype == torch.long
        assert all(len(set(row.tolist())) == TOP_K for row in r.indices)
        assert int(r.indices.min()) >= 0 and int(r.indices.max()) < EXPERTS


def test_gates_positive_and_sum_to_one(router, hidden):
    r = router(hidden)
    assert r.gates.dtype == torch.float32
    assert r.gates.shape == (40, TOP_K)
    assert bool((r.gates > 0).all())
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(40), rtol=0, atol=1e-6)
    assert r.probs.shape == (40, EXPERTS) and r.probs.dtype == torch.float32
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(40), rtol=0, atol=1e-6)


def test_gates_follow_the_largest_logits(router, hidden):
    r = router(hidden)  # eval: no noise, so the chosen experts are the top-k clean logits
    expected_logits, expected_idx = r.logits.topk(TOP_K, dim=-1)
    assert torch.equal(r.indices, expected_idx)
    torch.testing.assert_close(r.gates, torch.softmax(expected_logits, -1))
    # larger gate goes to the larger logit
    assert bool((r.gates[:, 0] >= r.gates[:, 1]).all())


def test_router_losses_stored_after_forward_use_mask(router, hidden):
    mask = torch.ones(40, dtype=torch.bool)
    mask[25:] = False
    r = router(hidden, mask)
    assert router.aux_loss.item() == pytest.approx(
        load_balancing_loss(r.probs[:25], r.indices[:25], EXPERTS).item(), rel=1e-6)
    assert router.z_loss.item() == pytest.approx(router_z_loss(r.logits[:25]).item(), rel=1e-6)


def test_eval_mode_is_deterministic(router, hidden):
    with torch.no_grad():
        router.noise_weight.normal_(std=1.0)
    a, b = router(hidden), router(hidden)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.gates, b.gates)


def test_training_mode_adds_noise(router, hidden):
    with torch.no_grad():
        router.noise_weight.normal_(std=1.0)
    router.train()
    torch.manual_seed(5)
    a = router(hidden)
    b = router(hidden)
    assert not (torch.equal(a.indices, b.indices) and torch.equal(a.gates, b.gates))
    # the clean logits carry no noise
    assert torch.equal(a.logits, b.logits)


def test_training_without_noise_is_deterministic(hidden):
    torch.manual_seed(0)
    router = NoisyTopKGating(HIDDEN, EXPERTS, TOP_K, noise=False).train()
    assert router.noise_weight is None
    a, b = router(hidden), router(hidden)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.gates, b.gates)
