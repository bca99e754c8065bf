"""Documents to token blocks: joined with blank lines, tokenised once, cut into fixed windows.

This is the perplexity protocol of the quantisation papers (docs/design.md section 5), and training uses
the same packing so that validation and training see text the same way.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..errors import DataError


def tokenize_documents(docs: List[str], tokenizer) -> torch.Tensor:
    """One 1-D LongTensor: the documents joined with blank lines and tokenised once."""
    text = "\n\n".join(docs)
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def pack_blocks(ids: torch.Tensor, block_size: int, max_blocks: Optional[int] = None,
                max_tokens: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping ``[n, block_size]`` windows; the incomplete tail is dropped."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise DataError(f"the text holds {ids.numel()} tokens, fewer than one block of {block_size}; "
                        f"lower --seq-len or give more text.")
    return ids[: n * block_size].view(n, block_size)
