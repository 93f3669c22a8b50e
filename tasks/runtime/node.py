"""The entry point of one training node of a multi-node SFT run: ``python -m tasks.runtime.node JOB_URI``.

Every pod of a Kubeflow Trainer ``TrainJob`` (tasks/runtime/cluster.py builds it) runs this command; by hand,
two shells on two machines (or one, as the tests do on 127.0.0.1) do the same. The node:

1. reads where it meets the others from the environment contract of Kubeflow Trainer's torch runtime
   (pkg/runtime/framework/plugins/torch in kubeflow/trainer): ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
   ``PET_NODE_RANK`` (the pod's completion index), ``PET_MASTER_ADDR`` (node 0's pod),
   ``PET_MASTER_PORT``; a missing or malformed one is a one-line error naming it;
2. reads the job spec at ``JOB_URI`` (JSON, written by the flow's SFT task: the store's root, the
   stage and fingerprint, the keys of the base model and the dataset in the store, the SFT config
   and the resolved hardware profile), and fetches the model and data from the store into a local
   folder (``TUNELINE_NODE_DIR``, default ``~/.cache/tuneline/node``), once;
3. resumes from the store's newest complete checkpoint (tasks/artifacts/checkpoint_sync.py): with an ``s3://``
   root the node's own scratch folder is emptied first, so every node starts from the same step —
   the store is the only truth, and a node on a new machine resumes like the others;
4. trains with the same code as one machine (``tasks.sft.stage``), through ``launch_training``: torchrun
   with ``--nnodes/--node-rank/--master-addr/--master-port`` (its static rendezvous on node 0's TCP
   store, what ``torchrun`` does with the ``PET_*`` values on a pod) under the trainer guard;
   complete checkpoints go to the store while it trains (the node holding global rank 0 writes them);
5. the node that holds global rank 0 uploads the adapter to the job's ``output`` key, ``_COMPLETE``
   last.

A local root (a folder every node sees, e.g. one machine with two GPUs: bench/two_node.sh) works
too: model, data and checkpoints are then read and written in place, and nothing is copied.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from tasks.artifacts.checkpoint_sync import CheckpointSync
from tasks.artifacts.store import Store, StoreError, local_cache_dir
from tasks.runtime.launch import Rendezvous, launch_training

PET = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
COMPLETE = "_COMPLETE"  # written last into a folder the flow or a node puts in the store


class NodeError(ValueError):
    """The node's environment or job spec is not usable; the message names what."""


def _int(env: Mapping[str, str], name: str, low: int, high: int | None = None) -> int:
    raw = env[name].strip()
    if not raw.isdigit() or int(raw) < low or (high is not None and int(raw) > high):
        bound = f"{low}..{high}" if high is not None else f"≥ {low}"
        raise NodeError(f"{name}={raw!r}: expected an integer {bound}")
    return int(raw)


def rendezvous_from_env(env: Mapping[str, str] = os.environ) -> tuple[Rendezvous, int]:
    """The rendezvous and processes per node from the ``PET_*`` variables (see the module docstring).

    >>> rdzv, nproc = rendezvous_from_env({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
    ...     "PET_MASTER_ADDR": "j-node-0-0.j", "PET_MASTER_PORT": "29400"})
    >>> rdzv.torchrun_args(nproc)[:3]
    ['--nnodes=2', '--nproc-per-node=8', '--node-rank=1']
    >>> try:
    ...     rendezvous_from_env({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1"})
    ... except NodeError as e:
    ...     print(str(e)[:62])
    PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT not set: Kubef
    """
    missing = [name for name in PET if not env.get(name, "").strip()]
    if missing:
        raise NodeError(
            f"{', '.join(missing)} not set: Kubeflow Trainer's torch runtime sets them on every pod; "
            'by hand, set all five (docs/operating.md, "Multi-node SFT")'
        )
    nnodes = _int(env, "PET_NNODES", 1, 1024)
    # numProcPerNode "auto" (the runtime's default when the TrainJob gives none) is not used here:
    # tasks/runtime/cluster.py always sets the number, so the global batch is known before the pods start.
    nproc = _int(env, "PET_NPROC_PER_NODE", 1, 64)
    rank = _int(env, "PET_NODE_RANK", 0, nnodes - 1)
    port = _int(env, "PET_MASTER_PORT", 1, 65535)
    return Rendezvous(nnodes, rank, env["PET_MASTER_ADDR"].strip(), port), nproc


