"""Retrain when data lands, with the real parts: ``tuneline serve-local`` (a Prefect server on 127.0.0.1)
deploys infra/prefect.yaml with ``data.trigger.source`` pointing at a prefix of the SeaweedFS S3 server;
the watch-data flow lists it and emits ``tuneline.data.changed``; the server's own automation (the
nightly's deployment trigger) starts the retrain once the prefix has been quiet for
``data.trigger.quiet_minutes``. Files written in one burst start exactly one night, which records the
change that started it; a burst while that night runs does not start a second one beside it."""

from __future__ import annotations

import time
import uuid

import pytest
import yaml

from tests.prefect_stack import ServeLocal, tiny_preset

QUIET_S = 15  # data.trigger.quiet_minutes: 0.25, the least a proactive Prefect trigger allows


@pytest.fixture(scope="module")
def watched(tmp_path_factory, tiny_model_dir, s3_server):
    home = tmp_path_factory.mktemp("trigger")
    source = f"s3://{s3_server.bucket}/landing-{uuid.uuid4().hex[:8]}"
    preset = tiny_preset(home / "preset.yaml", tiny_model_dir, home / "artifacts")
    data = yaml.safe_load(preset.read_text())
    # Daily: the schedule never fires during the test (these tests start each watch-data run themselves).
    data["data"]["trigger"] = {"source": source + "/", "quiet_minutes": QUIET_S / 60, "every_minutes": 1440}
    preset.write_text(yaml.safe_dump(data, sort_keys=False))
    stack = ServeLocal(home, preset, workers=["cpu"])
    stack.source, stack.artifacts = source, home / "artifacts"
    try:
        stack.wait_ready()
        _wait_deployed(stack, "watch-data/watch-data")  # deployed after the retrain ones
        yield stack
    finally:
        stack.stop()


def _wait_deployed(stack, name: str, timeout: float = 90) -> None:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with SyncPrefectClient(stack.api_url) as client:
        while True:
            try:
                client.read_deployment_by_name(name)
                return
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not deployed after {timeout:.0f}s:\n{stack.output()}") from None
                time.sleep(1)


@pytest.fixture
def client(watched):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(watched.api_url) as c:
        yield c


def _watch(stack) -> dict:
    """One watch-data run, as its schedule would start it (here in this process, on the stack's server)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.watch import watch_data

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        return watch_data(source=stack.source, artifact_root=str(stack.artifacts))


def _put(s3_server, source: str, name: str, body: bytes) -> None:
    import boto3

    bucket, prefix = source[5:].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)


def _nights(client) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly"])))


def test_the_nightly_carries_the_trigger_and_watch_data_is_scheduled(watched, client):
    nightly = client.read_deployment_by_name("retrain/nightly")
    # A real automation owned by the deployment: the UI lists it on the deployment's Triggers tab.
    (automation,) = client.read_resource_related_automations(f"prefect.deployment.{nightly.id}")
    assert automation.enabled and automation.name == "retrain/nightly: when data lands"
    trigger = automation.trigger
    assert trigger.posture.value == "Proactive" and trigger.threshold == 1
    assert trigger.after == trigger.expect == {"tuneline.data.changed"}
    assert trigger.within.total_seconds() == QUIET_S
    assert trigger.match.model_dump()["prefect.resource.id"] == f"tuneline.data-source.{watched.source}"
    (action,) = automation.actions
    assert action.type == "run-deployment" and action.deployment_id == nightly.id
    # the overlap guard still holds for triggered nights: one at a time, a collision cancels the new one
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy.value == "CANCEL_NEW"

    watch = client.read_deployment_by_name("watch-data/watch-data")
    (schedule,) = watch.schedules
    assert schedule.active and schedule.schedule.rrule.endswith("RRULE:FREQ=MINUTELY;INTERVAL=1440")
    assert watch.parameters["source"] == watched.source and watch.work_pool_name == "cpu"


def test_a_local_folder_is_watched_by_names_sizes_and_times(watched, client, tmp_path):
    """A folder source: the event names it and what changed; the digest is in a Variable."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.watch import EVENT, source_id, watch_data

    folder = tmp_path / "exports"
    (folder / "day1").mkdir(parents=True)
    (folder / "day1" / "a.jsonl").write_text('{"query": "q", "response": "r"}\n')
    with temporary_settings({PREFECT_API_URL: watched.api_url}):
        run = lambda: watch_data(source=str(folder), artifact_root=str(watched.artifacts))  # noqa: E731
        assert run()["emitted"] is False  # baseline
        (folder / "day1" / "a.jsonl").write_text('{"query": "q", "response": "r2"}\n')  # rewritten in place
        (folder / "day2.jsonl").write_text("{}\n")
        changed = run()
    assert changed["emitted"] and changed["changed"] == ["day1/a.jsonl"] and changed["added"] == ["day2.jsonl"]
    events = _eventually(
        lambda: client.request(
            "POST",
            "/events/filter",
            json={"filter": {"event": {"name": [EVENT]}, "resource": {"id": [f"tuneline.data-source.{folder}"]}}},
        ).json()["events"],
        30,
        watched,
    )
    (event,) = events
    assert event["payload"]["digest"] == changed["digest"] and event["payload"]["files"] == 2
    assert client.read_variable_by_name(f"tuneline_watch_{source_id(str(folder))}").value["digest"] == changed["digest"]
    # Not the nightly's source: the next test counts every night the trigger starts after this.


