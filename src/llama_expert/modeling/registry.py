"""Named strategies (routers, expert banks, allocations): new ones are registered, not added as branches.

A registry maps the name stored in ``ExpertConfig`` (and hence in every adapter file) to the class or
function that implements it, so an adapter saved with a strategy loads with the same code path.
"""

from __future__ import annotations

import reprlib
from typing import Callable, Dict, Generic, List, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """``kind``: what an entry is, for messages; ``flag``: the flag a user types to name one (``options.flag_for``
    of the field that stores the name)."""

    def __init__(self, kind: str, flag: str):
        self.kind = kind
        self.flag = flag
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"a {self.kind} named {name!r} is registered already")
            self._entries[name] = entry
            return entry
        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.flag} {reprlib.repr(name)}; choose one of {', '.join(self.names())}.")
        return self._entries[name]

    def names(self) -> List[str]:
        return sorted(self._entries)
