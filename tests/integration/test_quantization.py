"""--quantization-4bit on a CPU: optimum-quanto int4 weights for the frozen base's Linear layers, adapters
trained on top (QLoRA-style)."""

import pytest
import torch

pytest.importorskip("optimum.quanto", reason="optimum-quanto is part of the [quant] extra")

from llama_expert import ExpertConfig, TrainingArguments  # noqa: E402
from llama_expert.evaluation.memory import tensor_bytes  # noqa: E402
from llama_expert.integration.base_models import load_base_model  # noqa: E402
from llama_expert.training.arguments import DataArguments  # noqa: E402
from llama_expert.training.methods import MoEMethod  # noqa: E402
from llama_expert.training.recipe import fine_tune  # noqa: E402


def _linear_weight_bytes(model):
    """Bytes of the projections' weights (a quanto tensor: its packed codes, scales and shifts)."""
    return sum(tensor_bytes(module.weight) for name, module in model.named_modules()
               if "proj" in name and getattr(module, "weight", None) is not None)


@torch.no_grad()
def test_4_bit_linear_weights_take_at_most_035_of_bfloat16_at_smollm2_width(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # one decoder layer of SmolLM2-135M's shape, random weights
    LlamaForCausalLM(LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                                 num_key_value_heads=3, vocab_size=512)).save_pretrained(tmp_path / "base")
    plain = load_base_model(str(tmp_path / "base"), dtype="bfloat16")
    # bfloat16 compute: the groups' scales and shifts are bfloat16 (5 bits per weight with groups of 32; in
    # float32 they would take 6)
    small = load_base_model(str(tmp_path / "base"), dtype="bfloat16", quantization_4bit=True)
    ratio = _linear_weight_bytes(small) / _linear_weight_bytes(plain)
    assert ratio <= 0.35, ratio


@torch.no_grad()
def test_the_base_loads_in_4_bit_on_a_cpu(trained_base):
    folder, _ = trained_base
    small = load_base_model(str(folder), quantization_4bit=True)
    assert type(small.model.layers[0].mlp.gate_proj).__name__ == "QLinear"
    assert type(small.lm_head).__name__ == "Linear"  # the output head stays
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    full = load_base_model(str(folder))(input_ids=ids).logits
    gap = (small(input_ids=ids).logits - full).abs().max() / full.abs().max()
    assert gap < 0.2, float(gap)


def test_adapters_train_on_the_4_bit_base(trained_base, tmp_path):
    folder, text = trained_base
    result = fine_tune(MoEMethod(ExpertConfig(num_experts=4, quantization_4bit=True)),
                       TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=20, batch_size=4, seq_len=32,
                                         eval_every=0, eval_max_tokens=256, progress=False, mixed_precision="no",
                                         learning_rate=1e-2),
                       DataArguments(dataset=str(text)), model_id=str(folder))
    assert result.final_eval["perplexity"] < result.initial_eval["perplexity"]
