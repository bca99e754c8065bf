"""Prototypes: what an adapter's training text looks like to each layer, so that a mix can route to it later.

An adapter trained on one domain (a branch) records, per decoder layer ``l``, the mean ``p_l`` of the router input
(the MLP's input ``h``) over a sample of its training text, and the spread ``s_l`` of the sequences' causal prefix
means ``m_t`` around it (``mean ||m_t - p_l||^2 / d`` over the tokens from ``SPREAD_FROM`` on). A mixed adapter
(``lifecycle.mix``) routes a sequence to the expert whose prototype is nearest to its prefix mean, with no data
at all; the spread says how near "near" is. They are measured on the trained model, adapter on: that is the model
the branch's expert is part of when the mix routes to it.

How near depends on how long the prefix is: the mean of n tokens of one text lies about ``b + w / n`` from the
prototype (``b``: how far one text's own mean lies from it; ``w / n``: the noise of averaging n tokens), so a
threshold fixed in n either lets unlike text through once its prefix is long or refuses the start of like text
(docs/results/experts-by-design-cheap/null-distance-validation.md). The fit ``floor + slope / n`` of the mean
squared distance at each prefix length n from ``SPREAD_FROM`` on is recorded beside the spread; the null expert of
a mix uses it (docs/design.md section 2).

They live in their own file beside the adapter (``prototypes.safetensors``), not in ``adapter_model.safetensors``,
whose tensors must match what the adapter's config builds. They are measured on packed training blocks, which start
anywhere in a text; a prompt starting with a BOS token (whose router input is often an outlier) has, for its first
few tokens, a prefix mean unlike any block's: short prompts route least surely.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import AdapterError
from ..files import atomic_write
from .surgery import decoder_layers, domain_labels
from .weights_file import load_finite

PROTOTYPES_NAME = "prototypes.safetensors"
SPREAD_FROM = 32  # the spread is measured on prefixes of at least this many tokens (a shorter one says little)


@dataclass
class Prototypes:
    prototype: torch.Tensor  # [L, d] float32: mean router input per layer
    spread: torch.Tensor  # [L] float32: mean squared distance per dimension of the prefix means to it
    tokens: int  # how many tokens the means are over
    floor: Optional[torch.Tensor] = None  # [L] float32: that distance at prefix length n is about floor + slope / n
    slope: Optional[torch.Tensor] = None  # [L] float32 (None, None: recorded before the fit was, floor = spread)

    @property
    def fitted(self) -> bool:
        """Whether the spread by length was recorded (format 4 on); a file recorded before the fit was has it not."""
        return self.floor is not None and self.slope is not None

    def by_length(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(floor, slope)`` [L] each: the spread at prefix length n is ``floor + slope / n``; a file recorded before
        the fit gives ``(spread, 0)``, the same spread at every length."""
        if not self.fitted:
            return self.spread.clone(), torch.zeros_like(self.spread)
        return self.floor, self.slope


class _LayerSums:
    """Running sums over one layer's router inputs: of ``h`` (the prototype), and of the prefix means ``m_n`` and of
    ``||m_n||^2`` over the prefix lengths ``n``, plain and divided by ``n`` (the spread: ``E||m - p||^2 = E||m||^2 -
    2 p.E[m] + ||p||^2``, and the sums its fit by length needs: ``fit_from_sums``), in float64: memory of a few
    vectors per layer, whatever the block length."""

    def __init__(self):
        self.hidden = self.means = self.squares = self.inverse_means = self.inverse_squares = 0.0
        self.tokens = self.blocks = 0
        self.lengths: Optional[torch.Tensor] = None  # the prefix lengths summed (from SPREAD_FROM on)

    def __call__(self, module, args) -> None:
        hidden = args[0].detach().double()  # [B, T, d]
        counts = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device)
        first = min(SPREAD_FROM, hidden.shape[1])
        means = (hidden.cumsum(dim=1) / counts.view(1, -1, 1))[:, first - 1:]  # [B, T', d]
        inverse = 1.0 / counts[first - 1:].view(1, -1, 1)
        squares = means.pow(2).sum(-1, keepdim=True)
        self.hidden = self.hidden + hidden.sum(dim=(0, 1)).cpu()
        self.tokens += hidden.shape[0] * hidden.shape[1]
        self.means = self.means + means.sum(dim=(0, 1)).cpu()
        self.inverse_means = self.inverse_means + (means * inverse).sum(dim=(0, 1)).cpu()
        self.squares = self.squares + float(squares.sum())
        self.inverse_squares = self.inverse_squares + float((squares * inverse).sum())
        self.blocks += hidden.shape[0]
        self.lengths = counts[first - 1:].cpu()

    def result(self) -> Tuple[torch.Tensor, float, float, float]:
        """(prototype, spread, floor, slope) of the layer: with ``D(n)`` the mean squared distance per dimension at
        length n, ``sum_n D(n)`` and ``sum_n D(n) / n`` follow from the sums, and they are all the fit needs."""
        prototype = self.hidden / self.tokens
        norm, scale = float(prototype @ prototype), self.blocks * prototype.numel()
        inverse = 1.0 / self.lengths
        total = (self.squares - 2 * float(prototype @ self.means) + self.blocks * norm * len(inverse)) / scale
        weighted = (self.inverse_squares - 2 * float(prototype @ self.inverse_means)
                    + self.blocks * norm * float(inverse.sum())) / scale
        fit = fit_from_sums(len(inverse), float(inverse.sum()), float(inverse.pow(2).sum()), total, weighted)
        return (prototype.float(), total / len(inverse)) + fit


