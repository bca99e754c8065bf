"""Every registered expert bank and router against a plain per-token Python loop of its documented formula.

The batched implementations (a dense gate matrix, stacked expert weights, one matmul over all experts)
are easy to get subtly wrong: a gate scattered to the wrong expert, a transposed contraction, a sum over the
wrong axis. Each reference below recomputes the formula in the class docstring one token and one chosen
expert at a time, in float64, from the module's own parameters. The output projections (``up``) start at
zero, which would hide any such mistake, so every parameter is re-randomised first.

The tests are parametrised over the registries, so a newly registered bank or router is covered at once,
and fails until a reference for it is added here. Routers are given sequences ([B, T, d], one left-padded, each
with a domain label), as the adapter gives them; a reference gets a token's sequence up to that token (padding
left out) and the sequence's label, and a per-token router's reference reads the last token only.
"""

import pytest
import torch
import torch.nn.functional as F

from llama_expert import ExpertConfig
from llama_expert.modeling import MoEAdapter, TokenMask
from llama_expert.modeling.experts import EXPERT_BANKS
from llama_expert.modeling.routing import ROUTERS

HIDDEN, RANK, CORE, TOKENS, INTERMEDIATE = 16, 4, 6, 24, 20
SHAPES = [(1, 1), (4, 1), (8, 2), (6, 3), (5, 5)]  # (num_experts, top_k)
SEQUENCES, LENGTH, PADDING = 3, TOKENS // 3, 3  # the router tests' batch; the last sequence is left-padded


def _config(num_experts, top_k, **kw):
    # lora_alpha / lora_r = 3: a scaling applied twice, or not at all, shows. Dropout is on but eval mode
    # must ignore it. lora_experts: routed experts of rank 3 (not lora_r) and a shared expert of rank 2, so both
    # are checked. Three oracle domains (fewer with fewer experts): groups of unequal size, e.g. 1, 1, 2 of 4.
    return ExpertConfig(num_experts=num_experts, top_k=top_k, lora_r=RANK, lora_alpha=3.0 * RANK,
                        expert_hidden_size=CORE, lora_dropout=0.3, expert_allocation="uniform",
                        expert_rank=3, shared_expert_rank=2, oracle_domains=min(3, num_experts), **kw)


def _context(labels, mask=None):
    """The pass context a model's hooks would fill: padding mask [B, T] and one domain label per sequence."""
    context = TokenMask()
    context.set(mask)
    context.domain_labels = labels
    return context


class LlamaStyleMLP(torch.nn.Module):
    """The frozen MLP the adapter wraps: ``down(silu(gate(h)) * up(h))``, with biases so none is forgotten."""

    def __init__(self, hidden=HIDDEN, intermediate=INTERMEDIATE, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate_proj = torch.nn.Linear(hidden, intermediate)
        self.up_proj = torch.nn.Linear(hidden, intermediate)
        self.down_proj = torch.nn.Linear(intermediate, hidden)
        self.act_fn = torch.nn.SiLU()

    def forward(self, h):
        return self.down_proj(self.act_fn(self.gate_proj(h)) * self.up_proj(h))


def _bank(name, num_experts, top_k, dtype=torch.float32):
    """A bank built as MoEAdapter builds it: banks that need the frozen MLP (mixlora) get one."""
    mlp = LlamaStyleMLP().to(dtype)
    return EXPERT_BANKS.get(name).from_config(HIDDEN, num_experts, _config(num_experts, top_k), base_mlp=mlp)


def _randomise(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) * 0.5)
    return module


