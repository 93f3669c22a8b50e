"""The gate on the real flow: a night worse than the release we ship is not released (real SmolLM2
weights, so "worse" is learned, not simulated), and a night whose gate checked nothing is not
released unless the parameters say so on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.params import load_params
from flows.retrain import retrain
from tasks.artifacts.registry import latest_release
from tasks.artifacts.store import Store
from tasks.release.ops import release_ids


def _smollm2_sets(model_dir: Path, root: Path, steps: int) -> list[str]:
    return [
        f"model.base={model_dir}",
        "data.datasets=['swift/self-cognition:en#48']",
        "data.validation_ratio=0.25",
        "sft.profile=cpu",
        f"sft.max_steps={steps}",
        "sft.learning_rate=1e-3",
        "sft.per_device_batch_size=4",
        "sft.gradient_accumulation_steps=1",
        "sft.max_length=96",
        "sft.warmup_ratio=0.0",
        "sft.eval_steps=100",
        "sft.save_steps=100",
        "merge.dtype=fp32",
        "eval.suites=[validation]",
        "release.model_name=champ",
        f"artifact_root={root}",
    ]


@pytest.fixture(scope="module")
def champion(smollm2_dir, tmp_path_factory):
    """Night 1: trained enough to learn who it is; released, so it is the champion of night 2."""
    root = tmp_path_factory.mktemp("champion-root")
    state = retrain(load_params(None, _smollm2_sets(smollm2_dir, root, steps=12)), return_state=True)
    assert state.is_completed(), state.message
    return root, state.result()


def test_a_night_worse_than_the_champion_is_not_released(smollm2_dir, champion):
    root, first = champion
    # Night 2: one step only — still better than the base, clearly worse than night 1.
    state = retrain(load_params(None, _smollm2_sets(smollm2_dir, root, steps=1)), return_state=True)
    assert state.is_failed()
    message = state.message
    assert "quality gate failed" in message and "nothing released" in message
    assert "validation_loss" in message and f"champion {first['release_id']}" in message
    assert "[" in message  # the 95% interval of the difference is in the reason
    assert latest_release(Store(str(root)), "champ") == first["release_id"]
    assert list(release_ids(Store(str(root)), "champ")) == [first["release_id"]]  # no second release folder


def test_a_gate_that_checked_nothing_fails_unless_ungated_on_purpose(tiny_model_dir, tmp_path):
    sets = [
        f"model.base={tiny_model_dir}",
        "data.datasets=['swift/self-cognition#8']",
        "sft.max_steps=1",
        "sft.per_device_batch_size=2",
        "eval.suites=[samples]",
        "eval.prompts=['Hi']",
        "eval.max_new_tokens=4",
        "release.model_name=nogate",
        f"artifact_root={tmp_path}",
    ]
    state = retrain(load_params("demo", sets), return_state=True)
    assert state.is_failed() and "no gate metric ran" in state.message
    assert Store(str(tmp_path)).list("releases") == []

    ungated = retrain(load_params("demo", sets + ["eval.gate_metrics=[]"]), return_state=True)
    assert ungated.is_completed(), ungated.message
    manifest = json.loads((Path(ungated.result()["release_uri"]) / "manifest.json").read_text())
    assert manifest["ungated"] is True and manifest["gate"]["passed"] is True
