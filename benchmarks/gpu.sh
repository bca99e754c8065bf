#!/usr/bin/env bash
# The GPU benchmark: training and decode of SmolLM2-135M and the Llama-3.2-1B/3B architectures,
# MoE vs LoRA vs full fine-tuning, with and without gradient checkpointing and a 4-bit base, and the compiled rows
# (Llama-3.2-1B: MoE training with --compile adapters, base and MoE decoding on a static cache in CUDA graphs,
# interleaved with the eager rows). Meant to stay within 8 minutes on one H200 (the compiled rows' compile time is
# not measured yet; --budget-s starts no row after 300 s); the table goes to ${OUT:-runs/gpu}/gpu_table.md.
# A CPU dry run: python benchmarks/gpu.py --tiny
set -euo pipefail
${PYTHON:-python3} -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run python benchmarks/gpu.py --tiny for a CPU dry run')"
${PYTHON:-python3} benchmarks/gpu.py --out "${OUT:-runs/gpu}" "$@"
