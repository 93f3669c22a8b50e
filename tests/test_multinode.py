"""Multi-node SFT (tasks/runtime/node.py, tasks/runtime/cluster.py): two torchrun agents on 127.0.0.1 through the pods'
entry point and PET_* environment, against the real S3 server (gloo, the tiny model), a node killed
mid-run, and the Kubeflow TrainJob manifest built with the SDK's own models (no API server here)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tasks.artifacts.store import Store
from tasks.runtime.cluster import ClusterParams, check_cluster, job_state, train_job, upload_model
from tasks.runtime.hardware import PROFILES, profile_to_job
from tasks.sft.plan import SFTParams

ROOT = Path(__file__).resolve().parents[1]
# The same global batch as one process with accumulation 2: 2 nodes x 1 process x accumulation 1.
# Dropout off: each rank draws its own dropout masks, which one process would draw in another order.
CFG = SFTParams(
    profile="cpu",
    max_steps=8,
    per_device_batch_size=1,
    gradient_accumulation_steps=2,
    max_length=128,
    learning_rate=1e-3,
    lora_dropout=0.0,
    packing=False,
    eval_steps=100,
    save_steps=2,
    logging_steps=1,
)


def _rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {2 * i + 1}?"},
                {"role": "assistant", "content": f"{i} plus {2 * i + 1} is {3 * i + 1}."},
            ]
        }
        for i in range(n)
    ]


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(24)))
    (folder / "validation.jsonl").write_text("")
    (folder / "_SUCCESS").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, data_dir) -> dict:
    """The one-process run of the same job: the adapter two nodes must reproduce."""
    from tasks.sft.stage import make_job, train

    scratch = tmp_path_factory.mktemp("one-process")
    metrics = train(make_job(CFG, tiny_model_dir, data_dir, scratch, "cpu"))
    assert metrics["processes"] == 1 and metrics["global_step"] == CFG.max_steps
    return _adapter(scratch / "final")


@pytest.fixture(scope="module")
def cluster_store(s3_server, tiny_model_dir, data_dir) -> dict:
    """What the flow's SFT task puts in the store before it submits: the model and the dataset."""
    store = Store(f"s3://{s3_server.bucket}/multinode-{uuid.uuid4().hex[:8]}")
    model = upload_model(store, tiny_model_dir, "tiny-test-model")
    store.upload_dir(data_dir, "stages/data/test")
    return {"store": store, "model": model, "data": "stages/data/test"}


def _job(cluster_store: dict, fp: str) -> str:
    store: Store = cluster_store["store"]
    spec = {
        "root": store.root,
        "stage": "sft",
        "fingerprint": fp,
        "model": cluster_store["model"],
        "data": cluster_store["data"],
        "output": f"scratch/sft/{fp}/final",
        "config": CFG.model_dump(mode="json"),
        "profile": profile_to_job(PROFILES["cpu"]),
    }
    store.write_json(f"scratch/sft/{fp}/cluster/job.json", spec)
    return store.uri(f"scratch/sft/{fp}/cluster/job.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_nodes(job_uri: str, work: Path, nnodes: int = 2) -> list[tuple[subprocess.Popen, Path]]:
    """``nnodes`` agents as the pods run them: ``python -m tasks.runtime.node JOB_URI`` with the PET_* values the
    torch runtime sets, each with a local folder of its own (its own "machine")."""
    port = _free_port()
    work.mkdir(parents=True, exist_ok=True)
    nodes = []
    for rank in range(nnodes):
        env = {
            **os.environ,
            "PET_NNODES": str(nnodes),
            "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(port),
            "TUNELINE_NODE_DIR": str(work / f"node-{rank}"),
            "TUNELINE_CHECKPOINT_SYNC_S": "1",
            "TUNELINE_TRAINER_GRACE_S": "5",
            "OMP_NUM_THREADS": "1",  # two agents share two cores
            "PYTHONPATH": str(ROOT),
        }
        log = work / f"node-{rank}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tasks.runtime.node", job_uri],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        nodes.append((proc, log))
    return nodes


def _wait(nodes: list[tuple[subprocess.Popen, Path]], timeout: float = 300) -> list[int]:
    try:
        return [proc.wait(timeout=timeout) for proc, _ in nodes]
    finally:
        for proc, _ in nodes:
            if proc.poll() is None:
                _kill_node(proc)


