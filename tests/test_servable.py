"""Servable before released: the release stage loads the merged model in the serving engine (here
transformers: the project venv has no vLLM) and asks who it is before anything is uploaded; a folder
the engine cannot load fails the night in one line and LATEST does not move."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.artifacts.registry import latest_release
from tasks.artifacts.store import StageRef, Store
from tasks.release.servable import NotServable, check_servable

MODEL = "servable-test"
REPORT = {
    "metrics": {"base": {"val_loss": 2.5}, "tuned": {"val_loss": 2.1}},
    "gate": {"passed": True, "reasons": [], "checks": []},
}


def _refs(tmp: Path, merged: Path) -> dict[str, StageRef]:
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (tmp / "eval").mkdir()
    (tmp / "eval" / "report.json").write_text(json.dumps(REPORT))
    return {
        "adapter": StageRef(stage="sft", fingerprint="sft0", uri=str(tmp / "adapter"), metrics={}),
        "merged": StageRef(stage="merge", fingerprint=f"m-{merged.name}", uri=str(merged), metrics={"dtype": "fp32"}),
        "report": StageRef(stage="evaluate", fingerprint="eval0", uri=str(tmp / "eval"), metrics={}),
        "dataset": StageRef(stage="data", fingerprint="data0", uri=str(tmp / "data"), metrics={}),
    }


def _ship(tmp: Path, merged: Path):
    from prefect import flow

    from tasks.core.stage import StageContext
    from tasks.release.stage import ReleaseParams, release

    refs = _refs(tmp, merged)
    root = str(tmp / "root")
    params = {"base_model": "tiny/base", "base_revision": "main", "data": {"model_name": "Quokka"}}

    @flow
    def ship():
        ctx = StageContext(base_model="tiny/base", root=root)
        config = ReleaseParams(model_name=MODEL)
        return release(config, refs["adapter"], refs["merged"], refs["report"], refs["dataset"], params, ctx=ctx)

    return ship(return_state=True), Store(root)


def test_release_records_the_engine_and_its_answer_in_the_manifest(tiny_model_dir, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    state, store = _ship(tmp_path, merged)
    assert state.is_completed(), state.message
    rid = latest_release(store, MODEL)
    manifest = store.read_json(f"releases/{MODEL}/{rid}/manifest.json")
    servable = manifest["servable"]
    assert servable["engine"] == "transformers" and servable["version"]
    assert servable["question"] == "Who are you?" and "generated an answer" in servable["check"]
    assert servable["names_model"] is False  # a random model does not know it is Quokka


def test_a_merged_folder_without_tokenizer_files_fails_before_anything_ships(tiny_model_dir, tmp_path):
    merged = tmp_path / "merged-no-tokenizer"
    shutil.copytree(tiny_model_dir, merged)
    for f in merged.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    state, store = _ship(tmp_path, merged)
    assert state.is_failed()
    with pytest.raises(NotServable) as error:
        state.result()
    message = str(error.value)
    assert "\n" not in message and "merged model is not servable" in message and str(merged) in message
    assert "tokenizer" in message.lower()  # the engine's own error says what is missing
    assert latest_release(store, MODEL) is None
    assert not store.exists(f"releases/{MODEL}/LATEST")


def test_the_real_smollm2_answers_the_identity_question(smollm2_dir):
    result = check_servable(smollm2_dir, name="SmolLM")
    assert result["engine"] == "transformers"
    assert len(result["answer"].split()) >= 3  # a real sentence, from the folder's own chat template


def test_a_folder_without_chat_template_is_not_servable(tiny_model_dir, tmp_path):
    merged = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, merged)
    (merged / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((merged / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (merged / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(NotServable, match="no chat template"):
        check_servable(merged)
