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
    def __init__(self, kind: str, config_field: str):
        self.kind = kind
        self.config_field = config_field
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
            flag = "--" + self.config_field.replace("_", "-")  # the flag a user types for the field
            raise ConfigError(f"unknown {flag} {reprlib.repr(name)}; choose one of {', '.join(self.names())}.")
        return self._entries[name]

    def names(self) -> List[str]:
        return sorted(self._entries)
