#!/usr/bin/env bash
# Multi-domain benchmark (issue 9 §1): MoE adapters vs PEFT LoRA at a matched budget, trained on an equal-token
# mix of math (GSM8K), code (CPython stdlib) and prose (WikiText-2), tested per domain (first TEST_TOKENS tokens
# of each test text in 512-token windows) and on the mean of the three log-perplexities.
#   bash benchmarks/multidomain.sh                    # full protocol: 200 steps x 4 x 512, seeds 1 2 3
#   MAX_STEPS=2 SEEDS=1 TEST_TOKENS=512 bash benchmarks/multidomain.sh   # a smoke run
# Extra arguments go to every `train` run (e.g. --router-type aux_free). Results: $OUT/<method>-seed<N>/ and
# the table printed by benchmarks/multidomain_table.py.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${OUT:-docs/results/multidomain}
MAX_STEPS=${MAX_STEPS:-200}
SEEDS=${SEEDS:-1 2 3}
TEST_TOKENS=${TEST_TOKENS:-16384}
LR_MOE=${LR_MOE:-2e-3}
LR_LORA=${LR_LORA:-2e-3}
LORA_R=${LORA_R:-4}  # the LoRA rank closest to the default MoE budget on SmolLM2-135M (760,320 vs 832,542)
TRAIN="$DATA/multidomain/math/train.jsonl,$DATA/multidomain/code/train.txt,$DATA/wikitext-2-raw/wiki.valid.raw"
TEST="$DATA/multidomain/math/test.jsonl,$DATA/multidomain/code/test.txt,$DATA/wikitext-2-raw/wiki.test.raw"
COMMON=(--dataset "$TRAIN" --test-dataset "$TEST" --test-seq-len 512 --test-max-tokens "$TEST_TOKENS"
        --seq-len 512 --batch-size 4 --max-steps "$MAX_STEPS" --eval-every 50 --eval-max-tokens 6144
        --dtype bfloat16 --overwrite)
for seed in $SEEDS; do
  llama-expert train --method moe --learning-rate "$LR_MOE" --seed "$seed" --output-dir "$OUT/moe-seed$seed" \
    "${COMMON[@]}" "$@"
  llama-expert train --method lora --lora-r "$LORA_R" --learning-rate "$LR_LORA" --seed "$seed" \
    --output-dir "$OUT/lora-seed$seed" "${COMMON[@]}"
done
python benchmarks/multidomain_table.py "$OUT"
