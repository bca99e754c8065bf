"""Where the MoE adapters' decode time goes on a CPU: one decode step at batch 1, median of
interleaved repeats, for the base and for the augmented model with parts of the adapter switched off:

- ``wrapper only``: each adapter just calls the frozen MLP (the cost of one more module per layer);
- ``no-op plan``: the fused path's bookkeeping (checks, casts, the final add) with an expert output of zeros;
- ``compiled kernel``: the decode fast path as one C call per adapter (modeling/decode_kernel.py), what
  inference runs on a CPU with a C compiler;
- ``fused path``: the decode fast path in PyTorch operations (modeling/fused_inference.py), what runs without one;
- ``general path``: the training-time path (router module, Routing record, bank module).

    python benchmarks/decode_overhead.py [--adapter MOE_DIR] [--steps 48] [--repeats 5]
"""

import argparse
import copy
import statistics
import time

import torch

from llama_expert.integration.adapter_files import load_adapter_weights
from llama_expert.integration.base_models import load_base_model
from llama_expert.integration.surgery import adapters
from llama_expert.modeling.fused_inference import FusedInference

from common import command, machine, today


class ZeroPlan(FusedInference):
    """An adapter's inference plan whose expert output is zeros (one small op): what is left is the plan's
    bookkeeping and the final add."""

    def ready(self) -> bool:
        return True

    def __call__(self, flat):
        return torch.zeros_like(flat)


def set_variant(model, variant: str) -> None:
    for _, adapter in adapters(model):
        adapter.__dict__.pop("forward", None)  # back to the class's forward
        adapter.inference_plan = None
        adapter.fused_inference = variant != "general path"
        adapter.decode_kernel = variant == "compiled kernel"
        if variant == "wrapper only":
            object.__setattr__(adapter, "forward", adapter.base_mlp)  # in the instance dict (not a submodule)
        elif variant == "no-op plan":
            adapter.inference_plan = ZeroPlan(adapter)


@torch.no_grad()
def step_ms(model, steps: int, prompt_len: int = 128) -> float:
    ids = torch.randint(100, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", default="docs/results/multidomain-full/aux-free-lr1e-2-seed1")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = load_base_model(args.model).eval()
    moe = load_adapter_weights(copy.deepcopy(base), args.adapter).eval()
    variants = ["wrapper only", "no-op plan", "compiled kernel", "fused path", "general path"]
    times = {name: [] for name in ["base", *variants]}
    for _ in range(args.repeats):
        times["base"].append(step_ms(base, args.steps))
        for variant in variants:
            set_variant(moe, variant)
            times[variant].append(step_ms(moe, args.steps))
    set_variant(moe, "compiled kernel")
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{command()} ({today()}, {machine('cpu')}, float32, batch 1, prompt 128, median of {args.repeats} "
          f"interleaved repeats of {args.steps} decode steps)")
    print("| model | ms per decode step | added per layer | base / this |")
    print("|---|---:|---:|---:|")
    layers = len(list(adapters(moe)))
    for name, ms in medians.items():
        added = (ms - medians["base"]) / layers * 1e3
        print(f"| {name} | {ms:.2f} | {added:.0f} us | {medians['base'] / ms:.3f} |")


if __name__ == "__main__":
    main()
