"""``--resume``: find the newest readable checkpoint whose settings match this run's, or say why not.

A run resumes exactly or not at all: every setting that changes the trained weights or the data order must
equal the checkpoint's (``RESUMABLE_CHANGES`` lists the ones that may differ), and so must the number of
processes. An unreadable checkpoint (corrupt, truncated, an adapter that no longer loads) is skipped with a
warning for an older one (``checkpoints.checkpoint_candidates``: ``last``, its parked previous version,
``best``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..errors import ConfigError, LlamaExpertError
from .checkpoints import CheckpointError, checkpoint_candidates, load_training_state, require_checkpoint

# Settings that change neither the trained weights nor the data order: a resumed run may change them.
RESUMABLE_CHANGES = frozenset({"output_dir", "resume", "overwrite", "stop_after_steps", "progress", "use_wandb",
                               "compile", "use_tensorboard", "wandb_project", "log_every", "save_every", "eval_every",
                               "eval_dataset", "eval_max_tokens", "test_dataset", "test_max_tokens", "test_seq_len",
                               "use_gradient_checkpointing"})


def _flat_settings(config: dict, prefix: str = "") -> Dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat_settings(value, f"{prefix}{key}."))
        elif key not in RESUMABLE_CHANGES:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_changes(saved: dict, current: dict) -> List[str]:
    """``key: checkpoint X, now Y`` for every setting that changes the result and differs."""
    before, now = _flat_settings(saved), _flat_settings(current)
    # A setting the checkpoint does not record is newer than it: its default reproduces the old behaviour.
    return [f"{key.split('.')[-1]}: checkpoint {before.get(key)!r}, now {now.get(key)!r}"
            for key in sorted(set(before) | set(now)) if key in before and before.get(key) != now.get(key)]


def check_compatible(found: Path, state: dict, run_config: dict, world: int) -> None:
    """Refuse a checkpoint made with other settings or another number of processes."""
    changes = settings_changes(state["run_config"], run_config)
    if changes:
        raise ConfigError(f"cannot resume from {found}: these settings differ from the checkpoint's: "
                          f"{'; '.join(changes)}. Rerun with the checkpoint's settings, or train in a new "
                          f"--output-dir.")
    if state["world_size"] != world:
        raise ConfigError(f"cannot resume from {found}: it ran on {state['world_size']} processes, this run has "
                          f"{world}. Resume with accelerate launch --num_processes {state['world_size']}, or train "
                          f"in a new --output-dir.")


def optimizer_misfit(saved: dict, optimizer: torch.optim.Optimizer) -> Optional[str]:
    """How the saved optimiser state differs from the tensors ``optimizer`` trains, in number per group or in shape
    (its moments, by torch's flat numbering across groups), or None when it fits."""
    before = [len(group["params"]) for group in saved["param_groups"]]
    now = [len(group["params"]) for group in optimizer.param_groups]
    if before != now:
        return f"it holds {sum(before)} trained tensors in groups of {before}, this run {sum(now)} in {now}"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, moments in sorted(saved["state"].items()):
        for name, value in moments.items():
            if name != "step" and torch.is_tensor(value) and value.shape != params[index].shape:
                return (f"its {name} of tensor {index} is {list(value.shape)}, the tensor this run trains there "
                        f"{list(params[index].shape)}")
    return None


def check_optimizer_fits(found: Path, saved: dict, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimiser state that does not fit the tensors this run trains: a checkpoint written by a version
    whose adapter had other parameters (format 4 added the null's ``null_slope``). Torch would raise a bare
    ValueError on other counts, and fail at the first step on other shapes. (A state of other layouts, as
    DeepSpeed's, is left to its own loader.)"""
    if not {"state", "param_groups"} <= saved.keys():
        return
    misfit = optimizer_misfit(saved, optimizer)
    if misfit:
        raise ConfigError(f"cannot resume from {found}: its optimiser state does not fit the tensors this run trains "
                          f"({misfit}: it was written by a llama-expert whose adapter had other parameters). Finish "
                          f"it with that version, or start a new run from its weights: the same command with "
                          f"--init-adapter {found} in place of the expert flags (it brings them; keep --method and "
                          f"--train-only), in a new --output-dir, from step 0.")


def load_latest(output_dir: Path, run_config: dict, world: int, load_weights: Callable[[Path], None],
                warn: Callable[[str], None]) -> Tuple[Path, dict]:
    """(folder, training state) of the newest usable checkpoint, its weights already loaded by
    ``load_weights(folder)``. Raises when there is none (``--resume`` with nothing to resume never starts a new
    run), when none can be read, or when the newest readable one was made with other settings."""
    require_checkpoint(output_dir / "checkpoints")  # for train_model(resume=True); fine_tune checked it sooner
    unreadable: List[str] = []
    for found in checkpoint_candidates(output_dir / "checkpoints"):
        try:
            state = load_training_state(found)
        except CheckpointError as exc:
            unreadable.append(str(exc))
            warn(f"warning: {exc}; trying an older checkpoint")
            continue
        check_compatible(found, state, run_config, world)
        try:
            load_weights(found)
        except LlamaExpertError as exc:
            unreadable.append(f"the adapter in {found} cannot be loaded ({exc})")
            warn(f"warning: {unreadable[-1]}; trying an older checkpoint")
            continue
        return found, state
    why = f" ({'; '.join(unreadable)})" if unreadable else ""
    raise CheckpointError(f"no checkpoint in {output_dir / 'checkpoints'} can be read{why}. Delete that folder to "
                          f"start again from step 0, or pass a new --output-dir.")
