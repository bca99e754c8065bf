"""Documents to token blocks: joined with blank lines, tokenised once, cut into fixed windows.

This is the perplexity protocol of the quantisation papers (docs/design.md section 5), and training uses
the same packing so that validation and training see text the same way.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..errors import DataError
from ..progress import progress_bar


def tokenize_documents(docs: List[str], tokenizer, progress: bool = True) -> torch.Tensor:
    """One 1-D LongTensor: the documents joined with blank lines and tokenised once.

    Tokenising in pieces could change the tokens where the pieces meet, so the text stays one call and
    ``progress`` shows a one-step bar naming what is being tokenised while the call runs (a large corpus
    takes a while), then the token count; not a fraction done, which one call cannot report.
    """
    text = "\n\n".join(docs)
    with progress_bar(1, f"tokenising {len(text):,} characters", "text", progress) as bar:
        ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
        bar.set_postfix_str(f"{len(ids):,} tokens")
        bar.update()
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
