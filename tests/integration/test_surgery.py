import copy
import json
import re

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llama_expert import (ConfigError, ExpertConfig, MoEAdapter, adapter_parameters, augment_model, load_base_model,
                          parameter_counts, parameter_report, remove_adapters, router_losses, weighted_router_loss)
from llama_expert.modeling import EXPERT_BANKS
from llama_expert.modeling.decode_kernel import kernel_library

ADAPTER_NAME = re.compile(r"\.mlp\.(router\.|experts\.|residual_scale$)")


def _batch(vocab=128, batch=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _padded_mask(batch=3, length=10):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    return mask


@torch.no_grad()
def _logits(model, ids, mask=None):
    return model(input_ids=ids, attention_mask=mask).logits


INITS = [("shared_core", "zero"), ("shared_down", "zero"), ("shared_down", "distinct"), ("mixlora", "zero"),
         ("lora_experts", "zero")]


@pytest.mark.parametrize("expert_type,expert_init", INITS)
def test_augmented_logits_equal_base_at_step_zero(tiny_model, expert_type, expert_init):
    ids, mask = _batch(), _padded_mask()
    base, base_padded = _logits(tiny_model, ids), _logits(tiny_model, ids, mask)
    augment_model(tiny_model, ExpertConfig(expert_type=expert_type, expert_init=expert_init))
    assert all(isinstance(layer.mlp, MoEAdapter) for layer in tiny_model.model.layers)
    expected_bank = EXPERT_BANKS.get(expert_type)
    assert all(isinstance(layer.mlp.experts, expected_bank) for layer in tiny_model.model.layers)
    assert (_logits(tiny_model, ids) - base).abs().max().item() == 0
    assert (_logits(tiny_model, ids, mask) - base_padded).abs().max().item() == 0


@pytest.mark.parametrize("expert_type,expert_init", INITS)
def test_step_zero_exact_with_a_bf16_base(tiny_model, expert_type, expert_init):
    tiny_model.to(torch.bfloat16)
    ids = _batch()
    base = _logits(tiny_model, ids)
    augment_model(tiny_model, ExpertConfig(expert_type=expert_type, expert_init=expert_init))
    out = _logits(tiny_model, ids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, base)


def test_distinct_init_gives_distinct_experts_and_a_router_signal_after_one_step(tiny_model):
    """shared_down + "distinct": random B_i, alpha_l = 0; step 1 moves alpha_l, then the LM loss reaches the router."""
    augment_model(tiny_model, ExpertConfig(expert_type="shared_down", expert_init="distinct", router_aux_loss_coef=0.0,
                                           router_z_loss_coef=0.0))
    layers = [layer.mlp for layer in tiny_model.model.layers]
    assert all(a.residual_scale.item() == 0.0 for a in layers)
    assert all(not torch.equal(a.experts.up[0], a.experts.up[1]) for a in layers)
    tiny_model.train()
    ids = _batch()
    opt = torch.optim.AdamW(adapter_parameters(tiny_model), lr=1e-2)
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    assert all(a.residual_scale.grad.abs().item() > 0 for a in layers)
    assert all(a.router.weight.grad is None or a.router.weight.grad.abs().sum() == 0 for a in layers)
    opt.step()
    opt.zero_grad()
    assert all(a.residual_scale.item() != 0.0 for a in layers)
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    assert all(a.router.weight.grad.abs().sum() > 0 for a in layers)


@pytest.mark.parametrize("expert_type,expert_init", [("shared_core", "distinct"), ("mixlora", "distinct"),
                                                     ("shared_down", "random")])
def test_unsupported_expert_init_is_refused_before_building(tiny_model, expert_type, expert_init):
    with pytest.raises(ConfigError, match=f"does not support --expert-init {expert_init};"):
        augment_model(tiny_model, ExpertConfig(expert_type=expert_type, expert_init=expert_init))
    assert not any(isinstance(layer.mlp, MoEAdapter) for layer in tiny_model.model.layers)


def test_adapters_are_float32_and_base_dtype_kept(tiny_model):
    tiny_model.to(torch.bfloat16)
    ids = _batch()
    base = _logits(tiny_model, ids)
    augment_model(tiny_model, ExpertConfig())
    assert all(p.dtype == torch.float32 for p in adapter_parameters(tiny_model))
    out = _logits(tiny_model, ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - base.float()).abs().max().item() <= 1e-5


def test_greedy_generate_identical_at_step_zero(tiny_model):
    ids = _batch(batch=2, length=6, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left-padded prompt
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    base = tiny_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    augment_model(tiny_model, ExpertConfig())
    out = tiny_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert out.shape == (2, 18)
    assert torch.equal(out, base)


def test_gradients_reach_only_adapter_parameters(tiny_model):
    augment_model(tiny_model, ExpertConfig())
    tiny_model.train()
    ids = _batch()
    loss = tiny_model(input_ids=ids, attention_mask=_padded_mask(), labels=ids).loss
    loss = loss + weighted_router_loss(tiny_model)[0]
    loss.backward()
    adapter_names = []
    for name, p in tiny_model.named_parameters():
        if name.endswith(".router.bias"):  # aux_free's selection bias: saved with the adapter, moved without gradients
            assert not p.requires_grad and p.grad is None, name
        elif ADAPTER_NAME.search(name):
            adapter_names.append(name)
            assert p.requires_grad, name
            assert p.grad is not None, name
        else:
            assert not p.requires_grad, name
            assert p.grad is None, name
    assert len(adapter_names) == len([p for p in adapter_parameters(tiny_model) if p.requires_grad])
    # the zero-initialised up-projections and the routers do receive a signal
    for layer in tiny_model.model.layers:
        assert layer.mlp.experts.up.grad.abs().sum() > 0
        assert layer.mlp.router.weight.grad.abs().sum() > 0


def test_optimizer_step_leaves_base_bit_identical(tiny_model):
    before = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    augment_model(tiny_model, ExpertConfig())
    adapter_before = [p.detach().clone() for p in adapter_parameters(tiny_model)]
    tiny_model.train()
    opt = torch.optim.AdamW(adapter_parameters(tiny_model), lr=1e-2, weight_decay=0.1)
    ids = _batch()
    for _ in range(2):
        loss = tiny_model(input_ids=ids, labels=ids).loss + weighted_router_loss(tiny_model)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = tiny_model.state_dict()
    for key, value in before.items():
        key_now = key.replace(".mlp.", ".mlp.base_mlp.")
        assert torch.equal(after[key_now], value), key
    assert any(not torch.equal(a, p) for a, p in zip(adapter_before, adapter_parameters(tiny_model)))


def test_remove_adapters_restores_the_model(tiny_model):
    tiny_model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in tiny_model.named_parameters()}
    mlps = [layer.mlp for layer in tiny_model.model.layers]
    ids, mask = _batch(), _padded_mask()
    base = _logits(tiny_model, ids, mask)
    augment_model(tiny_model, ExpertConfig())
    with torch.no_grad():  # make the adapters non-trivial, so that a leftover adapter would show
        for p in adapter_parameters(tiny_model):
            p.normal_(std=0.1)
    assert not torch.equal(_logits(tiny_model, ids, mask), base)
    assert remove_adapters(tiny_model) is tiny_model
    assert all(layer.mlp is mlp for layer, mlp in zip(tiny_model.model.layers, mlps))
    assert torch.equal(_logits(tiny_model, ids, mask), base)
    assert {n: p.requires_grad for n, p in tiny_model.named_parameters()} == flags
    assert not hasattr(tiny_model, "expert_config")
    assert len(tiny_model._forward_pre_hooks) == 0
    with pytest.raises(ConfigError):
        remove_adapters(tiny_model)
    augment_model(tiny_model, ExpertConfig())  # can be augmented again
    assert (_logits(tiny_model, ids, mask) - base).abs().max().item() <= 1e-5


def test_augmenting_twice_raises(tiny_model):
    augment_model(tiny_model, ExpertConfig())
    with pytest.raises(ConfigError, match="remove_adapters"):
        augment_model(tiny_model, ExpertConfig())


def test_model_without_mlp_layers_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4)]))
    with pytest.raises(ConfigError, match="Llama-family"):
        augment_model(model, ExpertConfig())
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen


