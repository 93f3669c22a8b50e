"""``tuneline params``: every retrain parameter with its type, default and help, read from the models.

    tuneline params                          # every field: dotted name, type, default, help
    tuneline params --preset demo            # the values a run with this preset uses (* = not the default)
    tuneline params --preset demo --set sft.max_steps=5
    tuneline params --json-schema            # RetrainParams as JSON Schema (what the UI's Run form renders)

Nothing here re-declares a field: names, types, defaults and help come from ``RetrainParams`` and the
stage models it nests, so this listing cannot drift from what the flow validates.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel


def _type_name(annotation: Any) -> str:
    """A short, readable type: ``int``, ``str | None``, ``one of cpu|v100``, ``list[str]``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + "|".join(map(str, typing.get_args(annotation)))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def fields(model: type[BaseModel], values: BaseModel | None = None, prefix: str = "") -> list[dict[str, Any]]:
    """One row per leaf field: ``name`` (dotted), ``type``, ``default``, ``help`` and, with ``values``, ``value``."""
    rows: list[dict[str, Any]] = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        nested = _nested_model(info.annotation)
        if nested is not None:
            rows += fields(nested, getattr(values, name) if values is not None else None, dotted + ".")
            continue
        default = info.get_default(call_default_factory=True)
        row = {
            "name": dotted,
            "type": _type_name(info.annotation),
            "default": default.model_dump(mode="json") if isinstance(default, BaseModel) else default,
            "help": info.description or "",
        }
        if values is not None:
            value = getattr(values, name)
            row["value"] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        rows.append(row)
    return rows


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def cmd_params(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flows.errors import one_line
    from flows.params import RetrainParams, load_params

    if args.json_schema:
        print(json.dumps(RetrainParams.model_json_schema(), indent=2, ensure_ascii=False))
        return 0
    values = None
    if args.preset or args.set:
        try:
            values = load_params(args.preset, args.set)
        except (ValidationError, OSError, ValueError) as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
    for row in fields(RetrainParams, values):
        line = f"{row['name']}  ({row['type']})"
        if values is not None:
            changed = row["value"] != row["default"]
            line += f"  = {_show(row['value'])}" + (f"   * default {_show(row['default'])}" if changed else "")
        else:
            line += f"  default {_show(row['default'])}"
        print(line)
        if row["help"]:
            print(f"    {row['help']}")
    return 0


def add_params_parser(sub: Any) -> None:
    """The ``params`` subcommand (flows/cli.py registers it)."""
    p = sub.add_parser(
        "params",
        help="list every retrain parameter (type, default, help); --preset shows a preset's effective values",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default=None, help="show the values of this preset: a path or a name (demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. sft.max_steps=5")
    p.add_argument("--json-schema", action="store_true", help="print RetrainParams as JSON Schema")
    p.set_defaults(func=cmd_params)
