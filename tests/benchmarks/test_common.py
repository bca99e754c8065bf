"""benchmarks/common.py is the one place the benchmark scripts take their machine line, model shapes and data
paths from: none writes its own copy again (the GPU script's dry run, tests/benchmarks/test_gpu_script.py,
imports common and runs), and the machine line says what a
reader needs to compare two result files (processor or GPU, CPUs, torch version and threads)."""

import importlib.util
import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("*.py") if path.stem != "common")

# What common.py holds, as a script would write it again (each pattern matched a copy before common.py).
COPIES = {
    "a sys.path.insert (python benchmarks/NAME.py already finds common.py)": r"sys\.path\.insert",
    "its own machine line (common.machine)": r"platform\.|get_device_name|cpu_count\(",
    "its own date (common.today)": r"strftime",
    "its own data folder (common.DATA)": r"environ\.get\(\"DATA\"|\"shared\"",
    "its own model shapes (common.ARCHITECTURES)": r"ARCHITECTURES = ",
}


def test_no_script_writes_its_own_copy_of_what_common_holds():
    found = [f"{name}.py: {what}" for name in SCRIPTS for what, pattern in COPIES.items()
             if re.search(pattern, (BENCHMARKS / f"{name}.py").read_text())]
    assert not found, "; ".join(found)


def test_machine_line_is_one_line_with_processor_cpus_torch_and_threads():
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)

    line, today = common.machine("cpu"), common.today()
    assert "\n" not in line
    assert f"{os.cpu_count()} CPUs" in line and f"torch {torch.__version__}" in line
    assert f"({torch.get_num_threads()} thread" in line
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", today)
