"""``prune``: score every expert on calibration text, keep the best of each layer, write a smaller adapter.

The score of expert i in a layer is its expected contribution to that layer's output on the calibration
tokens, ``sum_t g_ti * |alpha_l| * ||E_i(h_t)||``: it is zero for an expert no token picks, small for one
picked with small gates, and small for one whose output is small, so it folds the three routing statistics
(how often chosen, gate weight, output size) into one number, and the report keeps each of them. Each
layer keeps its ``keep`` best experts (a fraction of its experts, rounded up and never below ``top_k``, or an
explicit count per layer); the routers lose the dropped experts' rows, so the gates renormalise over the
kept ones by themselves (a softmax over fewer logits). The result is an ordinary adapter with an explicit
``expert_allocation`` and loads like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..errors import ConfigError
from ..integration.adapter_files import (PRUNE_REPORT, expert_names, load_augmented_model, recorded_base,
                                         save_adapter)
from ..integration.base_models import check_within_context, load_tokenizer
from ..integration.surgery import adapters
from ..modeling.experts import gate_matrix
from ..options import option
from .arguments import AdapterCommandArguments
from ..progress import progress_bar
from .calibration import calibration_windows
from .output import check_output, locked_output, write_outputs


@dataclass
class PruneArguments(AdapterCommandArguments):
    adapter: Optional[str] = option(None, "the MoE adapter folder to prune (written by `train`)")
    keep: Optional[str] = option(None, "experts to keep per layer: a fraction in (0, 1] (e.g. 0.5), or one count "
                                       "per layer (e.g. 4,4,6,...)")
    keep_experts: Optional[str] = option(None, "instead of --keep: keep these experts of every layer, by index "
                                               "(e.g. 0,2; a mix's expert i is its i-th branch: drop a skill), "
                                               "with no calibration")
    calibration: str = option("embedded", "calibration text: dataset(s) as `train --dataset` takes them")
    output_dir: Optional[str] = option(None, "folder for the pruned adapter")
    seq_len: int = option(512, "calibration window length")
    max_tokens: int = option(8192, "calibration tokens per dataset")
    progress: bool = option(True, "no progress bars")

    def validate(self) -> None:
        self.require_paths("prune", "the MoE adapter folder to prune", "where to write the pruned adapter")
        if bool(self.keep) == bool(self.keep_experts):
            raise ConfigError("prune needs one of --keep (a fraction in (0, 1] such as 0.5, or one count per layer) "
                              "and --keep-experts (the experts of every layer to keep, e.g. 0,2).")
        if self.seq_len < 2 or self.max_tokens < self.seq_len:
            raise ConfigError(f"--seq-len must be >= 2 and --max-tokens >= --seq-len, got {self.seq_len} and "
                              f"{self.max_tokens}.")


def parse_keep(text: str, experts: List[int], minimums: List[int]) -> List[int]:
    """Experts to keep in each layer: ``ceil(fraction * E_l)`` (at least the router's minimum, e.g. top_k) or
    the given counts."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--keep {text!r}: give a fraction in (0, 1] or one integer count per layer.")
    if len(values) == 1 and values[0] <= 1:
        if not 0 < values[0]:
            raise ConfigError(f"--keep {text}: a fraction must be in (0, 1] (1 keeps every expert).")
        return [min(e, max(low, math.ceil(values[0] * e))) for e, low in zip(experts, minimums)]
    if len(values) != len(experts) or any(v != int(v) for v in values):
        raise ConfigError(f"--keep {text!r}: give one integer count per layer ({len(experts)} layers), or a "
                          f"fraction in (0, 1].")
    counts = [int(v) for v in values]
    bad = [(layer, c, e, low) for layer, (c, e, low) in enumerate(zip(counts, experts, minimums))
           if not low <= c <= e]
    if bad:
        layer, c, e, low = bad[0]
        raise ConfigError(f"--keep: layer {layer} would keep {c} experts; its router needs at least {low} "
                          f"(top_k) and it has {e}.")
    return counts