def read_job(job_uri: str) -> dict[str, Any]:
    """The job spec at ``JOB_URI`` (``s3://bucket/prefix/.../job.json`` or a local path)."""
    parent, _, name = job_uri.rstrip("/").rpartition("/")
    if not parent or not name:
        raise NodeError(f"JOB_URI {job_uri!r}: expected s3://bucket/key/job.json or a path to job.json")
    try:
        job = Store(parent).read_json(name)
    except (FileNotFoundError, StoreError) as e:
        raise NodeError(f"JOB_URI {job_uri}: cannot read the job spec ({e})") from None
    missing = [
        k for k in ("root", "stage", "fingerprint", "model", "data", "output", "config", "profile") if k not in job
    ]
    if missing:
        raise NodeError(f"job spec {job_uri}: missing {', '.join(missing)}")
    return job


def _fetch(store: Store, key: str, dest: Path, marker: str) -> Path:
    """A local copy of the store folder ``key`` (once: ``dest`` is complete when it has ``marker``)."""
    if (dest / marker).exists():
        return dest
    if not store.exists(f"{key}/{marker}"):
        raise NodeError(f"{store.uri(key)} has no {marker}: the flow's SFT task puts it there before submitting")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    store.download_dir(key, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return dest


def run_node(job_uri: str, env: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """Train this node's part of the job (see the module docstring); the metrics on the node that
    wrote the adapter, else None."""
    rdzv, nproc = rendezvous_from_env(env)
    job = read_job(job_uri)
    store = Store(job["root"])  # endpoint and credentials from the environment (the pod's Secret)
    stage, fp = job["stage"], job["fingerprint"]
    say = lambda msg: print(f"[tuneline.node {rdzv.node_rank}/{rdzv.nnodes}] {msg}", flush=True)  # noqa: E731
    say(f"job {job_uri}; rendezvous {rdzv.master_addr}:{rdzv.master_port}; {nproc} process(es) here")
    if store.is_s3:
        work = Path(env.get("TUNELINE_NODE_DIR") or local_cache_dir() / "node") / f"{stage}-{fp}"
        model_dir = _fetch(store, job["model"], work / "model", COMPLETE)
        data_dir = _fetch(store, job["data"], work / "data", "_SUCCESS")
        scratch = work / "scratch"
        shutil.rmtree(scratch, ignore_errors=True)  # the store's checkpoints are the only truth (step 3)
        scratch.mkdir(parents=True)
    else:  # a root every node sees: read and write in place
        model_dir, data_dir = store.local_path(job["model"]), store.local_path(job["data"])
        scratch = store.scratch_dir(stage, fp)
    train_job = {
        "config": job["config"],
        "model_dir": str(model_dir),
        "data_dir": str(data_dir),
        "scratch_dir": str(scratch),
        "output_dir": str(scratch / "final"),
        "profile": job["profile"],
    }
    # The guard locks the job file's folder: one per node, since on a shared root the nodes share scratch.
    job_path = scratch / f"node-{rdzv.node_rank}" / "job.json"
    job_path.parent.mkdir(parents=True, exist_ok=True)
    with CheckpointSync(store, stage, fp, scratch) as sync:
        if sync.in_store >= 0:
            say(f"checkpoint-{sync.in_store} restored from {store.uri(sync.prefix)}")
        launch_training("tasks.sft.stage", train_job, job_path, nproc, rendezvous=rdzv)
    final = scratch / "final"
    if not (final / "metrics.json").exists() or (not store.is_s3 and rdzv.node_rank != 0):
        # global rank 0 trains elsewhere (its node uploads), or the nodes share a local root
        say("trained; the node holding rank 0 uploads the adapter")
        return None
    metrics = json.loads((final / "metrics.json").read_text())
    if store.is_s3:
        store.delete(f"{job['output']}/{COMPLETE}")
        store.upload_dir(final, job["output"])
        store.write_json(f"{job['output']}/{COMPLETE}", {"uploaded": time.time(), "metrics": metrics})
    say(f"adapter in {store.uri(job['output'])}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            "usage: python -m tasks.runtime.node JOB_URI   (with the PET_* variables set; see the docstring)",
            file=sys.stderr,
        )
        return 2
    try:
        run_node(args[0])
    except NodeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except (RuntimeError, StoreError) as e:  # the trainer failed (its last lines are in the message), or the store
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
