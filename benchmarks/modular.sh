#!/usr/bin/env bash
# The modular-experts table from a clean checkout: branches trained apart (JOBS=N at a time), mixed by prototype,
# against LoRA trained on the mix; every row measured by `llama-expert benchmark`. See benchmarks/modular.py.
# Then the rows repeated over seeds (MORE_SEEDS, default "2 3"; empty: one seed), each seed in OUT-seedN, and their
# mean ± std over every seed; last, every mix's route = domain after the first 32 tokens of each window.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-runs/modular}"
python benchmarks/modular.py run --jobs "${JOBS:-1}"
python benchmarks/modular.py table | tee "$OUT/table.md"
folders=("$OUT")
for seed in ${MORE_SEEDS-2 3}; do
  SEED=$seed OUT="$OUT-seed$seed" python benchmarks/modular.py run --rows seeds --jobs "${JOBS:-1}"
  SEED=$seed OUT="$OUT-seed$seed" python benchmarks/modular.py run --rows lora-library --jobs "${JOBS:-1}"
  SEED=$seed OUT="$OUT-seed$seed" python benchmarks/modular.py run --rows peft-routers
  folders+=("$OUT-seed$seed")
done
python benchmarks/modular.py seeds "${folders[@]}" | tee "$OUT/seeds.md"
# route = domain after the first 32 tokens of each window (the table's column counts every token: a lower bound)
mapfile -t mixes < <(python benchmarks/modular.py mixes "${folders[@]}")
python benchmarks/route_after_prefix.py "${mixes[@]}" | tee "$OUT/route_after_prefix.md"
