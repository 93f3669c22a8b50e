"""Experiment tracking against a real MLflow server (issue 30, docs/tracking.md).

Real tiny nights (the tiny random model, 2 SFT steps) on one artifact root, tracked to ``mlflow server``
(SQLite backend, artifacts in the real S3 server, basic auth) started by the ``mlflow_server`` fixture;
everything is read back with ``MlflowClient``, as a person comparing nights would find it:

1. a tracked night whose credential comes from a Prefect Secret block, with TensorBoard on: one run, its
   stages nested, SFT's loss curve (in MLflow and in the stage folder's TensorBoard event files), evaluation
   and gate metrics, the release as a registered model version with the ``champion`` alias;
2. the same night untracked: every stage a cache hit, the same release (tracking changes no fingerprint);
3. the same night with the demo preset's own tracking: a local MLflow store under the artifact root;
4. a tracked night (credentials from the environment) that changes an evaluation setting: the unchanged
   stages tagged reused, a second version; ``release promote`` moves the alias with LATEST;
5. a night while the server is down: green, with a warning, its record kept; ``tuneline tracking sync``
   sends it once the server is back;
6. no credential anywhere in the tracker's database, its S3 artifacts, the night records, or the Prefect
   flow run's parameters and logs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from flows.cli import main as cli
from flows.params import RetrainParams, load_params
from flows.release_ops import run_action
from flows.retrain import retrain
from tasks.artifacts.stage_folders import content_hashes
from tasks.artifacts.store import Store
from tests.mlflowserver import ADMIN
from tests.test_flow import _params, _task_states

MODEL = "smollm2-135m-quokka"  # the demo preset's release.model_name: the experiment and the registered model
# The admin's credentials in the environment, where the MLflow client reads them (the test server has basic
# auth); none may be stored. The user name is not among them: MLflow records who created a run.
CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}
TOKEN = {"MLFLOW_TRACKING_TOKEN": "tok-5c2e9a17f3b4"}  # set too: basic auth wins, and it must not be stored either
BOT = ("night-bot", "pw-block-3f9a61c2d7e4")  # a second user, whose credential is only in a Prefect Secret block
BLOCK = "tuneline-mlflow-credentials"
SECRETS = {
    "the admin's password": ADMIN[1],
    "the block's password": BOT[1],
    "the token": TOKEN["MLFLOW_TRACKING_TOKEN"],
}
STAGES = {"data", "sft", "merge", "evaluate", "release"}


def _night(model_dir: Path, root: Path, uri: str | None, **overrides):
    # a loss point per step (a curve of max_steps points); validation only: no generation, the cheapest night
    sets = {"sft.logging_steps": 1, "eval.suites": "['validation']", **overrides}
    if uri is not None:  # None: the demo preset's own tracking.mlflow_uri (local); "": off
        sets["tracking.mlflow_uri"] = uri
    state = retrain(_params(model_dir, root, **sets), return_state=True)
    assert state.is_completed(), state.message
    return state


@pytest.fixture(scope="module")
def tracker_env(mlflow_server):
    """The admin's credentials in the environment for this module (readers, ``tracking sync``, nights)."""
    saved = {k: os.environ.get(k) for k in {**CREDENTIALS, **TOKEN}}
    os.environ.update({**CREDENTIALS, **TOKEN})
    yield
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def nights(tiny_model_dir, mlflow_server, tracker_env, tmp_path_factory):
    from mlflow.server.auth.client import AuthServiceClient
    from prefect.blocks.system import Secret

    root = tmp_path_factory.mktemp("tracked")
    AuthServiceClient(mlflow_server.url).create_user(*BOT)  # as the admin (the environment's credentials)
    Secret(value={"username": BOT[0], "password": BOT[1]}).save(BLOCK, overwrite=True)  # on the test Prefect server
    first = _night(
        tiny_model_dir, root, mlflow_server.url, **{"tracking.secret_block": BLOCK, "tracking.tensorboard": True}
    )
    password_after_first = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    untracked = _night(tiny_model_dir, root, "")
    local = _night(tiny_model_dir, root, None)
    second = _night(tiny_model_dir, root, mlflow_server.url, **{"eval.validation_max_rows": 6})
    return SimpleNamespace(
        root=root, first=first, untracked=untracked, local=local, second=second, password_after=password_after_first
    )


