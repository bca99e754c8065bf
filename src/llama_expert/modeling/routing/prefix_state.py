"""PrefixState: what a sequence router carries from one forward pass of its sequences to the next (decoding).

A sequence router (``sequence_aux_free``, ``prototype``) routes token t by the mean of its sequence's router inputs
over tokens 0..t. A full forward pass has them all; a decoding step with a KV cache sees only its new token, so the
earlier tokens' sum and count must come from the passes before. They are kept here, per router (one per layer), and
travel with the KV cache of the generation (``integration.prefix_cache``), never on the model: a model serves
generation after generation, and each must start from nothing.

A pass reads ``before`` (left by the earlier passes; empty for new sequences) and writes ``after``; ``following``
is the state of the next pass. Reading never sees the pass's own writes, so routing twice in one pass (a pruning
hook, gradient checkpointing's recomputation) gives the same answer twice.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .base import in_backward_pass

Sums = Tuple[torch.Tensor, torch.Tensor]  # ([B, d] float32 sum of the non-padding router inputs, [B] their count)


class PrefixState:
    def __init__(self, before: Optional[Dict[object, Sums]] = None):
        self.before: Dict[object, Sums] = before or {}
        self.after: Dict[object, Sums] = {}

    def read(self, key) -> Optional[Sums]:
        """What earlier passes left for ``key`` (a router), or None: these sequences start here."""
        return self.before.get(key)

    def write(self, key, total: torch.Tensor, count: torch.Tensor) -> None:
        self.after[key] = (_detached(total), _detached(count))

    def following(self) -> "PrefixState":
        """The state the next pass of these sequences starts from."""
        return PrefixState({**self.before, **self.after})

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (indices or a boolean mask) of every sum, in that order (beam search reorders its
        sequences)."""
        for sums in (self.before, self.after):
            for key, (total, count) in sums.items():
                where = index.to(total.device)
                sums[key] = (total[where], count[where])

    def repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times in a row (a batch expanded after the prompt, as the cache is)."""
        for sums in (self.before, self.after):
            for key, (total, count) in sums.items():
                sums[key] = (total.repeat_interleave(repeats, dim=0), count.repeat_interleave(repeats, dim=0))


class StaticPrefixState(PrefixState):
    """A ``PrefixState`` whose sums stay in the same tensors for the whole generation: what a CUDA graph needs.

    Why: a captured decode step reads and writes fixed addresses; a state that made new tensors every pass would be
    copied into the graph's inputs each step and its outputs kept across replays (which overwrite them). Here every
    router's running sums live in two buffers per router, ``before`` (what this pass reads) and ``after`` (what it
    writes, in place), marked as static addresses for the compiler; ``following`` copies ``after`` into ``before``
    in place and returns the same object. As in ``PrefixState``, reading never sees the pass's own writes.
    Made from the state an eager pass (the prompt's) left, by ``integration.prefix_cache`` for a compileable
    (static) KV cache."""

    def __init__(self, state: Dict[object, Sums]):
        super().__init__({key: _static_copy(sums) for key, sums in state.items()})
        self.after = {key: _static_copy(sums) for key, sums in state.items()}

    def refill(self, state: Dict[object, Sums]) -> bool:
        """Take ``state``'s sums into these buffers, in place, when it has the same routers and shapes (a static cache
        reused by the next generation: its graphs keep their addresses); False, and nothing changed, otherwise."""
        if state.keys() != self.before.keys() or any(state[k][0].shape != self.before[k][0].shape for k in state):
            return False
        for key, (total, count) in state.items():
            for sums in (self.before, self.after):
                sums[key][0].copy_(total)
                sums[key][1].copy_(count)
        return True

    def write(self, key, total: torch.Tensor, count: torch.Tensor) -> None:
        slot = self.after.get(key)
        if slot is None or slot[0].shape != total.shape:  # a router the prompt's pass did not see: a new slot
            self.after[key] = _static_copy((total.detach(), count.detach()))
            return
        slot[0].copy_(total.detach())
        slot[1].copy_(count.detach())

    def following(self) -> "StaticPrefixState":
        for key, (total, count) in self.after.items():
            before = self.before.get(key)
            if before is None or before[0].shape != total.shape:
                self.before[key] = _static_copy((total, count))
            else:
                before[0].copy_(total)
                before[1].copy_(count)
        return self

    def select(self, index: torch.Tensor) -> None:
        """Rows ``index`` in place when the batch keeps its size (beam search), else new buffers."""
        for sums in (self.before, self.after):
            for key, (total, count) in sums.items():
                where = index.to(total.device)
                picked = (total[where], count[where])
                if picked[0].shape == total.shape:
                    total.copy_(picked[0])
                    count.copy_(picked[1])
                else:
                    sums[key] = _static_copy(picked)

    def repeat_interleave(self, repeats: int) -> None:
        super().repeat_interleave(repeats)
        for sums in (self.before, self.after):
            for key, pair in sums.items():
                sums[key] = _static_copy(pair)


def _static_copy(sums: Sums) -> Sums:
    """Fresh copies the compiler may treat as fixed addresses (mutated in place inside a CUDA graph)."""
    copies = tuple(t.detach().clone() for t in sums)
    for t in copies:
        torch._dynamo.mark_static_address(t)
    return copies


class PrefixMeans(NamedTuple):
    """What a prefix-mean router routes, flat in the order ``b * T + t``."""

    means: torch.Tensor  # [B*T, d] float32: each token's prefix mean m_t
    mask: Optional[torch.Tensor]  # [B*T] bool, False for padding, or None
    sequences: int  # B
    counts: torch.Tensor  # [B*T] float32: the prefix's non-padding tokens (0 before a sequence's first)


def sequence_prefix_means(key, hidden: torch.Tensor, context) -> PrefixMeans:
    """The prefix means of a pass's ``hidden`` [B, T, d] (or [N, d]: one sequence), with its context
    (``modeling.adapter.TokenMask``: padding mask and ``PrefixState``); ``key`` (the router) names its running sums in
    the state.

    ``m_t = sum_{s<=t, s not padding} h_s / max(1, #{s <= t, s not padding})``: the masked cumulative sum over the
    sequence axis gives every prefix mean of a full pass at once; with a KV cache the sum and count of the earlier
    tokens come from the state (none: the sequences start here), and the new totals go back into it for the next
    pass. Padding is left out with ``where``, not a product: a padding row's hidden state may be NaN (it attends to
    nothing)."""
    batch = hidden if hidden.dim() == 3 else hidden.reshape(1, -1, hidden.shape[-1])
    flat_mask = context.for_hidden(hidden) if context is not None else None
    mask = flat_mask.view(batch.shape[:2]) if flat_mask is not None else None
    prefix = context.prefix if context is not None else None
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        means, counts = _prefix_means(key, batch.float(), mask, prefix)
    return PrefixMeans(means.reshape(-1, means.shape[-1]), flat_mask, batch.shape[0], counts.reshape(-1))


def _prefix_means(key, hidden: torch.Tensor, mask: Optional[torch.Tensor], prefix: Optional[PrefixState]):
    """``(means [B, T, d], counts [B, T])``."""
    if mask is None:
        total = hidden.cumsum(dim=1)
        count = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device).expand(hidden.shape[:2])
    else:
        total = torch.where(mask.unsqueeze(-1), hidden, hidden.new_zeros(())).cumsum(dim=1)
        count = mask.to(hidden.dtype).cumsum(dim=1)
    before = prefix.read(key) if prefix is not None else None
    if before is not None:
        total = total + before[0].to(total.device).unsqueeze(1)
        count = count + before[1].to(count.device).unsqueeze(1)
    if prefix is not None and not in_backward_pass():
        prefix.write(key, total[:, -1], count[:, -1])
    return total / count.clamp_min(1.0).unsqueeze(-1), count


class PrefixMeanRouting:
    """What the routers that route token t by its sequence's prefix mean ``m_t`` share (``sequence_aux_free``,
    ``prototype``; mixed in before ``RouterBase``): the general path routes the means of ``sequence_prefix_means``,
    and so does the decode fast path (``modeling.fused_inference``): its ``inference_logits`` are the subclass's
    ``logits`` of the means, which read and update the pass's ``PrefixState`` as the general path does, and its
    ``kernel_routing`` (the compiled kernel) sets ``prefix_mean``, which makes the kernel keep the same sums."""

    sequence_level = True
    has_inference_gates = True

    def route_sequences(self, hidden: torch.Tensor, context):
        return self(*sequence_prefix_means(self, hidden, context))  # means, mask, sequences, counts

    def inference_rows(self) -> None:
        return None  # the logits are of the means, not of each token's own h

    def inference_logits(self, projected: torch.Tensor, hidden: torch.Tensor, context) -> torch.Tensor:
        prefix = sequence_prefix_means(self, hidden, context)
        return self.logits(prefix.means, prefix.counts)


def _detached(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without its autograd history; as it is when it has none (inference: no new view per layer per
    decode step)."""
    return tensor.detach() if tensor.requires_grad else tensor
