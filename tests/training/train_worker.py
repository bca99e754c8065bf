"""Trains a tiny augmented Llama in a separate process: for the kill -9 test and the two-rank DDP test.

Usage: python train_worker.py OUTPUT_DIR STEPS BATCH_SIZE [--slow] [--resume] [--stop-after N] [--router-losses]
Under torchrun each rank writes its final adapter tensors to OUTPUT_DIR/rank<R>.safetensors.
"""

import os
import sys
import time

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llama_expert import ExpertConfig, augment_model, load_adapter_weights, save_adapter
from llama_expert.integration.surgery import adapter_state_dict
from llama_expert.training.arguments import TrainingArguments
from llama_expert.training.loop import train_model


def tiny_training_setup(seed: int = 0, router_losses: bool = False):
    """The same tiny model, data and config in every process. ``router_losses``: with the load-balancing and
    z losses on (their statistics are global under DDP, so the math still matches one process)."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    # No dropout and no router noise (each rank draws its own noise, one process draws it for the whole batch):
    # then two ranks of batch B do the math of one process with batch 2B, router losses included.
    augment_model(model, ExpertConfig(lora_dropout=0.0, router_noise=False,
                                      router_aux_loss_coef=0.5 if router_losses else 0.0,
                                      router_z_loss_coef=0.01 if router_losses else 0.0))
    blocks = torch.randint(0, 128, (64, 16), generator=torch.Generator().manual_seed(1))
    return model, blocks


def main():
    out, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    slow = "--slow" in sys.argv
    torch.set_num_threads(1)
    model, blocks = tiny_training_setup(router_losses="--router-losses" in sys.argv)

    def save(m, folder):
        if slow:
            time.sleep(0.05)  # widen the window in which kill -9 can land mid-write
        save_adapter(m, folder)

    args = TrainingArguments(output_dir=out, max_steps=steps, batch_size=batch, seq_len=16, eval_every=0,
                             save_every=1, learning_rate=1e-2, progress=False, mixed_precision="no",
                             resume="--resume" in sys.argv,
                             stop_after_steps=int(sys.argv[sys.argv.index("--stop-after") + 1])
                             if "--stop-after" in sys.argv else None)
    extra = None
    if "--router-losses" in sys.argv:
        from llama_expert.integration.surgery import weighted_router_loss
        extra = weighted_router_loss
    train_model(model, blocks, None, args, save_model=save, load_model=load_adapter_weights, extra_loss=extra)
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
