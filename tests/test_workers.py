"""One worker per card, for real: ``tuneline serve-local --pool gpu-v100 --worker gpu-v100:0
--worker gpu-v100:1`` derives the limits from its two workers, and two flow runs of the retrain
deployments then run at the same time, each under its own worker and seeing only its own card.

This machine has no GPU, so the pool is ``gpu-v100`` with the tiny preset's ``sft.profile: cpu``
(the demo's): a GPU pool is what has the limits under test (its concurrency limit and the ``gpu``
tag limit, both 1 before they followed the workers), while the runs train on CPU. The
``CUDA_VISIBLE_DEVICES`` values "0" and "1" name no real card here; what is checked is that each
run got its worker's value, and that TUNELINE_POOL_PROFILE from the pool reached it.

On a machine with two GPUs, ``TUNELINE_TEST_GPU_WORKERS=<card>,<card>`` (indices or UUIDs) runs the
same test for real (docs/gpu-runs.md): each worker serves one of those cards, the runs train with
``sft.profile: auto`` (the pool's v100 profile), and nvidia-smi must show each run's trainer on its
own worker's card and nowhere else.
"""

from __future__ import annotations

import copy
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.prefect_stack import ServeLocal, tiny_preset

POOL = "gpu-v100"
GPU_CARDS = [c for c in os.environ.get("TUNELINE_TEST_GPU_WORKERS", "").split(",") if c]
CARDS = GPU_CARDS or ["0", "1"]
WORKERS = [f"{POOL}:{card}" for card in CARDS]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("workers")
    preset = tiny_preset(home / "preset.yaml", tiny_model_dir, home / "artifacts")
    stack = ServeLocal(home, preset, workers=WORKERS, pool=POOL)
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


def _environ(pid: str | None) -> dict[str, str]:
    """The environment the worker gave a flow run's process (the process worker's infrastructure
    pid), read from /proc while it runs; empty once it has ended."""
    if not pid:
        return {}
    try:
        raw = Path(f"/proc/{pid.rsplit(':', 1)[-1]}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_one_worker_per_card_runs_two_runs_at_once(service):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(service.api_url) as client:
        # serve-local's two workers set the pool's GPU sets: both limits are 2, not the file's 1
        pool = client.read_work_pool(POOL)
        assert pool.concurrency_limit == 2
        assert client.read_concurrency_limit_by_tag("gpu").concurrency_limit == 2
        assert pool.base_job_template["variables"]["properties"]["env"]["default"]["TUNELINE_POOL_PROFILE"] == "v100"

        # The nightly and a manual run: each deployment runs one at a time, so two runs at once on
        # two cards are one of each. Separate artifact roots: on one root the second run would wait
        # for the first one's stage lock and take its result instead of training.
        runs = []
        for name in ("nightly", "manual"):
            deployment = client.read_deployment_by_name(f"retrain/{name}")
            params = copy.deepcopy(deployment.parameters["params"])
            assert params["sft"]["profile"] == "cpu"  # the tiny preset trains on CPU whatever the pool
            if GPU_CARDS:  # real cards: the pool's profile decides, and training lasts long enough to be seen
                params["sft"].update(profile="auto", max_steps=150, eval_steps=150, save_steps=150)
            params["artifact_root"] = str(service.home / f"artifacts-{name}")
            runs.append(client.create_flow_run_from_deployment(deployment.id, parameters={"params": params}))

        seen: dict = {r.id: {} for r in runs}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            current = [client.read_flow_run(r.id) for r in runs]
            for run in current:
                seen[run.id].update(_environ(run.infrastructure_pid))
                if GPU_CARDS:
                    for card in _cards_in_use(run.infrastructure_pid):
                        seen[run.id].setdefault("cards", set()).add(card)
            if all(r.state and r.state.type.value in FINAL for r in current):
                break
            time.sleep(1)
        else:
            raise TimeoutError(f"runs not final: {[(r.name, r.state.name) for r in current]}\n{service.output()}")
        assert [r.state.type.value for r in current] == ["COMPLETED", "COMPLETED"], service.output()

        # both ran at the same time (the server's start and end times)
        a, b = current
        assert a.start_time < b.end_time and b.start_time < a.end_time, [(r.start_time, r.end_time) for r in current]

        # each under its own worker, seeing only that worker's card
        workers = {r.labels["prefect.worker.name"] for r in current}
        assert {w.split("@")[0] for w in workers} == {f"{POOL}-{card}" for card in CARDS}, workers
        logged = {}
        for run in current:
            deadline = time.monotonic() + 30  # logs are sent in the background
            while not (lines := _device_lines(client, run.id)):
                assert time.monotonic() < deadline, f"no 'devices:' line in the logs of {run.name}"
                time.sleep(1)
            logged[run.id] = lines[0].split("=", 1)[1]
            worker_card = run.labels["prefect.worker.name"].split("@")[0].removeprefix(f"{POOL}-")  # UUIDs hold "-"
            assert logged[run.id] == worker_card, (run.name, lines, run.labels)
            # what the worker put in the run's environment: its card, and the pool's profile
            assert seen[run.id].get("CUDA_VISIBLE_DEVICES") == worker_card, sorted(seen[run.id])
            assert seen[run.id].get("TUNELINE_POOL_PROFILE") == "v100"
        assert sorted(logged.values()) == sorted(CARDS)
        if GPU_CARDS:  # each run's trainer was on its own worker's card, and only there
            for run in current:
                card = logged[run.id]
                assert seen[run.id].get("cards") == {_uuid(card)}, (run.name, card, seen[run.id].get("cards"))


def _uuid(card: str) -> str:
    if card.startswith("GPU-"):
        return card
    out = subprocess.run(["nvidia-smi", "-i", card, "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True)
    return out.stdout.decode().strip()


def _cards_in_use(pid: str | None) -> set[str]:
    """GPU UUIDs on which a process under the flow run's process (``pid``) holds a CUDA context."""
    import psutil

    if not pid:
        return set()
    root = int(pid.rsplit(":", 1)[-1])
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout
    cards = set()
    for line in out.strip().splitlines():
        app, uuid = (part.strip() for part in line.split(","))
        try:
            if root in {p.pid for p in psutil.Process(int(app)).parents()}:
                cards.add(uuid)
        except (psutil.NoSuchProcess, ValueError):
            continue
    return cards


def _device_lines(client, run_id) -> list[str]:
    """The retrain flow's first line: ``devices: CUDA_VISIBLE_DEVICES=<value>``."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return [line.message for line in logs if line.message.startswith("devices: CUDA_VISIBLE_DEVICES=")]
