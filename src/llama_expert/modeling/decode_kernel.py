"""The compiled CPU decode kernel (``decode_kernel.c``): one call per adapter per step, built once per machine.

Why: at batch 1 an adapter's decode work is a few thousand multiply-adds, less than the cost of the dozen
PyTorch operations that express it (about 7 us each on a 2-core VM, 0.90x of the base's tokens/s with the
PyTorch fused path). The kernel routes, runs the chosen experts only and adds the base output in one call,
and it reads ``[W_g; A]`` instead of the PyTorch path's ``[W_g; A; W1^T A]`` (5.7x fewer adapter bytes per
token with SmolLM2's default shapes, which matters when decoding is bound by memory).

Why ctypes and the system C compiler rather than ``torch.utils.cpp_extension``: the kernel needs no PyTorch
headers, so it builds in a fraction of a second instead of a minute, and a ctypes call costs about what one
PyTorch operation does. The library is cached under ``$LLAMA_EXPERT_CACHE/kernels`` keyed by the source, the
compiler, the flags and the CPU (it is built with ``-march=native``). Without a C compiler, or with
``LLAMA_EXPERT_DECODE_KERNEL=0``, adapters keep the PyTorch fused path (the first logs one warning).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Dict, Optional

import torch

from ..files import atomic_write, cache_root

logger = logging.getLogger(__name__)

KERNEL_SWITCH = "LLAMA_EXPERT_DECODE_KERNEL"
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
SOURCE = Path(__file__).with_name("decode_kernel.c")
# fast-math's reassociation (vectorised sums) without -ffast-math itself, which links crtfastmath.o into a shared
# library on some GCC versions and so would flush denormals to zero for the whole process
FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
         "-shared", "-fPIC")
NATIVE = ("-march=native",)


class PlanStruct(ctypes.Structure):
    """decode_kernel.c's ``Plan``."""

    _fields_ = [(name, ctypes.c_int32) for name in ("hidden", "experts", "real", "top_k", "normalise_all", "rank",
                                                    "width")] \
        + [(name, ctypes.c_void_p) for name in ("rows", "bias", "core_in", "core_out", "up")]


_state: Dict[str, object] = {}
_lock = threading.Lock()


def kernel_library() -> Optional[ctypes.CDLL]:
    """The built kernel library, or None when it is turned off or cannot be built (then one warning says why)."""
    if "library" not in _state:
        with _lock:
            if "library" not in _state:
                _state["library"] = _load()
    return _state["library"]


def _load() -> Optional[ctypes.CDLL]:
    if os.environ.get(KERNEL_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        library = ctypes.CDLL(str(build_kernel()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning("the compiled decode kernel is unavailable (%s); adapters use the PyTorch fused path, "
                       "about 5%% slower at batch 1 (install a C compiler, or set %s=0 to silence this)",
                       str(error).splitlines()[0] if str(error) else type(error).__name__, KERNEL_SWITCH)
        return None
    for name in ("shared_core_add", "shared_down_add", "lora_experts_add"):
        function = getattr(library, name)
        function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_int]
        function.restype = None
    return library


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("flags", "model name", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def build_kernel() -> Path:
    """Compile ``decode_kernel.c`` into the cache (once per source, compiler and CPU) and return the library."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    source = SOURCE.read_bytes()
    signature = b"\0".join([source, compiler.encode(), " ".join(FLAGS + NATIVE).encode(),
                            _cpu_signature().encode(), platform.machine().encode()])
    target = cache_root() / "kernels" / f"decode_kernel-{hashlib.sha256(signature).hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: _compile(compiler, tmp))
    return target


def _compile(compiler: str, target: str) -> None:
    error = ""
    for flags in (FLAGS + NATIVE, FLAGS):  # some compilers (clang on Apple silicon) have no -march=native
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", target, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode == 0:
            return
        error = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {error}")


class DecodeKernel:
    """One adapter's kernel call: ``base + alpha_l * MoE(hidden)`` for CPU float32 or bfloat16 hidden states.

    ``routing`` is the router's ``kernel_routing()`` and ``form`` the bank's ``kernel_form(alpha_l)``; the tensors
    are kept here because the C struct only points at them. ``real``: the bank's experts; a router with a null
    expert has one more row, and a token that picks it gets nothing from it.
    """

    def __init__(self, library: ctypes.CDLL, router_rows: torch.Tensor, routing, form, real: int):
        top_k, bias, normalise_all = routing
        kernel_name, rank, width, tensors = form
        self.tensors = {name: t.detach().float().contiguous() for name, t in tensors.items()}
        self.tensors["rows"] = torch.cat([router_rows.detach().float(), self.tensors.pop("input_rows")]).contiguous()
        if bias is not None:
            self.tensors["bias"] = bias.detach().float().contiguous()
        self.hidden = self.tensors["rows"].shape[1]
        pointers = {name: t.data_ptr() for name, t in self.tensors.items()}
        self.plan = PlanStruct(self.hidden, router_rows.shape[0], real, top_k, int(normalise_all), rank, width,
                               pointers["rows"], pointers.get("bias"),
                               pointers.get("core_in"), pointers.get("core_out"), pointers["up"])
        self.plan_pointer = ctypes.byref(self.plan)
        self.function = getattr(library, f"{kernel_name}_add")

    def accepts(self, hidden: torch.Tensor, base: torch.Tensor) -> bool:
        return (hidden.is_cpu and hidden.dtype is base.dtype and hidden.dtype in KERNEL_DTYPES
                and hidden.shape == base.shape and hidden.is_contiguous() and base.is_contiguous()
                and hidden.shape[-1] == self.hidden)

    def __call__(self, hidden: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(base)
        self.function(self.plan_pointer, hidden.numel() // self.hidden, hidden.data_ptr(), base.data_ptr(),
                      out.data_ptr(), hidden.dtype is torch.bfloat16)
        return out
