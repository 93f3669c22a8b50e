"""Training runs in a child process: ``launch_training`` starts ``python -m MODULE JOB.json`` (``torchrun``
for several processes), streams its output, and stops its whole process group when the task ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable


def launch_training(
    module: str, job: dict[str, Any], job_path: Path, nproc: int, on_progress: Callable[[], None] | None = None
) -> None:
    """Run ``python -m MODULE JOB.json`` in a child process (``torchrun`` for several processes).

    Training always runs in a child, one process too, so that a crash of training (OOM, NaN abort,
    SIGKILL) is a failed task that Prefect can retry, not a dead flow. The child's output is
    streamed to the terminal (its progress bar) and to ``JOB.log``; on failure the error carries
    its last lines. ``JOB.pid`` holds the child's process id while it runs (the child leads its own
    process group, so ``kill -- -PID`` stops torchrun and its workers). If the parent is cancelled,
    the child's whole process group is stopped."""
    job_path.write_text(json.dumps(job, indent=2))
    if nproc > 1:
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
    log_path = job_path.with_suffix(".log")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        job_path.with_suffix(".pid").write_text(str(proc.pid))
        try:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                sys.stdout.buffer.write(line)  # the trainer's progress bar reaches the terminal
                sys.stdout.flush()
                log.write(line)
                if on_progress:
                    on_progress()
            proc.wait()
        finally:
            if proc.poll() is None:  # cancelled or crashed parent: stop the whole child group
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            job_path.with_suffix(".pid").unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"training process exited with {proc.returncode}; last lines:\n" + "\n".join(tail))
