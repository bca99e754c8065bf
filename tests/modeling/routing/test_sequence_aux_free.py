"""SequenceAuxFreeRouter: a token is routed by the mean of its sequence so far (padding left out), a pass that
continues a sequence from a PrefixState routes as one pass over the whole sequence would, top-1 works, training
balances with aux_free's bias and sends gradients through the prefix means, and its adapter's decode fast path
routes by the prefix means too (tests/modeling/test_fused_inference.py pins it to the general path)."""

import torch

from llama_expert import ExpertConfig
from llama_expert.modeling import MoEAdapter, TokenMask
from llama_expert.modeling.routing import AuxFreeRouter, PrefixState, SequenceAuxFreeRouter

HIDDEN, EXPERTS = 8, 4


def _router(top_k=2, seed=0):
    torch.manual_seed(seed)
    router = SequenceAuxFreeRouter(HIDDEN, EXPERTS, top_k=top_k, bias_rate=0.1)
    with torch.no_grad():
        router.weight.normal_()
    return router.eval()


def _context(mask=None, prefix=None):
    context = TokenMask()
    context.set(mask)
    context.prefix = prefix
    return context


def test_a_token_is_routed_by_the_mean_of_its_sequence_so_far_without_padding():
    router = _router()
    hidden = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    hidden[1, :2] = float("nan")  # a padding row may hold anything
    plain = AuxFreeRouter(HIDDEN, EXPERTS, top_k=2).eval()
    plain.load_state_dict(router.state_dict())
    with torch.no_grad():
        routing = router.route_sequences(hidden, _context(mask))
        for b, t in mask.nonzero().tolist():
            mean = hidden[b, :t + 1][mask[b, :t + 1]].mean(dim=0, keepdim=True)
            want = plain(mean)
            torch.testing.assert_close(routing.logits[b * 6 + t], want.logits[0])
            assert routing.indices[b * 6 + t].tolist() == want.indices[0].tolist()
            torch.testing.assert_close(routing.gates[b * 6 + t], want.gates[0])


def test_a_pass_that_continues_from_the_prefix_state_routes_as_the_whole_sequence_does():
    router = _router()
    hidden = torch.randn(3, 9, HIDDEN, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :4] = False
    with torch.no_grad():
        whole = router.route_sequences(hidden, _context(mask))
        state, pieces = PrefixState(), []
        for start, end in ((0, 5), (5, 6), (6, 9)):  # a prefill, one decoding step, three tokens
            context = _context(mask[:, :end], state)
            pieces.append(router.route_sequences(hidden[:, start:end], context))
            again = router.route_sequences(hidden[:, start:end], context)  # reading never sees this pass's writes
            assert torch.equal(again.indices, pieces[-1].indices)
            state = state.following()
    for field in ("logits", "gates"):
        got = torch.cat([getattr(p, field).view(3, -1, getattr(p, field).shape[-1]) for p in pieces], dim=1)
        torch.testing.assert_close(got.reshape(27, -1), getattr(whole, field), rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([p.indices.view(3, -1, 2) for p in pieces], dim=1).reshape(27, 2), whole.indices)


def test_top_1_routing():
    router = _router(top_k=1)
    with torch.no_grad():
        routing = router.route_sequences(torch.randn(2, 5, HIDDEN), _context())
    assert routing.indices.shape == (10, 1) and torch.equal(routing.gates, torch.ones(10, 1))


def test_training_moves_the_bias_and_sends_gradients_through_the_prefix_means():
    router = _router().train()
    hidden = torch.randn(2, 7, HIDDEN, requires_grad=True)
    routing = router.route_sequences(hidden, _context())
    (routing.gates[:, 0] * torch.arange(14.0)).sum().backward()
    assert hidden.grad[:, 0].abs().sum() > 0  # the first token's state steers every later token's routing
    assert router.bias.abs().sum() > 0 and router.aux_loss.item() == 0.0 and router.z_loss is not None


def test_the_adapter_takes_the_fast_path_by_the_prefix_means():
    adapter = MoEAdapter(torch.nn.Linear(HIDDEN, HIDDEN), HIDDEN, EXPERTS,
                         ExpertConfig(router_type="sequence_aux_free", num_experts=EXPERTS, lora_r=2)).eval()
    routing = adapter.router.kernel_routing()
    assert routing.prefix_mean and routing.logits == "linear" and adapter.router.inference_rows() is None
    with torch.no_grad():
        assert adapter.use_fused_inference(torch.zeros(1, 1, HIDDEN))