def _kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL to the node's every process at once (wrapper, guard, torchrun, worker): a machine gone."""
    from tasks.runtime.guard import descendant_groups

    for pgid in descendant_groups(proc.pid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _final_in_store(store: Store, fp: str, tmp: Path) -> tuple[dict, dict]:
    marker = store.read_json(f"scratch/sft/{fp}/final/_COMPLETE")
    store.download_dir(f"scratch/sft/{fp}/final", tmp / "downloaded")
    return marker["metrics"], _adapter(tmp / "downloaded")


# ----------------------------------------------------------------------------------------------
# Two nodes, the real S3 store
# ----------------------------------------------------------------------------------------------
def test_two_nodes_train_the_adapter_of_one_process_and_leave_it_in_the_store(tmp_path, cluster_store, reference):
    nodes = _start_nodes(_job(cluster_store, "twonodes"), tmp_path)
    codes = _wait(nodes)
    logs = [log.read_text(errors="replace") for _, log in nodes]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in logs)
    assert "processes=2" in logs[0]  # one DDP group over both nodes (gloo)
    metrics, adapter = _final_in_store(cluster_store["store"], "twonodes", tmp_path)
    assert (metrics["processes"], metrics["global_step"], metrics["gradient_accumulation_steps"]) == (2, 8, 1)
    diff = _max_diff(adapter, reference)
    assert diff <= 1e-4, f"two-node adapter differs from the one-process one by {diff}"
    assert any(w.abs().max() > 0 for k, w in adapter.items() if "lora_B" in k)  # it learned something


def test_a_dead_node_fails_the_survivor_and_a_rerun_resumes_from_the_store(tmp_path, cluster_store, reference):
    store: Store = cluster_store["store"]
    job_uri = _job(cluster_store, "deadnode")
    nodes = _start_nodes(job_uri, tmp_path / "first")
    (survivor, survivor_log), (victim, _) = nodes
    first_ckpt = tmp_path / "first" / "node-0" / "sft-deadnode" / "scratch" / "checkpoint-2" / "_COMPLETE"
    deadline = time.monotonic() + 300
    while not first_ckpt.exists() and survivor.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first_ckpt.exists(), survivor_log.read_text(errors="replace")[-3000:]
    _kill_node(victim)
    killed_at = time.monotonic()
    code = _wait([(survivor, survivor_log)], timeout=180)[0]  # a hang would end here, as a failure
    noticed_s = time.monotonic() - killed_at
    text = survivor_log.read_text(errors="replace")
    assert code == 1, text[-3000:]
    assert "error: training process exited with 1" in text
    # What docs/operating.md quotes: the worker's gloo error naming the dead peer, torchrun's summary
    assert re.search(r"\[rank0\]: RuntimeError: \[.*gloo.*\] .* by peer", text), text[-3000:]
    assert "ChildFailedError" in text and "tasks.sft.stage FAILED" in text
    print(f"survivor failed {noticed_s:.1f}s after node 1 died")
    steps = [
        int(k.split("/")[-2].split("-")[1]) for k in store.list("scratch/sft/deadnode/checkpoints") if "_COMPLETE" in k
    ]
    assert steps and 2 <= max(steps) < CFG.max_steps, "the survivor's last checkpoint is in the store"

    # A rerun on fresh machines (empty local folders) resumes from the store's checkpoint.
    nodes = _start_nodes(job_uri, tmp_path / "rerun")
    codes = _wait(nodes)
    logs = [log.read_text(errors="replace") for _, log in nodes]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in logs)
    assert all(f"checkpoint-{max(steps)} restored from" in t for t in logs)  # every node starts at the same step
    metrics, adapter = _final_in_store(store, "deadnode", tmp_path)
    assert metrics["resumed_from_step"] == max(steps) and metrics["global_step"] == CFG.max_steps
    diff = _max_diff(adapter, reference)
    assert diff <= 1e-4, f"resumed two-node adapter differs from the one-process one by {diff}"


