"""MoEAdapter.keep_experts (what pruning does) and split_expert (what dynamic allocation does): every tensor
stacked by expert is declared, sliced or copied, nothing else."""

import copy

import pytest
import torch

from llama_expert import ExpertConfig
from llama_expert.modeling.adapter import MoEAdapter
from llama_expert.modeling.experts import EXPERT_BANKS
from llama_expert.modeling.routing import ROUTERS

HIDDEN, INTERMEDIATE = 16, 24


class LlamaStyleMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = torch.nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = torch.nn.Linear(INTERMEDIATE, HIDDEN, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, h):
        return self.down_proj(self.act_fn(self.gate_proj(h)) * self.up_proj(h))


def _adapter(expert_type, router_type, num_experts=7, **config):
    torch.manual_seed(0)
    adapter = MoEAdapter(LlamaStyleMLP(), HIDDEN, num_experts,
                         ExpertConfig(expert_type=expert_type, router_type=router_type, lora_r=4, top_k=2,
                                      lora_dropout=0.0, **config))
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad or p.dim() == 1:
                p.normal_(std=0.3)
    adapter.token_mask.domain_labels = 1  # every sequence is of domain 1 (only the oracle router reads it)
    return adapter.eval()


def _logits(adapter, hidden):
    """The router logits of ``hidden`` [N, d] as one sequence, routed as the adapter routes it."""
    return adapter.router.route_sequences(hidden.unsqueeze(0), adapter.token_mask).logits


@pytest.mark.parametrize("router_type", ROUTERS.names())
@pytest.mark.parametrize("expert_type", EXPERT_BANKS.names())
def test_every_tensor_stacked_by_expert_is_declared(expert_type, router_type):
    """7 experts (no other dimension is 7): a tensor with 7 rows must be in per_expert_parameters."""
    adapter = _adapter(expert_type, router_type)
    for module in (adapter.router, adapter.experts):
        stacked = {name for name, p in module.named_parameters(recurse=False) if p.shape[0] == 7}
        names = module.per_expert_parameters + getattr(module, "real_expert_parameters", ())
        declared = {name for name in names if getattr(module, name, None) is not None}
        assert stacked == declared, type(module).__name__


@pytest.mark.parametrize("router_type", ROUTERS.names())
@pytest.mark.parametrize("expert_type", EXPERT_BANKS.names())
@torch.no_grad()
def test_kept_experts_compute_what_they_computed(expert_type, router_type):
    adapter = _adapter(expert_type, router_type)
    pruned = copy.deepcopy(adapter)
    keep = torch.tensor([5, 0, 3, 6])
    pruned.keep_experts(keep)
    assert pruned.num_experts == pruned.router.num_experts == pruned.experts.num_experts == 4
    hidden = torch.randn(10, HIDDEN)
    # the router: the kept experts' logits, in the kept order, and their per-expert buffers
    torch.testing.assert_close(_logits(pruned, hidden), _logits(adapter, hidden)[:, keep])
    for name in adapter.router.per_expert_parameters + adapter.router.real_expert_parameters:
        if getattr(adapter.router, name, None) is not None:
            assert torch.equal(getattr(pruned.router, name), getattr(adapter.router, name)[keep])
    # the bank: expert j of the pruned layer is expert keep[j] of the original
    indices = torch.randint(0, 4, (10, 2))
    indices[:, 1] = (indices[:, 0] + 1) % 4
    gates = torch.rand(10, 2)
    torch.testing.assert_close(pruned.experts(hidden, indices, gates), adapter.experts(hidden, keep[indices], gates))
    pruned(hidden.unsqueeze(0))  # and the whole layer runs


def test_keep_experts_rejects_what_cannot_work():
    adapter = _adapter("shared_core", "noisy_top_k", num_experts=4)
    for keep in ([], [0, 0]):
        with pytest.raises(ValueError, match="distinct experts"):
            adapter.keep_experts(keep)
    for keep in ([1, 4], [-1, 2]):
        with pytest.raises(ValueError, match="must lie in 0..3"):
            adapter.keep_experts(keep)
    with pytest.raises(ValueError, match="top_k=2"):
        adapter.keep_experts([3])


