"""Where a one-skill mix's null expert takes each domain's tokens, by null distance and prefix length: why
`mix A --null-expert` keeps code but not math from a prose adapter (docs/results "Experts by design").

    python benchmarks/null_distance.py ADAPTER [--split validation] [--distances 1,1.5,2,3,4] [--fixed]

ADAPTER is an adapter folder with its prototypes (what `train` writes: a branch or a PEFT LoRA). In a mix of it
alone with the null expert, layer l sends token t to the null where the squared distance of the sequence's prefix
mean to the prototype, ``||m_t - p_l||^2 / d``, is beyond ``D * (b_l + w_l / n)`` (``D`` the null distance, ``n``
the prefix's length, ``b_l + w_l / n`` the recorded spread at that length; section 2 of docs/design.md;
``--fixed`` divides by the mean spread ``s_l`` instead, the threshold of adapter files before format 4). This
measures that ratio on the adapter's own model (as the prototypes were measured) for each domain's windows (512
tokens within the first 8,192 of each training file's split, bfloat16) and prints, per domain, prefix length and
``D``, the share of (window, layer) pairs beyond it: the share of tokens there that a mix at ``D`` gives the null
(exactly so in the first layer; in a later one, where the layers before it chose the skill, since a null choice
changes what the later layers see).
"""

import argparse

import torch

from llama_expert.evaluation.benchmark import ExpertModelBenchmark
from llama_expert.integration.base_models import load_tokenizer
from llama_expert.integration.loading import load_adapter
from llama_expert.integration.prototypes import load_prototypes
from llama_expert.integration.surgery import decoder_layers

from common import TRAIN, command, machine, today

POSITIONS = (16, 32, 64, 128, 256, 512)  # prefix lengths reported


@torch.no_grad()
def ratios(model, windows: torch.Tensor, prototypes, positions=POSITIONS, fixed: bool = False) -> torch.Tensor:
    """[windows, layers, positions]: ``||m_t - p_l||^2 / d`` over the spread at each prefix length n of ``positions``,
    ``b_l + w_l / n`` (``fixed``: the mean spread ``s_l``), on ``model`` (the skill in every layer: what the mix
    computes until a layer chooses the null, which changes the later layers' inputs; the first layer's share is
    exactly the mix's, tests/benchmarks/test_null_distance.py)."""
    layers, found = decoder_layers(model), []
    floor, slope = (prototypes.spread, torch.zeros_like(prototypes.spread)) if fixed else prototypes.by_length()
    spreads = floor[:, None] + slope[:, None] / torch.tensor(positions, dtype=torch.float32)  # [L, positions]

    def hook(module, args):
        hidden = args[0].float()[0]  # [T, d], the MLP's input: the router's
        means = hidden.cumsum(0)[[p - 1 for p in positions]] / torch.tensor(positions).view(-1, 1)
        found.append(means)

    handles = [layer.mlp.register_forward_pre_hook(hook) for layer in layers]
    out = []
    try:
        for window in windows:
            found.clear()
            model(input_ids=window.view(1, -1), use_cache=False)
            means = torch.stack(found)  # [L, positions, d]
            distance = (means - prototypes.prototype[:, None]).pow(2).mean(-1)
            out.append(distance / spreads)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("--dataset", default=TRAIN)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--distances", default="1,1.5,2,3,4")
    parser.add_argument("--fixed", action="store_true", help="the mean spread at every length (format 3's threshold)")
    args = parser.parse_args()
    model, base = load_adapter(args.adapter, dtype=torch.bfloat16)
    model.eval()
    prototypes = load_prototypes(args.adapter, len(decoder_layers(model)), model.config.hidden_size)
    bench = ExpertModelBenchmark(model, load_tokenizer(base), dataset=args.dataset, split=args.split, seq_len=512,
                                 max_tokens=args.max_tokens, progress=False)
    windows, labels = bench.windows(), bench.window_domains()
    distances = [float(d) for d in args.distances.split(",")]
    print(f"null share, {command()}, {today()}, {machine('cpu')}, bfloat16; share of (window, layer) pairs whose "
          f"prefix mean is beyond D x the spread {'(the mean spread, fixed)' if args.fixed else 'at its length'} "
          f"({args.split} split, 512-token windows)\n")
    print("| domain | prefix length | median ratio | " + " | ".join(f"null at D={d:g}" for d in distances) + " |")
    print("|---|---:|---:|" + "---:|" * len(distances))
    for domain, name in enumerate(bench.domain_names):
        found = ratios(model, windows[labels == domain], prototypes, fixed=args.fixed)
        for i, position in enumerate(POSITIONS):
            at = found[:, :, i]
            shares = " | ".join(f"{100 * float((at > d).float().mean()):.0f}%" for d in distances)
            print(f"| {name} | {position} | {float(at.median()):.2f} | {shares} |")


if __name__ == "__main__":
    main()