def _routing_inputs(num_experts, top_k, seed):
    """Random distinct experts per token, in random order, with unnormalised positive gates."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.rand(TOKENS, num_experts, generator=generator).argsort(-1)[:, :top_k]
    gates = torch.rand(TOKENS, top_k, generator=generator, dtype=torch.float64) + 0.1
    return indices, gates


# ---------------------------------------------------------------------------------------------- banks
def _shared_core_token(bank, h, chosen, gates):
    """s * B (z + sum_i g_i W2_i silu(W1_i z)), z = A h, for one token."""
    z = bank.down.double() @ h
    mixed = z.clone()
    for i, g in zip(chosen, gates):
        core_in = bank.core_in[i].double()  # [r, e]: W1_i z = z @ core_in_i
        core_out = bank.core_out[i].double()  # [e, r]
        mixed = mixed + g * (F.silu(z @ core_in) @ core_out)
    return bank.lora_scaling * (bank.up.double() @ mixed)


def _shared_down_token(bank, h, chosen, gates):
    """s * sum_i g_i B_i A h, for one token."""
    z = bank.down.double() @ h
    out = torch.zeros(bank.up.shape[-1], dtype=torch.float64)
    for i, g in zip(chosen, gates):
        out = out + g * (z @ bank.up[i].double())  # B_i: r -> d stored as [r, d]
    return bank.lora_scaling * out


def _mixlora_token(bank, h, chosen, gates):
    """sum_i g_i (E_i(h) - MLP(h)), E_i the MLP with expert i's LoRA deltas s D C on gate, up and down, one token."""
    mlp, s = bank._base[0], bank.lora_scaling
    w1, b1 = mlp.gate_proj.weight.double(), mlp.gate_proj.bias.double()
    w3, b3 = mlp.up_proj.weight.double(), mlp.up_proj.bias.double()
    w2, b2 = mlp.down_proj.weight.double(), mlp.down_proj.bias.double()

    def mlp_with(d1, d3, d2):  # each delta is an [out, in] matrix added to the frozen weight
        m = F.silu((w1 + d1) @ h + b1) * ((w3 + d3) @ h + b3)
        return (w2 + d2) @ m + b2

    zero = (torch.zeros_like(w1), torch.zeros_like(w3), torch.zeros_like(w2))
    out = torch.zeros(h.shape[0], dtype=torch.float64)
    for i, g in zip(chosen, gates):
        deltas = [s * bank_up[i].double().t() @ bank_down[i].double()  # D_i stored [r, out], C_i [r, in]
                  for bank_down, bank_up in ((bank.gate_down, bank.gate_up), (bank.up_down, bank.up_up),
                                             (bank.down_down, bank.down_up))]
        out = out + g * (mlp_with(*deltas) - mlp_with(*zero))
    return out


def _lora_experts_token(bank, h, chosen, gates):
    """s * (B_s A_s h + sum_i g_i B_i A_i h), for one token (B stored [r, d], so B h-space = z @ up)."""
    out = torch.zeros(h.shape[0], dtype=torch.float64)
    if bank.shared_down is not None:
        out = out + (bank.shared_down.double() @ h) @ bank.shared_up.double()
    for i, g in zip(chosen, gates):
        out = out + g * ((bank.down[i].double() @ h) @ bank.up[i].double())
    return bank.lora_scaling * out


BANK_REFERENCES = {"shared_core": _shared_core_token, "shared_down": _shared_down_token, "mixlora": _mixlora_token,
                   "lora_experts": _lora_experts_token}


def bank_reference(name, bank, hidden, indices, gates):
    if name not in BANK_REFERENCES:
        pytest.fail(f"expert bank {name!r} is registered but has no reference formula: add a per-token loop for "
                    f"it to BANK_REFERENCES in tests/modeling/test_reference.py")
    token = BANK_REFERENCES[name]
    return torch.stack([token(bank, hidden[n].double(), indices[n].tolist(), gates[n].double().tolist())
                        for n in range(hidden.shape[0])])


@pytest.mark.parametrize("num_experts,top_k", SHAPES)
@pytest.mark.parametrize("name", EXPERT_BANKS.names())
def test_expert_bank_matches_the_per_token_loop(name, num_experts, top_k):
    bank = _bank(name, num_experts, top_k, torch.float64)
    _randomise(bank, seed=num_experts * 10 + top_k).double().eval()
    hidden = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    indices, gates = _routing_inputs(num_experts, top_k, seed=2)
    with torch.no_grad():
        got = bank(hidden, indices, gates)
        want = bank_reference(name, bank, hidden, indices, gates)
    assert got.shape == (TOKENS, HIDDEN)
    assert want.abs().max() > 0.1  # the reference is not trivially zero
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", EXPERT_BANKS.names())
def test_expert_bank_float32_matches_the_reference(name):
    """The dtype the adapters actually run in: float32 parameters and inputs, float32 router gates."""
    bank = _bank(name, 8, 2)
    _randomise(bank, seed=5).eval()
    hidden = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(3))
    indices, gates = _routing_inputs(8, 2, seed=4)
    with torch.no_grad():
        got = bank(hidden, indices, gates.float())
        want = bank_reference(name, bank, hidden, indices, gates.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EXPERT_BANKS.names())