@pytest.mark.parametrize("router_type", ROUTERS.names())
@pytest.mark.parametrize("expert_type", EXPERT_BANKS.names())
@torch.no_grad()
def test_split_expert_appends_a_perturbed_copy(expert_type, router_type):
    adapter = _adapter(expert_type, router_type, num_experts=4)
    before = copy.deepcopy(adapter)
    transfers = adapter.split_expert(2, noise=0.01, generator=torch.Generator().manual_seed(0))
    assert adapter.num_experts == adapter.router.num_experts == adapter.experts.num_experts == 5
    for old, new, index in transfers:  # what an optimiser needs to carry its state over
        assert index.tolist() == [0, 1, 2, 3, 2] and new.shape[0] == 5 and old.shape[0] == 4
        assert torch.equal(new[:4], old)
        scale = float(old[2].float().std()) if old[2].numel() > 1 else 0.0
        if new.requires_grad and scale > 0:
            assert not torch.equal(new[4], old[2])
            assert float((new[4] - old[2]).abs().max()) < 0.1 * scale  # a small perturbation
        else:
            assert torch.equal(new[4], old[2])
    hidden = torch.randn(6, HIDDEN)
    torch.testing.assert_close(_logits(adapter, hidden)[:, :4], _logits(before, hidden))
    adapter(hidden.unsqueeze(0))



def _decode_inputs(adapter, hidden, prefix):
    """The pass context of a decode or prompt pass: a left-padded mask over the cache and the new tokens, the
    prefix state a sequence router reads (None: new sequences)."""
    batch, length = hidden.shape[:2]
    mask = torch.ones(batch, length + 3, dtype=torch.long)
    mask[0, :2] = 0  # the first sequence starts later (left padding)
    adapter.token_mask.set(mask if length > 1 else torch.ones(batch, 4, dtype=torch.long))
    adapter.token_mask.prefix = prefix


def _null_for_some_tokens(adapter, hidden, prefix):
    """A null threshold ``D + S / n``: ``S`` the least-squares slope of the pass's nearest prototype distances by
    prefix length, ``D`` between the floors its tokens would tie at, so that the null is chosen for half of them."""
    from llama_expert.integration.prototypes import fit_by_length
    from llama_expert.modeling.routing.prefix_state import sequence_prefix_means

    _decode_inputs(adapter, hidden, prefix)
    means = sequence_prefix_means(adapter.router, hidden, adapter.token_mask)
    keep = means.mask.bool() if means.mask is not None else torch.ones_like(means.counts, dtype=torch.bool)
    with torch.no_grad():
        nearest = -adapter.router.logits(means.means, means.counts)[:, :-1].amax(-1) * adapter.router.temperature
        _, slope = fit_by_length(means.counts[keep].double(), nearest[keep].double())
        below = (nearest[keep] - slope / means.counts[keep]).sort().values  # the floor each token would tie at
        half = len(below) // 2
        adapter.router.null_distance.fill_(float(below[half - 1] + below[half]) / 2)  # half win, half lose
        adapter.router.null_slope.fill_(slope)
        chosen = adapter.router.logits(means.means, means.counts)[keep].argmax(-1) == adapter.router.num_experts - 1
    assert chosen.any() and not chosen.all()


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("router_type,bank,null", [(name, "shared_core", False) for name in ROUTERS.names()]
                         + [("prototype", "mixlora", False),  # mixlora with prototype: a mix of PEFT LoRAs
                            ("prototype", "lora_experts", True)])  # the null's threshold by the prefix's length
def test_the_inference_forward_compiles_as_one_graph(router_type, bank, null, decode):
    """``torch.compile(fullgraph=True)`` of the adapter's eval forward (no gradients) traces without a graph break,
    so no host synchronisation (what a CUDA graph cannot hold), for every router with the default bank, in a prompt
    pass (with padding) and a decode step (one token, with the prefix state earlier passes left), and a mix's
    router with a null expert whose threshold reads each token's prefix length (``pass_counts``, set per pass); it
    computes what the eager forward computes, and a sequence router writes the same prefix sums."""
    from llama_expert.modeling.routing import PrefixState

    adapter = _adapter(bank, router_type, num_experts=4, null_expert=null)
    adapter.decode_kernel = bank != "mixlora"  # mixlora eager: the general path the compiler traces, not its kernel
    hidden = torch.randn(2, 1 if decode else 5, HIDDEN)
    earlier = {adapter.router: (torch.randn(2, HIDDEN), torch.tensor([3.0, 5.0]))} if decode else {}
    if null:
        _null_for_some_tokens(adapter, hidden, PrefixState(dict(earlier)))
    results = []
    for forward in (adapter, torch.compile(adapter, fullgraph=True, backend="aot_eager")):
        prefix = PrefixState(dict(earlier))
        _decode_inputs(adapter, hidden, prefix)
        with torch.no_grad():
            results.append((forward(hidden), prefix.after))
    (eager, eager_sums), (compiled, compiled_sums) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert eager_sums.keys() == compiled_sums.keys()
    assert bool(eager_sums) == (router_type in ("sequence_aux_free", "prototype"))  # the routers that keep sums
    for key in eager_sums:
        torch.testing.assert_close(compiled_sums[key], eager_sums[key])
    torch._dynamo.reset()