def test_allocation_list_of_wrong_length_raises(tiny_model):
    with pytest.raises(ConfigError, match="one count per layer"):
        augment_model(tiny_model, ExpertConfig(expert_allocation=[4, 4, 4]))


def test_router_losses_before_forward_raises(tiny_model):
    with pytest.raises(RuntimeError, match="forward"):
        router_losses(tiny_model)
    augment_model(tiny_model, ExpertConfig())
    with pytest.raises(RuntimeError, match="forward"):
        router_losses(tiny_model)
    _logits(tiny_model, _batch())  # eval under no_grad: inference computes no router losses
    with pytest.raises(RuntimeError, match="no_grad"):
        router_losses(tiny_model)
    tiny_model(input_ids=_batch())
    losses = router_losses(tiny_model)
    assert set(losses) == {"aux_loss", "z_loss"}
    mods = [layer.mlp for layer in tiny_model.model.layers]
    assert losses["aux_loss"].item() == pytest.approx(sum(m.aux_loss.item() for m in mods) / 4, rel=1e-6)
    assert losses["z_loss"].item() == pytest.approx(sum(m.z_loss.item() for m in mods) / 4, rel=1e-6)
    assert weighted_router_loss(tiny_model)[0].item() == pytest.approx(
        0.01 * losses["aux_loss"].item() + 0.001 * losses["z_loss"].item(), rel=1e-6)