@torch.no_grad()
def expert_scores(model, windows: torch.Tensor, progress: bool = True) -> List[Dict[str, List[float]]]:
    """Per layer and expert: tokens that chose it, the sum of its gates, the sum of its gated output norms
    (the score), all over the calibration ``windows`` in eval mode."""
    layers = adapters(model)
    stats = [{"tokens": torch.zeros(a.num_experts, dtype=torch.float64),
              "gate_sum": torch.zeros(a.num_experts, dtype=torch.float64),
              "score": torch.zeros(a.num_experts, dtype=torch.float64)} for _, a in layers]

    def observe(index):
        def hook(adapter, args):
            flat = args[0].reshape(-1, args[0].shape[-1]).to(adapter.experts.compute_dtype)
            routing = adapter.router.route_sequences(args[0], adapter.token_mask)  # as the pass routes it
            gates = gate_matrix(routing.indices, routing.gates.float(), adapter.router.num_experts)
            gates = gates[:, :adapter.num_experts].double()  # [N, E]: a null expert's column goes
            n = flat.shape[0]
            one = torch.ones(n, 1, dtype=flat.dtype)
            shared = adapter.experts(flat, torch.zeros(n, 1, dtype=torch.long), torch.zeros_like(one))
            scale = float(adapter.residual_scale.abs())
            for e in range(adapter.num_experts):
                alone = adapter.experts(flat, torch.full((n, 1), e, dtype=torch.long), one) - shared
                stats[index]["score"][e] += float((gates[:, e] * alone.double().norm(dim=-1)).sum()) * scale
            stats[index]["tokens"] += (gates > 0).sum(0).double()
            stats[index]["gate_sum"] += gates.sum(0)
        return hook

    handles = [adapter.register_forward_pre_hook(observe(i)) for i, (_, adapter) in enumerate(layers)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with progress_bar(windows.shape[0], "scoring experts", "window", progress) as bar:
            for window in windows:
                model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
                bar.update(1)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [{key: values.tolist() for key, values in layer.items()} for layer in stats]


def prune_model(model, counts: List[int], scores: List[Dict[str, List[float]]]) -> List[List[int]]:
    """Keep each layer's ``counts[l]`` highest-scoring experts (in their original order); returns the kept ids."""
    kept = []
    for (_, adapter), count, layer in zip(adapters(model), counts, scores):
        best = torch.tensor(layer["score"]).argsort(descending=True, stable=True)[:count]
        keep = best.sort().values
        adapter.keep_experts(keep)
        kept.append(keep.tolist())
    # num_experts stays: the allocation's cap, it also sets lora_experts' default expert rank (lora_r // num_experts)
    model.expert_config.expert_allocation = [len(k) for k in kept]
    return kept


def run_prune(args: PruneArguments) -> Path:
    """The ``prune`` command: check the output, score, keep, write the pruned adapter and ``prune_report.json``."""
    args.validate()
    output = Path(args.output_dir)
    base = args.model or recorded_base(args.adapter)
    check_output(output, "prune", args.overwrite, args.inputs(base))
    with locked_output(output, "prune"):
        model, report = pruned_model(args, base)
        write_outputs(output, PRUNE_REPORT, report,
                      lambda staging: save_adapter(model, staging))  # the loaded base's portable name
    before, after = sum(report["experts_before"]), sum(report["experts_after"])
    print(f"kept {after} of {before} experts ({100 * after / before:.0f}%): {report['experts_after']}; wrote {output}")
    return output


def parse_keep_experts(text: str, experts: List[int], minimums: List[int]) -> List[int]:
    """The experts ``--keep-experts`` names: distinct indices that every layer has, at least each router's minimum."""
    try:
        keep = [int(part) for part in str(text).split(",")]
    except ValueError:
        keep = []
    if not keep or len(set(keep)) != len(keep) or min(keep) < 0:
        raise ConfigError(f"--keep-experts {text!r}: give distinct expert indices, comma-separated (e.g. 0,2).")
    if max(keep) >= min(experts):
        raise ConfigError(f"--keep-experts {text}: expert {max(keep)} does not exist in every layer (the smallest "
                          f"layer has {min(experts)}: 0..{min(experts) - 1}).")
    if len(keep) < max(minimums):
        raise ConfigError(f"--keep-experts {text}: the routers need at least {max(minimums)} experts (top_k).")
    return keep


def kept_by_index(args: PruneArguments, model) -> dict:
    """``--keep-experts``: the same experts kept in every layer; the report says which."""
    layers = [adapter for _, adapter in adapters(model)]
    experts = [a.num_experts for a in layers]
    keep = parse_keep_experts(args.keep_experts, experts, [a.router.min_experts for a in layers])
    for adapter in layers:
        adapter.keep_experts(keep)
    model.expert_config.expert_allocation = [len(keep)] * len(layers)
    names = expert_names(args.adapter, min(experts))  # a mix's branch names follow the experts kept
    return {"adapter": str(args.adapter), "keep_experts": keep, "experts_before": experts,
            "experts_after": [len(keep)] * len(layers), **({"experts": [names[i] for i in keep]} if names else {})}


def pruned_model(args: PruneArguments, base: Optional[str]):
    """(the adapter of ``args.adapter`` with each layer's best experts kept, the report of what was kept)."""
    model, _ = load_augmented_model(base, adapter_path=args.adapter, use_auth_token=args.auth_token)
    if args.keep_experts:
        return model, kept_by_index(args, model)
    experts = [a.num_experts for _, a in adapters(model)]
    counts = parse_keep(args.keep, experts, [a.router.min_experts for _, a in adapters(model)])
    check_within_context(model.config, args.seq_len, "--seq-len")
    tokenizer = load_tokenizer(base, auth_token=args.auth_token)
    windows = calibration_windows(tokenizer, args.calibration, args.seq_len, args.max_tokens, args.progress)
    scores = expert_scores(model, windows, args.progress)
    kept = prune_model(model, counts, scores)
    report = {"adapter": str(args.adapter), "calibration": args.calibration, "calibration_tokens": int(windows.numel()),
              "keep": args.keep, "experts_before": experts, "experts_after": counts,
              "layers": [{"layer": i, "kept": k, **layer} for i, (k, layer) in enumerate(zip(kept, scores))]}
    return model, report
