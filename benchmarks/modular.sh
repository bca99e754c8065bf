#!/usr/bin/env bash
# The modular-experts table from a clean checkout: branches trained apart (JOBS=N at a time), mixed by prototype,
# against LoRA trained on the mix; every row measured by `llama-expert benchmark`. See benchmarks/modular.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/modular.py run --jobs "${JOBS:-1}"
python benchmarks/modular.py table | tee "${OUT:-runs/modular}/table.md"
