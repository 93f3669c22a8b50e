"""tuneline as a service, with the real parts: ``tuneline serve-local`` starts a Prefect server
(SQLite, temporary home, 127.0.0.1), creates the work pools, applies infra/prefect.yaml through
``prefect deploy`` and starts a process worker; runs are triggered through the API exactly as the
UI's Run form does, and execute the real flow on CPU with the tiny random model."""

from __future__ import annotations

import copy
import json
import time
import typing

import pytest
import yaml
from pydantic import BaseModel

from flows.deploy import POOLS_FILE, PREFECT_FILE, REPO
from flows.params import RetrainParams, load_params
from tests.prefect_stack import ServeLocal, tiny_preset

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("service")
    preset = tiny_preset(home / "preset.yaml", tiny_model_dir, home / "artifacts")
    stack = ServeLocal(home, preset, workers=["cpu"])
    stack.preset, stack.artifacts = preset, home / "artifacts"
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def client(service):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(service.api_url) as c:
        yield c


def _wait_final(client, run_ids, service, timeout=420):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [client.read_flow_run(i) for i in run_ids]
        if all(r.state and r.state.type.value in FINAL for r in runs):
            return runs
        time.sleep(2)
    raise TimeoutError(f"runs not final after {timeout}s: {[(r.name, r.state.name) for r in runs]}\n{service.output()}")


def _eventually(read, timeout=30):
    deadline = time.monotonic() + timeout
    while not (found := read()) and time.monotonic() < deadline:
        time.sleep(1)
    return found


def _history(client, run_id):
    return sorted(client.read_flow_run_states(run_id), key=lambda s: s.timestamp)


# ----------------------------------------------------------------------------------------------
def test_deployments_pools_and_limits_come_from_infra_files(service, client):
    spec = {d["name"]: d for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]}
    nightly = client.read_deployment_by_name("retrain/nightly")
    manual = client.read_deployment_by_name("retrain/manual")

    # nightly: the cron schedule with its timezone, one run at a time, a collision cancels the new run
    (schedule,) = nightly.schedules
    assert schedule.active
    assert schedule.schedule.cron == spec["nightly"]["schedules"][0]["cron"]
    assert schedule.schedule.timezone == spec["nightly"]["schedules"][0]["timezone"] != "UTC"
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    # manual: no schedule (runs come from the UI), a second click waits
    assert manual.schedules == []
    assert manual.global_concurrency_limit.limit == 1
    assert manual.concurrency_options.collision_strategy.value == "ENQUEUE"

    for d in (nightly, manual):
        assert d.work_pool_name == "cpu"
        assert d.entrypoint == "flows/retrain.py:retrain"
        # no git clone at run time: the worker moves into this checkout
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        # parameters: the preset, validated and stored in full
        assert d.parameters == {"params": load_params(service.preset).model_dump(mode="json")}

    # the server's scheduler has put the next nights on the calendar, at 01:30 Berlin time
    from zoneinfo import ZoneInfo

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    upcoming = _eventually(
        lambda: client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id]))),
        timeout=90,
    )
    local = [r.expected_start_time.astimezone(ZoneInfo("Europe/Berlin")) for r in upcoming]
    assert local and all((t.hour, t.minute) == (1, 30) for t in local), local

    pools_spec = yaml.safe_load(POOLS_FILE.read_text())
    pools = {p.name: p for p in client.read_work_pools()}
    for name, pool in pools_spec["pools"].items():
        assert pools[name].type == "process"
        assert pools[name].concurrency_limit == pool["concurrency_limit"]
    assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == pools_spec["tag_limits"]["gpu"]


