"""Command-line flags generated from settings dataclasses (fields declared with ``llama_expert.options.option``).

Why not ``transformers.HfArgumentParser``: every flag keeps the name users already type (``--epochs``
for ``num_train_epochs``, ``--no-router-noise``, the seed's ``--base-model``), where HfArgumentParser
derives names from the fields and adds underscore spellings to ``--help``; and a command's ``--help``
should not import Transformers. This is the small part of it that we need.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Dict, Iterable, List, Optional, Type, TypeVar

from ..errors import LlamaExpertError
from ..options import flag_of

T = TypeVar("T")


def _value_type(hint: Any):
    """``int`` for ``Optional[int]``, ``list`` element type for ``List[int]``; None when not a scalar."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return _value_type(args[0]) if len(args) == 1 else None
    if origin in (list, typing.List):
        return None
    return hint if hint in (int, float, str, bool) else None


def add_dataclass_arguments(parser, cls: type, skip: Iterable[str] = (), only: Optional[Iterable[str]] = None,
                            title: Optional[str] = None, defaults: Optional[Dict[str, Any]] = None,
                            choices: Optional[Dict[str, List[str]]] = None):
    """Add one flag per field of ``cls`` (``only`` these, except ``skip``) to ``parser``, in a group ``title``;
    returns the group (or the parser), for a command's own flags beside them.

    ``defaults`` overrides a field's default for this command only (``compare`` trains 100 steps); ``choices``
    gives a field the names it may take, read where they are known (``strategy_choices``: the registries).
    """
    group = parser.add_argument_group(title) if title else parser
    only = set(only) if only is not None else None
    hints = typing.get_type_hints(cls)
    instance_defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                         for f in dataclasses.fields(cls)
                         if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    instance_defaults.update(defaults or {})
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init or (only is not None and field.name not in only):
            continue
        meta, hint = field.metadata, hints[field.name]
        default = instance_defaults.get(field.name)
        help_text = meta.get("help")  # argparse formats help with %: a literal "5%" must reach it as "5%%"
        kwargs: Dict[str, Any] = {"dest": field.name, "default": default,
                                  "help": help_text.replace("%", "%%") if help_text else help_text}
        names = [flag_of(field), *meta.get("aliases", ())]
        value_type = _value_type(hint)
        if value_type is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            named = (choices or {}).get(field.name) or meta.get("choices")
            metavar = meta.get("metavar") or (None if named else names[0].lstrip("-").replace("-", "_").upper())
            if meta.get("parse") and named:  # a parsed value may be a name or what the metavar says: check names only
                other = meta.get("metavar") or "VALUE"
                kwargs["type"] = _parser_type(meta["parse"], named, other)
                metavar, named = "{" + ",".join(named) + "} or " + other, None
            elif meta.get("parse"):
                kwargs["type"] = _parser_type(meta["parse"])
            elif value_type is not None:
                kwargs["type"] = value_type
            else:
                element = [a for a in typing.get_args(hint) if a is not type(None)]
                kwargs["type"], kwargs["nargs"] = (element[0] if element else str), "+"
            if named:
                kwargs["choices"] = list(named)  # shown as {a,b,c} in the usage and the help
            kwargs["metavar"] = metavar
        group.add_argument(*names, **kwargs)
    return group


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where there is one worth showing (not None, not an on/off switch)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def strategy_choices() -> Dict[str, List[str]]:
    """The registered routers, expert banks and allocation rules, as ``choices`` for ``ExpertConfig``'s flags: a
    name typed by hand in a help text would go stale when a strategy is registered."""
    from ..modeling import ALLOCATIONS, EXPERT_BANKS, ROUTERS

    return {"router_type": ROUTERS.names(), "expert_type": EXPERT_BANKS.names(),
            "expert_allocation": ALLOCATIONS.names()}


def _parser_type(parse, names: Optional[List[str]] = None, other: str = "VALUE"):
    """argparse shows a type function's ArgumentTypeError as is, but any other error as 'invalid value'.
    ``names``: a parsed string must be one of them (a parsed list, say of counts, is not a name); ``other``: what
    the field takes besides (its metavar)."""
    def convert(text: str):
        try:
            value = parse(text)
        except LlamaExpertError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if names and isinstance(value, str) and value not in names:
            raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(names)}, or "
                                             f"{other})")
        return value
    convert.__name__ = parse.__name__
    return convert


def dataclass_from_args(cls: Type[T], args: argparse.Namespace, only: Optional[Iterable[str]] = None,
                        **overrides) -> T:
    """Build ``cls`` from the parsed flags that ``add_dataclass_arguments`` added for it (``only`` these
    fields, the rest at their defaults: two dataclasses of one command may share a field name)."""
    wanted = set(only) if only is not None else None
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(args, f.name) and (wanted is None or f.name in wanted)}
    values.update(overrides)
    return cls(**values)

SECRET_FLAGS = ("--auth-token", "--api-key")


def redacted_command(argv: List[str], program: str = "llama-expert") -> str:
    """The command line as typed, with the value of every secret flag replaced by ``***``."""
    shown, hide_next = [program], False
    for part in argv:
        if hide_next:
            shown.append("***")
            hide_next = False
        elif part in SECRET_FLAGS:
            shown.append(part)
            hide_next = True
        elif part.startswith(tuple(f + "=" for f in SECRET_FLAGS)):
            shown.append(part.split("=", 1)[0] + "=***")
        else:
            shown.append(part)
    return " ".join(shown)