@pytest.fixture(scope="module")
def mlflow(mlflow_server, tracker_env):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


def _night_run(mlflow, state):
    """The night's MLflow run, found as a person would: by its Prefect flow run id."""
    exp = mlflow.get_experiment_by_name(MODEL)
    flow_run_id = str(state.state_details.flow_run_id)
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`tuneline.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1, f"one run per night, found {len(runs)}"
    return runs[0]


def _stage_runs(mlflow, parent) -> dict:
    runs = mlflow.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    by_stage = {r.data.tags["tuneline.stage"]: r for r in runs}
    assert len(by_stage) == len(runs), "one nested run per stage"
    return by_stage


def _version_of(mlflow, release_id: str):
    found = [v for v in mlflow.search_model_versions(f"name='{MODEL}'") if v.tags["tuneline.release_id"] == release_id]
    assert len(found) == 1, f"release {release_id}: {len(found)} model versions"
    return found[0]


def test_a_night_is_one_run_with_a_nested_run_per_stage(nights, mlflow):
    parent = _night_run(mlflow, nights.first)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tuneline.flow_run_url"]  # back to the Prefect UI
    assert parent.data.params["sft.max_steps"] == "2" and parent.data.params["tracking.mlflow_uri"]
    stages = _stage_runs(mlflow, parent)
    assert set(stages) == STAGES
    for name, run in stages.items():
        assert run.data.tags["tuneline.reused"] == "false", name
        assert run.info.status == "FINISHED", name
        folder = nights.root / "stages" / name / run.data.tags["tuneline.fingerprint"]
        assert (folder / "_SUCCESS").exists(), f"{name}: the fingerprint tag names its stage folder"
        assert run.data.tags["tuneline.uri"].rstrip("/").endswith(run.data.tags["tuneline.fingerprint"]), name
    assert parent.data.tags["tuneline.release_uri"] == nights.first.result()["release_uri"]
    assert parent.data.metrics["data.train_rows"] > 0  # the data report's counts


def test_the_sft_run_holds_the_trainers_loss_curve(nights, mlflow):
    sft = _stage_runs(mlflow, _night_run(mlflow, nights.first))["sft"]
    history = mlflow.get_metric_history(sft.info.run_id, "loss")
    folder = nights.root / "stages" / "sft" / sft.data.tags["tuneline.fingerprint"]
    logged = [e for e in json.loads((folder / "log_history.json").read_text()) if "loss" in e]
    assert len(logged) == 2  # sft.max_steps=2, a point per step
    assert sorted(m.step for m in history) == [e["step"] for e in logged]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([e["loss"] for e in logged])
    assert sft.data.params.get("learning_rate")  # TRL's own MLflow callback logged the trainer's arguments
    assert "eval_loss" in sft.data.metrics
    # the final evaluate() after train() logs into the stage's run too, not into a stray run of its own
    assert mlflow.search_runs([mlflow.get_experiment_by_name("Default").experiment_id]) == []


def test_evaluation_and_gate_land_on_the_night(nights, mlflow):
    parent = _night_run(mlflow, nights.first)
    result = nights.first.result()
    metrics, tags = parent.data.metrics, parent.data.tags
    assert metrics["gate.passed"] == (1.0 if result["gate"]["passed"] else 0.0)
    assert tags["tuneline.gate"] == ("passed" if result["gate"]["passed"] else "failed")
    tuned = {k for k in metrics if k.startswith("eval.tuned.")}
    base = {k for k in metrics if k.startswith("eval.base.")}
    assert tuned and {k.replace("eval.tuned.", "") for k in tuned} == {k.replace("eval.base.", "") for k in base}
    assert any(k.startswith("eval.delta_vs_base.") for k in metrics), sorted(metrics)
    assert any(k.startswith("eval.interval_vs_base.") for k in metrics), sorted(metrics)


def test_the_secret_blocks_credential_reaches_the_tracker_for_that_night_only(nights, mlflow, mlflow_server):
    """The first night's only way in was the Secret block's user: the server refused no call (no warning), the
    experiment that night created is that user's, and the process has the environment's credential again."""
    from mlflow.server.auth.client import AuthServiceClient

    assert nights.first.result()["tracking"]["warnings"] == []
    experiment = mlflow.get_experiment_by_name(MODEL)
    auth = AuthServiceClient(mlflow_server.url)
    permission = auth.get_user_permission(BOT[0], "experiment", experiment.experiment_id)
    assert permission.permission == "MANAGE"  # the creator's: the night ran as the block's user
    assert nights.password_after == ADMIN[1]  # the block's password left the environment with the night
    assert _stage_runs(mlflow, _night_run(mlflow, nights.first))["sft"].data.metrics  # the training child got it too


def test_tensorboard_event_files_in_the_sft_folder_hold_the_trainers_loss(nights, mlflow):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sft = _stage_runs(mlflow, _night_run(mlflow, nights.first))["sft"]
    folder = nights.root / "stages" / "sft" / sft.data.tags["tuneline.fingerprint"]
    events = sorted((folder / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, f"no event files under {folder / 'tensorboard'}"
    scalars = EventAccumulator(str(events[0].parent))
    scalars.Reload()
    loss = scalars.Scalars("train/loss")
    logged = [e for e in json.loads((folder / "log_history.json").read_text()) if "loss" in e]
    assert [s.step for s in loss] == [e["step"] for e in logged]
    assert [s.value for s in loss] == pytest.approx([e["loss"] for e in logged], rel=1e-5)
    assert not list((nights.root / "releases").rglob("events.out.tfevents.*")), "event files are not released"
    # nor part of what the SFT folder is (its digest, which later stages' fingerprints use)
    assert not [rel for rel in content_hashes(folder, "sft") if "tfevents" in rel]


def test_the_demo_preset_tracks_to_a_local_store_under_the_root(nights):
    """`mlflow ui --backend-store-uri sqlite:///<root>/mlflow/mlflow.db` shows the demo's nights, no server."""
    from mlflow.tracking import MlflowClient

    assert load_params("demo", []).tracking.mlflow_uri == "local"
    uri = f"sqlite:///{nights.root.resolve()}/mlflow/mlflow.db"
    local = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = _night_run(local, nights.local)
    assert parent.info.status == "FINISHED" and parent.data.params["tracking.mlflow_uri"] == "local"
    stages = _stage_runs(local, parent)
    assert set(stages) == STAGES and all(r.data.tags["tuneline.reused"] == "true" for r in stages.values())
    assert nights.local.result()["release_id"] == nights.first.result()["release_id"]
    assert (
        local.get_model_version_by_alias(MODEL, "champion").tags["tuneline.release_id"]
        == nights.local.result()["release_id"]
    )