def _model_fields(model: type[BaseModel], path: str = ""):
    for name, info in model.model_fields.items():
        yield f"{path}{name}", name, info
        ann = info.annotation
        nested = [a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            yield from _model_fields(nested[0], f"{path}{name}.")


def _literal_choices(ann) -> set:
    if typing.get_origin(ann) is typing.Literal:
        return set(typing.get_args(ann))
    return set().union(*(_literal_choices(a) for a in typing.get_args(ann))) if typing.get_args(ann) else set()


def _enums(node) -> set:
    if isinstance(node, dict):
        found = set(node.get("enum", [])) | ({node["const"]} if "const" in node else set())  # a one-value Literal
        return found.union(*(_enums(v) for v in node.values())) if node else found
    if isinstance(node, list):
        return set().union(*(_enums(v) for v in node)) if node else set()
    return set()


def test_parameter_schema_exposes_every_field_with_description_and_dropdowns(service, client):
    schema = client.read_deployment_by_name("retrain/nightly").parameter_openapi_schema
    defs = schema.get("definitions") or schema.get("$defs") or {}

    def resolve(node):
        while "$ref" in node:
            node = defs[node["$ref"].split("/")[-1]]
        for alt in node.get("anyOf", []) + node.get("allOf", []):
            if "$ref" in alt:
                return resolve(alt)
        return node

    checked = 0
    for dotted, _, info in _model_fields(RetrainParams):
        node = resolve(schema["properties"]["params"])
        for part in dotted.split("."):
            assert part in node.get("properties", {}), f"{dotted}: missing from the Run form's schema"
            prop = node["properties"][part]
            node = resolve(prop)
        assert info.description, f"{dotted}: RetrainParams field without a description"
        assert prop.get("description") == info.description, f"{dotted}: description not in the form"
        if choices := _literal_choices(info.annotation):
            assert choices <= _enums(prop) | _enums(node), f"{dotted}: choices {choices} are not a dropdown (enum)"
        checked += 1
    assert checked > 40  # the nested models were walked, not just the top level


def test_manual_run_from_the_api_releases_and_a_second_click_waits(service, client):
    manual = client.read_deployment_by_name("retrain/manual")
    # What the UI's custom-run form submits: the deployment's parameters, one field changed.
    params = copy.deepcopy(manual.parameters["params"])
    params["release"]["model_name"] = "quokka-manual"
    first = client.create_flow_run_from_deployment(manual.id, parameters={"params": params})
    second = client.create_flow_run_from_deployment(manual.id, parameters={"params": params})

    runs = _wait_final(client, [first.id, second.id], service)
    assert [r.state.type.value for r in runs] == ["COMPLETED", "COMPLETED"], service.output()

    # ENQUEUE: whichever got the slot second waited for it, and only ran once the first had ended.
    histories = {r.id: _history(client, r.id) for r in runs}
    started = {rid: next(s.timestamp for s in h if s.type.value == "RUNNING") for rid, h in histories.items()}
    a, b = sorted(started, key=started.get)
    assert any(s.name == "AwaitingConcurrencySlot" for s in histories[b]), [s.name for s in histories[b]]
    a_end = next(s.timestamp for s in histories[a] if s.type.value == "COMPLETED")
    assert started[b] >= a_end

    # The release is where the parameters (changed in the form) said, complete with its manifest.
    release_dir = service.artifacts / "releases" / "quokka-manual"
    latest = (release_dir / "LATEST").read_text().strip()
    manifest = json.loads((release_dir / latest / "manifest.json").read_text())
    assert manifest["model_name"] == "quokka-manual"
    assert manifest["params"]["release"]["model_name"] == "quokka-manual"
    assert manifest["params"]["sft"]["max_steps"] == 2
    for name in manifest["files"]:
        assert (release_dir / latest / name).exists(), name
    # the run that waited found the training in the cache (same parameters, same fingerprints)
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[b])))
    assert {t.name.split("-")[0]: t.state.name for t in tasks}["lora_sft"] == "Cached"


def test_nightly_collision_cancels_the_new_run(service, client):
    nightly = client.read_deployment_by_name("retrain/nightly")
    params = copy.deepcopy(nightly.parameters["params"])
    params["data"]["datasets"] = [
        str(service.artifacts.parent / "missing-rows.jsonl")
    ]  # fails fast, after the slot is held
    runs = [client.create_flow_run_from_deployment(nightly.id, parameters={"params": params}) for _ in range(2)]
    runs = _wait_final(client, [r.id for r in runs], service, timeout=240)
    states = sorted((r.state.type.value, r.state.message or "") for r in runs)
    assert [s for s, _ in states] == ["CANCELLED", "FAILED"], states
    assert "concurrency limit" in states[0][1]
    assert "missing-rows.jsonl" in states[1][1]  # the failure names the file
    # the failed nightly is reported where operators look (flows/hooks.py): an artifact on the run
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    failed = next(r for r in runs if r.state.type.value == "FAILED")
    reports = _eventually(
        lambda: client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[failed.id]))
        )
    )
    assert any(a.key == "retrain-failure" and "missing-rows.jsonl" in a.data for a in reports), reports