def test_a_burst_of_files_starts_exactly_one_night_after_the_quiet_window(watched, client, s3_server):
    first = _watch(watched)  # the baseline: deploying (or a new source) starts nothing
    assert first["files"] == 0 and not first["emitted"]
    assert _watch(watched)["emitted"] is False  # nothing new, nothing said

    _put(s3_server, watched.source, "part-0.jsonl", b'{"query": "1+1?", "response": "2"}\n')
    one = _watch(watched)
    assert one["emitted"] and one["added"] == ["part-0.jsonl"]
    time.sleep(4)
    assert _nights(client) == []  # still inside the quiet window: nothing started yet
    # A second write within the quiet window: no second night, the wait starts over from it.
    _put(s3_server, watched.source, "part-1.jsonl", b'{"query": "2+2?", "response": "4"}\n')
    two = _watch(watched)
    sent = time.time()
    assert two["emitted"] and two["added"] == ["part-1.jsonl"] and two["files"] == 2

    deadline = sent + QUIET_S + 60
    while not (nights := _nights(client)) and time.time() < deadline:
        time.sleep(1)
    assert len(nights) == 1, watched.output()
    (night,) = nights
    # started by the server's automation, once the prefix had been quiet for the window after the last write
    assert night.created.timestamp() >= sent + QUIET_S - 3
    assert night.created_by and night.created_by.type == "AUTOMATION"
    # the night knows which change started it: the last event's payload, as its `trigger` parameter
    trigger = night.parameters["trigger"]
    assert trigger["digest"] == two["digest"] != one["digest"]
    assert trigger["source"] == watched.source and trigger["files"] == 2
    assert trigger["added"] == ["part-1.jsonl"] and trigger["previous_digest"] == one["digest"]
    deployed = client.read_deployment_by_name("retrain/nightly").parameters
    assert night.parameters["params"] == deployed["params"]  # the deployment's parameters, the trigger's added

    # The night records which change started it (its first act, before any stage): the data-trigger artifact.
    artifact = _eventually(lambda: _artifact(client, night.id, "data-trigger"), 120, watched)
    assert "part-1.jsonl" in artifact.data and two["digest"] in artifact.data and watched.source in artifact.data
    assert len(_nights(client)) == 1  # another quiet window has passed with no event: still one night

    # More data while that night runs: the trigger starts another night, and the overlap guard (the nightly's
    # concurrency limit, CANCEL_NEW) never lets it run beside the first: cancelled, or run after it ended.
    _put(s3_server, watched.source, "part-2.jsonl", b'{"query": "3+3?", "response": "6"}\n')
    assert _watch(watched)["added"] == ["part-2.jsonl"]
    later = _eventually(lambda: [n for n in _nights(client) if n.id != night.id], QUIET_S + 60, watched)
    (second,) = later
    assert second.parameters["trigger"]["added"] == ["part-2.jsonl"]
    second = _eventually(lambda: _left_scheduled(client, second.id), 120, watched)
    first = client.read_flow_run(night.id)
    if second.state.type.value == "CANCELLED":  # what happens on this box: the first night is still training
        assert "concurrency limit" in (second.state.message or ""), second.state
        assert first.start_time and not (first.end_time and first.end_time < second.state.timestamp), (
            "cancelled although the first night was over"
        )
    else:
        assert first.end_time and second.start_time and first.end_time <= second.start_time, watched.output()


def _eventually(read, timeout: float, stack):
    deadline = time.monotonic() + timeout
    while not (found := read()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing after {timeout:.0f}s:\n{stack.output()}")
        time.sleep(1)
    return found


def _artifact(client, run_id, key):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]), key=ArtifactFilterKey(any_=[key])
        )
    )
    return found[0] if found else None


def _left_scheduled(client, run_id):
    """The run once a worker has taken it: cancelled by the concurrency guard, or running (or done)."""
    run = client.read_flow_run(run_id)
    return run if run.state.type.value in {"CANCELLED", "RUNNING", "COMPLETED", "FAILED", "CRASHED"} else None


def test_a_bad_trigger_setting_fails_the_deploy_with_one_line(tmp_path):
    """Mistakes in data.trigger fail `tuneline deploy` (its build step), not the watch at 14:00."""
    from pydantic import ValidationError

    from flows.deploy import deployment_values
    from flows.errors import InputError
    from flows.watch import list_source, normalized_source

    for bad, field in [
        ({"quiet_minutes": 0.1}, "quiet_minutes"),
        ({"source": "x", "every_minutes": 0}, "every_minutes"),
    ]:
        preset = tmp_path / "p.yaml"
        preset.write_text(yaml.safe_dump({"data": {"trigger": bad}}))
        with pytest.raises(ValidationError, match=f"data.trigger.{field}"):
            deployment_values(str(preset))
    for source, problem in [("s3:/bucket/x", "expected s3://bucket/prefix"), ("s3://", "expected s3://bucket/prefix")]:
        with pytest.raises(InputError, match=problem) as e:
            normalized_source(source)
        assert "\n" not in str(e.value) and str(e.value).startswith("data.trigger.source")
    with pytest.raises(InputError, match="not a folder"):
        list_source(str(tmp_path / "missing"))
