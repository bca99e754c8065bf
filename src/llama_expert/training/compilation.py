"""``train --compile``: how the training step is compiled, a registered choice (``COMPILATIONS``).

Why: an adapter adds about fifteen small operations per layer (router matmul, top-k, softmax, gate scatter, the
bank's matmuls, the residual scale) to the frozen MLP's three large ones, and their backward as many again. Run
eagerly each is its own kernel launch (on a GPU) or its own pass over memory (on a CPU); compiled, the small
elementwise ones fuse. ``adapters`` compiles each ``MoEAdapter`` (its forward, and through AOT autograd its
backward) with ``torch.compile``, in place (``nn.Module.compile``: parameter names, state dicts and checkpoints stay
as they are). The frozen base outside the adapters stays eager, so the compiled region is the same small graph in
every layer with the same number of experts: one compilation per expert count (and one more for the first layer,
whose input needs no gradient), paid in the first step. The compiled step computes what the eager one computes, to
float tolerance (tests/training/test_compilation.py); random draws (router noise, dropout) come from the compiler's
generator, so they are other draws than eager's.

Gradient checkpointing is refused with it: its recomputation would run the compiled forward a second time, and a
router that updates a buffer after each pass (aux_free's bias) would update it twice (an eager pass asks
``in_backward_pass``; a compiled graph cannot).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from ..integration.surgery import adapters
from ..modeling.registry import Registry

COMPILATIONS: Registry[Callable] = Registry("compilation", "--compile")


@COMPILATIONS.register("none")
def eager(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """Every operation as its own kernel (the default: nothing to compile, nothing to wait for)."""
    return model


@COMPILATIONS.register("adapters")
def compile_adapters(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """Each MoE adapter compiled in place with ``backend`` (tests trace with "aot_eager": the same graphs, forward
    and backward, without code generation)."""
    layers = adapters(model)
    if not layers:
        raise ConfigError("--compile adapters compiles the MoE adapters, and this model has none (a LoRA or full "
                          "fine-tuning run); use --compile none.")
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # Transformers 5's name, else the old one
    if checkpointing if checkpointing is not None else getattr(model, "is_gradient_checkpointing", False):
        raise ConfigError("--compile adapters cannot run with gradient checkpointing (its recomputation would run the "
                          "compiled routers twice); drop --use-gradient-checkpointing, or use --compile none.")
    # one graph per distinct expert count, for training and for evaluation (and the first layer's): more than the
    # default limit of 8 with a progressive allocation, beyond which dynamo would fall back to eager
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 4 * len({a.num_experts for _, a in layers}) + 4)
    for _, adapter in layers:
        adapter.compile(backend=backend)
    return model


def compile_for_training(model: torch.nn.Module, choice: str, backend: str = "inductor") -> torch.nn.Module:
    """``model`` as ``--compile choice`` trains it."""
    return COMPILATIONS.get(choice)(model, backend)
