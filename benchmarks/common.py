"""What the benchmark scripts share, kept in one place so that every result file describes its machine, its
model shapes and its data the same way. A script imports it with a plain ``from common import ...``: run as
``python benchmarks/NAME.py``, Python puts ``benchmarks/`` first on ``sys.path``.

- ``machine()``, ``today()``, ``command()``: the header line of a result (where, when, how it was made);
- ``ARCHITECTURES``: the Llama shapes the scripts build with random weights or on the meta device (no download);
- ``DATA`` and the three-domain mix (math, code, prose): ``DOMAIN_TRAIN``, ``TRAIN``, ``TEST``, ``PROSE``,
  ``PROSE_TEST``;
- ``llama_expert(...)``: a CLI step run in its own process, as a user would run it.
"""

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ARCHITECTURES = {
    # meta-llama/Llama-3.2-1B config.json
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    # meta-llama/Llama-3.2-3B config.json
    "Llama-3.2-3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=128),
    # HuggingFaceTB/SmolLM2-135M-Instruct config.json
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, head_dim=64),
}

# The shared data folder, relative to the repository root the scripts run from; DATA in the environment moves it.
DATA = os.environ.get("DATA", "../shared/data")
PROSE = f"{DATA}/wikitext-2-raw/wiki.valid.raw"  # WikiText-2's train split is not available offline: valid trains
PROSE_TEST = f"{DATA}/wikitext-2-raw/wiki.test.raw"
# Each domain's training text, and the equal-token three-domain mix, comma-separated as `llama-expert train
# --dataset` takes several domains.
DOMAIN_TRAIN = {"math": f"{DATA}/multidomain/math/train.jsonl", "code": f"{DATA}/multidomain/code/train.txt",
                "prose": PROSE}
TRAIN = ",".join(DOMAIN_TRAIN.values())
TEST = ",".join([f"{DATA}/multidomain/math/test.jsonl", f"{DATA}/multidomain/code/test.txt", PROSE_TEST])


def cpu_name() -> str:
    """The processor's model name: it decides CPU speed (AVX-512, AMX) more than the architecture does, and
    ``platform.processor()`` is empty on most Linux machines, so Linux's /proc/cpuinfo is read first."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def machine(device: Optional[str] = None) -> str:
    """One line that says where a benchmark ran: the GPU's name when it runs on one (``device`` 'cuda...', or
    None and a GPU is present), else the processor; then CPU count, torch version and torch's thread count."""
    import torch

    gpu = torch.cuda.is_available() if device is None else device.startswith("cuda")
    where = torch.cuda.get_device_name() if gpu else f"{platform.machine()} {cpu_name()}"
    threads = torch.get_num_threads()
    return f"{where}, {os.cpu_count()} CPUs, torch {torch.__version__} ({threads} thread{'s' * (threads != 1)})"


def today() -> str:
    return time.strftime("%Y-%m-%d")


def command() -> str:
    """The command line that produced this result, in backquotes, as a user would type it to reproduce it."""
    return f"`{shlex.join(['python', f'benchmarks/{Path(sys.argv[0]).name}', *sys.argv[1:]])}`"


def llama_expert(*argv: str, quiet: bool = False) -> None:
    """Run ``llama-expert ARGV...`` in its own process (its peak memory is its own) with this interpreter, and
    stop the benchmark if it fails; ``quiet`` drops its standard output (its files hold what is measured)."""
    subprocess.run([sys.executable, "-m", "llama_expert.cli", *argv], check=True,
                   stdout=subprocess.DEVNULL if quiet else None)
