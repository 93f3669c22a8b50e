"""SFT on several GPU nodes through Kubeflow Trainer: the ``sft.cluster`` parameters, the ``TrainJob``
the flow submits, and how the SFT task follows it (docs/operating.md, "Multi-node SFT").

With ``sft.cluster.mode: kubeflow`` the ``lora_sft`` task trains nothing itself, so its flow run stays
on the CPU pool (tasks/runtime/requirements.py) and holds no GPU the training needs. It:

1. puts what the pods need in the ``s3://`` store: the base model (``models/<digest>/``, once, with
   ``_COMPLETE`` last) and the job spec ``scratch/sft/<fp>/cluster/job.json`` (the dataset is a stage
   there already);
2. submits a ``TrainJob`` (``train_job``: built with the Kubeflow SDK's own models, kubeflow-trainer-api)
   on the ``torch-distributed`` runtime: our image, ``numNodes`` pods with ``nvidia.com/gpu`` each, the
   command ``python -m tasks.runtime.node JOB_URI`` (tasks/runtime/node.py), the store's endpoint; the credentials come
   from a Kubernetes Secret by name, never a value. Its name is ``tuneline-sft-<fp>``, so a retry finds
   the job of the attempt before and follows it instead of starting a second one;
3. follows it until ``Complete`` (downloads the adapter the pods wrote to the store) or ``Failed``
   (the task fails with the job's own condition message); when the task is interrupted (the flow run
   is cancelled: Prefect raises in the task, ``tuneline run``'s Ctrl-C raises ``Stop``) it deletes the
   TrainJob, and Kubernetes removes its pods. ``activeDeadlineSeconds`` (``max_hours``) bounds a job
   whose flow died without a word.

Checkpoints go to the store while the pods train (tasks/artifacts/checkpoint_sync.py), so a retried task's new
TrainJob resumes on whatever nodes it gets. Submitting, following and deleting need a Kubernetes API
server and are not tested here; the manifest and the status decisions are (tests/test_multinode.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts.store import Store

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # keys the store Secret must hold
COMPLETE = "_COMPLETE"


class ClusterParams(BaseModel):
    """Where SFT trains: here (``none``) or on a Kubernetes cluster through Kubeflow Trainer."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "kubeflow"] = Field(
        default="none",
        description="none: train on the flow's machine (sft.profile). kubeflow: submit a Kubeflow Trainer TrainJob "
        "of `nodes` pods and follow it; the flow run stays on a CPU pool. Needs an s3:// artifact root.",
    )
    nodes: int = Field(default=2, ge=1, le=64, description="Training nodes (pods), one torchrun agent each.")
    gpus_per_node: int = Field(
        default=1,
        ge=1,
        le=16,
        description="GPUs (nvidia.com/gpu) per pod, one training process each. sft.profile gives the precision and "
        "memory settings; the global batch stays sft's (accumulation is divided over nodes x gpus_per_node).",
    )
    namespace: str = Field(
        default="tuneline", max_length=63, pattern=DNS_LABEL, description="Kubernetes namespace of the TrainJob."
    )
    image: str = Field(
        default="",
        max_length=500,
        description="Training image (infra/Dockerfile's gpu target, pushed to your registry); required for kubeflow.",
    )
    runtime: str = Field(
        default="torch-distributed",
        max_length=63,
        pattern=DNS_LABEL,
        description="Kubeflow Trainer ClusterTrainingRuntime (torchrun with the PET_* environment).",
    )
    store_secret: str = Field(
        default="tuneline-store",
        max_length=253,
        pattern=DNS_LABEL,
        description="Kubernetes Secret in the namespace holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the "
        "artifact store (referenced by name; no credential is ever written into the TrainJob).",
    )
    max_hours: float = Field(
        default=24.0, gt=0.0, le=168.0, description="The TrainJob's activeDeadlineSeconds, in hours."
    )
    poll_seconds: float = Field(
        default=15.0, ge=1.0, le=600.0, description="How often the task reads the job's status."
    )


def check_cluster(cluster: ClusterParams, profile: str, root: str) -> None:
    """One-line errors for what the submission would trip on, before anything is uploaded.

    >>> check_cluster(ClusterParams(mode="kubeflow"), "a100x2", "s3://b/p")
    Traceback (most recent call last):
    ...
    ValueError: sft.cluster.image: required with sft.cluster.mode=kubeflow (the training image the pods run)
    """
    if cluster.mode == "none":
        return
    if not cluster.image.strip():
        raise ValueError("sft.cluster.image: required with sft.cluster.mode=kubeflow (the training image the pods run)")
    if profile == "auto":
        raise ValueError(
            "sft.profile=auto: with sft.cluster.mode=kubeflow name the nodes' profile (v100, a100x2, cpu); "
            "auto reads the flow's own machine, which trains nothing"
        )
    if not root.startswith("s3://"):
        raise ValueError(
            f"artifact_root={root}: sft.cluster.mode=kubeflow needs an s3:// root (the pods read the job, "
            "the model and the data there, and write checkpoints and the adapter there)"
        )


