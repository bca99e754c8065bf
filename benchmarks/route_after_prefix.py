"""How often a mixed adapter routes a token to its own domain's expert once its window is past its first tokens:
the modular-experts goal (>= 95% of tokens after the first 32), which `benchmark`'s routing health gives only over
all tokens (a lower bound of it).

    python benchmarks/route_after_prefix.py ADAPTER [ADAPTER ...] [--skip 32] [--test-tokens 4096]

Each domain's test windows (512 tokens within the first TEST_TOKENS, as `benchmarks/modular.py` measures them) are
routed in one eval pass each (`metrics.routing.token_routing`, bfloat16 base, as the table). In a layer a token
matches when its highest-gated choice is its domain's expert: a mix's i-th expert is the i-th domain of
DOMAIN_TRAIN (math, code, prose); a null expert's choice never matches. Shares are over every layer, per domain
and as the mean over domains, before and after position ``skip``.
"""

import argparse

import torch

from llama_expert.evaluation.benchmark import ExpertModelBenchmark
from llama_expert import load_augmented_model
from llama_expert.integration.base_models import load_tokenizer
from llama_expert.metrics.routing import token_routing

from common import DOMAIN_TRAIN, TEST, command, machine, today


def matches(model, window: torch.Tensor, domain: int) -> torch.Tensor:
    """[layers, T]: whether each token's highest-gated choice in each layer is expert ``domain``."""
    return torch.stack([row["gates"].argmax(-1) == domain for row in token_routing(model, window)])


def shares(model, bench: ExpertModelBenchmark, skip: int) -> dict:
    """Per domain name: (share matching before ``skip``, share matching from ``skip`` on), over layers and tokens."""
    windows, labels = bench.windows(), bench.window_domains()
    found = {}
    for domain, name in enumerate(bench.domain_names):
        hits = torch.cat([matches(model, window, domain) for window in windows[labels == domain]], dim=1)
        per_position = hits.view(hits.shape[0], -1, windows.shape[1]).float()  # [layers, windows, T]
        found[name] = (float(per_position[:, :, :skip].mean()), float(per_position[:, :, skip:].mean()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--skip", type=int, default=32)
    parser.add_argument("--test-tokens", type=int, default=4096)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    print(f"route = domain, {command()}, {today()}, {machine('cpu')}, bfloat16 base, 512-token windows within the "
          f"first {args.test_tokens} tokens of each domain's test text; experts in the order {list(DOMAIN_TRAIN)}")
    print(f"| adapter | domain | first {args.skip} tokens | after them |")
    print("|---|---|---:|---:|")
    for path in args.adapters:
        model = load_augmented_model(args.model, path, dtype=torch.bfloat16)[0].eval()
        bench = ExpertModelBenchmark(model, tokenizer, dataset=TEST, seq_len=512, max_tokens=args.test_tokens,
                                     progress=False)
        found = shares(model, bench, args.skip)
        for name, (before, after) in found.items():
            print(f"| {path} | {name} | {100 * before:.1f}% | {100 * after:.1f}% |")
        means = [sum(values) / len(found) for values in zip(*found.values())]
        print(f"| {path} | **mean** | {100 * means[0]:.1f}% | **{100 * means[1]:.1f}%** |")


if __name__ == "__main__":
    main()
