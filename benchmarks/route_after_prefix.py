"""How often a mixed adapter routes a token to its own domain's expert once its window is past its first tokens:
the modular-experts goal (>= 95% of tokens after the first 32), which `benchmark`'s routing health gives only over
all tokens (a lower bound of it).

    python benchmarks/route_after_prefix.py ADAPTER [ADAPTER ...] [--skip 32] [--test-tokens 4096] [--rule R]
    python benchmarks/route_after_prefix.py MIX --split validation --rule scaled   # another nearest-prototype rule

Each domain's test windows (512 tokens within the first TEST_TOKENS, as `benchmarks/modular.py` measures them) are
routed in one eval pass each (`metrics.routing.token_routing`, bfloat16 base, as the table). In a layer a token
matches when its highest-gated choice is its domain's expert: a mix's i-th expert is the i-th domain of
DOMAIN_TRAIN (math, code, prose); a null expert's choice never matches. Shares are over every layer, per domain
and as the mean over domains, before and after position ``skip``.

``--rule`` asks what another rule would choose from the same prefix means of a mix (a prototype router): a
counterfactual per layer, on the hidden states the mix's own routing gave (no model is routed by the rule, and no
perplexity follows from it). With ``D_i`` the squared distance per dimension to prototype i and ``s_i(n) = spread_i
+ spread_slope_i / n`` how far a prefix of n tokens of its own text lies from it on average (fitted on n >= 32,
``integration.prototypes``; below that it is the fit's extrapolation), ``raw`` picks the least ``D_i`` (the mix's
own rule when it has no null expert; with one, compare a rule with ``raw``, not with the mix's choices, since no
rule here picks the null), ``scaled`` the least ``D_i / s_i(n)`` and ``gauss`` the least ``D_i / s_i(n) + log
s_i(n)`` (the likeliest under an isotropic Gaussian of that spread). A window is one unpadded sequence, so token t
has a prefix of t + 1 tokens.
"""

import argparse

import torch

from llama_expert.errors import ConfigError
from llama_expert.evaluation.benchmark import ExpertModelBenchmark
from llama_expert import load_augmented_model
from llama_expert.integration.base_models import load_tokenizer
from llama_expert.integration.surgery import adapters
from llama_expert.metrics.routing import token_routing

from common import DOMAIN_TRAIN, TEST, command, machine, today

RULES = {"raw": lambda distance, spread: distance,
         "scaled": lambda distance, spread: distance / spread,
         "gauss": lambda distance, spread: distance / spread + spread.log()}


def matches(model, window: torch.Tensor, domain: int, rule: str = "chosen") -> torch.Tensor:
    """[layers, T]: whether each token's highest-gated choice in each layer (or what ``rule`` picks) is expert
    ``domain``."""
    routers = {name: adapter.router for name, adapter in adapters(model)}
    for router in routers.values():
        if rule != "chosen" and not hasattr(router, "spread_slope"):
            raise ConfigError(f"--rule {rule} needs a mix (a prototype router); this adapter's router is "
                              f"{type(router).__name__}: measure it without --rule.")
    rows = token_routing(model, window)
    if rule == "chosen":
        return torch.stack([row["gates"].argmax(-1) == domain for row in rows])
    lengths = torch.arange(1, window.numel() + 1, dtype=torch.float32).view(-1, 1)
    found = []
    for row in rows:
        router = routers[row["module"]]
        experts = router.weight.shape[0]  # the logits' last column is the null's, where there is one
        distance = -row["logits"][:, :experts] * router.temperature
        spread = router.spread.detach().float().cpu() + router.spread_slope.detach().float().cpu() / lengths
        found.append(RULES[rule](distance, spread).argmin(-1) == domain)
    return torch.stack(found)


def shares(model, bench: ExpertModelBenchmark, skip: int, rule: str = "chosen") -> dict:
    """Per domain name: (share matching before ``skip``, share matching from ``skip`` on), over layers and tokens."""
    windows, labels = bench.windows(), bench.window_domains()
    found = {}
    for domain, name in enumerate(bench.domain_names):
        hits = torch.cat([matches(model, window, domain, rule) for window in windows[labels == domain]], dim=1)
        per_position = hits.view(hits.shape[0], -1, windows.shape[1]).float()  # [layers, windows, T]
        found[name] = (float(per_position[:, :, :skip].mean()), float(per_position[:, :, skip:].mean()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--skip", type=int, default=32)
    parser.add_argument("--test-tokens", type=int, default=4096)
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="validation: the held-out rows of each domain's training file")
    parser.add_argument("--rule", choices=("chosen", *RULES), default="chosen",
                        help="chosen: the adapter's own choices; raw, scaled, gauss: what that rule picks among the "
                             "real experts (a mix only; the docstring defines them)")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    dataset = TEST if args.split == "test" else ",".join(DOMAIN_TRAIN.values())
    print(f"route = domain ({args.rule}), {command()}, {today()}, {machine('cpu')}, bfloat16 base, 512-token windows "
          f"within the first {args.test_tokens} tokens of each domain's {args.split} text; experts in the order "
          f"{list(DOMAIN_TRAIN)}")
    print(f"| adapter | domain | first {args.skip} tokens | after them |")
    print("|---|---|---:|---:|")
    for path in args.adapters:
        model = load_augmented_model(args.model, path, dtype=torch.bfloat16)[0].eval()
        bench = ExpertModelBenchmark(model, tokenizer, dataset=dataset, split=args.split, seq_len=512,
                                     max_tokens=args.test_tokens, progress=False)
        found = shares(model, bench, args.skip, args.rule)
        for name, (before, after) in found.items():
            print(f"| {path} | {name} | {100 * before:.1f}% | {100 * after:.1f}% |")
        means = [sum(values) / len(found) for values in zip(*found.values())]
        print(f"| {path} | **mean** | {100 * means[0]:.1f}% | **{100 * means[1]:.1f}%** |")


if __name__ == "__main__":
    main()