@pytest.mark.parametrize("expert_type", ["shared_core", "lora_experts"])
def test_a_null_expert_and_a_balance_window_keep_step_zero_exact(tiny_model, expert_type):
    ids, mask = _batch(), _padded_mask()
    base = _logits(tiny_model, ids, mask)
    augment_model(tiny_model, ExpertConfig(expert_type=expert_type, null_expert=True, balance_window=64,
                                           shared_expert_rank=4, router_mi_loss_coef=0.1))
    assert torch.equal(_logits(tiny_model, ids, mask), base)
    tiny_model.train()
    tiny_model(input_ids=ids, attention_mask=mask, labels=ids)  # a training pass runs with all of them
    assert set(weighted_router_loss(tiny_model)[1]) == {"aux_loss", "z_loss", "mi_loss"}


def test_weighted_router_loss_adds_each_registered_loss_in_use(tiny_model):
    """``mi_loss`` joins the sum, weighted by --router-mi-loss-coef, only when that is above 0 (the default 0 leaves
    the total as it was)."""
    augment_model(tiny_model, ExpertConfig(router_mi_loss_coef=0.5))
    tiny_model(input_ids=_batch())
    weighted, losses = weighted_router_loss(tiny_model)
    mods = [layer.mlp for layer in tiny_model.model.layers]
    mi = sum(m.router.extra_losses["mi_loss"].item() for m in mods) / 4
    assert losses["mi_loss"].item() == pytest.approx(mi, rel=1e-6) and mi < 0  # -(mutual information) <= 0
    assert weighted.item() == pytest.approx(
        0.01 * losses["aux_loss"].item() + 0.001 * losses["z_loss"].item() + 0.5 * mi, rel=1e-6)
    tiny_model.model.layers[0].mlp.router.weight.grad = None
    weighted.backward()
    assert tiny_model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_parameter_counts(tiny_model):
    base_total = sum(p.numel() for p in tiny_model.parameters())
    augment_model(tiny_model, ExpertConfig())
    c = parameter_counts(tiny_model)
    assert c["trainable"] == c["routers"] + c["experts"] + c["scales"]
    assert c["trainable"] + c["router_state"] == sum(p.numel() for p in adapter_parameters(tiny_model))
    assert c["total"] == base_total + c["trainable"] + c["router_state"]
    assert c["frozen"] == base_total
    assert c["scales"] == 4
    assert c["experts_per_layer"] == [4, 8, 6, 4]
    # the default aux_free router: W_g (E x d) trains; its selection bias (E) is saved, not trained
    assert c["routers"] == 64 * sum(c["experts_per_layer"])
    assert c["router_state"] == sum(c["experts_per_layer"])
    # shared_core: A and B (r x d each) + per-expert cores (r x r twice)
    assert c["experts"] == 4 * 2 * 16 * 64 + 2 * 16 * 16 * sum(c["experts_per_layer"])


