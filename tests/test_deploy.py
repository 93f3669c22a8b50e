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
        # parameters: the preset, validated and stored in full, and again as the base a partial object merges over
        stored = load_params(service.preset).model_dump(mode="json")
        assert d.parameters == {"params": stored, "preset": stored}

    # serve-local on a box without a GPU (the tests' box) leaves the nightly's schedule off, and says so:
    # nothing lands on the calendar to fail preflight at 01:30
    assert not schedule.active
    assert "nightly schedule left off: found no GPU" in service.output()

    _assert_pools_as_in_the_file(client, {})  # the service's only worker is a cpu one: the file's GPU sets


def _assert_pools_as_in_the_file(client, gpu_sets: dict[str, int]) -> None:
    """Every pool of infra/work-pools.yaml on the server: its profile in the runs' env, its limit (a
    GPU pool's: its GPU sets, ``gpu_sets`` overriding the file's); the gpu tag limit their sum."""
    raw = yaml.safe_load(POOLS_FILE.read_text())["pools"]
    pools = {p.name: p for p in client.read_work_pools()}
    expected_gpu = 0
    for name, pool in raw.items():
        assert pools[name].type == "process"
        env = pools[name].base_job_template["variables"]["properties"]["env"]["default"]
        assert env["TUNELINE_POOL_PROFILE"] == pool["profile"], name
        assert env["PYTHONUNBUFFERED"] == "1", name  # the template's env is kept beside it
        if "gpu_sets" in pool:
            sets = gpu_sets.get(name, pool["gpu_sets"])
            assert pools[name].concurrency_limit == sets, name
            expected_gpu += sets
        else:
            assert pool["profile"] == "cpu"
            assert pools[name].concurrency_limit == pool["concurrency_limit"], name
    assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == max(expected_gpu, 1)


def test_apply_work_pools_follows_the_gpu_sets_served(service, client):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import apply_work_pools

    with temporary_settings({PREFECT_API_URL: service.api_url}):
        try:
            # what `serve-local --worker gpu-v100:0 --worker gpu-v100:1 --worker gpu-a100x2:2,3` applies
            spec = apply_work_pools("process", gpu_sets={"gpu-v100": 2, "gpu-a100x2": 1})
            assert spec.gpu_tag_limit == 3
            _assert_pools_as_in_the_file(client, {"gpu-v100": 2, "gpu-a100x2": 1})
            # no GPU set served at all: the tag limit stays 1, since Prefect aborts a task whose limit is 0
            spec = apply_work_pools("process", gpu_sets={"gpu-v100": 0, "gpu-a100x2": 0})
            assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == spec.gpu_tag_limit == 1
            assert client.read_work_pool("gpu-v100").concurrency_limit == 0
        finally:
            apply_work_pools("process")  # back to the file, for the tests after this one
    _assert_pools_as_in_the_file(client, {})


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
    from flows.deploy import base_job_template, load_pools

    for name, pool in load_pools().pools.items():
        template = base_job_template(kind, pool)
        declared = set(template["variables"]["properties"])
        assert template["variables"]["properties"]["env"]["default"]["TUNELINE_POOL_PROFILE"] == pool.profile
        assert _placeholders(template["job_configuration"]) <= declared, name
        if kind == "kubernetes":
            container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
            gpus = template["variables"]["properties"]["gpus"]["default"]
            # the pool asks Kubernetes for exactly the GPUs of its profile, on matching nodes
            from tasks.runtime.hardware import PROFILES

            assert gpus == PROFILES[pool.profile].requirement.gpus == pool.gpus, name
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


_GOOD_POOLS = POOLS_FILE.read_text()


