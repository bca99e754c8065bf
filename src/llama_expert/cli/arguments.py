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
                            title: Optional[str] = None, defaults: Optional[Dict[str, Any]] = None) -> None:
    """Add one flag per field of ``cls`` (``only`` these, except ``skip``) to ``parser``, in a group ``title``.

    ``defaults`` overrides a field's default for this command only (``compare`` trains 100 steps).
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
            if default and not meta.get("flag"):
                names[0] = "--no-" + field.name.replace("_", "-")
        else:
            if meta.get("parse"):
                kwargs["type"] = _parser_type(meta["parse"])
            elif value_type is not None:
                kwargs["type"] = value_type
            else:
                element = [a for a in typing.get_args(hint) if a is not type(None)]
                kwargs["type"], kwargs["nargs"] = (element[0] if element else str), "+"
            if meta.get("choices"):
                kwargs["choices"] = list(meta["choices"])
            kwargs["metavar"] = meta.get("metavar") or names[0].lstrip("-").replace("-", "_").upper()
        group.add_argument(*names, **kwargs)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where there is one worth showing (not None, not an on/off switch)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parser_type(parse):
    """argparse shows a type function's ArgumentTypeError as is, but any other error as 'invalid value'."""
    def convert(text: str):
        try:
            return parse(text)
        except LlamaExpertError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
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