def job_name(fp: str) -> str:
    """The TrainJob's name: one per SFT fingerprint, so a retry finds the job of the attempt before."""
    return f"tuneline-sft-{fp}"[:63]


def train_job(
    name: str, cluster: ClusterParams, job_uri: str, *, cpu_only: bool, endpoint: str | None, labels: dict[str, str]
) -> Any:
    """The ``TrainJob`` (kubeflow_trainer_api's model; ``.to_dict()`` is what the API server gets).

    Env: the store's endpoint and credentials (``secretKeyRef`` to ``store_secret``); never a ``PET_*``
    name, which the torch runtime sets itself (and its webhook refuses)."""
    from kubeflow.trainer.constants import constants as kf
    from kubeflow_trainer_api import models as m

    def secret(key: str, optional: bool = False) -> Any:
        ref = m.IoK8sApiCoreV1SecretKeySelector(name=cluster.store_secret, key=key, optional=optional or None)
        return m.IoK8sApiCoreV1EnvVar(name=key, valueFrom=m.IoK8sApiCoreV1EnvVarSource(secretKeyRef=ref))

    env = [secret(k) for k in SECRET_KEYS] + [secret("AWS_SESSION_TOKEN", optional=True)]
    if endpoint:
        env.append(m.IoK8sApiCoreV1EnvVar(name="AWS_ENDPOINT_URL", value=endpoint))
    env.append(m.IoK8sApiCoreV1EnvVar(name="PYTHONUNBUFFERED", value="1"))
    # A CPU profile (a CPU cluster, a smoke test) asks for cores; a GPU profile for whole cards.
    per_node = {"cpu": str(cluster.gpus_per_node)} if cpu_only else {"nvidia.com/gpu": str(cluster.gpus_per_node)}
    quantity = {k: m.IoK8sApimachineryPkgApiResourceQuantity(v) for k, v in per_node.items()}
    trainer = m.TrainerV1alpha1Trainer(
        image=cluster.image,
        command=["python", "-m", "tasks.runtime.node", job_uri],
        numNodes=cluster.nodes,
        numProcPerNode=cluster.gpus_per_node,
        resourcesPerNode=m.IoK8sApiCoreV1ResourceRequirements(limits=quantity, requests=dict(quantity)),
        env=env,
    )
    spec = m.TrainerV1alpha1TrainJobSpec(
        runtimeRef=m.TrainerV1alpha1RuntimeRef(name=cluster.runtime, kind="ClusterTrainingRuntime", apiGroup=kf.GROUP),
        trainer=trainer,
        activeDeadlineSeconds=int(cluster.max_hours * 3600),
    )
    meta = m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=name, namespace=cluster.namespace, labels=labels)
    return m.TrainerV1alpha1TrainJob(apiVersion=kf.API_VERSION, kind=kf.TRAINJOB_KIND, metadata=meta, spec=spec)


# ----------------------------------------------------------------------------------------------
# Reading a TrainJob's status (the API server's object as a dict)
# ----------------------------------------------------------------------------------------------
def job_state(obj: dict[str, Any]) -> tuple[str, str]:
    """``(state, message)`` of a TrainJob object: ``Complete`` or ``Failed`` (a condition with status
    True, its reason and message), else ``Suspended`` or ``Running``/``Created``."""
    conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}
    for kind in ("Failed", "Complete", "Suspended"):
        c = conditions.get(kind)
        if c and c.get("status") == "True":
            return kind, f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
    jobs = (obj.get("status") or {}).get("jobsStatus") or []
    return ("Running" if any(j.get("active") for j in jobs) else "Created"), ""


class TrainJobFailed(RuntimeError):
    """The TrainJob ended Failed; the message is the job's own condition (and node 0's last log lines)."""


