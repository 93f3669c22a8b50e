"""The retrain flow on the tiny random model: caching across runs, as docs/design.md promises.

- a second run with the same parameters runs no stage again (every task Cached);
- changing only an evaluation parameter reruns only evaluate and what follows;
- a cache hit whose folder was deleted recomputes instead of failing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.params import RetrainParams, load_params
from flows.retrain import retrain


def _params(model_dir: Path, root: Path, **overrides) -> RetrainParams:
    sets = [
        f"model.base={model_dir}",
        "model.revision=tiny",
        "data.datasets=['swift/self-cognition#24', 'tuneline/arithmetic#8']",
        "data.validation_max_rows=4",
        "sft.max_steps=2",
        "sft.per_device_batch_size=2",
        "sft.eval_steps=2",
        "sft.save_steps=2",
        "eval.suites=['validation', 'self_cognition']",
        "eval.validation_max_rows=5",
        "eval.force_release=true",  # a random model's gate result is not what these tests are about
        f"artifact_root={root}",
    ] + [f"{k}={v}" for k, v in overrides.items()]
    return load_params("demo", sets)


def _task_states(state) -> dict[str, str]:
    """Task name -> state name for one flow run, read back from the Prefect API."""
    flow_run_id = state.state_details.flow_run_id

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}

    import asyncio

    return asyncio.run(read())


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    state = retrain(_params(tiny_model_dir, root), return_state=True)
    assert state.is_completed(), state.message
    return root, state


def test_first_run_completes_every_stage_and_releases(first_run):
    root, state = first_run
    assert _task_states(state) == {
        "prepare_dataset": "Completed",
        "lora_sft": "Completed",
        "merge_lora": "Completed",
        "evaluate": "Completed",
        "release": "Completed",
    }
    result = state.result()
    release_dir = Path(result["release_uri"])
    assert (release_dir / "manifest.json").exists()
    assert (root / "releases" / "smollm2-135m-quokka" / "LATEST").read_text() == result["release_id"]
    # stage folders are named by fingerprint and complete
    for stage in ("data", "sft", "merge", "evaluate", "release"):
        folders = [p for p in (root / "stages" / stage).iterdir() if p.is_dir()]
        assert len(folders) == 1 and (folders[0] / "_SUCCESS").exists(), stage


def test_task_runs_are_tagged_by_their_requirement(first_run):
    """The demo says cpu: no task holds a slot of the `gpu` tag limit (tasks/runtime/requirements.py)."""
    root, state = first_run
    flow_run_id = state.state_details.flow_run_id

    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            return {r.name.rsplit("-", 1)[0]: set(r.tags) for r in runs}

    import asyncio

    tags = asyncio.run(read())
    assert all("gpu" not in tags[t] and "cpu" in tags[t] for t in ("lora_sft", "merge_lora", "evaluate")), tags
    result = state.result()
    assert set(result["needs"]) == {"lora_sft", "merge_lora", "evaluate"}
    assert result["needs"]["lora_sft"] == "lora_sft (sft.profile=cpu): needs no GPU"


def test_second_identical_run_is_all_cached(first_run, tiny_model_dir):
    root, first = first_run
    state = retrain(_params(tiny_model_dir, root), return_state=True)
    assert state.is_completed()
    assert set(_task_states(state).values()) == {"Cached"}
    assert state.result()["release_id"] == first.result()["release_id"]


def test_changing_an_eval_parameter_reruns_only_evaluate_and_release(first_run, tiny_model_dir):
    root, _ = first_run
    state = retrain(_params(tiny_model_dir, root, **{"eval.validation_max_rows": 6}), return_state=True)
    assert state.is_completed()
    assert _task_states(state) == {
        "prepare_dataset": "Cached",
        "lora_sft": "Cached",
        "merge_lora": "Cached",
        "evaluate": "Completed",
        "release": "Completed",
    }


def test_a_cache_hit_whose_folder_was_deleted_recomputes(first_run, tiny_model_dir):
    root, _ = first_run
    (sft_folder,) = [p for p in (root / "stages" / "sft").iterdir() if p.is_dir()]
    shutil.rmtree(sft_folder)
    state = retrain(_params(tiny_model_dir, root), return_state=True)
    assert state.is_completed(), state.message
    states = _task_states(state)
    assert states["lora_sft"] == "Completed"  # recomputed, not a ref to nothing
    assert states["prepare_dataset"] == "Cached"
    assert (sft_folder / "_SUCCESS").exists() and (sft_folder / "adapter_model.safetensors").exists()


def test_a_missing_dataset_file_fails_in_the_data_stage_with_its_path(tiny_model_dir, tmp_path):
    missing = tmp_path / "nope.jsonl"
    params = _params(tiny_model_dir, tmp_path / "root", **{"data.datasets": f"['{missing}']"})
    state = retrain(params, return_state=True)
    assert state.is_failed()
    assert str(missing) in state.message or str(missing) in str(state.result(raise_on_failure=False))
    assert not (tmp_path / "root" / "stages" / "sft").exists()  # failed before any model loaded
