"""Behaviour of the switch, aux_free and soft routers that the per-token references cannot see: training-mode
capacity and jitter, the balancing bias over several batches (and through save/load), the dense soft gates."""

import pytest
import torch

from llama_expert import ExpertConfig, load_augmented_model, save_adapter
from llama_expert.integration.surgery import adapter_state_dict, adapters
from llama_expert.modeling.routing import ROUTERS, AuxFreeRouter, ExpertChoiceRouter, SoftRouter, SwitchRouter
from llama_expert.modeling.routing.expert_choice import THRESHOLD_RATE

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


# ---------------------------------------------------------------------------------------------- switch
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


# ---------------------------------------------------------------------------------------------- aux_free
def _skewed_batch(generator, tokens=256):
    hidden = torch.randn(tokens, HIDDEN, generator=generator)
    hidden[:, 0] += 3.0  # most tokens prefer expert 0
    return hidden


def _imbalance(router, hidden):
    with torch.no_grad():
        indices = router(hidden).indices
    load = torch.bincount(indices.reshape(-1), minlength=router.num_experts).double()
    return float(load.max() / load.mean())


def test_aux_free_bias_moves_toward_balance_in_training_only():
    router = AuxFreeRouter(HIDDEN, 4, top_k=1, bias_rate=0.1)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4, HIDDEN))
    generator = torch.Generator().manual_seed(0)
    probe = _skewed_batch(generator)
    router.eval()
    before = _imbalance(router, probe)
    for _ in range(3):
        router(_skewed_batch(generator))
    assert torch.equal(router.bias, torch.zeros(4))  # eval passes leave the bias alone
    router.train()
    for _ in range(30):
        router(_skewed_batch(generator))
        assert router.aux_loss.item() == 0.0 and router.z_loss is not None
    assert router.bias[0] < 0  # the overloaded expert is pushed down
    router.eval()
    after = _imbalance(router, probe)
    assert before > 2.0
    assert after < before / 2, (before, after)


def test_aux_free_bias_update_ignores_padding():
    router = AuxFreeRouter(HIDDEN, 2, top_k=1, bias_rate=1.0).train()
    with torch.no_grad():
        router.weight.copy_(torch.eye(2, HIDDEN))
    hidden = torch.zeros(3, HIDDEN)
    hidden[0, 0] = hidden[1, 1] = 1.0  # one token each: balanced
    hidden[2, 0] = 1.0  # a padding token on expert 0
    router(hidden, torch.tensor([True, True, False]))
    assert router.bias.tolist() == [0.0, 0.0]


def test_aux_free_bias_is_saved_and_loaded_with_the_adapter(tiny_folder, tmp_path):
    config = ExpertConfig(router_type="aux_free", num_experts=4, top_k=2, expert_allocation="uniform")
    model, _ = load_augmented_model(str(tiny_folder), config=config)
    biases = []
    for index, (name, adapter) in enumerate(adapters(model)):
        assert not adapter.router.bias.requires_grad
        assert f"{name}.router.bias" in adapter_state_dict(model)
        with torch.no_grad():
            adapter.router.bias.copy_(torch.arange(4.0) * 0.1 + index)
        biases.append(adapter.router.bias.clone())
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_folder))
    loaded, loaded_config = load_augmented_model(adapter_path=tmp_path / "adapter")
    assert loaded_config.router_type == "aux_free"
    got = [adapter.router.bias for _, adapter in adapters(loaded)]
    assert len(got) == len(biases)
    for want, have in zip(biases, got):
        assert torch.equal(want, have)
        assert not have.requires_grad


# ---------------------------------------------------------------------------------------------- expert_choice
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
    # per token (hence causal): test_reference.py's test_router_decision_is_per_token covers every router


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


# ---------------------------------------------------------------------------------------------- soft
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


def test_routers_skip_losses_under_no_grad_eval():
    for name in ROUTERS.names():
        router = ROUTERS.get(name).from_config(HIDDEN, 4, ExpertConfig(num_experts=4, top_k=2)).eval()
        with torch.no_grad():
            routing = router(torch.randn(6, HIDDEN))
        assert router.aux_loss is None and router.z_loss is None, name
        assert routing.probs is None, name


def test_routers_record_statistics():
    for name in ROUTERS.names():
        router = ROUTERS.get(name).from_config(HIDDEN, 4, ExpertConfig(num_experts=4, top_k=2)).eval()
        router.record_statistics = True
        with torch.no_grad():
            routing = router(torch.randn(6, HIDDEN))
        assert float(router.tokens_seen) == 6, name
        assert float(router.expert_counts.sum()) == int((routing.gates > 0).sum()), name  # the chosen pairs
        router.reset_statistics()
        assert float(router.tokens_seen) == 0 and float(router.expert_counts.sum()) == 0, name


@pytest.mark.parametrize("router_type", ["aux_free", "expert_choice"])
def test_buffer_updates_happen_once_per_pass_under_gradient_checkpointing(tiny_folder, router_type):
    """The recomputed forward of gradient checkpointing must not update the bias / thresholds a second time."""
    config = ExpertConfig(router_type=router_type, num_experts=4, top_k=2, expert_allocation="uniform",
                          aux_free_bias_rate=0.1)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    states = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, _ = load_augmented_model(str(tiny_folder), config=config)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        states.append({name: p.clone() for name, p in adapter_state_dict(model).items()
                       if name.endswith((".router.bias", ".router.thresholds"))})
    assert states[0] and states[0].keys() == states[1].keys()
    assert any(bool(v.abs().sum() > 0) for v in states[0].values())  # the pass did update them
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("router_type", ROUTERS.names())
def test_router_init_scale_sets_the_spread_of_the_router_matrix(router_type):
    from llama_expert.modeling.adapter import MoEAdapter

    assert ExpertConfig().router_init_scale == ROUTERS.get(router_type).DEFAULT_INIT_SCALE
    mlp = torch.nn.Linear(64, 64)
    spreads = {}
    for scale in (0.0, 0.1, 1.0):
        torch.manual_seed(0)
        adapter = MoEAdapter(mlp, 64, 16, ExpertConfig(router_type=router_type, router_init_scale=scale))
        spreads[scale] = float(adapter.router.weight.std())
    assert spreads[0.0] == 0.0
    assert spreads[0.1] == pytest.approx(0.1 / 8, rel=0.1) and spreads[1.0] == pytest.approx(1 / 8, rel=0.1)