def test_mixlora_parameter_counts_and_gradients(tiny_model):
    """One mixlora expert is one rank-r LoRA on gate/up/down: 3*r*(d+I); the base weights are not the bank's."""
    augment_model(tiny_model, ExpertConfig(expert_type="mixlora"))
    c = parameter_counts(tiny_model)
    d, i = tiny_model.config.hidden_size, tiny_model.config.intermediate_size
    assert c["experts"] == 3 * 16 * (d + i) * sum(c["experts_per_layer"])
    assert c["trainable"] == sum(p.numel() for p in adapter_parameters(tiny_model) if p.requires_grad)
    tiny_model.train()
    ids = _batch()
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    for layer in tiny_model.model.layers:  # at step 0 the zero D matrices take the LM gradient
        bank = layer.mlp.experts
        assert bank.gate_up.grad.abs().sum() > 0 and bank.down_up.grad.abs().sum() > 0
        assert layer.mlp.base_mlp.gate_proj.weight.grad is None


LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64)


SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64)


def _trainable_on_meta(shape, config):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    augment_model(model, config)
    return parameter_counts(model)


def test_lora_experts_budgets_match_lora_r4_on_smollm2_and_fit_llama_3_2_1b():
    """The settings docs/design.md section 3 gives: 4 experts of rank 5 in every layer match PEFT LoRA r=4 on the
    MLP projections of SmolLM2-135M (3 * 4 * (576 + 1536) * 30 = 760,320) within 0.01%; 4 experts of rank 8 stay
    under 0.2% of Llama 3.2 1B. Per layer: routers d*E, experts 2*d*r_e*E, alpha_l 1."""
    matched = _trainable_on_meta(SMOLLM2_135M, ExpertConfig(expert_type="lora_experts", num_experts=4, expert_rank=5,
                                                             expert_allocation="uniform"))
    assert matched["trainable"] == 30 * (576 * 4 + 2 * 576 * 5 * 4 + 1) == 760_350
    assert abs(matched["trainable"] / 760_320 - 1) < 0.0001
    llama = _trainable_on_meta(LLAMA_32_1B, ExpertConfig(expert_type="lora_experts", num_experts=4, expert_rank=8,
                                                         expert_allocation="uniform"))
    assert llama["trainable"] == 16 * (2048 * 4 + 2 * 2048 * 8 * 4 + 1) == 2_228_240
    assert llama["trainable"] / llama["total"] <= 0.002


def test_budget_on_llama_3_2_1b_architecture():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_32_1B))
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400
    augment_model(model, ExpertConfig())
    c = parameter_counts(model)
    assert c["frozen"] == 1_235_814_400
    assert c["trainable"] > 0
    assert c["trainable"] / c["total"] <= 0.002
    assert c["experts_per_layer"] == [4, 4, 6, 6, 7, 7, 8, 8, 6, 6, 5, 5, 5, 5, 4, 4]
    assert all(p.device.type == "meta" for p in adapter_parameters(model))
    report = parameter_report(model)
    for word in ("routers", "experts", "scales", "trainable"):
        assert word in report
    assert f"{c['trainable']:,}" in report
    assert "1,235,814,400" in report


