"""Training runs in a child process: ``launch_training`` starts ``python -m MODULE JOB.json`` (``torchrun``
for several processes) under a guard (``tasks/runtime/guard.py``), streams its output, and makes sure the trainer
never outlives the flow and never runs twice on one scratch folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tasks.artifacts.tracking import child_env
from tasks.runtime.guard import die_with_parent

# Seconds a trainer gets between SIGTERM and SIGKILL when its flow goes away or is cancelled.
DEFAULT_GRACE_S = 30.0
# Seconds a launch waits for the scratch folder's lock (another trainer there) before failing.
DEFAULT_LOCK_TIMEOUT_S = 600.0


def _setting(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


@dataclass(frozen=True)
class Rendezvous:
    """Where this node meets the others: torchrun's ``--nnodes/--node-rank/--master-addr/--master-port``,
    the values Kubeflow Trainer's torch runtime hands every pod as ``PET_*`` (tasks/runtime/node.py reads them).
    torchrun's static rendezvous: node 0 hosts the TCP store, ranks follow the node rank."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    def torchrun_args(self, nproc: int) -> list[str]:
        return [
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={nproc}",
            f"--node-rank={self.node_rank}",
            f"--master-addr={self.master_addr}",
            f"--master-port={self.master_port}",
        ]


def launch_training(
    module: str,
    job: dict[str, Any],
    job_path: Path,
    nproc: int,
    on_progress: Callable[[], None] | None = None,
    rendezvous: Rendezvous | None = None,
) -> None:
    """Run ``python -m MODULE JOB.json`` in a child process (``torchrun`` for several processes).

    Training always runs in a child, one process too, so that a crash of training (OOM, NaN abort,
    SIGKILL) is a failed task that Prefect can retry, not a dead flow. The child's output is
    streamed to the terminal (its progress bar) and to ``JOB.log``; on failure the error carries
    its last lines. ``JOB.pid`` holds the trainer's process id while it runs (it leads its own
    process group, so ``kill -- -PID`` stops torchrun and its workers).

    The trainer runs under ``python -m tasks.runtime.guard``, which holds the lock of JOB.json's folder while
    the trainer lives (a second launch there waits, ``TUNELINE_TRAINER_LOCK_TIMEOUT_S``, then fails)
    and stops the trainer's whole process group (SIGTERM, ``TUNELINE_TRAINER_GRACE_S``, SIGKILL) when
    this process dies — by SIGKILL too — or the launch is cancelled.

    ``rendezvous``: one node of several (tasks/runtime/node.py): ``torchrun`` joins the other nodes instead of
    ``--standalone``, with ``nproc`` processes here."""
    if rendezvous is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", *rendezvous.torchrun_args(nproc), "-m", module]
        cmd.append(str(job_path))
    elif nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--standalone",
            "-m",
            module,
            str(job_path),
        ]
    else:
        cmd = [sys.executable, "-m", module, str(job_path)]
    # The job goes aside first; the guard moves it into place under the lock, so a launch that
    # waits for another trainer never rewrites the job file that trainer runs.
    pending = job_path.with_name(f".{job_path.name}.{uuid.uuid4().hex[:12]}.pending")
    pending.write_text(json.dumps(job, indent=2))
    log_path = job_path.with_suffix(".log")
    grace = _setting("TUNELINE_TRAINER_GRACE_S", DEFAULT_GRACE_S)
    guard = [
        sys.executable,
        "-m",
        "tasks.runtime.guard",
        f"--parent={os.getpid()}",
        f"--lock-dir={job_path.parent}",
        f"--pid-file={job_path.with_suffix('.pid')}",
        f"--job={job_path}",
        f"--pending={pending}",
        f"--log={log_path}",
        f"--grace={grace}",
        f"--lock-timeout={_setting('TUNELINE_TRAINER_LOCK_TIMEOUT_S', DEFAULT_LOCK_TIMEOUT_S)}",
        "--",
        *cmd,
    ]
    env = {
        **os.environ,
        **child_env(),  # inside a tracked stage: the trainer's report_to logs into its nested MLflow run
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    tail: deque[bytes] = deque(maxlen=15)  # this launch's own lines (JOB.log may hold another's too)
    with open(log_path, "ab") as log:
        # Its own session: a kill of this process's group (Ctrl-C, a worker's killpg) must leave the
        # guard alive to stop the trainer. The death signal reaches it when this thread ends.
        proc = subprocess.Popen(
            guard,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            assert proc.stdout is not None
            partial = b""
            # Whatever the trainer wrote, as it comes (read1, not readline): a progress bar redraws its
            # line with carriage returns and ends it only when done, so a line-wise relay sat silent.
            while chunk := proc.stdout.read1(65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                tail.extend(line + b"\n" for line in lines)
                if on_progress:
                    on_progress()
            if partial:
                tail.append(partial)
            proc.wait()
        finally:
            if proc.poll() is None:  # cancelled or crashed parent: the guard stops the trainer's group
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace + 15)
                except subprocess.TimeoutExpired:  # the trainer gets SIGTERM from its own death signal
                    proc.kill()
                    proc.wait()
            pending.unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = b"".join(tail).decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"training process exited with {proc.returncode}; last lines:\n" + "\n".join(lines))