def test_tracking_changes_no_fingerprint(nights):
    """Tracking is observation: the same night untracked is all cache hits and the same release."""
    assert set(_task_states(nights.untracked).values()) == {"Cached"}
    assert set(_task_states(nights.local).values()) == {"Cached"}
    assert nights.untracked.result()["release_id"] == nights.first.result()["release_id"]
    assert nights.untracked.result()["tracking"] is None


def test_a_later_night_tags_the_stages_it_reused(nights, mlflow):
    first = _stage_runs(mlflow, _night_run(mlflow, nights.first))
    second = _stage_runs(mlflow, _night_run(mlflow, nights.second))
    assert set(second) == STAGES
    for name in ("data", "sft", "merge"):  # unchanged: cache hits, linked by fingerprint, nothing new logged
        run = second[name]
        assert run.data.tags["tuneline.reused"] == "true", name
        assert run.data.tags["tuneline.fingerprint"] == first[name].data.tags["tuneline.fingerprint"]
        assert not run.data.metrics, f"{name}: a reused stage logs nothing new"
    for name in ("evaluate", "release"):  # eval.validation_max_rows changed: built again
        assert second[name].data.tags["tuneline.reused"] == "false", name
        assert second[name].data.tags["tuneline.fingerprint"] != first[name].data.tags["tuneline.fingerprint"]


