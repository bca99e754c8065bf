"""Settings dataclasses carry their own command-line flag: ``option(default, help, ...)``.

Every setting a user can pass on the command line is a field of a dataclass on the floor that owns it
(``ExpertConfig``, ``TrainingArguments``, ...), declared with ``option``. The CLI generates its flags
from those fields (``llama_expert.cli.arguments``), so a default or a help text is written once.

``flag`` overrides the flag name derived from the field name (``num_train_epochs`` -> ``--epochs``);
``aliases`` adds more names (the seed's ``--base-model``); ``parse`` turns the command-line string into
the field's value; ``metavar`` names the value (for a parsed field with named choices: what else it takes). A
boolean whose default is True becomes a ``--no-...`` switch: ``flag_of`` says so, for the CLI and messages alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence


def option(default: Any = None, help: Optional[str] = None, *, flag: Optional[str] = None,
           aliases: Sequence[str] = (), choices: Optional[Sequence[str]] = None,
           parse: Optional[Callable[[str], Any]] = None, metavar: Optional[str] = None,
           default_factory: Optional[Callable[[], Any]] = None) -> Any:
    metadata = {"help": help, "flag": flag, "aliases": tuple(aliases), "choices": choices, "parse": parse,
                "metavar": metavar}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    """The command-line flag of a field declared with ``option``: its own ``flag``, else its name; a boolean that
    is on by default can only be switched off, so its flag is ``--no-<name>``."""
    if field.metadata.get("flag"):
        return field.metadata["flag"]
    name = field.name.replace("_", "-")
    return f"--no-{name}" if field.default is True else f"--{name}"


def fields_named(cls: type, names) -> list:
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    return [by_name[n] for n in names]


def flag_for(cls: type, name: str) -> str:
    """The flag of field ``name`` of ``cls``: what a message calls a setting (users type flags, not fields)."""
    return flag_of(fields_named(cls, [name])[0])
