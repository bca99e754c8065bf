"""An input embedding read a row at a time from an optimum-quanto int4 or int8 weight (the CPU 4-bit base).

Why: the token embedding is a fifth of Llama 3.2 1B's and SmolLM2's weights, and both tie it to the output head.
With only the Linear layers in 4 bit the whole base kept 0.46x of its bfloat16 bytes; quantising the head too
and letting the embedding read that same quantised table brings it near 0.33x, and a tied model keeps one table.
Why by rows: a lookup needs a few rows, and dequantising the whole [vocab, hidden] table per forward pass would
cost more than the step. quanto offers no row lookup, so this reads its layouts: int8 (``_data`` [V, d], one
scale per row) and packed int4 (``PackedTensor``: grouped row ``i`` of ``R`` in the low four bits of packed row
``i``, row ``i + ceil(R/2)`` in the high four bits; one scale and shift per group of a row). Tests pin the rows
to ``weight.dequantize()`` for both.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class QuantizedEmbedding(nn.Module):
    """``embedding(ids)`` from ``table.weight``, a quanto int4 or int8 [vocab, hidden] weight quantised by rows.

    ``tied``: ``table`` is the model's output head, which owns the weight (not registered here, so that it is
    saved, moved and counted once); otherwise ``table`` is this module's own frozen quantised Linear.
    """

    def __init__(self, table: nn.Module, dtype: torch.dtype, tied: bool, padding_idx: Optional[int] = None,
                 unquantized_sample: Optional[torch.Tensor] = None):
        super().__init__()
        if tied:
            object.__setattr__(self, "table", table)
        else:
            self.table = table
        self.tied, self.dtype, self.padding_idx = tied, dtype, padding_idx
        self.num_embeddings, self.embedding_dim = table.weight.shape
        # a corner of the table as it was before quantisation (not a buffer: no bytes in the model's state), for
        # ``weights_checksum``: an adapter trained on the 4-bit base still matches the full-precision base
        self.unquantized_sample = unquantized_sample

    @property
    def weight(self):
        """The quantised table (what ``tie_weights`` and ``get_input_embeddings().weight`` read)."""
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.table.weight
        data, scale = weight._data, weight._scale
        if not hasattr(data, "_bits"):  # int8: a row of codes and its scale
            flat = ids.reshape(-1)
            values = scale[flat] * data[flat].to(scale.dtype)
        else:
            packed, shift = data._data, weight._shift
            groups = scale.shape[0] // self.num_embeddings  # per row of the table
            rows = (ids.reshape(-1, 1) * groups + torch.arange(groups, device=ids.device)).reshape(-1)
            half = packed.shape[0]
            codes = packed[rows % half]
            codes = torch.where((rows >= half).unsqueeze(-1), codes >> 4, codes & 15)
            if shift.dtype.is_floating_point:
                values = scale[rows] * codes.to(scale.dtype) - shift[rows]
            else:
                values = scale[rows] * (codes.to(torch.int8) - shift[rows].to(torch.int8))
        return values.reshape(*ids.shape, self.embedding_dim).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.weight.qtype.name}, tied={self.tied}"