def test_releases_are_model_versions_and_champion_follows_latest(nights, mlflow):
    r1, r2 = nights.first.result()["release_id"], nights.second.result()["release_id"]
    v1, v2 = _version_of(mlflow, r1), _version_of(mlflow, r2)
    # a link to the release, no copy of the weights (a local release: the night's run stands as the source)
    assert v1.tags["tuneline.release_uri"] == nights.first.result()["release_uri"]
    assert v2.run_id == _night_run(mlflow, nights.second).info.run_id
    assert v2.tags["tuneline.fingerprint.sft"] == v1.tags["tuneline.fingerprint.sft"]
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == v2.version

    # A random model's releases are all forced, so `rollback` (to the previous *good* release) refuses here;
    # `promote` moves LATEST back and forth through the same alias code.
    store = Store(str(nights.root))
    text, _ = run_action(store, "promote", MODEL, r1, who="test", reason="back", tracking_uri=mlflow.tracking_uri)
    assert store.read_bytes(f"releases/{MODEL}/LATEST").decode().strip() == r1
    assert f"alias champion -> version {v1.version}" in text
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == v1.version

    text, _ = run_action(store, "promote", MODEL, r2, who="test", reason="again", tracking_uri=mlflow.tracking_uri)
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == v2.version, text


def test_a_promote_the_tracker_misses_says_so_and_latest_still_moves(nights, mlflow):
    r1 = nights.first.result()["release_id"]
    store = Store(str(nights.root))
    before = mlflow.get_model_version_by_alias(MODEL, "champion").version
    dead = "http://127.0.0.1:9"  # discard port: nothing answers
    text, _ = run_action(store, "promote", MODEL, r1, who="test", reason="dead tracker", tracking_uri=dead)
    assert store.read_bytes(f"releases/{MODEL}/LATEST").decode().strip() == r1
    assert "alias could not be moved" in text and "tuneline tracking sync" in text
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == before  # stale until repaired
    assert cli(["tracking", "sync", "--root", str(nights.root), "--uri", mlflow.tracking_uri, "--model", MODEL]) == 0
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == _version_of(mlflow, r1).version


def test_a_night_with_the_tracker_down_stays_green_and_sync_backfills_it(nights, mlflow, mlflow_server, tiny_model_dir):
    mlflow_server.stop()
    try:
        down = _night(tiny_model_dir, nights.root, mlflow_server.url, **{"eval.validation_max_rows": 7})
    finally:
        mlflow_server.start()
    result = down.result()
    assert result["tracking"]["warnings"] and all(w.startswith("tracking: ") for w in result["tracking"]["warnings"])
    record_key = f"tracking/nights/{down.state_details.flow_run_id}.json"
    record = Store(str(nights.root)).read_json(record_key)
    assert record["synced"] is False and record["release"]["release_id"] == result["release_id"]

    assert cli(["tracking", "sync", "--root", str(nights.root)]) == 0  # the record names its own tracker
    parent = _night_run(mlflow, down)
    assert parent.info.status == "FINISHED" and parent.data.metrics["gate.passed"] in (0.0, 1.0)
    stages = _stage_runs(mlflow, parent)
    assert set(stages) == STAGES
    assert {n for n, r in stages.items() if r.data.tags["tuneline.reused"] == "false"} == {"evaluate", "release"}
    assert stages["evaluate"].data.metrics  # its numbers, from the stage's own metrics
    version = _version_of(mlflow, result["release_id"])  # registered by the backfill
    assert mlflow.get_model_version_by_alias(MODEL, "champion").version == version.version  # LATEST's
    assert Store(str(nights.root)).read_json(record_key)["synced"] is True
    assert cli(["tracking", "sync", "--root", str(nights.root)]) == 0  # idempotent: nothing twice
    assert len(_stage_runs(mlflow, _night_run(mlflow, down))) == len(STAGES)


