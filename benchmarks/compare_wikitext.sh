#!/usr/bin/env bash
# base vs MoE adapters vs PEFT LoRA at a matched trainable-parameter budget, one run.
# Uses the MoE adapter of benchmarks/wikitext_headline.sh (or trains one with the same flags when
# docs/results/wikitext-moe is absent) and trains LoRA with identical data, steps, batch, length, learning
# rate and dtype. All three are then measured in float32 on the same 16,384 WikiText-2 test tokens.
# The committed MoE adapter uses noisy top-k routing (the default then); without it, compare trains today's default.
set -euo pipefail
DATA=${DATA:-../shared/data/wikitext-2-raw}
MOE=${MOE:-docs/results/wikitext-moe}
ADAPTER=(); [ -f "$MOE/adapter_config.json" ] && ADAPTER=(--adapter "$MOE")
llama-expert compare "${ADAPTER[@]}" --lora-baseline --dataset "$DATA/wiki.valid.raw" --seq-len 512 --batch-size 4 \
  --max-steps 200 --learning-rate 2e-3 --eval-every 50 --eval-max-tokens 8192 --dtype bfloat16 \
  --test-dataset "$DATA" --split test --eval-seq-len 512 --max-tokens 16384 \
  --output-dir docs/results/compare-wikitext "$@"