@pytest.mark.parametrize(
    "edit, where, problem",
    [
        (lambda p: p["pools"]["gpu-v100"].update(profile="h100"), "pool 'gpu-v100', field 'profile'", "'h100'"),
        (lambda p: p["pools"]["cpu"].pop("profile"), "pool 'cpu', field 'profile'", "missing"),
        (lambda p: p["pools"]["gpu-v100"].pop("gpu_sets"), "pool 'gpu-v100', field 'gpu_sets'", "missing"),
        (lambda p: p["pools"]["gpu-v100"].update(gpu_sets="two"), "pool 'gpu-v100', field 'gpu_sets'", "integer"),
        (lambda p: p["pools"]["gpu-v100"].update(gpu_sets=-1), "pool 'gpu-v100', field 'gpu_sets'", "≥ 0"),
        (
            lambda p: p["pools"]["cpu"].update(concurrency_limit=True),
            "pool 'cpu', field 'concurrency_limit'",
            "integer",
        ),
        (
            lambda p: p["pools"]["gpu-v100"].update(concurrency_limit=2),
            "pool 'gpu-v100', field 'concurrency_limit'",
            "gpu_sets",
        ),
        (lambda p: p["pools"]["cpu"].update(gpu_sets=1), "pool 'cpu', field 'gpu_sets'", "no GPU sets"),
        (lambda p: p["pools"]["cpu"].update(profle="cpu"), "pool 'cpu', field 'profle'", "unknown field"),
        (lambda p: p["pools"]["cpu"].update(description=3), "pool 'cpu', field 'description'", "string"),
        (
            lambda p: p["pools"]["cpu"]["kubernetes"].update(gpu=1),
            "pool 'cpu', field 'kubernetes.gpu'",
            "no such variable",
        ),
        (lambda p: p["pools"]["cpu"].update(process=["env"]), "pool 'cpu', field 'process'", "mapping"),
        (lambda p: p.update(tag_limits={"gpu": 1}), "top level", "sum of the GPU pools' gpu_sets"),
        (lambda p: p.pop("pools"), "top level", "'pools'"),
    ],
)
def test_a_bad_pools_file_fails_with_one_line_naming_file_pool_and_field(tmp_path, edit, where, problem):
    from flows.deploy import PoolsFileError, load_pools

    spec = yaml.safe_load(_GOOD_POOLS)
    edit(spec)
    bad = tmp_path / "work-pools.yaml"
    bad.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    with pytest.raises(PoolsFileError) as e:
        load_pools(bad)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{bad}: {where}: "), message
    assert problem in message, message
    if "profile" in where and "missing" not in problem:
        assert "cpu, v100, a100x2" in message  # the known profiles: tasks.runtime.hardware.PROFILES


def test_deploy_with_a_bad_pools_file_stops_before_the_server(tmp_path, monkeypatch, capsys):
    import flows.deploy
    from flows.cli import main

    bad = tmp_path / "work-pools.yaml"
    bad.write_text(_GOOD_POOLS.replace("profile: v100", "profile: v100x"))
    monkeypatch.setattr(flows.deploy, "POOLS_FILE", bad)  # the file deploy reads; no server is running
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: touching it would fail
    assert main(["deploy", "--pool", "gpu-v100"]) == 1
    err = capsys.readouterr().err.strip()
    known = "cpu, v100, a100x2, fsdp"
    assert err == f"error: {bad}: pool 'gpu-v100', field 'profile': unknown profile 'v100x' (known: {known})"
    # a GPU pool that serves no GPU set: its runs would never start, so deploying to it is refused
    monkeypatch.setattr(flows.deploy, "POOLS_FILE", POOLS_FILE)
    assert main(["deploy", "--pool", "gpu-a100x2"]) == 1
    assert "serves 0 GPU sets" in capsys.readouterr().err


def test_serve_local_workers_set_gpu_sets_and_never_share_a_card():
    from flows.deploy import WorkerSpec, load_pools, served_gpu_sets

    pools = load_pools()
    specs = [WorkerSpec.parse(w) for w in ("gpu-v100:0", "gpu-v100:1", "gpu-a100x2:2,3", "cpu")]
    assert served_gpu_sets(specs, pools) == {"gpu-v100": 2, "gpu-a100x2": 1}
    assert served_gpu_sets([WorkerSpec.parse("gpu-v100"), WorkerSpec.parse("cpu")], pools) == {"gpu-v100": 1}
    assert pools.with_gpu_sets({"gpu-v100": 2, "gpu-a100x2": 1}).gpu_tag_limit == 3
    assert [s.env() for s in specs] == [{"CUDA_VISIBLE_DEVICES": d} for d in ("0", "1", "2,3", "")]
    for workers, problem in [
        (["gpu-v100:0", "gpu-a100x2:0,1"], "GPU 0 is given to two workers"),
        (["gpu-a100x2:0"], "needs 2 GPUs"),
        (["gpu-h100:0"], "unknown work pool"),
        (["gpu-v100", "gpu-v100:1"], "give each its cards"),
    ]:
        with pytest.raises(ValueError, match=problem):
            served_gpu_sets([WorkerSpec.parse(w) for w in workers], pools)


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


