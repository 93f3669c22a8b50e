"""Command-line options generated from a pydantic params model, so a parameter is declared once.

``tuneline data check`` offers every ``DataParams`` field as ``--field-name VALUE`` (booleans as
``--field`` / ``--no-field``): the help text, the choices and the default shown come from the model,
and the values are validated by the model, never re-declared here. Values are read as YAML, as in
``--set`` (``--max-length 512``, ``--formats '{"*": alpaca}'``, ``--max-length null``).
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from flows.errors import option_value


def _choices(annotation: Any) -> list[Any] | None:
    """The values of a ``Literal`` (also inside ``Optional``), else None.

    >>> _choices(typing.Literal["a", "b"] | None)
    ['a', 'b']
    """
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        if (found := _choices(arg)) is not None:
            return found
    return None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_options(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    exclude: frozenset[str] = frozenset(),
    aliases: dict[str, list[str]] | None = None,
) -> None:
    """One option per field of ``model``; an option the user does not give is absent from the parsed
    namespace (``argparse.SUPPRESS``), so ``model_overrides`` returns only what was typed."""
    aliases = aliases or {}
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} (default: {default!r})".strip()
        flags = [_flag(name), *aliases.get(name, [])]
        if field.annotation is bool:
            parser.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        choices = _choices(field.annotation)
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else name.upper()
        parser.add_argument(
            *flags, dest=name, default=argparse.SUPPRESS, metavar=metavar, type=option_value(flags[0]), help=help_text
        )


def model_overrides(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` given on the command line, as parsed values."""
    return {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}


def field_type(model: type[BaseModel], name: str, flag: str) -> Any:
    """An argparse ``type=`` that validates an option by the model's own field (type and bounds), so
    the CLI and the flow's parameters accept the same values (``--keep-last`` ≥ 1 as ``release.keep_last``)."""
    field = model.model_fields[name]
    adapter = TypeAdapter(typing.Annotated[field.annotation, *field.metadata])

    def parse(raw: str) -> Any:
        try:
            return adapter.validate_python(option_value(flag)(raw))
        except ValidationError as e:
            message = e.errors(include_url=False, include_input=False)[0]["msg"]
            raise argparse.ArgumentTypeError(message) from None

    parse.__name__ = flag
    return parse
