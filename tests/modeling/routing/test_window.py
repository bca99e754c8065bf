"""LoadWindow: the load the balancing acts on, a moving average over about ``balance_window`` sequences. By hand
for the window itself, then through the routers that balance (the loss's f_i, aux_free's load), and once per
pass under gradient checkpointing."""

import pytest
import torch

from llama_expert import ExpertConfig, load_augmented_model
from llama_expert.integration.surgery import adapters
from llama_expert.modeling.routing import ROUTERS, load_balancing_loss
from llama_expert.modeling.routing.window import LoadWindow

HIDDEN = 8


def test_window_zero_is_each_pass_alone():
    window = LoadWindow(3, 0)
    counts = torch.tensor([4.0, 1.0, 1.0])
    assert window(counts, torch.tensor(2.0)) is counts
    assert torch.equal(window.load, torch.zeros(3, dtype=torch.float64))


def test_the_window_decays_by_one_minus_one_over_w_per_sequence():
    window = LoadWindow(2, 4).train()
    first = window(torch.tensor([6.0, 2.0]), torch.tensor(2.0))
    assert first.tolist() == [6.0, 2.0]
    second = window(torch.tensor([0.0, 8.0]), torch.tensor(3.0))
    beta = 0.75 ** 3  # (1 - 1/4) per sequence, three sequences in the second pass
    assert second.tolist() == pytest.approx([6.0 * beta, 2.0 * beta + 8.0])
    assert window.load.tolist() == pytest.approx(second.tolist())


def test_eval_reads_the_window_and_a_recomputation_repeats_the_pass():
    window = LoadWindow(2, 4).train()
    window(torch.tensor([6.0, 2.0]), torch.tensor(1.0))
    trained = window(torch.tensor([1.0, 1.0]), torch.tensor(1.0))
    again = window(torch.tensor([5.0, 5.0]), torch.tensor(1.0), recomputing=True)  # gradient checkpointing
    assert torch.equal(again, trained) and torch.equal(window.load, trained.double())
    window.eval()
    seen = window(torch.tensor([0.0, 4.0]), torch.tensor(1.0))
    assert seen.tolist() == pytest.approx([6.0 * 0.75 ** 2 + 0.75, 2.0 * 0.75 ** 2 + 0.75 + 4.0])
    assert torch.equal(window.load, trained.double())  # eval does not move it


def test_selecting_experts_keeps_each_ones_window():
    window = LoadWindow(3, 10).train()
    window(torch.tensor([1.0, 2.0, 3.0]), torch.tensor(1.0))
    window.select(torch.tensor([2, 0, 0]))
    assert window.load.tolist() == [3.0, 1.0, 1.0]


def _router(name, window, **kw):
    config = ExpertConfig(router_type=name, num_experts=2, top_k=1, balance_window=window, router_noise=False,
                          router_jitter=0.0, **kw)
    router = ROUTERS.get(name).build(HIDDEN, 2, config).train()
    with torch.no_grad():
        router.weight.copy_(torch.eye(2, HIDDEN))
    return router


def _tokens(expert, count):
    hidden = torch.zeros(count, HIDDEN)
    hidden[:, expert] = 1.0
    return hidden


def test_the_load_balancing_loss_takes_f_from_the_window():
    """Batch 1 sends 6 tokens of 2 sequences to expert 0, batch 2 sends 4 tokens of 1 sequence to expert 1: with a
    window of 4 sequences f = (6 * 0.75, 4) / (4.5 + 4), with none f = (0, 1)."""
    for window, f in ((4, torch.tensor([4.5, 4.0]) / 8.5), (0, torch.tensor([0.0, 1.0]))):
        router = _router("noisy_top_k", window)
        router(_tokens(0, 6), sequences=2)
        routing = router(_tokens(1, 4), sequences=1)
        want = load_balancing_loss(routing.probs, routing.indices, 2, counts=f * 4)
        assert router.aux_loss.item() == pytest.approx(want.item(), rel=1e-6), window
        assert router.aux_loss.item() == pytest.approx(2 * float((f * routing.probs.mean(0)).sum()), rel=1e-6)


def test_aux_free_moves_its_bias_by_the_windowed_load():
    """After a batch overloading expert 0 and a smaller one overloading expert 1, the window still sees expert 0 as
    the busier one (bias 0 down twice); each batch alone would push it back up in the second step."""
    steps = {}
    for window in (0, 100):
        router = _router("aux_free", window, aux_free_bias_rate=1.0)
        router(_tokens(0, 8), sequences=2)
        router(_tokens(1, 2), sequences=2)
        steps[window] = router.bias.tolist()
    assert steps[100] == [-2.0, 2.0]
    assert steps[0] == [0.0, 0.0]


@pytest.mark.parametrize("router_type", ["noisy_top_k", "aux_free"])
def test_the_window_moves_once_per_pass_under_gradient_checkpointing(tiny_folder, router_type):
    """The recomputed forward must neither move the window again nor balance on another f (the router's gradient
    would change). (aux_free's recomputation routes with the bias this pass already moved, as without a window:
    docs/design.md section 2; its gradient is not compared.)"""
    config = ExpertConfig(router_type=router_type, num_experts=4, top_k=2, expert_allocation="uniform",
                          balance_window=3, router_noise=False, lora_dropout=0.0, aux_free_bias_rate=0.1)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, _ = load_augmented_model(str(tiny_folder), config=config)
        for _, adapter in adapters(model):
            with torch.no_grad():
                adapter.experts.up.normal_()  # B != 0: the router gets gradients from the LM loss too
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for _ in range(2):
            model.zero_grad()
            output = model(input_ids=ids, labels=ids)
            (output.loss + sum(a.aux_loss for _, a in adapters(model))).backward()
        results.append([(a.router.load_window.load.clone(), a.router.weight.grad.clone()) for _, a in adapters(model)])
    for (load, grad), (load_ckpt, grad_ckpt) in zip(*results):
        assert load.sum() > 0
        torch.testing.assert_close(load_ckpt, load, rtol=0, atol=0)
        if router_type != "aux_free":
            torch.testing.assert_close(grad_ckpt, grad, rtol=1e-6, atol=1e-9)