def test_release_ops_deployment_rolls_back_from_the_ui(service, client, tmp_path):
    """The release-ops deployment (cpu pool, the preset's model and store) run as the UI's Run form
    does: a rollback moves LATEST, and the move log is the run's markdown artifact."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tasks.artifacts.registry import latest_release
    from tasks.artifacts.store import Store
    from tasks.release.stage import publish_release

    ops = client.read_deployment_by_name("release-ops/release-ops")
    preset = load_params(service.preset)
    assert ops.work_pool_name == "cpu" and ops.entrypoint == "flows/release_ops.py:release_ops"
    assert ops.parameters["model_name"] == preset.release.model_name
    assert ops.parameters["artifact_root"] == preset.artifact_root and ops.parameters["action"] == "list"

    store = Store(str(tmp_path / "root"))
    for n, passed in ((1, True), (2, True)):
        weights = tmp_path / f"w{n}"
        weights.write_bytes(bytes([n]) * 100)
        publish_release(
            store, "ui-model", f"2026010{n}T000000Z-0000000{n}", {"model/w": weights}, {"gate": {"passed": passed}}
        )
    params = {
        "action": "rollback",
        "model_name": "ui-model",
        "artifact_root": store.root,
        "reason": "clicked in the UI",
    }
    run = client.create_flow_run_from_deployment(ops.id, parameters=params)
    (done,) = _wait_final(client, [run.id], service, timeout=180)
    assert done.state.type.value == "COMPLETED", service.output()
    assert latest_release(store, "ui-model") == "20260101T000000Z-00000001"
    (artifact,) = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
    )
    assert (
        artifact.key == "release-log"
        and "| rollback | 20260102T000000Z-00000002 | 20260101T000000Z-00000001 |" in artifact.data
    )


def _prefect_servers(root_pid: int) -> list[str]:
    """Command lines of the Prefect API servers in a process tree: `prefect server start` and the
    in-process (ephemeral) one Prefect starts when its client has no API URL."""
    import psutil

    procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    found = []
    for proc in procs:
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "server start" in cmd or "prefect.server.api.server" in cmd:
            found.append(cmd)
    return found


def test_serve_local_without_preset_is_the_demo_on_one_server(tmp_path):
    """No --preset on a CPU box: the deployments carry the demo parameters, the nightly's schedule is off,
    and serve-local's process tree holds one Prefect server, the one it started and printed."""
    stack = ServeLocal(tmp_path, None, workers=[])
    try:
        stack.wait_ready()
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(stack.api_url) as client:
            nightly = client.read_deployment_by_name("retrain/nightly")
        demo = load_params("demo").model_dump(mode="json")
        assert nightly.parameters == {"params": demo, "preset": demo}
        assert [s.active for s in nightly.schedules] == [False]
        out = stack.output()
        assert "demo parameters" in out and "nightly schedule left off" in out
        servers = _prefect_servers(stack.proc.pid)
        assert len(servers) == 1 and f"--port {stack.port}" in servers[0], servers
    finally:
        stack.stop()


def test_a_partial_params_object_merges_over_the_deployments_preset(service, client):
    """What a data team's script sends: one nested field, through `prefect deployment run --params`.
    Every other field comes from the deployment's preset, not the code defaults; the run records its
    effective parameters (an artifact and the release manifest) and the overridden field."""
    import os
    import subprocess

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.deploy import _prefect

    sent = {"params": {"release": {"model_name": "quokka-partial"}, "sft": {"learning_rate": 0.002}}}
    out = subprocess.run(
        [_prefect(), "deployment", "run", "retrain/manual", "--params", json.dumps(sent)],
        env={**os.environ, "PREFECT_API_URL": service.api_url},
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    manual = client.read_deployment_by_name("retrain/manual")
    (run,) = [
        r
        for r in client.read_flow_runs()
        if r.deployment_id == manual.id and "quokka-partial" in json.dumps(r.parameters)
    ]
    (run,) = _wait_final(client, [run.id], service)
    assert run.state.type.value == "COMPLETED", service.output()

    preset = load_params(service.preset)
    release_dir = service.artifacts / "releases" / "quokka-partial"
    manifest = json.loads((release_dir / (release_dir / "LATEST").read_text().strip() / "manifest.json").read_text())
    effective = manifest["params"]
    assert effective["release"]["model_name"] == "quokka-partial"
    assert effective["sft"]["learning_rate"] == 0.002
    # the rest is the preset's (the code defaults would be Qwen2-7B, profile auto, ./artifacts)
    assert effective["model"] == preset.model.model_dump(mode="json")
    assert effective["sft"]["max_steps"] == preset.sft.max_steps == 2
    assert effective["sft"]["profile"] == "cpu"
    assert effective["artifact_root"] == str(service.artifacts)
    assert effective["overridden"] == ["release.model_name", "sft.learning_rate"]
    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    (table,) = [a for a in arts if a.key == "effective-parameters"]
    assert "| `release.model_name` |" in table.data and "| `sft.learning_rate` |" in table.data
    assert "Fields that differ from the deployment's preset: 2" in table.data