def test_padding_mask_reaches_the_routers(tiny_model):
    augment_model(tiny_model, ExpertConfig())
    ids, mask = _batch(), _padded_mask()
    routers = [layer.mlp.router for layer in tiny_model.model.layers]
    for r in routers:
        r.record_statistics = True
    _logits(tiny_model, ids, mask)
    real_tokens = int(mask.sum())
    assert real_tokens < ids.numel()
    for r in routers:
        assert r.tokens_seen.item() == real_tokens
        assert r.expert_counts.sum().item() == real_tokens * 2
        r.reset_statistics()
    # the next call without a mask counts every token again (no stale mask)
    _logits(tiny_model, ids)
    for r in routers:
        assert r.tokens_seen.item() == ids.numel()
        assert r.expert_counts.sum().item() == ids.numel() * 2



@pytest.mark.parametrize("training", [False, True])
def test_adapters_follow_the_model_mode(tiny_model, training):
    """Adapters injected into an eval-mode model must be in eval mode too (no router noise, no dropout)."""
    tiny_model.train(training)
    augment_model(tiny_model, ExpertConfig())
    for layer in tiny_model.model.layers:
        assert all(m.training == training for m in layer.mlp.modules()), layer.mlp


def test_trained_adapter_is_deterministic_in_eval_mode(tiny_model):
    tiny_model.eval()
    augment_model(tiny_model, ExpertConfig(router_type="noisy_top_k"))
    with torch.no_grad():
        for layer in tiny_model.model.layers:
            layer.mlp.experts.up.normal_(std=0.5)
            layer.mlp.router.noise_weight.normal_(std=1.0)
    ids = _batch()
    assert torch.equal(_logits(tiny_model, ids), _logits(tiny_model, ids))


LLAMA_32_3B = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=128)


def test_budget_on_llama_3_2_3b_architecture():
    """meta-llama/Llama-3.2-3B's config.json: the default stays under 0.2% trainable (3.31 M of 3.21 B)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_32_3B))
    assert sum(p.numel() for p in model.parameters()) == 3_212_749_824
    augment_model(model, ExpertConfig())
    c = parameter_counts(model)
    assert c["trainable"] == 3_311_644 and c["trainable"] / c["total"] <= 0.002
    assert c["experts_per_layer"] == [4, 4, 4, 4, 6, 6, 6, 7, 7, 7, 7, 8, 8, 8, 6, 6, 6, 6, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4]



def test_the_decode_kernel_is_checked_once_per_forward_pass_and_released_after(tiny_model):
    """The model's hooks hand every adapter its compiled kernel for one pass (integration.surgery), the pass gives
    the general path's logits, and no adapter keeps the kernel after the pass, even one that raised."""
    model = augment_model(tiny_model, ExpertConfig(num_experts=4, top_k=2)).eval()
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn_like(p) * 0.3)
    layers = [m for m in model.modules() if isinstance(m, MoEAdapter)]
    seen = []
    layers[1].base_mlp.register_forward_hook(lambda module, args, output: seen.append(layers[1].pass_kernel))
    ids = _batch()
    fused = _logits(model, ids)
    # the kernel of the pass is the plan's (None only without a C compiler: then the PyTorch fused path ran)
    assert seen[0] is layers[1].inference_plan.kernel
    assert seen[0] is not None or kernel_library() is None
    assert all(adapter.pass_kernel is None for adapter in layers)
    for adapter in layers:
        adapter.fused_inference = False
    torch.testing.assert_close(fused, _logits(model, ids), rtol=1e-5, atol=1e-5)
    for adapter in layers:
        adapter.fused_inference = True
    with torch.enable_grad():  # gradients on: no kernel for this pass
        model(input_ids=ids)
    assert seen[-1] is None

    def fail(module, args, output):
        raise RuntimeError("stop")
    handle = layers[0].base_mlp.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="stop"), torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    assert all(adapter.pass_kernel is None for adapter in layers)


