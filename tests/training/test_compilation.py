"""``train --compile`` (training/compilation.py): compiled adapters train as eager adapters do (loss, gradients,
the routers' buffers and the weights after optimiser steps, to float tolerance) for every router, with no graph
break; the trainer runs the real inductor-compiled step to the same weights; what cannot work is refused."""

import copy
import dataclasses

import pytest
import torch
import torch._dynamo.utils
from transformers import LlamaConfig, LlamaForCausalLM

from llama_expert import ExpertConfig, augment_model
from llama_expert.errors import ConfigError
from llama_expert.integration.peft_lora import add_lora
from llama_expert.integration.surgery import adapter_state_dict, domain_labels, weighted_router_loss
from llama_expert.modeling.routing import ROUTERS
from llama_expert.training.arguments import TrainingArguments
from llama_expert.training.compilation import COMPILATIONS, compile_for_training
from llama_expert.training.methods import MoEMethod
from llama_expert.training.trainer import train_model


def _tiny(layers=2, **config):
    """A random Llama (hidden 64) with non-zero adapters, no dropout and no router noise: the draws of a compiled
    graph are not eager's, everything else must match."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         max_position_embeddings=64))
    augment_model(model, ExpertConfig(num_experts=4, top_k=2, lora_r=4, lora_dropout=0.0, router_noise=False,
                                      router_jitter=0.0, expert_allocation="uniform", aux_free_bias_rate=0.05,
                                      router_aux_loss_coef=0.1, router_z_loss_coef=0.01, **config))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.train()


def _steps(model, ids, steps=2):
    """Losses, gradients of the last step, and every adapter tensor (routers' buffers too) after ``steps`` steps."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with domain_labels(model, torch.tensor([0, 1])):  # only the oracle reads them
            loss = model(input_ids=ids, labels=ids).loss + weighted_router_loss(model)[0]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses), grads, {n: t.clone() for n, t in adapter_state_dict(model).items()}


@pytest.mark.parametrize("router_type", ROUTERS.names())
def test_compiled_adapters_train_as_eager_ones(router_type):
    eager = _tiny(router_type=router_type)
    compiled = compile_for_training(copy.deepcopy(eager), "adapters", backend="aot_eager")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    torch._dynamo.utils.counters.clear()
    (eager_losses, eager_grads, eager_state), (losses, grads, state) = _steps(eager, ids), _steps(compiled, ids)
    assert not torch._dynamo.utils.counters["graph_break"]  # one graph per adapter pass: the small ops all fuse
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6)
    for name in eager_state:
        torch.testing.assert_close(state[name], eager_state[name], rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_the_trainer_runs_the_inductor_compiled_step_to_the_same_weights(tmp_path):
    """The real thing end to end (inductor's generated code, forward and backward): one decoder layer, so one
    graph to compile."""
    blocks = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(1))
    trained = []
    for choice in ("none", "adapters"):
        model = _tiny(layers=1)
        args = TrainingArguments(output_dir=str(tmp_path / choice), batch_size=2, seq_len=12, max_steps=2,
                                 eval_every=0, learning_rate=1e-2, progress=False, mixed_precision="no", compile=choice)
        result = train_model(model, MoEMethod(model.expert_config), blocks, None, args)
        trained.append((result, adapter_state_dict(model)))
        assert (choice == "adapters") == bool(model.model.layers[0].mlp._compiled_call_impl)
    (eager, eager_state), (compiled, state) = trained
    assert compiled.steps == eager.steps == 2
    for name in eager_state:
        torch.testing.assert_close(state[name], eager_state[name], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_what_cannot_be_compiled_is_refused():
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        compile_for_training(_tiny(use_gradient_checkpointing=True), "adapters")
    torch.manual_seed(0)
    lora = add_lora(LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128)), 4)
    with pytest.raises(ConfigError, match="has none"):
        compile_for_training(lora, "adapters")
    with pytest.raises(ConfigError, match="--compile 'everything'; choose one of adapters, none"):
        compile_for_training(_tiny(), "everything")


def test_the_flag_offers_the_registered_compilations():
    field = next(f for f in dataclasses.fields(TrainingArguments) if f.name == "compile")
    assert tuple(sorted(field.metadata.get("choices", ()))) == tuple(COMPILATIONS.names())
    with pytest.raises(ConfigError, match="--compile must be none or adapters"):
        TrainingArguments(compile="all").validate()