def test_failure_hook_reports_where_operators_look(service, client, monkeypatch):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.hooks import ARTIFACT_KEY, FAILED_EVENT, report_failure
    from flows.retrain import retrain

    params = load_params(service.preset, [f"data.datasets=['{service.artifacts.parent / 'bad.jsonl'}']"])
    (service.artifacts.parent / "bad.jsonl").write_text('{"messages": "not a list"}\n')
    assert report_failure in retrain.on_failure_hooks  # the flow as deployed carries the hook
    with temporary_settings({PREFECT_API_URL: service.api_url}):
        state = retrain(params, return_state=True)
    assert state.is_failed()
    run_id = state.state_details.flow_run_id
    reason = state.message
    assert "bad.jsonl" in reason

    # 1. an ERROR line in the run's log, with the reason (logs and events are sent in the background)
    errors = _eventually(
        lambda: [
            line.message
            for line in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            if line.level >= 40 and "FAILED" in line.message
        ]
    )
    assert any("bad.jsonl" in m for m in errors), errors
    # 2. a markdown artifact under a fixed key, linked to the run
    (artifact,) = [
        a
        for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY])))
        if a.flow_run_id == run_id
    ]
    assert "bad.jsonl" in artifact.data
    # 3. an event on the run, for automations and the Event Feed
    events = _eventually(
        lambda: client.request(
            "POST",
            "/events/filter",
            json={"filter": {"event": {"name": [FAILED_EVENT]}, "resource": {"id": [f"prefect.flow-run.{run_id}"]}}},
        ).json()["events"]
    )
    assert len(events) == 1
    assert "bad.jsonl" in events[0]["payload"]["reason"]


# ----------------------------------------------------------------------------------------------
# Files that cannot run here (no Docker, no cluster): parsed and cross-checked
# ----------------------------------------------------------------------------------------------
def _placeholders(node) -> set[str]:
    import re

    if isinstance(node, str):
        return set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", node))
    items = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return set().union(*(_placeholders(v) for v in items)) if items else set()


@pytest.mark.parametrize("kind", ["process", "kubernetes"])
def test_every_pool_template_is_complete(kind):
    from flows.deploy import base_job_template

    spec = yaml.safe_load(POOLS_FILE.read_text())
    for name, pool in spec["pools"].items():
        template = base_job_template(kind, pool.get(kind))  # raises on an override the template lacks
        declared = set(template["variables"]["properties"])
        assert _placeholders(template["job_configuration"]) <= declared, name
        if kind == "kubernetes":
            container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
            gpus = template["variables"]["properties"]["gpus"]["default"]
            # the pool asks Kubernetes for exactly the GPUs of its profile, on matching nodes
            from tasks.hardware import PROFILES

            assert gpus == PROFILES[pool["profile"]].requirement.gpus, name
            assert bool(template["variables"]["properties"]["node_selector"]["default"]) == (gpus > 0), name


def test_compose_file_parses_and_wires_server_postgres_s3_and_workers():
    compose = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())  # Docker is not available here
    services = compose["services"]
    assert {"postgres", "prefect-server", "s3", "worker-cpu", "worker-gpu-0", "deploy"} <= set(services)
    server = services["prefect-server"]
    assert "postgresql+asyncpg://" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    for name in ("worker-cpu", "worker-gpu-0"):
        env = services[name]["environment"]
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["AWS_ENDPOINT_URL"].startswith("http://s3:")
        assert "${" in env["AWS_SECRET_ACCESS_KEY"]  # from infra/.env, never written in the file
    gpu = services["worker-gpu-0"]
    assert "--limit" in gpu["command"] and gpu["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == [
        "0"
    ]


def test_deploy_refuses_an_unknown_pool_before_touching_the_server(capsys):
    from flows.cli import main

    assert main(["deploy", "--pool", "gpu-h100"]) == 1
    err = capsys.readouterr().err
    assert "gpu-h100" in err and "work-pools.yaml" in err and "gpu-v100" in err


def test_deploy_build_step_rejects_a_bad_preset(tmp_path):
    from pydantic import ValidationError

    from flows.deploy import deployment_values

    bad = tmp_path / "nightly.yaml"
    bad.write_text("sft:\n  max_stpes: 10\n")
    with pytest.raises(ValidationError, match="max_stpes"):
        deployment_values(str(bad))
    good = deployment_values(str(REPO / "infra" / "presets" / "nightly.yaml"))
    assert good["params"] == RetrainParams.model_validate(
        yaml.safe_load((REPO / "infra" / "presets" / "nightly.yaml").read_text())
    ).model_dump(mode="json")
    assert good["code_dir"] == str(REPO)