# ---------------------------------------------------------------------------------------------- lm-evaluation-harness
# The harness sees an augmented model as an ordinary Transformers model (its HFLM wrapper). It fetches its stock
# tasks from the Hub, so the test defines a tiny local task (a rolling log-likelihood over three WikiText-2
# paragraphs read from a JSON-lines file) with the harness's own YAML.
TASK_YAML = """task: tiny_wikitext
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
metadata:
  version: 1.0
"""


def _harness_results(model, tokenizer, task_dir):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=256)
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_wikitext"], task_manager=TaskManager(include_path=str(task_dir)),
                                      limit=3, bootstrap_iters=0)
    return results["results"]["tiny_wikitext"]


def test_augmented_model_runs_in_lm_eval_harness(tmp_path, shared_data, chat_folder, embedded_tokenizer):
    """On a tiny random Llama with the embedded model's tokenizer: what matters is how the harness sees an
    augmented model, not SmolLM2's numbers."""
    pytest.importorskip("lm_eval")
    wikitext_test = shared_data("wikitext-2-raw/wiki.test.raw")  # skips naming the path when missing; fails on CI
    base, tokenizer = load_base_model(str(chat_folder)).eval(), embedded_tokenizer
    paragraphs = [line for line in wikitext_test.read_text().splitlines() if len(line) > 200][:3]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"text": p[:600]}) + "\n" for p in paragraphs))
    (tmp_path / "tiny_wikitext.yaml").write_text(TASK_YAML.format(data=data))

    augmented = augment_model(copy.deepcopy(base), ExpertConfig()).eval()
    got = _harness_results(augmented, tokenizer, tmp_path)
    want = _harness_results(base, tokenizer, tmp_path)
    assert 1.0 < got["word_perplexity,none"] < float("inf")
    # fresh adapters compute exactly the base model, so the harness must see the same numbers
    assert got["word_perplexity,none"] == pytest.approx(want["word_perplexity,none"], rel=1e-5)


def test_domain_labels_route_each_sequence_to_its_group_and_a_pass_without_them_is_refused(tiny_model):
    """The oracle router: in every layer, the tokens of a domain-d sequence use experts d*E//D .. (d+1)*E//D - 1
    only, all of them alike; the labels hold inside the block only; a model without adapters ignores them."""
    from llama_expert import domain_labels
    from llama_expert.metrics.routing import recording_routing
    from llama_expert.integration.surgery import adapters

    with domain_labels(tiny_model, torch.tensor([0])):  # no adapters: nothing to route, nothing changes
        tiny_model(input_ids=_batch(batch=1))
    model = augment_model(tiny_model, ExpertConfig(router_type="oracle", num_experts=5, oracle_domains=2,
                                                   expert_allocation="uniform"))
    ids, mask = _batch(), _padded_mask()
    for domain, group in ((0, [0, 1]), (1, [2, 3, 4])):
        with recording_routing(model), domain_labels(model, torch.full((3,), domain)), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        for _, adapter in adapters(model):
            tokens = int(mask.sum())
            assert adapter.router.expert_counts.tolist() == [tokens if e in group else 0 for e in range(5)]
    with recording_routing(model), domain_labels(model, torch.tensor([1, 0, 1])), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # one sequence per domain label
    rows = mask.sum(dim=1).tolist()  # 10, 6 and 7 tokens
    for _, adapter in adapters(model):
        assert adapter.router.expert_counts.tolist() == [rows[1]] * 2 + [rows[0] + rows[2]] * 3
    with pytest.raises(ConfigError, match="this forward pass has none"):
        model(input_ids=ids)  # outside the block the labels are gone
