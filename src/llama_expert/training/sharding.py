"""Sharded data parallelism for adapter training: FSDP2 shards the frozen base, the adapters stay replicated.

Why this split: the frozen base is more than 99.8% of the weights, so sharding it (and its all-gathers around
each decoder layer) is where FSDP saves memory. The adapters stay ordinary tensors on every rank, so
checkpoints, the optimiser state, exact resume and the NaN guards work as in single-process training; their
gradients are averaged over the ranks by one all-reduce per optimiser step, as DDP would do.

Asked for as Accelerate asks for FSDP: ``accelerate launch --config_file examples/accelerate/fsdp2.yaml``
(``ACCELERATE_USE_FSDP=true``), on GPUs and, with ``--cpu``/gloo, on CPUs, where Accelerate has no FSDP of its
own. The loop then shards the model itself instead of handing it to ``accelerator.prepare``.
"""

from __future__ import annotations

import os
from typing import Iterable, List

import torch
from torch import nn


def fsdp_requested(accelerator) -> bool:
    """Whether this run was launched for FSDP on several processes."""
    if accelerator.num_processes < 2:
        return False
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or \
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_frozen_base(model: nn.Module, replicated: Iterable[nn.Parameter], device: torch.device) -> nn.Module:
    """FSDP2 (``fully_shard``) on every decoder layer and on the whole model, leaving ``replicated`` (the
    adapters' tensors) out of the sharding. The model is moved to ``device`` first."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    ignored = set(replicated)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError("FSDP sharding needs a decoder with model.model.layers (a Llama-family model).")
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params={p for p in layer.parameters() if p in ignored})
    fully_shard(model, mesh=mesh, ignored_params={p for p in model.parameters() if p in ignored})
    return model


def average_gradients(params: List[nn.Parameter]) -> None:
    """All-reduce the replicated parameters' gradients to their mean over the ranks, in one flat buffer. A
    parameter without a gradient on some rank (an expert no token of that shard reached) counts as zero
    there, so every rank reduces the same buffer."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
