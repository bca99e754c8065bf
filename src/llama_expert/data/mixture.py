"""Several datasets trained at once: ``--dataset a.txt,b.jsonl --dataset-weights 1,1``.

Heterogeneous data (several domains or tasks) is where routed experts can beat one LoRA, so a mixture
is first-class. Each source is read, tokenised and packed on its own; the training set then takes the
same number of tokens per unit of weight from every source (equal tokens per domain for equal weights,
limited by the smallest source), and the training loop shuffles them together. Every block keeps the
index of its source, so evaluation can report per-domain numbers and routing can be compared with
domains.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import DataError
from .sources import hub_name_and_config


def split_sources(spec: Optional[str]) -> List[str]:
    """``"a.txt,b.jsonl"`` -> ``["a.txt", "b.jsonl"]``; one source stays a list of one."""
    if spec is None:
        return [None]
    return [part.strip() for part in str(spec).split(",") if part.strip()] or [None]


def domain_name(source: Optional[str]) -> str:
    """A short label for a source: the file's stem, or the folder's name (``math/train.jsonl`` -> ``math``)."""
    if not source:
        return "embedded"
    source = hub_name_and_config(source, None)[0]  # openai/gsm8k:main -> openai/gsm8k
    path = Path(source)
    generic = {"train", "test", "valid", "validation", "wiki.valid", "wiki.test", "wiki.train"}
    return path.parent.name if path.stem in generic and path.parent.name else path.stem


def parse_weights(weights: Optional[str], count: int) -> List[float]:
    if weights is None:
        return [1.0] * count
    try:
        values = [float(w) for w in str(weights).split(",")]
    except ValueError:
        raise DataError(f"--dataset-weights {weights!r}: give one number per dataset, e.g. 1,1,2.") from None
    if len(values) != count:
        raise DataError(f"--dataset-weights has {len(values)} values for {count} datasets; give one per dataset.")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise DataError(f"--dataset-weights {weights!r}: every weight must be a finite number > 0.")
    return values


def mix_blocks(blocks: Sequence[torch.Tensor], weights: Sequence[float],
               names: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, source index per block)`` with ``weight_d * unit`` blocks from source d, ``unit`` as large
    as the smallest source allows. The first blocks of each source are taken (deterministic)."""
    unit = min(len(b) / w for b, w in zip(blocks, weights))
    counts = [int(unit * w) for w in weights]
    if min(counts) < 1:
        small = names[counts.index(min(counts))]
        raise DataError(f"dataset '{small}' is too small for its weight: it gives no training block; give it more "
                        f"text or a larger weight.")
    taken = [b[:n] for b, n in zip(blocks, counts)]
    labels = torch.cat([torch.full((n,), d, dtype=torch.long) for d, n in enumerate(counts)])
    return torch.cat(taken), labels
