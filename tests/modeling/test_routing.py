import pytest
import torch

from llama_expert import NoisyTopKGating, load_balancing_loss, router_z_loss

HIDDEN, EXPERTS, TOP_K = 16, 8, 2


@pytest.fixture
def router():
    torch.manual_seed(0)
    return NoisyTopKGating(HIDDEN, EXPERTS, TOP_K).eval()


@pytest.fixture
def hidden():
    torch.manual_seed(1)
    return torch.randn(40, HIDDEN)


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


def test_load_balancing_loss_is_one_for_uniform_routing():
    tokens = 4 * EXPERTS
    probs = torch.full((tokens, EXPERTS), 1.0 / EXPERTS)
    t = torch.arange(tokens)
    indices = torch.stack([t % EXPERTS, (t + 1) % EXPERTS], dim=1)  # every expert gets the same share
    loss = load_balancing_loss(probs, indices, EXPERTS)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_above_one_for_collapsed_routing():
    tokens = 32
    logits = torch.full((tokens, EXPERTS), -5.0)
    logits[:, :2] = 5.0
    probs = torch.softmax(logits, -1)
    indices = torch.tensor([[0, 1]] * tokens)
    loss = load_balancing_loss(probs, indices, EXPERTS)
    assert loss.item() > 1.5
    # a fully collapsed router approaches E / k
    assert loss.item() == pytest.approx(EXPERTS / 2, rel=0.01)


def test_load_balancing_loss_by_hand():
    torch.manual_seed(3)
    probs = torch.softmax(torch.randn(10, 4), -1)
    indices = torch.tensor([[0, 1], [1, 2], [0, 3], [2, 3], [0, 1], [1, 0], [3, 2], [2, 0], [0, 2], [1, 3]])
    counts = torch.zeros(4)
    for row in indices:
        for i in row:
            counts[i] += 1
    expected = 4 * (counts / 20 * probs.mean(0)).sum()
    assert load_balancing_loss(probs, indices, 4).item() == pytest.approx(expected.item(), rel=1e-6)


def test_z_loss_by_hand():
    torch.manual_seed(2)
    logits = torch.randn(12, EXPERTS) * 3
    by_hand = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits]).mean()
    assert router_z_loss(logits).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_mask_excludes_padding_from_both_losses():
    torch.manual_seed(4)
    logits = torch.randn(20, EXPERTS)
    logits[10:] *= 20  # the padding rows are very different: including them would change both losses
    probs = torch.softmax(logits, -1)
    indices = probs.topk(TOP_K, -1).indices
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:10] = True
    lb_masked = load_balancing_loss(probs, indices, EXPERTS, mask)
    z_masked = router_z_loss(logits, mask)
    assert lb_masked.item() == pytest.approx(load_balancing_loss(probs[:10], indices[:10], EXPERTS).item(), rel=1e-6)
    assert z_masked.item() == pytest.approx(router_z_loss(logits[:10]).item(), rel=1e-6)
    assert lb_masked.item() != pytest.approx(load_balancing_loss(probs, indices, EXPERTS).item(), rel=1e-3)
    assert z_masked.item() != pytest.approx(router_z_loss(logits).item(), rel=1e-3)


def test_all_padding_gives_zero_losses():
    logits = torch.randn(5, EXPERTS)
    mask = torch.zeros(5, dtype=torch.bool)
    assert router_z_loss(logits, mask).item() == 0.0
    assert load_balancing_loss(torch.softmax(logits, -1), logits.topk(2, -1).indices, EXPERTS, mask).item() == 0.0


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


def test_router_runs_in_float32_for_bfloat16_input(router, hidden):
    ref = router(hidden)
    r = router(hidden.to(torch.bfloat16))
    for t in (r.gates, r.probs, r.logits):
        assert t.dtype == torch.float32
    assert torch.equal(r.logits, torch.nn.functional.linear(hidden.to(torch.bfloat16).float(), router.weight))
    assert router.aux_loss.dtype == torch.float32 and router.z_loss.dtype == torch.float32
    assert ref.logits.dtype == torch.float32


def test_router_runs_in_float32_under_autocast(router, hidden):
    ref = router(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(hidden)
        assert torch.nn.functional.linear(hidden, router.weight).dtype == torch.bfloat16  # autocast is active
    for t in (r.gates, r.probs, r.logits):
        assert t.dtype == torch.float32
    assert torch.equal(r.logits, ref.logits)
    assert torch.equal(r.indices, ref.indices)
    assert router.z_loss.dtype == torch.float32


def test_expert_counts_accumulate_and_reset(router, hidden):
    router(hidden)
    assert router.expert_counts.sum().item() == 0  # recording is off unless asked for
    router.record_statistics = True
    r1 = router(hidden)
    counts1 = torch.bincount(r1.indices.reshape(-1), minlength=EXPERTS).double()
    assert torch.equal(router.expert_counts, counts1)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[:15] = True
    r2 = router(hidden, mask)
    counts2 = torch.bincount(r2.indices[:15].reshape(-1), minlength=EXPERTS).double()
    assert torch.equal(router.expert_counts, counts1 + counts2)
    assert router.expert_counts.sum().item() == (40 + 15) * TOP_K
    assert router.tokens_seen.item() == 55
    assert router.entropy_sum.item() > 0
    router.reset_statistics()
    assert router.expert_counts.sum().item() == 0
    assert router.tokens_seen.item() == 0
    assert router.entropy_sum.item() == 0


def test_statistics_are_not_saved_in_state_dict(router):
    assert set(router.state_dict()) == {"weight", "noise_weight"}
