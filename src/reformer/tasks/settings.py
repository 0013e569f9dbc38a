"""Typed settings dataclasses that make their own command-line flags.

A field made with :func:`setting` carries its help text: :func:`add_arguments` turns it into the flag
``--field-name`` (type, ``nargs`` and on/off switches follow the annotation), :func:`given` reads the
flags a command line gave, :func:`to_dict` / :func:`from_dict` are the JSON round trip (lists become
tuples where the annotation says tuple). A field made with ``flag=False`` (or without :func:`setting`)
is a setting of the saved ``train_config.json`` and of ``reformer train --config`` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

_MISSING = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    help: str = "",
    *,
    default_factory: Any = _MISSING,
    flag: bool | str = True,
    unset: str | None = None,
    path: bool = False,
    **argparse_options: Any,
) -> Any:
    """A settings field. ``help`` becomes the flag's help; ``flag`` False keeps it off the command line,
    a string names the flag (``"--no-progress"``); ``unset`` says what ``None`` means ("--n-heads");
    ``path`` makes the given paths absolute; ``argparse_options`` go to ``add_argument``."""
    metadata = {"help": help, "flag": flag if help else False, "unset": unset, "path": path,
                "argparse": argparse_options}  # fmt: skip
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line flags."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]


def flag_name(f: dataclasses.Field) -> str:
    named = f.metadata.get("flag")
    return named if isinstance(named, str) else "--" + f.name.replace("_", "-")


def add_arguments(group: Any, cls: type, values: Any = None, skip: set[str] = frozenset()) -> None:
    """One flag per flag field of ``cls`` (except ``skip``); with ``values`` (an instance) the help ends
    with the value a run will use when the flag is not given. Every flag's default is None, so that
    :func:`given` can tell the flags given from the others."""
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        if f.name in skip:
            continue
        options = {"dest": f.name, "default": None, **_argparse_options(hints[f.name])}
        options.update(f.metadata["argparse"])
        text = f.metadata["help"]
        if values is not None and options.get("action") not in ("store_true", "store_false"):
            text += f" (default: {show(getattr(values, f.name), f.metadata['unset'])})"
        group.add_argument(flag_name(f), help=text.replace("%", "%%"), **options)


def _argparse_options(hint: Any) -> dict[str, Any]:
    base = _first_type(hint)
    origin = typing.get_origin(base)
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:
        return {"nargs": "+", "type": typing.get_args(base)[0]}
    if origin is tuple:
        return {"type": comma_list(typing.get_args(base)[0]), "metavar": "A,B,..."}
    return {"type": base}


def comma_list(item: type):
    def parse(text: str) -> tuple:
        return tuple(item(part.strip()) for part in text.split(","))

    parse.__name__ = f"comma-separated {item.__name__}"
    return parse


def _first_type(hint: Any) -> Any:
    """``int`` for ``int | None``, ``int | tuple[int, ...] | None`` and ``int``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def show(value: Any, unset: str | None = None) -> str:
    """A setting's value as the help text shows it."""
    if value is None or value == []:
        return unset or "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of ``cls`` given as flags in ``args`` (paths made absolute)."""
    out = {}
    for f in flag_fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.metadata["path"]:
            value = (
                [str(Path(v).resolve()) for v in value]
                if isinstance(value, list)
                else str(Path(value).resolve())
            )
        out[f.name] = value
    return out


def to_dict(settings: Any) -> dict[str, Any]:
    """The settings as JSON values (tuples as lists)."""
    return {f.name: _jsonable(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def from_dict(cls: type, data: dict[str, Any], what: str):
    """``cls(**data)`` with JSON lists made tuples where the field is a tuple; unknown keys are refused
    with a message naming them and the known ones."""
    if not isinstance(data, dict):
        raise ValueError(f"the {what} settings must be a JSON object, got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; known ones are {known}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _typed(hints[name], value) for name, value in data.items()})


def _typed(hint: Any, value: Any) -> Any:
    return tuple(value) if isinstance(value, list) and _allows_tuple(hint) else value


def _allows_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) is tuple:
        return True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_allows_tuple(a) for a in typing.get_args(hint))
    return False


def replace(settings: Any, changes: dict[str, Any], what: str):
    """``settings`` with ``changes`` (JSON values allowed), checked like :func:`from_dict`."""
    return from_dict(type(settings), {**to_dict(settings), **changes}, what)
