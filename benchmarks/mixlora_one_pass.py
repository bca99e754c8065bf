"""The mixlora layer in one pass (the frozen projections once, ``ExpertBank.computes_mlp``) against the two passes it
took before (the MLP, then the bank computing the gate and up projections again), greedy decode at batch 1 on a
CPU, repeats interleaved, both on the general path (the compiled decode kernel, which runs the one-pass layer, is
turned off here; ``benchmarks/decode_speed.py`` measures it against the base); docs/design.md section 3, mixlora.

    python benchmarks/mixlora_one_pass.py --adapter runs/modular-40-loras/loras-mixed-calibrated [--samples 5]
"""

import argparse
import statistics
import time

import torch

from llama_expert import load_augmented_model
from llama_expert.integration.surgery import adapters
from llama_expert.modeling.experts import MixLoRAExperts

from common import command, machine, today


def tokens_per_second(model, ids: torch.Tensor, new: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)
        return new / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="a mixlora adapter (a mix of PEFT LoRAs)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model, config = load_augmented_model(None, adapter_path=args.adapter)
    if config.expert_type != "mixlora":
        parser.error(f"{args.adapter} is a {config.expert_type} adapter; this compares the mixlora layer's two forms")
    ids = torch.randint(100, 1000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    for _, adapter in adapters(model):
        adapter.decode_kernel = False  # the general path: the kernel has the one-pass form only
    tokens_per_second(model.eval(), ids, args.new_tokens)  # warm-up
    speeds = {"one pass": [], "two passes": []}
    for _ in range(args.samples):
        for form in speeds:
            MixLoRAExperts.computes_mlp = form == "one pass"
            speeds[form].append(tokens_per_second(model, ids, args.new_tokens))
    MixLoRAExperts.computes_mlp = True
    print(f"mixlora decode, {command()}, {today()}, {machine()}, batch 1, prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens, median of {args.samples} interleaved repeats")
    for form, values in speeds.items():
        print(f"{form}: {statistics.median(values):.2f} tokens/s ({', '.join(f'{v:.2f}' for v in values)})")
    ratio = statistics.median(speeds["one pass"]) / statistics.median(speeds["two passes"])
    print(f"one pass / two passes: {ratio:.3f}")


if __name__ == "__main__":
    main()
