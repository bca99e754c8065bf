#!/usr/bin/env bash
# The README headline: MoE adapters on the embedded SmolLM2-135M, trained on WikiText-2 (wiki.valid.raw;
# the train split is not available offline here), tested on wiki.test.raw (different articles):
# test perplexity before and after, first 16,384 test tokens in 512-token windows.
# The frozen base runs in bfloat16 (faster than float32 on CPUs with AMX; adapters stay float32).
# The committed run used the noisy top-k router, the default before the multi-domain study made aux_free the default.
set -euo pipefail
DATA=${DATA:-../shared/data/wikitext-2-raw}
OUT=${OUT:-docs/results/wikitext-moe}
llama-expert train --router-type noisy_top_k --dataset "$DATA/wiki.valid.raw" --test-dataset "$DATA/wiki.test.raw" \
  --test-seq-len 512 --test-max-tokens 16384 --seq-len 512 --batch-size 4 --learning-rate 2e-3 \
  --max-steps 200 --eval-every 50 --eval-max-tokens 8192 --dtype bfloat16 --output-dir "$OUT" --overwrite "$@"