def test_no_credential_reaches_the_tracker(nights, mlflow_server, mlflow, s3_server):
    import asyncio

    import boto3
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    bucket = boto3.client("s3", **{"endpoint_url": s3_server.endpoint, "region_name": "us-east-1"})
    listed = bucket.list_objects_v2(Bucket=s3_server.bucket, Prefix=mlflow_server.artifacts_prefix)
    objects = {
        o["Key"]: bucket.get_object(Bucket=s3_server.bucket, Key=o["Key"])["Body"].read()
        for o in listed.get("Contents", [])
    }
    assert any(k.endswith("/tuneline/night.json") for k in objects), "the nights' records are artifacts in S3"
    stored = {str(p): p.read_bytes() for p in [mlflow_server.db, *mlflow_server.data_dir.glob("*.log")]}
    stored |= {str(p): p.read_bytes() for p in nights.root.glob("mlflow/**/*") if p.is_file()}  # the local store
    stored |= {str(p): p.read_bytes() for p in (nights.root / "tracking").rglob("*") if p.is_file()}
    stored |= {f"s3://{s3_server.bucket}/{k}": v for k, v in objects.items()}

    async def prefect_side(state) -> bytes:  # what Prefect keeps of the night: its parameters and its logs
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            return json.dumps(run.parameters).encode() + "\n".join(log.message for log in logs).encode()

    for name, state in (("first", nights.first), ("second", nights.second)):
        stored[f"Prefect flow run of the {name} night"] = asyncio.run(prefect_side(state))
    for where, data in stored.items():
        for name, secret in SECRETS.items():
            assert secret.encode() not in data, f"{name} found in {where}"
    run = _night_run(mlflow, nights.first)
    named = re.compile(r"password|secret_key|access_key|(^|[._])token$")  # tracking.secret_block is a block's name
    assert not [k for k in run.data.params if named.search(k.lower())], "a credential-like parameter"
    assert run.data.params["tracking.secret_block"] == BLOCK
    assert BOT[0] not in json.dumps(run.data.params)


def test_a_tracking_uri_with_credentials_is_refused():
    with pytest.raises(ValidationError, match="no credentials in the URI"):
        RetrainParams(tracking={"mlflow_uri": "https://bob:hunter2@mlflow.example"})


def test_tracking_on_without_mlflow_is_one_warning_naming_the_extra_and_the_night_goes_on(monkeypatch, tmp_path):
    import logging

    import tasks.artifacts.tracking as plumbing
    from flows.tracking import open_night

    monkeypatch.setattr(plumbing, "mlflow_installed", lambda: False)  # as without the extra
    lines: list[str] = []
    logger = logging.getLogger("test-tracking-missing")
    monkeypatch.setattr(logger, "warning", lambda msg, *a: lines.append(msg % a))
    for tensorboard in (False, True):
        params = RetrainParams(
            artifact_root=str(tmp_path), tracking={"mlflow_uri": "local", "tensorboard": tensorboard}
        )
        night, ctx = open_night(params, params.stage_context(), logger)
        assert night is None  # untracked, not stopped
        # TensorBoard needs no tracker: the trainers still write their event files
        assert (ctx.tracking is not None and ctx.tracking.tensorboard) is tensorboard
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "mlflow is not installed: pip install 'tuneline[tracking]'" in lines[0]
    assert not (tmp_path / "tracking").exists() and not (tmp_path / "mlflow").exists()  # nothing recorded


def test_the_demo_presets_local_store_with_an_s3_root_is_a_warning(monkeypatch):
    import logging

    from flows.tracking import open_night

    lines: list[str] = []
    logger = logging.getLogger("test-tracking-s3")
    monkeypatch.setattr(logger, "warning", lambda msg, *a: lines.append(msg % a))
    params = load_params("demo", ["artifact_root=s3://bucket/prefix"])
    night, ctx = open_night(params, params.stage_context(), logger)
    assert night is None and ctx.tracking is None
    assert lines == [
        "tracking: tracking.mlflow_uri=local needs a local artifact_root; give a server URL for an s3:// root;"
        " the night goes on untracked"
    ]