def test_expert_bank_uses_only_the_chosen_experts(name):
    """Changing the weights of an expert that no token chose leaves the output bit-identical."""
    bank = _bank(name, 6, 2, torch.float64)
    _randomise(bank, seed=6).double().eval()
    hidden = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    indices, gates = _routing_inputs(5, 2, seed=7)  # expert 5 is never chosen
    with torch.no_grad():
        before = bank(hidden, indices, gates)
        for p in bank.parameters():
            if p.dim() == 3 and p.shape[0] == 6:  # stacked per-expert weights
                p[5].normal_()
        after = bank(hidden, indices, gates)
    assert torch.equal(before, after)


# ---------------------------------------------------------------------------------------------- routers
def _noisy_top_k_token(router, h):
    """Eval mode: logits l_j = w_j . h (no noise); keep the k largest; gates = softmax over the kept ones."""
    logits = [float(router.weight[j].detach().double() @ h) for j in range(router.weight.shape[0])]
    chosen = sorted(range(len(logits)), key=lambda j: -logits[j])[: router.top_k]
    kept = torch.tensor([logits[j] for j in chosen], dtype=torch.float64)
    gates = torch.exp(kept - kept.max()) / torch.exp(kept - kept.max()).sum()
    return logits, chosen, gates.tolist()


def _softmax(values):
    values = torch.tensor(values, dtype=torch.float64)
    return (torch.exp(values - values.max()) / torch.exp(values - values.max()).sum()).tolist()


def _switch_token(router, h):
    """Eval mode (no jitter, no capacity): the single largest logit; its gate is p_i = softmax(all logits)_i."""
    logits = [float(router.weight[j].detach().double() @ h) for j in range(router.weight.shape[0])]
    best = max(range(len(logits)), key=lambda j: logits[j])
    return logits, [best], [_softmax(logits)[best]]


def _aux_free_token(router, h):
    """Keep the k largest of l_j + b_j (b: the balancing bias); gates = softmax over the kept *unbiased* l_j."""
    logits = [float(router.weight[j].detach().double() @ h) for j in range(router.weight.shape[0])]
    biased = [logits[j] + float(router.bias[j]) for j in range(len(logits))]
    chosen = sorted(range(len(logits)), key=lambda j: -biased[j])[: router.top_k]
    return logits, chosen, _softmax([logits[j] for j in chosen])


def _soft_token(router, h):
    """Every expert, gates = softmax over all E logits."""
    logits = [float(router.weight[j].detach().double() @ h) for j in range(router.weight.shape[0])]
    return logits, list(range(len(logits))), _softmax(logits)


def _expert_choice_token(router, h):
    """Eval mode: every expert listed; expert j's gate is p_j = softmax(all logits)_j if p_j >= its learned
    threshold tau_j, else 0."""
    logits = [float(router.weight[j].detach().double() @ h) for j in range(router.weight.shape[0])]
    probs = _softmax(logits)
    return logits, list(range(len(logits))), [p if p >= float(router.thresholds[j]) else 0.0
                                              for j, p in enumerate(probs)]


def _sequence_aux_free_token(router, tokens, label):
    """aux_free's rule applied to the mean of the sequence's (non-padding) router inputs up to this token."""
    return _aux_free_token(router, tokens.mean(dim=0))


