"""The optimiser and its schedule, and rebuilding them when the trainable parameters change shape.

Dynamic expert allocation (``training/dynamic.py``) replaces parameters mid-run: an expert split in two
becomes one parameter with more rows. The rebuilt AdamW keeps each unchanged parameter's state and gives a
re-shaped one the rows of its predecessor's state, and the schedule continues where it was.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError
from .schedule import Schedule


def check_groups(params: List[torch.nn.Parameter], groups: Optional[List[dict]]) -> None:
    """Parameter groups must hold every trainable parameter exactly once (else some would silently not train)."""
    if groups is None:
        return
    grouped = [p for group in groups for p in group["params"]]
    if len(grouped) != len(params) or {id(p) for p in grouped} != {id(p) for p in params}:
        raise ConfigError("parameter_groups must hold every trainable parameter of the model exactly once.")


def build_optimizer(params, groups: Optional[List[dict]], learning_rate: float, weight_decay: float,
                    schedule: Schedule):
    """AdamW over ``groups`` (or one group of ``params``) and its cosine schedule with warm-up."""
    check_groups(params, groups)
    optimizer = torch.optim.AdamW(params if groups is None else groups, lr=learning_rate, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.learning_rate_factor())


def rebuild_optimizer(old, scheduler, params, groups: Optional[List[dict]], learning_rate: float,
                      weight_decay: float, schedule: Schedule,
                      transfers: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = ()):
    """A fresh optimiser and schedule over ``params`` that continue ``old`` and ``scheduler``.

    ``transfers`` holds (old parameter, new parameter, rows of the old one the new one takes), possibly
    chained (a parameter replaced twice in one change)."""
    origin = {}  # id(new parameter) -> (parameter in the old optimiser, its rows)
    for before, after, rows in transfers:
        root, base_rows = origin.get(id(before), (before, None))
        origin[id(after)] = (root, rows if base_rows is None else base_rows.index_select(0, rows))
    fresh, fresh_scheduler = build_optimizer(params, groups, learning_rate, weight_decay, schedule)
    for group, previous in zip(fresh.param_groups, old.param_groups):  # the schedule's current rates
        group["lr"], group["initial_lr"] = previous["lr"], previous.get("initial_lr", previous["lr"])
    for p in params:
        if p in old.state:
            fresh.state[p] = old.state[p]
        elif id(p) in origin and origin[id(p)][0] in old.state:
            source, rows = origin[id(p)]
            fresh.state[p] = {k: _rows_of(v, rows) for k, v in old.state[source].items()}
    fresh_scheduler.load_state_dict(scheduler.state_dict())
    return fresh, fresh_scheduler


def _rows_of(value, rows: torch.Tensor):
    """An optimiser state entry for the new parameter: the chosen rows of a tensor, a copy of a scalar."""
    if not torch.is_tensor(value):
        return value
    return value.index_select(0, rows.to(value.device)).clone() if value.dim() else value.clone()
