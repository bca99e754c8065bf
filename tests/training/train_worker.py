"""Trains a tiny augmented Llama in a separate process: for the kill -9 test and the two-rank DDP test.

Usage: python train_worker.py OUTPUT_DIR STEPS BATCH_SIZE [--slow] [--resume] [--stop-after N] [--router-losses]
       [--router-noise] [--router-type NAME] [--balance-window] [--local-statistics] [--no-gradient-average]
       [--cases A,B,...]
Under torchrun each rank writes its final adapter tensors to OUTPUT_DIR/rank<R>.safetensors; with ``--cases`` it
trains each named set-up of CASES in turn, into OUTPUT_DIR/<case>/.
"""

import contextlib
import os
import sys
import time

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from llama_expert import ExpertConfig, augment_model
from llama_expert.integration.surgery import adapter_state_dict
from llama_expert.training.arguments import TrainingArguments
from llama_expert.training.methods import MoEMethod
from llama_expert.training.trainer import train_model


def tiny_training_setup(seed: int = 0, router_losses: bool = False, router_noise: bool = False,
                        router_type: str = "noisy_top_k", balance_window: int = 0):
    """The same tiny model, data and config in every process. ``router_losses``: with the load-balancing and
    z losses on; ``router_noise``: noisy top-k's noise on; ``balance_window``: balancing over that many sequences.
    Their statistics are global and the noise is drawn for the global batch under data parallelism, so two ranks
    still do the math of one process."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    # No dropout: each rank draws the dropout masks of its own shard.
    augment_model(model, ExpertConfig(lora_dropout=0.0, router_noise=router_noise, router_type=router_type,
                                      aux_free_bias_rate=0.05, router_aux_loss_coef=0.5 if router_losses else 0.0,
                                      router_z_loss_coef=0.01 if router_losses else 0.0,
                                      balance_window=balance_window))
    blocks = torch.randint(0, 128, (64, 16), generator=torch.Generator().manual_seed(1))
    return model, blocks


@contextlib.contextmanager
def local_statistics():
    """Break the mechanism on purpose (the tests show that it matters): every rank balances with its own
    expert counts, updates the aux_free bias from its own load and draws router noise for its own tokens (both
    balancing statistics reach the ranks through ``losses.global_sums``)."""
    from llama_expert.modeling.routing import losses, noisy_topk

    saved = losses.global_sums, noisy_topk.data_parallel_draw
    losses.global_sums = lambda *tensors: tensors
    noisy_topk.data_parallel_draw = lambda like, draw=torch.randn: draw(like.shape, dtype=like.dtype, device=like.device)
    try:
        yield
    finally:
        losses.global_sums, noisy_topk.data_parallel_draw = saved


# Routing set-ups the data-parallel tests run, by name: each is a list of this worker's flags.
CASES = {"lm-loss": [], "router-losses": ["--router-losses"],
         "router-losses-and-noise": ["--router-losses", "--router-noise"],
         "aux-free": ["--router-type", "aux_free"],
         # balancing over a window of 6 sequences: the window's load and its sequence count are global too
         "router-losses-window": ["--router-losses", "--balance-window"],
         "aux-free-window": ["--router-type", "aux_free", "--balance-window"],
         # the two whose statistics are global, with each rank's own instead (they must break the equality)
         "router-losses-and-noise-local": ["--router-losses", "--router-noise", "--local-statistics"],
         "aux-free-local": ["--router-type", "aux_free", "--local-statistics"]}


def flag(name: str, flags) -> bool:
    return name in flags


def train_one(out: str, steps: int, batch: int, flags, slow: bool) -> None:
    """Train the tiny set-up with ``flags`` into ``out`` and write this rank's final adapter tensors there."""
    model, blocks = tiny_training_setup(router_losses=flag("--router-losses", flags),
                                        router_noise=flag("--router-noise", flags),
                                        router_type=flags[flags.index("--router-type") + 1]
                                        if "--router-type" in flags else "noisy_top_k",
                                        balance_window=6 if flag("--balance-window", flags) else 0)

    class WorkerMethod(MoEMethod):
        def save(self, model, folder):
            if slow:
                time.sleep(0.05)  # widen the window in which kill -9 can land mid-write
            super().save(model, folder)

        def extra_loss(self, model):  # the router losses only when asked for: the plain LM loss otherwise
            return super().extra_loss(model) if flag("--router-losses", flags) else (0.0, {})

    args = TrainingArguments(output_dir=out, max_steps=steps, batch_size=batch, seq_len=16, eval_every=0,
                             save_every=1, learning_rate=1e-2, progress=False, mixed_precision="no",
                             resume=flag("--resume", flags),
                             stop_after_steps=int(flags[flags.index("--stop-after") + 1])
                             if "--stop-after" in flags else None)
    with local_statistics() if flag("--local-statistics", flags) else contextlib.nullcontext():
        train_model(model, WorkerMethod(model.expert_config), blocks, None, args)
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))


def main():
    out, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    flags = sys.argv[4:]
    torch.set_num_threads(1)
    if "--no-gradient-average" in flags:  # break FSDP's replicated adapters on purpose: each rank keeps its own
        import llama_expert.training.trainer as trainer
        trainer.average_gradients = lambda params: None
    if "--cases" in flags:  # several set-ups in one process (one start of torch and of the process group)
        for case in flags[flags.index("--cases") + 1].split(","):
            train_one(os.path.join(out, case), steps, batch, flags + CASES[case], slow=False)
        return
    train_one(out, steps, batch, flags, slow="--slow" in flags)


if __name__ == "__main__":
    main()