def _oracle_token(router, tokens, label):
    """Every expert listed; domain d's group, experts d*E//D .. (d+1)*E//D - 1, shares gate 1, the others get 0;
    no logits (zeros)."""
    experts, domains = router.num_experts, router.num_domains
    group = range(label * experts // domains, (label + 1) * experts // domains)
    return [0.0] * experts, list(range(experts)), [1 / len(group) if e in group else 0.0 for e in range(experts)]


def _prototype_token(router, tokens, label):
    """The prefix mean m's mean squared difference d_i to each prototype (row i of the router matrix); logit -d_i / T,
    with a null expert one more logit, -(null_distance + null_slope / n) / T for a prefix of n tokens; keep the k
    largest; gates = softmax over the kept."""
    mean, temperature = tokens.mean(dim=0), router.temperature
    logits = [-float((mean - p.detach().double()).pow(2).mean()) / temperature for p in router.weight]
    if router.null_distance is not None:
        logits.append(-(float(router.null_distance) + float(router.null_slope) / len(tokens)) / temperature)
    chosen = sorted(range(len(logits)), key=lambda j: -logits[j])[: router.top_k]
    return logits, chosen, _softmax([logits[j] for j in chosen])


def _per_token(reference):
    """A router that routes each token by itself: the reference of the sequence's last token."""
    return lambda router, tokens, label: reference(router, tokens[-1])


ROUTER_REFERENCES = {"noisy_top_k": _per_token(_noisy_top_k_token), "switch": _per_token(_switch_token),
                     "aux_free": _per_token(_aux_free_token), "soft": _per_token(_soft_token),
                     "expert_choice": _per_token(_expert_choice_token),
                     "sequence_aux_free": _sequence_aux_free_token, "oracle": _oracle_token,
                     "prototype": _prototype_token}


def router_reference(name, router, tokens, label):
    """(logits, chosen experts, their gates) of the last of ``tokens`` [t + 1, d] (float64), its sequence so far."""
    if name not in ROUTER_REFERENCES:
        pytest.fail(f"router {name!r} is registered but has no reference: add a per-token loop for it to "
                    f"ROUTER_REFERENCES in tests/modeling/test_reference.py")
    return ROUTER_REFERENCES[name](router, tokens, label)


def _sequences(seed, batch=SEQUENCES, length=LENGTH):
    """Hidden states [B, T, d], the padding mask (the last sequence left-padded) and each sequence's label."""
    hidden = torch.randn(batch, length, HIDDEN, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, :PADDING] = False
    return hidden, mask, torch.arange(batch)


@pytest.mark.parametrize("num_experts,top_k", SHAPES)
@pytest.mark.parametrize("name", ROUTERS.names())
def test_router_matches_the_per_token_loop(name, num_experts, top_k):
    router = ROUTERS.get(name).from_config(HIDDEN, num_experts, _config(num_experts, top_k))
    _randomise(router, seed=num_experts + top_k).eval()
    hidden, mask, labels = _sequences(seed=8)
    labels = labels % min(3, num_experts)
    with torch.no_grad():
        routing = router.route_sequences(hidden, _context(labels, mask))
    assert routing.gates.dtype == torch.float32
    for b, t in mask.nonzero().tolist():  # padding tokens are routed too, but nothing reads their choice
        n = b * LENGTH + t
        logits, chosen, gates = router_reference(name, router, hidden[b, :t + 1][mask[b, :t + 1]].double(),
                                                 int(labels[b]))
        # the reference fixes k: top_k for noisy_top_k and the aux_free routers, 1 for switch, E for soft,
        # expert_choice and oracle (whose unchosen experts have gate 0)
        assert routing.indices.shape == routing.gates.shape == (TOKENS, len(chosen))
        torch.testing.assert_close(routing.logits[n].double(), torch.tensor(logits, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)
        got = dict(zip(routing.indices[n].tolist(), routing.gates[n].tolist()))
        assert sorted(got) == sorted(chosen), f"token {n}: chose {sorted(got)}, the reference {sorted(chosen)}"
        for expert, gate in zip(chosen, gates):
            assert got[expert] == pytest.approx(gate, abs=1e-6), f"token {n}, expert {expert}"


@pytest.mark.parametrize("name", ROUTERS.names())
def test_router_decision_is_per_sequence(name):
    """A sequence's routing is the same alone, in a batch, and in any order of the batch (and for a per-token
    router, a token's is the same whatever its neighbours: sequences of one token)."""
    router = ROUTERS.get(name).from_config(HIDDEN, 8, _config(8, 2))
    _randomise(router, seed=9).eval()
    for batch, length in ((6, 4), (TOKENS, 1)):
        hidden, mask, labels = _sequences(seed=10, batch=batch, length=length)
        mask[:] = True
        labels = labels % 3
        order = torch.randperm(batch, generator=torch.Generator().manual_seed(11))
        with torch.no_grad():
            whole = router.route_sequences(hidden, _context(labels))
            shuffled = router.route_sequences(hidden[order], _context(labels[order]))
            alone = [router.route_sequences(hidden[b:b + 1], _context(labels[b:b + 1])) for b in range(batch)]
        rows = (order.unsqueeze(1) * length + torch.arange(length)).reshape(-1)  # the flat rows of each sequence
        assert torch.equal(shuffled.indices, whole.indices[rows])
        torch.testing.assert_close(shuffled.gates, whole.gates[rows], rtol=0, atol=1e-6)
        for b, single in enumerate(alone):
            assert torch.equal(single.indices, whole.indices[b * length:(b + 1) * length])
            torch.testing.assert_close(single.gates, whole.gates[b * length:(b + 1) * length], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the adapter
@pytest.mark.parametrize("null_expert", [False, True])
@pytest.mark.parametrize("router_type", ROUTERS.names())
@pytest.mark.parametrize("expert_type", EXPERT_BANKS.names())
def test_adapter_is_mlp_plus_scaled_bank_of_the_routed_experts(expert_type, router_type, null_expert):
    """MoEAdapter(h) = MLP(h) + a_l * bank(h; the router's top-k and gates), per token. With a null expert the
    router has one more logit (the last); a token may choose it, and its gate adds nothing: the bank sums the
    chosen real experts only, with their gates as the router gave them (not renormalised)."""
    if router_type == "oracle" and null_expert:
        pytest.skip("oracle refuses a null expert (tests/modeling/routing/test_oracle.py)")
    config = _config(6, 2, expert_type=expert_type, router_type=router_type, null_expert=null_expert)
    torch.manual_seed(12)
    mlp = LlamaStyleMLP(seed=12)
    adapter = MoEAdapter(mlp, HIDDEN, 6, config)
    assert adapter.router.num_experts == 6 + null_expert
    _randomise(adapter.router, seed=13)
    _randomise(adapter.experts, seed=14)
    with torch.no_grad():
        adapter.residual_scale.fill_(0.7)
    adapter.eval()
    adapter.token_mask.domain_labels = torch.tensor([1, 0])  # what integration.surgery.domain_labels sets
    hidden = torch.randn(2, TOKENS // 2, HIDDEN, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        got = adapter(hidden).reshape(TOKENS, HIDDEN)
        flat = hidden.reshape(TOKENS, HIDDEN)
        want, nulls = [], 0
        for n in range(TOKENS):
            b, t = divmod(n, TOKENS // 2)
            _, chosen, gates = router_reference(router_type, adapter.router, hidden[b, :t + 1].double(),
                                                [1, 0][b])
            nulls += chosen.count(6)
            kept = [(i, g) for i, g in zip(chosen, gates) if i != 6]  # the null expert's slot adds nothing
            # (a bank's always-on part, shared_core's identity path or lora_experts' shared expert, stays)
            moe = bank_reference(expert_type, adapter.experts, flat[n:n + 1],
                                 torch.tensor([[i for i, _ in kept]], dtype=torch.long),
                                 torch.tensor([[g for _, g in kept]], dtype=torch.float64))[0]
            want.append(mlp(flat[n]).double() + 0.7 * moe)
    # float32 adapter vs float64 reference: mixlora sums every routed expert's (E_i - MLP), each of a few
    # units with the randomised deltas, so float32 rounding reaches 1e-5; a routing or scaling mistake is O(1)
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-4, atol=1e-4)
    if null_expert and router_type != "expert_choice":  # (expert choice's thresholds are random here)
        assert nulls > 0, "no token chose the null expert: the case is not tested"