def fit_by_length(lengths: torch.Tensor, distances: torch.Tensor) -> Tuple[float, float]:
    """``(floor, slope) >= 0`` of the least-squares fit ``distances ~ floor + slope / lengths``; one length, or
    distances that do not shrink with the length, give ``(their mean, 0)``: the same spread at every length."""
    inverse = 1.0 / lengths.double()
    distances = distances.double()
    return fit_from_sums(len(lengths), float(inverse.sum()), float(inverse.pow(2).sum()), float(distances.sum()),
                         float((inverse * distances).sum()))


def fit_from_sums(count: int, x: float, xx: float, y: float, xy: float) -> Tuple[float, float]:
    """``fit_by_length`` from its sums over the ``count`` points: of ``x = 1 / n``, ``x^2``, ``y = D(n)`` and
    ``x y``."""
    spread_x = xx - x * x / count
    if count < 2 or spread_x <= 0:
        return y / count, 0.0
    slope = (xy - x * y / count) / spread_x
    if slope <= 0:
        return y / count, 0.0
    floor = (y - slope * x) / count
    if floor < 0:  # the best fit through the origin
        return 0.0, xy / xx
    return floor, slope


@torch.no_grad()
def measure_prototypes(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4,
                       domains: Optional[torch.Tensor] = None) -> Prototypes:
    """The prototypes of ``model`` on ``blocks`` [n, T] (packed token ids, no padding; blocks shorter than
    ``SPREAD_FROM`` measure the spread on their last prefix); ``domains`` [n] labels each block for the routers that
    route by label (``oracle``)."""
    if blocks.dim() != 2 or blocks.shape[0] == 0:
        raise ValueError(f"prototypes need a [n, T] batch of token blocks, got shape {tuple(blocks.shape)}")
    layers = decoder_layers(model)
    sums = [_LayerSums() for _ in layers]
    handles = [layer.mlp.register_forward_pre_hook(s) for layer, s in zip(layers, sums)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(blocks), batch_size):
            labels = domains[start:start + batch_size] if domains is not None else None
            with domain_labels(model, labels):
                model(input_ids=blocks[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    prototype, spread, floor, slope = zip(*(s.result() for s in sums))
    return Prototypes(torch.stack(prototype), _floats(spread), int(blocks.numel()), _floats(floor), _floats(slope))


def _floats(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def save_prototypes(prototypes: Prototypes, folder: Union[str, Path]) -> Path:
    path = Path(folder) / PROTOTYPES_NAME
    floor, slope = prototypes.by_length()
    state = {"prototype": prototypes.prototype.contiguous(), "spread": prototypes.spread.contiguous(),
             "spread_floor": floor.contiguous(), "spread_slope": slope.contiguous()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"tokens": str(prototypes.tokens)}))
    return path


def load_prototypes(folder: Union[str, Path], layers: int, hidden_size: int) -> Prototypes:
    """The prototypes an adapter folder records, checked against the model's ``layers`` x ``hidden_size``."""
    path = Path(folder) / PROTOTYPES_NAME
    if not path.is_file():
        raise AdapterError(f"{folder} records no prototypes ({PROTOTYPES_NAME}): `train` writes them at the end of "
                           f"training, and adapters trained before it or elsewhere have none; measure them on its "
                           f"training text with `mix --prototype-data`.")
    state = load_finite(path)
    prototype, spread = state.get("prototype"), state.get("spread")
    floor, slope = state.get("spread_floor"), state.get("spread_slope")  # None in files written before the fit
    if prototype is None or spread is None or tuple(prototype.shape) != (layers, hidden_size) \
            or any(t is not None and tuple(t.shape) != (layers,) for t in (spread, floor, slope)):
        found = {k: tuple(v.shape) for k, v in state.items()}
        raise AdapterError(f"{path} holds {found}, not prototype [{layers}, {hidden_size}] and spread [{layers}] for "
                           f"this base model; it belongs to another base. Mix adapters of one base.")
    with safe_open(str(path), "pt") as f:
        tokens = int((f.metadata() or {}).get("tokens", 0))
    by_length = (floor.float(), slope.float()) if floor is not None and slope is not None else (None, None)
    return Prototypes(prototype.float(), spread.float(), tokens, *by_length)
