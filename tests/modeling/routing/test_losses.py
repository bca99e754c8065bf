"""The router losses: load balancing (1 for uniform routing, E / k when collapsed, by hand) and the z-loss (by
hand), both blind to padding."""

import math

import pytest
import torch

from llama_expert import load_balancing_loss, router_z_loss

from .helpers import EXPERTS, TOP_K


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


def test_load_balancing_loss_balances_the_first_columns_only():
    """A null expert's column (the last) takes no part: P is renormalised over the others, its assignments are
    not counted, so uniform use of the real experts scores 1 however much goes to the null."""
    probs = torch.tensor([[0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])
    indices = torch.tensor([[0, 2], [1, 2]])
    assert load_balancing_loss(probs, indices, 2).item() == pytest.approx(1.0)
    collapsed = load_balancing_loss(probs, torch.tensor([[0, 2], [0, 2]]), 2)
    assert collapsed.item() == pytest.approx(2 * 0.5)  # f = (1, 0), P = (0.5, 0.5)


def test_mutual_information_loss_by_hand():
    """-(H(mean p) - mean H(p)): each token certain of a different expert gives -log E (the minimum); every token
    with the same distribution gives 0."""
    from llama_expert.modeling.routing.losses import ROUTER_LOSSES, mutual_information_loss

    assert ROUTER_LOSSES["mi_loss"] == ("router_mi_loss_coef", mutual_information_loss)
    decided = torch.eye(4) * 60.0
    assert mutual_information_loss(decided, None, 4).item() == pytest.approx(-math.log(4), abs=1e-5)
    same = torch.randn(1, 4).expand(6, 4)
    assert mutual_information_loss(same, None, 4).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(5)
    logits = torch.randn(7, 5)
    p = torch.softmax(logits[:, :4], -1)  # the fifth column (a null expert) is left out

    def entropy(q):
        return -(q * q.log()).sum(-1)
    want = entropy(p).mean() - entropy(p.mean(0))
    assert mutual_information_loss(logits, None, 4).item() == pytest.approx(want.item(), rel=1e-5)
    mask = torch.tensor([True] * 3 + [False] * 4)
    assert mutual_information_loss(logits, mask, 4).item() == pytest.approx(
        mutual_information_loss(logits[:3], None, 4).item(), rel=1e-6)
    assert mutual_information_loss(logits, torch.zeros(7, dtype=torch.bool), 4).item() == 0.0
