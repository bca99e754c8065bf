"""Stopping a training run on SIGINT (Ctrl-C) or SIGTERM (preemption) without losing its steps.

While training, the first signal only sets a flag: the loop finishes the step it is in, writes a
checkpoint of it and ends (``TrainingInterrupted``), so ``--resume`` continues exactly. A second Ctrl-C
stops at once, as Ctrl-C usually does. With several processes the flag is summed across ranks every
step, so all of them stop after the same step (a checkpoint is a collective operation).
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Callable, Optional

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    def __init__(self, world_size: int = 1, reduce: Optional[Callable] = None, device=None, announce: bool = True):
        self.world_size, self.reduce, self.device, self.announce = world_size, reduce, device, announce
        self.signal_name: Optional[str] = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signal_name = signal.Signals(signum).name
        if self.announce:
            print(f"\n{self.signal_name}: stopping after this step and saving a checkpoint "
                  f"(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requested(self) -> bool:
        """True when any rank received a signal (called once per step by every rank)."""
        if self.world_size > 1 and self.reduce is not None:
            # Decide on the sum alone: a signal that lands during the reduce is counted at the next step on
            # every rank, so no rank stops (and enters a collective checkpoint) alone.
            flag = torch.tensor([1.0 if self.signal_name else 0.0], device=self.device)
            stop = self.reduce(flag, reduction="sum").item() > 0
            if stop and self.signal_name is None:
                self.signal_name = "a signal to another process"
            return stop
        return self.signal_name is not None