class KubeflowJobs:
    """Submit, follow and delete TrainJobs with the Kubeflow SDK's client (its ``TrainerClient`` for
    reading, its Kubernetes ``CustomObjectsApi`` for our own manifest). NOT TESTED HERE: no API server."""

    def __init__(self, namespace: str):
        from kubeflow.common.types import KubernetesBackendConfig
        from kubeflow.trainer import TrainerClient
        from kubeflow.trainer.constants import constants as kf

        self.kf, self.namespace = kf, namespace
        self.client = TrainerClient(KubernetesBackendConfig(namespace=namespace))  # kubeconfig or in-cluster
        self.api = self.client.backend.custom_api

    def _args(self) -> tuple[str, str, str, str]:
        return self.kf.GROUP, self.kf.VERSION, self.namespace, self.kf.TRAINJOB_PLURAL

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(*self._args(), name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def submit(self, manifest: Any, log: Any) -> str:
        """Create the TrainJob; one of the same name that still runs is followed instead, a finished one
        is replaced."""
        name = manifest.metadata.name
        existing = self.get(name)
        if existing is not None:
            state, _ = job_state(existing)
            if state in ("Running", "Created", "Suspended"):
                log.info("TrainJob %s/%s is already %s (an earlier attempt): following it", self.namespace, name, state)
                return name
            self.delete(name, log)
            while self.get(name) is not None:  # deletion is asynchronous; a create before it ends conflicts
                time.sleep(2)
        self.api.create_namespaced_custom_object(*self._args(), manifest.to_dict())
        log.info("TrainJob %s/%s submitted", self.namespace, name)
        return name

    def follow(self, name: str, poll_s: float, log: Any, on_poll: Callable[[], None] | None = None) -> None:
        """Wait for ``Complete``; raise ``TrainJobFailed`` with the job's message when it fails or vanishes."""
        said = ""
        while True:
            obj = self.get(name)
            if obj is None:
                raise TrainJobFailed(f"TrainJob {self.namespace}/{name} was deleted while the task followed it")
            state, message = job_state(obj)
            if state != said:
                log.info("TrainJob %s/%s: %s%s", self.namespace, name, state, f" ({message})" if message else "")
                said = state
            if state == "Complete":
                return
            if state == "Failed":
                raise TrainJobFailed(f"TrainJob {self.namespace}/{name} failed: {message}{self._tail(name)}")
            if on_poll:
                on_poll()
            time.sleep(poll_s)

    def _tail(self, name: str, lines: int = 15) -> str:
        try:
            logs = list(self.client.get_job_logs(name, step="node-0"))
        except Exception:  # noqa: BLE001 - pods may be gone already; the condition message stands alone
            return ""
        return ("; node-0's last lines:\n" + "\n".join(logs[-lines:])) if logs else ""

    def delete(self, name: str, log: Any) -> None:
        self.client.delete_job(name)
        log.info("TrainJob %s/%s deleted", self.namespace, name)


# ----------------------------------------------------------------------------------------------
# The SFT task's side
# ----------------------------------------------------------------------------------------------
def upload_model(store: Store, model_dir: Path, identity: str) -> str:
    """The base model's key in the store (``models/<digest of its identity>``), uploaded once."""
    key = f"models/{hashlib.sha256(identity.encode()).hexdigest()[:16]}"
    if not store.exists(f"{key}/{COMPLETE}"):
        store.upload_dir(model_dir, key)
        store.write_json(f"{key}/{COMPLETE}", {"identity": identity, "uploaded": time.time()})
    return key


def train_on_cluster(
    config: Any, dataset_uri: str, store: Store, model_dir: Path, identity: str, fp: str, profile_job: dict, out: Path
) -> dict[str, Any]:
    """Train on the cluster (module docstring) and bring the adapter to ``out``; return its metrics."""
    from tasks.core.common import run_logger

    log = run_logger()
    cluster: ClusterParams = config.cluster
    if not dataset_uri.startswith(store.root + "/"):
        raise ValueError(f"dataset {dataset_uri} is not in the artifact store {store.root}: the pods cannot read it")
    prefix = f"scratch/sft/{fp}"
    spec = {
        "root": store.root,
        "stage": "sft",
        "fingerprint": fp,
        "model": upload_model(store, model_dir, identity),
        "data": dataset_uri[len(store.root) + 1 :],
        "output": f"{prefix}/final",
        "config": config.model_dump(mode="json"),
        "profile": profile_job,
    }
    store.write_json(f"{prefix}/cluster/job.json", spec)
    labels = {"app.kubernetes.io/managed-by": "tuneline", "tuneline/stage": "sft", "tuneline/fingerprint": fp}
    endpoint = store.endpoint if store.endpoint != "AWS default" else None
    manifest = train_job(
        job_name(fp),
        cluster,
        store.uri(f"{prefix}/cluster/job.json"),
        cpu_only=profile_job.get("dtype") == "fp32",
        endpoint=endpoint,
        labels=labels,
    )
    jobs = KubeflowJobs(cluster.namespace)
    name = jobs.submit(manifest, log)
    try:
        jobs.follow(name, cluster.poll_seconds, log)
    except BaseException as e:  # cancelled or crashed: the pods must not train on for nobody
        if not isinstance(e, TrainJobFailed):
            log.warning("stopping: deleting TrainJob %s/%s (%s)", cluster.namespace, name, type(e).__name__)
            try:
                jobs.delete(name, log)
            except Exception as err:  # noqa: BLE001 - activeDeadlineSeconds still ends it
                log.warning("could not delete TrainJob %s/%s: %s", cluster.namespace, name, err)
        raise
    if not store.exists(f"{prefix}/final/{COMPLETE}"):
        raise TrainJobFailed(f"TrainJob {cluster.namespace}/{name} completed without {store.uri(prefix)}/final/")
    store.download_dir(f"{prefix}/final", out)
    (out / COMPLETE).unlink(missing_ok=True)
    store.delete_prefix(prefix)  # checkpoints, job spec, adapter copy: the stage's own folder replaces them
    return json.loads((out / "metrics.json").read_text())