# ----------------------------------------------------------------------------------------------
# The entry point's contract, the TrainJob manifest, the task's decisions (no cluster needed)
# ----------------------------------------------------------------------------------------------
def test_a_node_without_the_pet_contract_says_which_variable_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    env.update(PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK="2", PET_MASTER_ADDR="x", PET_MASTER_PORT="1")
    out = subprocess.run(
        [sys.executable, "-m", "tasks.runtime.node", str(tmp_path / "job.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert (out.returncode, out.stderr.strip()) == (2, "error: PET_NODE_RANK='2': expected an integer 0..1")
    del env["PET_MASTER_PORT"]
    out = subprocess.run(
        [sys.executable, "-m", "tasks.runtime.node", "j.json"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.stderr.startswith("error: PET_MASTER_PORT not set: Kubeflow Trainer's torch runtime sets them")


def test_the_trainjob_is_built_with_the_sdk_models_and_holds_no_secret(monkeypatch):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-8c1f")
    cluster = ClusterParams(mode="kubeflow", nodes=4, gpus_per_node=8, namespace="ml", image="reg.example/tuneline:1")
    uri = "s3://bucket/nightly/scratch/sft/0123456789abcdef/cluster/job.json"
    manifest = train_job(
        "tuneline-sft-0123456789abcdef",
        cluster,
        uri,
        cpu_only=False,
        endpoint="http://s3.internal:8333",
        labels={"tuneline/stage": "sft"},
    )
    d = manifest.to_dict()
    text = json.dumps(d)
    assert TrainerV1alpha1TrainJob.from_json(text).to_dict() == d  # the SDK's own (de)serialisation round-trips
    assert (d["apiVersion"], d["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert d["metadata"] == {
        "name": "tuneline-sft-0123456789abcdef",
        "namespace": "ml",
        "labels": {"tuneline/stage": "sft"},
    }
    spec = d["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "kind": "ClusterTrainingRuntime",
        "apiGroup": "trainer.kubeflow.org",
    }
    assert spec["activeDeadlineSeconds"] == 24 * 3600
    trainer = spec["trainer"]
    assert trainer["image"] == "reg.example/tuneline:1"
    assert trainer["command"] == ["python", "-m", "tasks.runtime.node", uri]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}, "requests": {"nvidia.com/gpu": "8"}}
    env = {e["name"]: e for e in trainer["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3.internal:8333"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "tuneline-store", "key": key}}}
    assert not [n for n in env if n.startswith("PET_")]  # the runtime sets those (its webhook refuses ours)
    assert "do-not-leak-8c1f" not in text and not any("value" in env[k] for k in ("AWS_SECRET_ACCESS_KEY",))
    cpu = train_job("t", cluster, uri, cpu_only=True, endpoint=None, labels={}).to_dict()
    assert cpu["spec"]["trainer"]["resourcesPerNode"]["limits"] == {"cpu": "8"}
    assert "AWS_ENDPOINT_URL" not in {e["name"] for e in cpu["spec"]["trainer"]["env"]}


def test_the_trainjob_status_decides_the_task(tmp_path):
    from kubeflow_trainer_api import models as m

    def obj(*conditions, active=0):
        status = m.TrainerV1alpha1TrainJobStatus(
            conditions=[
                m.IoK8sApimachineryPkgApisMetaV1Condition(
                    type=t, status=s, reason=r, message=msg, lastTransitionTime="2026-01-01T00:00:00Z"
                )
                for t, s, r, msg in conditions
            ],
            jobsStatus=[
                m.TrainerV1alpha1JobStatus(name="node", active=active, ready=active, failed=0, succeeded=0, suspended=0)
            ],
        )
        return json.loads(json.dumps(m.TrainerV1alpha1TrainJob(status=status).to_dict(), default=str))

    assert job_state(obj()) == ("Created", "")
    assert job_state(obj(active=2)) == ("Running", "")
    assert job_state(obj(("Complete", "True", "JobsCompleted", "TrainJob is completed"))) == (
        "Complete",
        "JobsCompleted: TrainJob is completed",
    )
    failed = obj(
        ("Failed", "True", "FailedJobs", "jobset failed: node-1 pod exited 137"), ("Complete", "False", "x", "y")
    )
    assert job_state(failed) == ("Failed", "FailedJobs: jobset failed: node-1 pod exited 137")


def test_cluster_mode_keeps_the_flow_run_on_the_cpu_pool_and_refuses_what_cannot_run():
    from pydantic import ValidationError

    from flows.params import RetrainParams

    kube = {"mode": "kubeflow", "image": "reg/tuneline:1"}
    params = RetrainParams(sft={"profile": "a100x2", "cluster": kube}, artifact_root="s3://bucket/nightly")
    needs = params.task_needs()
    assert needs["lora_sft"].describe() == "lora_sft (sft.cluster.mode=kubeflow): needs no GPU"
    assert needs["lora_sft"].tags == ["cpu"] and needs["evaluate"].device == "cpu"
    for sft, root, message in [
        ({"profile": "a100x2", "cluster": {"mode": "kubeflow"}}, "s3://b/p", "sft.cluster.image: required"),
        ({"profile": "auto", "cluster": kube}, "s3://b/p", "sft.profile=auto: with sft.cluster.mode=kubeflow"),
        ({"profile": "a100x2", "cluster": kube}, "./artifacts", "artifact_root=./artifacts: sft.cluster.mode=kubeflow"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            RetrainParams(sft=sft, artifact_root=root).task_needs()
    with pytest.raises(ValidationError, match=r"sft\.cluster\.namespace"):
        RetrainParams(sft={"cluster": {"namespace": "Not_A_Label"}})
    check_cluster(ClusterParams(), "auto", "./artifacts")  # mode none: nothing to check
