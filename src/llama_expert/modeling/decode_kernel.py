"""The compiled CPU decode kernel (``decode_kernel.c``): one call per adapter per step, built once per machine.

Why: at batch 1 an adapter's decode work is a few thousand multiply-adds, less than the cost of the dozen
PyTorch operations that express it (about 7 us each on a 2-core VM, 0.90x of the base's tokens/s with the
PyTorch fused path). The kernel routes, runs the chosen experts only and adds the base output in one call,
and it reads ``[W_g; A]`` instead of the PyTorch path's ``[W_g; A; W1^T A]`` (5.7x fewer adapter bytes per
token with SmolLM2's default shapes, which matters when decoding is bound by memory). Routers that route by the
sequence's prefix mean (``sequence_aux_free``, a mix's ``prototype``) run here too: the call reads the running sums
earlier passes left in the pass's ``PrefixState`` and writes the new ones (``KernelRouting.prefix_mean``). A bank
that computes the whole layer (mixlora: LoRAs inside the MLP's projections) has a second entry point, ``layer_add``
(``LayerKernel``): PyTorch runs the frozen projections, the call the routing and the chosen LoRAs.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple

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
                                                    "width", "prefix_mean")] \
        + [(name, ctypes.c_float) for name in ("divisor", "null_logit", "null_slope", "alpha")] \
        + [(name, ctypes.c_void_p) for name in ("logits", "delta", "layer", "router_rows", "bias", "centre",
                                                "row_norms", "rows", "core_in", "core_out", "up")]


class PrefixStruct(ctypes.Structure):
    """decode_kernel.c's ``Prefix``: a prefix-mean router's running sums for one call."""

    _fields_ = [("length", ctypes.c_int64)] + [(name, ctypes.c_void_p) for name in (
        "mask", "before_total", "before_count", "after_total", "after_count")]


@dataclass
class KernelRouting:
    """A router's eval routing as the kernel runs it (``RouterBase.kernel_routing``): the C function
    ``<logits>_logits`` makes the logits from the router input (the token's ``h``, or with ``prefix_mean`` its
    sequence's prefix mean, kept across passes in the pass context's ``PrefixState`` under the router as key), then
    the top-k of ``logits + bias``, gated by the softmax of the chosen logits (``normalise_all``: of all of them).

    ``linear``: ``rows`` is ``W_g`` [choices, d]. ``prototype``: ``rows`` are the prototypes minus their mean ``centre``
    [E_real, d], ``row_norms`` their squared norms, ``divisor`` ``d * T``; with a null expert (one more choice than
    rows) its logit is ``null_logit + null_slope / n``, n the length of the token's prefix."""

    top_k: int
    choices: int  # the router's ``num_experts``: the real experts and a null expert's choice
    rows: torch.Tensor
    bias: Optional[torch.Tensor] = None
    normalise_all: bool = False
    logits: str = "linear"
    prefix_mean: bool = False
    centre: Optional[torch.Tensor] = None
    row_norms: Optional[torch.Tensor] = None
    divisor: float = 1.0
    null_logit: float = 0.0
    null_slope: float = 0.0


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
    library.adapter_add.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    library.adapter_add.restype = None
    library.layer_add.argtypes = [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 5 + [ctypes.c_int,
                                                                                             ctypes.c_void_p]
    library.layer_add.restype = ctypes.c_int
    return library


def kernel_function(library: ctypes.CDLL, name: str) -> int:
    """The address of the library's C function ``name`` (a router's ``<form>_logits``, a bank's ``<bank>_delta``),
    for the plan: the kernel calls the router's and the bank's parts through these pointers."""
    try:
        return ctypes.cast(getattr(library, name), ctypes.c_void_p).value
    except AttributeError:
        raise ValueError(f"decode_kernel.c has no function {name}; add it there, or give this router or bank no "
                         f"kernel form") from None


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
    expert has one more choice, and a token that picks it gets nothing from it. A prefix-mean router also needs
    ``context`` (the model's ``TokenMask``: padding mask and ``PrefixState``) and ``key`` (its key in the state).
    """

    ENTRY, PART = "adapter_add", "delta"  # the C entry point, and the bank's part it calls: ``<bank>_<PART>``

    def __init__(self, library: ctypes.CDLL, routing: KernelRouting, form, real: int, context=None, key=None,
                 alpha: float = 1.0):
        kernel_name, rank, width, tensors = form
        self.tensors = {name: t.detach().float().contiguous() for name, t in tensors.items()}
        self.tensors["rows"] = self.tensors.pop("input_rows")
        for name in ("rows", "bias", "centre", "row_norms"):
            value = getattr(routing, name)
            if value is not None:
                self.tensors["router_" + name if name == "rows" else name] = value.detach().float().contiguous()
        self.hidden = self.tensors["rows"].shape[1]
        pointers = {name: t.data_ptr() for name, t in self.tensors.items()}
        bank_parts = {"delta": None, "layer": None, self.PART: kernel_function(library, f"{kernel_name}_{self.PART}")}
        self.plan = PlanStruct(
            self.hidden, routing.choices, real, routing.top_k, int(routing.normalise_all), rank, width,
            int(routing.prefix_mean), routing.divisor, routing.null_logit, routing.null_slope, alpha,
            kernel_function(library, f"{routing.logits}_logits"), bank_parts["delta"], bank_parts["layer"],
            *[pointers.get(name) for name in ("router_rows", "bias", "centre", "row_norms", "rows", "core_in",
                                              "core_out", "up")])
        self.plan_pointer = ctypes.byref(self.plan)
        self.function = getattr(library, self.ENTRY)
        self.sequences = (context, key) if routing.prefix_mean else None
        self.prefix = PrefixStruct()
        self.prefix_pointer = ctypes.byref(self.prefix)
        self.prepared: Optional[Tuple[Tuple[int, int], PrefixSums]] = None  # (batch, length), the pass's sums
        self.frozen = None  # a layer bank's frozen projections for this pass (``ExpertBank.frozen_projections``)

    def accepts(self, hidden: torch.Tensor, base: torch.Tensor) -> bool:
        return (self.accepts_hidden(hidden) and hidden.dtype is base.dtype and hidden.shape == base.shape
                and base.is_contiguous())

    def accepts_hidden(self, hidden: torch.Tensor) -> bool:
        return (hidden.is_cpu and hidden.dtype in KERNEL_DTYPES and hidden.is_contiguous()
                and hidden.shape[-1] == self.hidden and hidden.numel() > 0)

    def __call__(self, hidden: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(base)
        self.run(hidden, base.data_ptr(), out.data_ptr())
        return out

    def run(self, hidden: torch.Tensor, *pointers: int):
        """The entry point on ``hidden``'s tokens and the other tensors' ``pointers``; its return value."""
        sums = self.pass_sums(hidden) if self.sequences is not None else None
        result = self.function(self.plan_pointer, hidden.numel() // self.hidden, hidden.data_ptr(), *pointers,
                               hidden.dtype is torch.bfloat16, None if sums is None else self.prefix_pointer)
        if sums is not None and sums.after is not None:  # after the call: a static state copies what it is given
            sums.state.write(self.sequences[1], *sums.after)  # as the general path leaves them for the next pass
        return result

    def prepare(self, shape: Optional[Tuple[int, int]], frozen=None) -> None:
        """Set up the prefix sums of a model pass over ``shape`` = (batch, new tokens) before it starts, for every
        layer in one loop (``MoEAdapter.kernel_for_pass``): done per layer, right after the MLP has streamed its
        weights through the caches, the same Python costs several times more. None: each call sets up its own.
        ``frozen``: a layer bank's frozen projections, looked up once for the pass for the same reason."""
        self.prepared, self.frozen = None, frozen
        if self.sequences is not None and shape is not None:
            context = self.sequences[0]
            mask = context.for_shape(*shape, torch.device("cpu")) if context is not None else None
            self.prepared = (tuple(shape), self.prefix_sums(*shape, mask))

    def pass_sums(self, hidden: torch.Tensor) -> "PrefixSums":
        """This call's prefix sums: the pass's prepared ones when the shapes match, else set up now."""
        shape = (hidden.shape[0], hidden.shape[1]) if hidden.dim() == 3 else (1, hidden.shape[0])
        if self.prepared is not None and self.prepared[0] == shape:
            return self.prepared[1]
        self.prepared = None  # the struct is pointed elsewhere now
        context = self.sequences[0]
        return self.prefix_sums(*shape, context.for_hidden(hidden) if context is not None else None)

    def prefix_sums(self, batch: int, length: int, mask: Optional[torch.Tensor]) -> "PrefixSums":
        """Point the ``Prefix`` struct at the padding mask of ``batch`` sequences of ``length`` new tokens and the
        sums earlier passes left, and at new tensors for the totals after them, as
        ``prefix_state.sequence_prefix_means`` reads and writes them (no ``PrefixState``: the sequences start here and
        nothing is kept)."""
        context, key = self.sequences
        state = context.prefix if context is not None else None
        before = state.read(key) if state is not None else None
        mask = mask.contiguous() if mask is not None else None
        if before is not None:
            before = (as_rows(before[0], (batch, self.hidden)), as_rows(before[1], (batch,)))
        after = (torch.empty(batch, self.hidden, dtype=torch.float32), torch.empty(batch, dtype=torch.float32)) \
            if state is not None else None
        prefix = self.prefix
        prefix.length = length
        prefix.mask = mask.data_ptr() if mask is not None else None
        prefix.before_total, prefix.before_count = (None, None) if before is None else [t.data_ptr() for t in before]
        prefix.after_total, prefix.after_count = (None, None) if after is None else [t.data_ptr() for t in after]
        return PrefixSums(state, mask, before, after)


class LayerKernel(DecodeKernel):
    """The call of a bank that computes the whole layer (``ExpertBank.computes_mlp``: mixlora), ``layer_add``: given
    the frozen projections' ``u = W1 h``, ``v = W3 h`` and ``m = act(u) * v`` (as the MLP computes them), it routes and
    runs the chosen experts, leaves ``W2``'s input in ``m`` (in place) and returns the bank's output beside ``W2``
    (float32, ``hidden``'s shape). The bank's form names ``<bank>_layer``; ``alpha`` is ``alpha_l``."""

    ENTRY, PART = "layer_add", "layer"

    def __call__(self, hidden: torch.Tensor, u: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        down = torch.empty(hidden.shape, dtype=torch.float32)
        if self.run(hidden, u.data_ptr(), v.data_ptr(), m.data_ptr(), down.data_ptr()):
            raise MemoryError(f"the decode kernel could not allocate {3 * u.shape[-1] * 4} bytes of working memory")
        return down


def as_rows(tensor: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """``tensor`` as a contiguous float32 tensor of ``shape`` for the kernel to read, broadcast as the general path's
    sum broadcasts (and never read past its end); as it is when it is one already (each decode step's case)."""
    if tensor.shape == shape and tensor.dtype is torch.float32 and tensor.is_contiguous():
        return tensor
    return torch.broadcast_to(tensor.float(), shape).contiguous()


class PrefixSums(NamedTuple):
    """One kernel call's prefix state (``state``, None outside a model pass) and the tensors its ``Prefix`` struct
    points at, kept alive until the call returns."""

    state: object
    mask: Optional[torch.Tensor]
    before: Optional[Tuple[torch.Tensor, torch.Tensor]]
    after: Optional[Tuple[torch.Tensor, torch.Tensor]]
