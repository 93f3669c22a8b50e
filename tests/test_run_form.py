"""The Run form puts what an operator changes first (issue 26): read from the schema Prefect builds from
the flow's signature, the one a deployment stores and the UI draws, without a server; sorted as the UI
sorts a section (by ``position``, 0 when absent, declared order among equals)."""

from __future__ import annotations

import pytest
from prefect.utilities.callables import parameter_schema
from pydantic import BaseModel

from flows.params import RetrainParams
from flows.retrain import retrain
from tasks.core.fingerprints import code_modules


@pytest.fixture(scope="module")
def schema() -> dict:
    return parameter_schema(retrain).model_dump()


def _form(schema: dict, model: str) -> list[tuple[str, str]]:
    """A section's fields as the UI lists them: (name, label)."""
    props = schema["definitions"][model]["properties"]
    ordered = sorted(props.items(), key=lambda item: item[1].get("position", 0))
    return [(name, prop.get("title") or name) for name, prop in ordered]


def _names(schema: dict, model: str) -> list[str]:
    return [name for name, _ in _form(schema, model)]


def test_the_sections_an_operator_opens_come_first_the_rest_say_advanced(schema):
    top = _form(schema, "RetrainParams")
    assert [name for name, _ in top[:4]] == ["model", "data", "sft", "release"]
    assert all(label.endswith("(advanced)") for _, label in top[4:])
    assert {name for name, _ in top[4:]} == {"grpo", "merge", "eval", "artifact_root", "storage_block", "tracking"}


@pytest.mark.parametrize(
    "model, first",
    [
        ("ModelParams", ["base"]),
        ("DataParams", ["datasets", "model_name", "model_author", "system_prompt"]),
        ("SFTParams", ["max_steps", "num_train_epochs", "learning_rate", "profile"]),
        ("ReleaseParams", ["model_name"]),
    ],
)
def test_in_each_operator_section_its_fields_come_first_the_rest_folded_after(schema, model, first):
    form = _form(schema, model)
    assert [name for name, _ in form[: len(first)]] == first
    assert not any(label.endswith("(advanced)") for _, label in form[: len(first)])
    assert form[len(first) :] and all(label.endswith("(advanced)") for _, label in form[len(first) :])


def test_only_the_form_changes_names_fields_and_dumps_stay_as_declared(schema):
    models = [f.annotation for f in RetrainParams.model_fields.values()]
    sections = {model.__name__: model for model in models if isinstance(model, type) and issubclass(model, BaseModel)}
    assert len(sections) == 8  # model, data, sft, grpo, merge, eval, release, tracking
    for name, model in [*sections.items(), ("RetrainParams", RetrainParams)]:
        assert sorted(_names(schema, name)) == sorted(model.model_fields), name
    # model_dump keeps declared order (the release manifest, `tuneline params`); the form alone reorders
    assert list(RetrainParams().model_dump()) == list(RetrainParams.model_fields) != _names(schema, "RetrainParams")


STAGES = ["data", "sft", "grpo", "merge", "evaluate", "release"]


@pytest.mark.parametrize("stage", [f"tasks.{name}.stage" for name in STAGES])
def test_the_form_layout_is_no_part_of_any_stage_fingerprint(stage):
    """Stage code identity covers the modules a stage reaches; the layout lives in flows/, out of reach,
    so laying out the form reruns no cached stage (config values are hashed sorted: order never counts)."""
    assert not [name for name in code_modules(stage) if name.startswith("flows")]
