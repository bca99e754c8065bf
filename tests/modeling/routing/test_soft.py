"""SoftRouter: every token goes to every expert, with dense softmax gates."""

import pytest
import torch

from llama_expert import ExpertConfig
from llama_expert.modeling.routing import ROUTERS, SoftRouter

HIDDEN = 8


@pytest.mark.parametrize("use_mask", [False, True])
def test_soft_routes_every_token_to_every_expert(use_mask):
    router = ROUTERS.get("soft").from_config(HIDDEN, 5, ExpertConfig(num_experts=5, top_k=2))
    assert isinstance(router, SoftRouter) and router.top_k == 5
    torch.nn.init.normal_(router.weight)
    router.train()
    mask = torch.tensor([True, False] * 5) if use_mask else None
    routing = router(torch.randn(10, HIDDEN), mask)
    assert torch.equal(routing.indices, torch.arange(5).expand(10, 5))
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(10), rtol=0, atol=1e-6)
    torch.testing.assert_close(routing.gates, torch.softmax(routing.logits, -1))
    assert router.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert router.z_loss is not None
