#!/usr/bin/env bash
# The multi-domain benchmark at the full protocol: PEFT LoRA r=4 and the three best MoE configurations
# of the cheap sweep, each at three learning rates and three seeds, 200 steps x 4 x 512 tokens on the equal-token
# mix of math (GSM8K), code (CPython stdlib) and prose (WikiText-2); test: the first 16,384 tokens of each domain's
# test text in 512-token windows. Then retention: the same configurations trained on prose only.
#   bash benchmarks/multidomain.sh                       # hours on a CPU, one run at a time
#   JOBS=8 RETENTION_JOBS=2 bash benchmarks/multidomain.sh   # minutes on one GPU: runs share it
# Also: DEADLINE_S (start no run after it), MODEL (default: the embedded SmolLM2-135M), DATA (../shared/data).
#   MAX_STEPS=2 TEST_TOKENS=512 SEEDS=1 bash benchmarks/multidomain.sh   # a smoke run
# Results: $OUT/<config>-lr<LR>-seed<N>/ and $OUT/retention/...; the tables: multidomain_sweep.py table and
# retention-table (learning rate chosen per configuration on the mean validation perplexity of the mix).
set -euo pipefail
export MAX_STEPS=${MAX_STEPS:-200} SEQ_LEN=${SEQ_LEN:-512} TEST_TOKENS=${TEST_TOKENS:-16384}
export OUT=${OUT:-runs/multidomain-full}
PYTHON=${PYTHON:-python}
SEEDS=${SEEDS:-1 2 3}
GRID=${GRID:-lora:1e-3 lora:3e-3 lora:1e-2 moe:3e-3 moe:1e-2 moe:3e-2 aux-free:3e-3 aux-free:1e-2 aux-free:3e-2
              expert-choice:3e-3 expert-choice:1e-2 expert-choice:3e-2}
RETENTION=${RETENTION:-lora:3e-3 moe:1e-2 aux-free:1e-2 expert-choice:1e-2}
DEADLINE=(); [ -n "${DEADLINE_S:-}" ] && DEADLINE=(--deadline "$DEADLINE_S")
runs=(); retention=()
for seed in $SEEDS; do
  for spec in $GRID; do runs+=("$spec:$seed"); done
  for spec in $RETENTION; do retention+=("$spec:$seed"); done
done
retention_runs() { $PYTHON benchmarks/multidomain_sweep.py retention --jobs "${RETENTION_JOBS:-1}" "${DEADLINE[@]}" "${retention[@]}"; }
if [ -n "${RETENTION_JOBS:-}" ]; then retention_runs & fi  # beside the main runs (a GPU has room for both)
$PYTHON benchmarks/multidomain_sweep.py run --jobs "${JOBS:-1}" "${DEADLINE[@]}" "${runs[@]}"
if [ -n "${RETENTION_JOBS:-}" ]; then wait; else retention_runs; fi
$PYTHON benchmarks/multidomain_sweep.py table
$PYTHON benchmarks/multidomain_sweep.py retention-table
