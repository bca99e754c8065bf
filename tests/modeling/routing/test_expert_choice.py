"""ExpertChoiceRouter: in training each expert takes its capacity of highest-scoring tokens (padding never); the
thresholds learnt from that cut-off route eval passes, and are saved and loaded with the adapter."""

import torch

from llama_expert import ExpertConfig, load_augmented_model, save_adapter
from llama_expert.integration.surgery import adapter_state_dict, adapters
from llama_expert.modeling.routing import ExpertChoiceRouter
from llama_expert.modeling.routing.expert_choice import THRESHOLD_RATE

HIDDEN = 8


def _expert_choice(num_experts=4, top_k=2, **kw):
    router = ExpertChoiceRouter(HIDDEN, num_experts, top_k, **kw)
    torch.nn.init.normal_(router.weight)
    return router


def test_expert_choice_gives_every_expert_its_capacity_in_training():
    torch.manual_seed(0)
    router = _expert_choice().train()
    hidden = torch.randn(20, HIDDEN)
    hidden[:, 0] += 3.0  # skewed: a token-choice router would overload some experts
    routing = router(hidden)
    chosen = routing.gates > 0
    assert chosen.sum(0).tolist() == [10, 10, 10, 10]  # capacity ceil(1 * 20 * 2 / 4) = 10 tokens each
    probs = torch.softmax(routing.logits, -1)
    for e in range(4):  # each expert's tokens are its 10 highest-scoring ones, gated by p_e
        assert set(chosen[:, e].nonzero()[:, 0].tolist()) == set(probs[:, e].topk(10).indices.tolist())
    torch.testing.assert_close(routing.gates, probs * chosen)
    assert router.aux_loss.item() == 0.0 and router.z_loss is not None


def test_expert_choice_capacity_factor_and_padding():
    torch.manual_seed(1)
    router = _expert_choice(capacity_factor=0.5).train()
    mask = torch.tensor([True] * 12 + [False] * 4)
    routing = router(torch.randn(16, HIDDEN), mask)
    chosen = routing.gates > 0
    assert not bool(chosen[~mask].any())  # padding is never chosen
    assert chosen.sum(0).tolist() == [3, 3, 3, 3]  # ceil(0.5 * 12 * 2 / 4) among the 12 real tokens


def test_expert_choice_thresholds_follow_the_training_cut_off_and_route_eval():
    torch.manual_seed(2)
    router = _expert_choice().train()
    assert router.thresholds.tolist() == [0.0] * 4  # untrained: eval uses every expert
    hidden = torch.randn(40, HIDDEN)
    with torch.no_grad():
        cut = torch.softmax(router(hidden).logits, -1).topk(20, dim=0).values[-1]
    torch.testing.assert_close(router.thresholds.data, THRESHOLD_RATE * cut)
    for _ in range(200):
        router(hidden)
    torch.testing.assert_close(router.thresholds.data, cut, rtol=1e-4, atol=1e-6)
    router.eval()
    frozen = router.thresholds.clone()
    routing = router(hidden)
    assert torch.equal(router.thresholds.data, frozen)  # eval passes leave the thresholds alone
    chosen = routing.gates > 0
    assert chosen.sum(0).tolist() == [20, 20, 20, 20]  # the training batch itself: the same tokens per expert


def test_expert_choice_thresholds_are_saved_and_loaded_with_the_adapter(tiny_folder, tmp_path):
    config = ExpertConfig(router_type="expert_choice", num_experts=4, top_k=2, expert_allocation="uniform")
    model, _ = load_augmented_model(str(tiny_folder), config=config)
    for index, (name, adapter) in enumerate(adapters(model)):
        assert not adapter.router.thresholds.requires_grad
        assert f"{name}.router.thresholds" in adapter_state_dict(model)
        with torch.no_grad():
            adapter.router.thresholds.copy_(torch.arange(4.0) * 0.01 + index)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_folder))
    loaded, _ = load_augmented_model(adapter_path=tmp_path / "adapter")
    for (_, want), (_, have) in zip(adapters(model), adapters(loaded)):
        assert torch.equal(want.router.thresholds, have.router.thresholds)
