"""Hooks: what takes part in a training run beside the method's loss, called by the ``Trainer`` at fixed points.

A training method (``training/methods.py``) returns its hooks from ``TrainingMethod.hooks(seed)``. Dynamic
expert allocation (``training/dynamic.py``) is one: it counts routing decisions, re-shapes the experts every
few steps (the trainer then rebuilds the optimiser around the new parameters) and keeps its statistics in
every checkpoint. A new training mode that acts between steps is a hook, not a branch in the trainer.
"""

from __future__ import annotations

from typing import List, Optional


class TrainingHook:
    """The points at which the trainer calls a hook; every method has a default that does nothing."""

    name: str = ""  # the key of the hook's state in a checkpoint
    single_process: bool = False  # True: the hook cannot run under accelerate launch with several processes

    def start(self, model, step: int, saved: Optional[dict]) -> List[dict]:
        """Training starts (or resumes, with the hook's ``saved`` state) at ``step``; returns events to log."""
        return []

    def pause(self, model) -> None:
        """Validation is about to run: its text must not change what the hook does."""

    def resume(self, model) -> None:
        """Validation is over."""

    def after_step(self, model, step: int) -> Optional[dict]:
        """After optimiser step ``step``: an event to log, or None. An event with ``transfers`` (old parameter,
        new parameter, rows) says the trainable parameters were replaced: the trainer rebuilds the optimiser."""
        return None

    def state(self, model) -> dict:
        """What a resumed run needs to act exactly as an uninterrupted one (stored in every checkpoint)."""
        return {}

    def finish(self, model) -> None:
        """Training is over (or stopped)."""
