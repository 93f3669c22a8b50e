"""A stand-in trainer for tests/test_launch.py: ``python -m tests.launch_worker JOB.json`` (or under torchrun).

Under torchrun it joins a gloo group and loops on ``all_reduce``, like a training step; alone it just
loops. Each process records its pid and its parent's in ``<out>/<name>-<rank>.pid`` and bumps
``<out>/<name>-<rank>.beat`` every step, so a test can see which trainer runs and check that every
process is gone. ``steps`` ends it (0: run until killed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out, name, steps = Path(job["out"]), job["name"], int(job.get("steps", 0))
    distributed = "RANK" in os.environ
    if distributed:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, tensor = dist.get_rank(), torch.ones(1)
    else:
        rank = 0
    (out / f"{name}-{rank}.pid").write_text(json.dumps({"pid": os.getpid(), "ppid": os.getppid()}))
    print(f"[worker {name}] rank {rank} started", flush=True)
    step = 0
    while not steps or step < steps:
        if distributed:
            dist.all_reduce(tensor)
        step += 1
        (out / f"{name}-{rank}.beat").write_text(str(step))
        time.sleep(0.05)
    print(f"[worker {name}] rank {rank} done after {step} steps", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
