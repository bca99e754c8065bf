"""Pruning curve: multi-domain test perplexity of an MoE adapter against the share of experts kept.

For each fraction, `llama-expert prune` scores the experts on calibration text (the training files of the mix,
never the test text) and keeps that share per layer; the pruned adapter is then measured with `benchmark` on
the three test texts (first TEST_TOKENS tokens each, 512-token windows; the mean is the exp of the mean
log-perplexity). Prints a Markdown table and writes prune_curve.png and prune_curve.json beside the adapters.

    python benchmarks/prune_curve.py ADAPTER_DIR [--keep 1,0.75,0.5,0.25] [--out runs/prune-curve]
"""

import argparse
import json
from pathlib import Path

from common import TEST, TRAIN, llama_expert, today


def measure(adapter: Path, report: Path, test_tokens: int) -> dict:
    llama_expert("benchmark", "--model", str(adapter), "--dataset", TEST, "--seq-len", "512", "--max-tokens",
                 str(test_tokens), "--skip-throughput", "--routing-windows", "2", "--output-json", str(report),
                 "--no-progress")
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("--keep", default="1,0.75,0.5,0.25")
    parser.add_argument("--out", default="runs/prune-curve")
    parser.add_argument("--test-tokens", type=int, default=16384)
    parser.add_argument("--calibration-tokens", type=int, default=8192, help="per training file")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for keep in args.keep.split(","):
        folder = out / f"keep-{keep}"
        if float(keep) < 1:
            llama_expert("prune", "--adapter", args.adapter, "--keep", keep, "--calibration", TRAIN,
                         "--max-tokens", str(args.calibration_tokens), "--output-dir", str(folder), "--overwrite",
                         "--no-progress")
        report = measure(Path(args.adapter) if float(keep) >= 1 else folder, out / f"keep-{keep}.json",
                         args.test_tokens)
        ppl = report["perplexity"]
        experts = report["model"]["parameters"]
        rows.append({"keep": float(keep), "experts": sum(layer["num_experts"]
                                                         for layer in report["routing_health"]["layers"]),
                     "trainable": experts["trainable"], "mean": ppl["perplexity"],
                     "domains": {d: v["perplexity"] for d, v in ppl["domains"].items()}})
    full = rows[0]["mean"]
    domains = list(rows[0]["domains"])
    print(f"pruning curve of {args.adapter}, {today()}, test: first {args.test_tokens} tokens "
          f"per domain in 512-token windows")
    print(f"| kept | experts | trainable | {' | '.join(domains)} | mean | vs unpruned |")
    print("|---:|---:|---:|" + "---:|" * len(domains) + "---:|---:|")
    for row in rows:
        cells = " | ".join(f"{row['domains'][d]:.3f}" for d in domains)
        print(f"| {row['keep']:g} | {row['experts']} | {row['trainable']:,} | {cells} | {row['mean']:.3f} | "
              f"{100 * (row['mean'] / full - 1):+.2f}% |")
    (out / "prune_curve.json").write_text(json.dumps(rows, indent=1) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["keep"] for r in rows], [r["mean"] for r in rows], marker="o", label="mean")
    for d in domains:
        ax.plot([r["keep"] for r in rows], [r["domains"][d] for r in rows], marker=".", linestyle="--", label=d)
    ax.set_xlabel("share of experts kept")
    ax.set_ylabel("test perplexity")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    ax.set_title("Pruning curve")
    fig.tight_layout()
    fig.savefig(out / "prune_curve.png", dpi=100)


if __name__ == "__main__":
    main()
