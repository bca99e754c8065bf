"""The optimiser and its schedule, and rebuilding them when the trainable parameters change shape.

Dynamic expert allocation (``training/dynamic.py``) replaces parameters mid-run: an expert split in two
becomes one parameter with more rows. The optimiser is moved onto the new parameters in place: it keeps each
unchanged parameter's state and gives a re-shaped one the rows of its predecessor's state. In place, because the
object Accelerate prepared (with its fp16 loss scaler) and the schedule stay bound to it, and nothing keeps the
replaced state alive; preparing a new optimiser at every change would keep every earlier one in the Accelerator.
"""

from __future__ import annotations

from collections import defaultdict
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


def rebuild_optimizer(optimizer, params, groups: Optional[List[dict]], learning_rate: float, weight_decay: float,
                      transfers: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = ()) -> None:
    """Move ``optimizer`` (built by ``build_optimizer``, or Accelerate's wrapper of it) onto ``params`` in place,
    continuing where it was: the groups' current rates, each parameter's state. The schedule needs nothing: it
    reads the same optimiser, whose groups keep their number.

    ``transfers`` holds (old parameter, new parameter, rows of the old one the new one takes), possibly
    chained (a parameter replaced twice in one change)."""
    origin = {}  # id(new parameter) -> (parameter in the old optimiser, its rows)
    for before, after, rows in transfers:
        root, base_rows = origin.get(id(before), (before, None))
        origin[id(after)] = (root, rows if base_rows is None else base_rows.index_select(0, rows))
    check_groups(params, groups)
    fresh = torch.optim.AdamW(params if groups is None else groups, lr=learning_rate, weight_decay=weight_decay)
    if len(fresh.param_groups) != len(optimizer.param_groups):
        raise ValueError("a rebuilt optimiser must keep its number of parameter groups (the schedule has one rate "
                         "per group)")
    for group, previous in zip(fresh.param_groups, optimizer.param_groups):  # the schedule's current rates
        group["lr"], group["initial_lr"] = previous["lr"], previous.get("initial_lr", previous["lr"])
    state = defaultdict(dict)
    for p in params:
        if p in optimizer.state:
            state[p] = optimizer.state[p]
        elif id(p) in origin and origin[id(p)][0] in optimizer.state:
            source, rows = origin[id(p)]
            state[p] = {k: _rows_of(v, rows) for k, v in optimizer.state[source].items()}
    optimizer.param_groups, optimizer.state = fresh.param_groups, state


def _rows_of(value, rows: torch.Tensor):
    """An optimiser state entry for the new parameter: the chosen rows of a tensor, a copy of a scalar."""
    if not torch.is_tensor(value):
        return value
    return value.index_select(0, rows.to(value.device)).clone() if value.dim() else value.clone()
