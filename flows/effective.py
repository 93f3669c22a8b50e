"""A run's effective parameters: what the caller sent, merged field by field over the deployment's preset.

Prefect merges a run's parameters with its deployment's one level deep: ``{"params": {"release":
{"model_name": "x"}}}`` replaces the whole ``params`` object, and pydantic fills the rest with the
code defaults. So deployments store the preset a second time, as the flow parameter ``preset``
(which a caller does not send, so Prefect keeps the deployment's), and the flow overlays what was
sent on it: a field counts as sent when pydantic recorded it as set (``model_fields_set``), in every
nested model; a list or a mapping that is sent replaces the preset's. The UI's Run form sends the
whole object, so it is unchanged by the overlay. docs/operating.md ("Parameters") argues the choice.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from flows.params import RetrainParams


def _overlay(base: BaseModel, sent: BaseModel) -> dict[str, Any]:
    """``base`` as JSON with every field ``sent`` set replaced; nested models are overlaid in turn."""
    out = base.model_dump(mode="json")
    for name in sent.model_fields_set:
        value, old = getattr(sent, name), getattr(base, name, None)
        if isinstance(value, BaseModel) and type(value) is type(old):
            out[name] = _overlay(old, value)
        else:
            out[name] = sent.model_dump(mode="json", include={name})[name]
    return out


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        found: dict[str, Any] = {}
        for key, value in data.items():
            found.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return found
    return {prefix: data}


def overridden_fields(preset: dict[str, Any], effective: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted field → (preset value, effective value), for every field whose value differs."""
    before, after = _leaves(preset), _leaves(effective)
    missing = object()
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(set(before) | set(after))
        if before.get(key, missing) != after.get(key, missing)
    }


def effective_params(
    params: RetrainParams, preset: dict[str, Any] | None
) -> tuple[RetrainParams, dict[str, tuple[Any, Any]]]:
    """The parameters this run uses and the fields that differ from the preset (from the code
    defaults when the run has no preset). A preset that no longer validates raises pydantic's error."""
    base = RetrainParams.model_validate(preset or {})
    effective = RetrainParams.model_validate(_overlay(base, params))
    return effective, overridden_fields(base.model_dump(mode="json"), effective.model_dump(mode="json"))


def params_markdown(effective: RetrainParams, overridden: dict[str, tuple[Any, Any]], has_preset: bool) -> str:
    """The run's ``effective-parameters`` artifact: the overridden fields first, then every value."""
    against = "the deployment's preset" if has_preset else "the code defaults (no preset)"
    lines = ["# Effective parameters", "", f"Fields that differ from {against}: {len(overridden)}", ""]
    if overridden:
        lines += ["| field | preset | this run |", "|---|---|---|"]
        lines += [f"| `{k}` | `{json.dumps(a)}` | `{json.dumps(b)}` |" for k, (a, b) in overridden.items()]
    dumped = json.dumps(effective.model_dump(mode="json"), indent=2, ensure_ascii=False)
    return "\n".join([*lines, "", "## All values", "", "```json", dumped, "```", ""])
