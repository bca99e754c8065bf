"""benchmarks/gpu.py (training and decode speed and memory of MoE adapters, LoRA and full fine-tuning) runs end to
end on a CPU with tiny shapes, so the GPU script cannot rot between GPU loans: every training and decode row of the
real run is produced and written, the compiled rows (training with --compile adapters, compiled decoding) included."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_dry_run_writes_every_row(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--models", "Llama-3.2-1B",
                          "--compile-backend", "aot_eager",  # inductor generating code: test_compilation.py
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "gpu_table.md").read_text()
    training = [line for line in table.splitlines() if line.startswith("| Llama-3.2-1B (tiny) |") and "GiB" in line]
    assert len(training) == 11  # moe and lora x checkpointing x 4-bit, full x checkpointing, moe compiled
    assert len([line for line in training if "| moe compiled | no | no |" in line]) == 1
    decode = [line for line in table.splitlines() if line.startswith("| Llama-3.2-1B (tiny) |") and "GiB" not in line]
    assert len(decode) == 10  # base, MoE, merged LoRA, base and MoE compiled x 2 batch sizes
    # a CPU has nothing to put in a CUDA graph: the compiled decode rows say they ran eagerly
    assert len([line for line in decode if "compiled (asked; a CPU decodes eagerly)" in line]) == 4
    assert "tiny dry run" in table
