"""AuxFreeRouter: its balancing bias moves toward balance over several training batches (never at eval, never for
padding), and is saved and loaded with the adapter."""

import torch

from llama_expert import ExpertConfig, load_augmented_model, save_adapter
from llama_expert.integration.surgery import adapter_state_dict, adapters
from llama_expert.modeling.routing import AuxFreeRouter

HIDDEN = 8


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


def test_with_a_null_expert_the_bias_balances_the_experts_among_themselves():
    """The null's bias stays 0 and the real experts' mean bias stays 0: the updates move the experts against each
    other, never toward or away from the null (else a persistent imbalance would drift every real bias up)."""
    config = ExpertConfig(router_type="aux_free", num_experts=3, top_k=1, null_expert=True, aux_free_bias_rate=0.1)
    router = AuxFreeRouter.build(HIDDEN, 3, config).train()
    with torch.no_grad():
        router.weight.copy_(torch.eye(4, HIDDEN))
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        router(_skewed_batch(generator))  # expert 0 overloaded: signs (-1, +1, +1) uncentred
    assert router.bias[3] == 0.0
    assert router.bias[:3].mean().abs() < 1e-6
    assert router.bias[0] < 0
