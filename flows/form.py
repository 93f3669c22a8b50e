"""The Run form: the order and labels of ``RetrainParams``' fields in the Prefect UI.

Prefect sends the UI the JSON schema of the flow's parameters (``parameter_openapi_schema``); both of
its forms (the classic one and ui-v2) sort each object's fields by a ``position`` key, ``0`` when
absent, keeping declared order among equals, and draw each nested model as a section of its own. So
every section gets positions: the fields an operator changes (the data, the base model, the steps,
the release name) first, the rest after them with "(advanced)" in their label; at the top, the four
sections an operator opens come first and the others say "(advanced)".

Only the JSON schema changes. Field names, defaults, validation and ``model_dump`` stay as declared,
and fingerprints hash sorted values (``tasks/core/fingerprints.py``), never an order. This lives in
``flows/``, not in the stage modules that declare the models, because a stage module's code is part
of its fingerprint: laying out a form must not rerun a cached stage.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel

ADVANCED = "(advanced)"


def operator_first(*first: str) -> Callable[[dict[str, Any]], None]:
    """A model's ``json_schema_extra``: ``first`` get the first positions, in that order; every other
    field follows in declared order, its label ending in "(advanced)"."""

    def lay_out(schema: dict[str, Any]) -> None:
        props = schema.get("properties", {})
        unknown = [name for name in first if name not in props]
        if unknown:  # a renamed field must not silently drop out of the operator's fields
            raise KeyError(f"Run form: no field {', '.join(unknown)} in {schema.get('title')}")
        names = [*first, *(name for name in props if name not in first)]
        out = {}
        for position, name in enumerate(names):
            prop = {**props[name], "position": position}
            if name not in first:
                prop["title"] = f"{prop.get('title') or _label(name)} {ADVANCED}"
            out[name] = prop
        schema["properties"] = out

    return lay_out


def _label(name: str) -> str:
    """The label the UI derives from a field's name when the schema gives none (a nested model's
    field carries only its ``$ref``): ``artifact_root`` -> ``Artifact Root``."""
    return name.replace("_", " ").title()


def lay_out_form(layout: dict[type[BaseModel], tuple[str, ...]]) -> None:
    """Give each model its Run form layout. Read when a schema is generated (at deploy, or by
    ``tuneline params --json-schema``), so setting it after the class is declared is enough."""
    for model, first in layout.items():
        model.model_config["json_schema_extra"] = operator_first(*first)
