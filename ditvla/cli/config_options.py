"""Command-line options derived from configuration dataclasses.

Each setting has one home: its field in a config dataclass, with its default and, in the
class docstring's ``Args:`` section, its description. The ``ditvla`` command adds one
option per field from there (``--batch-size``, ``--policy.head.width``), so a default
or a description is never restated in the CLI. Nested dataclasses become dotted
options; fields a config fills in itself (from the data, the backbone) are listed in its
``filled_in`` class attribute and are not options.

Options default to "not given": only the values a user types override the config (so a
preset's own sizes survive); ``--help`` shows the dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints


def field_docs(cls: type) -> dict[str, str]:
    """The ``name: text`` entries of the ``Args:`` section of ``cls``'s docstring
    (``a / b: text`` documents two fields at once)."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Args:" not in lines:
        return {}
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in lines[lines.index("Args:") + 1 :]:
        if not line.strip():
            break
        entry = re.match(r"^    (\w[\w /]*?):\s(.*)$", line)  # a continuation is indented more
        if entry:
            names = [name.strip() for name in entry.group(1).split("/")]
            for name in names:
                docs[name] = entry.group(2).strip()
        else:
            for name in names:
                docs[name] += " " + line.strip()
    return docs


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _argument(annotation: Any) -> dict[str, Any]:
    """argparse keywords for one field type."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _argument(options[0])
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        return {"choices": choices, "type": type(choices[0])}
    if get_origin(annotation) in (list, tuple):
        return {"type": _comma_list, "metavar": "A,B,..."}
    if annotation in (int, float, str):
        return {"type": annotation, "metavar": {int: "N", float: "X", str: "TEXT"}[annotation]}
    raise TypeError(f"no command-line form for a field of type {annotation!r}")


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return ""
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value)) or "none"
    return f" (default: {value})"


def add_config_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str = "",
    exclude: tuple[str, ...] = (),
) -> None:
    """Add ``--{prefix}{field}`` for every field of the dataclass ``cls`` (recursing into
    nested dataclasses), except ``exclude`` and ``cls.filled_in``."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    skipped = set(exclude) | set(getattr(cls, "filled_in", ()))
    for field in dataclasses.fields(cls):
        if field.name in skipped:
            continue
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            add_config_options(parser, annotation, prefix=f"{prefix}{field.name}.")
            continue
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        parser.add_argument(
            f"--{prefix}{field.name.replace('_', '-')}",
            dest=f"{prefix}{field.name}",
            default=argparse.SUPPRESS,
            required=required,
            # argparse formats help with %: a docstring's "48%" must reach it as "48%%"
            help=(docs.get(field.name, "").rstrip(".") + _default_text(field)).replace("%", "%%"),
            **_argument(annotation),
        )


def given_options(args: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` that the user gave under ``prefix``, nested like the config:
    ``--policy.head.width 384`` -> ``{"head": {"width": 384}}`` for ``prefix="policy."``."""
    given: dict[str, Any] = {}
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        dest = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hints[field.name]):
            nested = given_options(args, hints[field.name], prefix=f"{dest}.")
            if nested:
                given[field.name] = nested
        elif hasattr(args, dest):
            given[field.name] = getattr(args, dest)
    return given


def option_flags(config: Any, *, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """The options that rebuild ``config`` from its class's defaults: the inverse of
    :func:`given_options`, for printing the command a run is equivalent to."""
    flags: list[str] = []
    cls = type(config)
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or field.name in getattr(cls, "filled_in", ()):
            continue
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            flags += option_flags(value, prefix=f"{prefix}{field.name}.")
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        if value == default:
            continue
        flag = f"--{prefix}{field.name.replace('_', '-')}"
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{prefix}{field.name.replace('_', '-')}")
        elif isinstance(value, list | tuple):
            flags += [flag, ",".join(map(str, value))]
        else:
            flags += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def override_flags(overrides: dict[str, Any], *, prefix: str = "") -> list[str]:
    """Options for a nested dict of config overrides (``{"head": {"width": 384}}`` ->
    ``--{prefix}head.width 384``)."""
    flags: list[str] = []
    for name, value in overrides.items():
        if isinstance(value, dict):
            flags += override_flags(value, prefix=f"{prefix}{name}.")
        elif isinstance(value, bool):
            flags.append(f"--{'' if value else 'no-'}{prefix}{name.replace('_', '-')}")
        else:
            flags += [f"--{prefix}{name.replace('_', '-')}", str(value)]
    return flags
