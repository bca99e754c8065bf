"""RouterBase: what every router does. It routes in float32 (bfloat16 input, autocast), keeps routing statistics
(never saved), computes no losses under no_grad in eval, updates its buffers once per pass under gradient
checkpointing, and draws its router matrix at the configured scale."""

import pytest
import torch

from llama_expert import ExpertConfig, load_augmented_model
from llama_expert.integration.surgery import adapter_state_dict
from llama_expert.modeling import TokenMask
from llama_expert.modeling.routing import ROUTERS

from .helpers import EXPERTS, TOP_K

LEARNED = [name for name in ROUTERS.names() if name != "oracle"]  # routers that choose

HIDDEN = 8  # the width of the checks that build every registered router


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


def _route(router, hidden):
    """Route [B, T, d] as an adapter does, in a pass whose sequences carry domain labels (the oracle reads them)."""
    context = TokenMask()
    context.domain_labels = torch.arange(hidden.shape[0]) % 2
    return router.route_sequences(hidden, context)


def test_routers_skip_losses_under_no_grad_eval():
    for name in ROUTERS.names():
        router = ROUTERS.get(name).from_config(HIDDEN, 4, ExpertConfig(num_experts=4, top_k=2)).eval()
        with torch.no_grad():
            routing = _route(router, torch.randn(2, 3, HIDDEN))
        assert router.aux_loss is None and router.z_loss is None, name
        assert routing.probs is None, name


def test_routers_record_statistics():
    for name in ROUTERS.names():
        router = ROUTERS.get(name).from_config(HIDDEN, 4, ExpertConfig(num_experts=4, top_k=2)).eval()
        router.record_statistics = True
        with torch.no_grad():
            routing = _route(router, torch.randn(2, 3, HIDDEN))
        assert float(router.tokens_seen) == 6, name
        assert float(router.expert_counts.sum()) == int((routing.gates > 0).sum()), name  # the chosen pairs
        router.reset_statistics()
        assert float(router.tokens_seen) == 0 and float(router.expert_counts.sum()) == 0, name


@pytest.mark.parametrize("router_type", ["aux_free", "expert_choice", "sequence_aux_free"])
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


@pytest.mark.parametrize("router_type", [name for name in ROUTERS.names()  # the oracle has no router matrix
                                         if "weight" in ROUTERS.get(name).per_expert_parameters])
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


# ---------------------------------------------------------------------------------------------- the null expert
def _null_router(name, experts=4, **kw):
    config = ExpertConfig(router_type=name, num_experts=experts, top_k=2, null_expert=True, **kw)
    return ROUTERS.get(name).build(HIDDEN, experts, config)


@pytest.mark.parametrize("name", LEARNED)  # oracle refuses a null expert (test_oracle.py)
def test_a_null_expert_is_one_more_choice_counted_in_the_statistics(name):
    router = _null_router(name).eval()
    assert router.num_experts == 5 and router.real_experts == 4
    with torch.no_grad():  # the null's logit is large for these tokens
        if name == "prototype":  # a prototype per real expert; the null's logit is -null_distance / T
            assert router.weight.shape[0] == 4
            router.null_distance.fill_(-100.0)
        else:
            assert router.weight.shape[0] == 5
            router.weight[4].copy_(torch.ones(HIDDEN))
    router.record_statistics = True
    with torch.no_grad():
        routing = router(torch.ones(6, HIDDEN))
    assert router.expert_counts.shape == (5,)
    assert router.expert_counts[4] == 6  # every token chose the null
    indices, gates = router.bank_routing(routing)  # what the bank gets: real experts only, the null's gate 0
    assert int(indices.max()) < 4
    assert torch.equal(gates[routing.indices == 4], torch.zeros_like(gates[routing.indices == 4]))


@pytest.mark.parametrize("name", ["noisy_top_k", "switch", "soft"])
def test_the_load_balancing_loss_leaves_the_null_expert_free(name):
    """The loss balances the real experts: it gives the null's logit no gradient, and uniform real routing
    scores 1 however much goes to the null."""
    router = _null_router(name, router_noise=False, router_jitter=0.0).train()
    hidden = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(0))
    router(hidden)
    router.aux_loss.backward()
    assert router.weight.grad[4].abs().max() < 1e-6  # zero up to float32 rounding
    assert router.weight.grad[:4].abs().max() > 1e-3 or name == "soft"  # (soft's loss is the constant 1)


def test_selecting_experts_slices_the_rows_of_the_real_experts_alone():
    """The prototype router keeps one row per real expert (prototype, spread) and the null's logit apart: selecting
    experts slices those rows by the real experts' index and keeps the null's distance."""
    router = _null_router("prototype", experts=5)
    with torch.no_grad():
        router.weight.normal_(generator=torch.Generator().manual_seed(0))
        router.spread.copy_(torch.arange(5.0))
        router.null_distance.fill_(3.0)
    weight = router.weight.detach().clone()
    router.select_experts(torch.tensor([4, 0, 2]))
    assert router.num_experts == 4 and router.real_experts == 3
    assert torch.equal(router.weight, weight[[4, 0, 2]]) and router.spread.tolist() == [4.0, 0.0, 2.0]
    assert router.null_distance.item() == 3.0 and not router.spread.requires_grad


def test_selecting_experts_keeps_the_null_expert_last():
    router = _null_router("noisy_top_k", experts=5)
    null_row = router.weight[5].detach().clone()
    transfers = router.select_experts(torch.tensor([4, 0, 2]))
    assert router.num_experts == 4 and router.real_experts == 3
    assert torch.equal(router.weight[3], null_row)
    assert all(index.tolist() == [4, 0, 2, 5] for _, _, index in transfers)


def test_switch_capacity_counts_the_real_experts():
    """ceil(capacity_factor * T / E) with E the real experts: a null expert is no one's capacity."""
    router = _null_router("switch", experts=2, capacity_factor=1.0, router_jitter=0.0).train()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 1.0  # every token picks expert 0
    routing = router(torch.ones(8, HIDDEN))
    assert int((routing.gates > 0).sum()) == 4  # ceil(8 / 2), not ceil(8 / 3)


# ------------------------------------------------------------------------------------------------ top-1 gates
@pytest.mark.parametrize("name", ["aux_free", "sequence_aux_free", "noisy_top_k", "switch", "prototype"])
def test_a_top_1_router_learns_from_what_its_gate_multiplies(name):
    """With one expert chosen, a softmax over the chosen logits is the constant 1: without a straight-through gate
    (``base.chosen_gates``) the language-model loss gave the router matrix exactly zero gradient. The gate's value
    stays exactly 1 (saved adapters compute what they computed); its gradient is the chosen expert's probability's."""
    config = ExpertConfig(router_type=name, num_experts=4, top_k=1, router_noise=False, router_jitter=0.0)
    router = ROUTERS.get(name).build(HIDDEN, 4, config).train()
    if name == "prototype":  # prototypes start at zero, all tied: spread them
        with torch.no_grad():
            router.weight.normal_(generator=torch.Generator().manual_seed(2))
    hidden = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    routing = router.route_sequences(hidden, TokenMask())
    if name != "switch":  # switch gates by p_i itself
        assert torch.equal(routing.gates.detach(), torch.ones_like(routing.gates))
    expert_effect = torch.randn(routing.gates.shape, generator=torch.Generator().manual_seed(1))
    (routing.gates * expert_effect).sum().backward()  # the loss's dependence on the gate, nothing else
    assert router.weight.grad is not None and router.weight.grad.abs().max() > 1e-4
