"""Cost per problem of the HumanEval sandbox (namespaces + seccomp + private folders) against running the
same honest completions without it.

The completions are HumanEval's canonical solutions (every one passes), so each row times the same
programs. Three ways to run one program, timed one problem at a time and interleaved (problem 1 in
each way, then problem 2, ...) so that a busy moment of the machine lands on all of them alike:

- ``bare``: ``python -I -B -c PROGRAM`` in a subprocess, nothing else: the baseline;
- ``plain``: the sandbox without namespaces (supervisor, rlimits, seccomp filter, uid 65534 as root);
- ``root`` / ``userns``: the sandbox as the evaluation stage runs it (pid/net/mount/ipc/uts namespaces,
  read-only root, private /tmp, seccomp filter);
- ``root-old`` / ``userns-old``: the same, but the child looks libc and libseccomp up itself, as the
  first seccomp commit did (``ctypes.util.find_library`` runs ``ldconfig -p`` twice per program).

    python bench/sandbox_cost.py                 # 40 problems, 3 rounds
    python bench/sandbox_cost.py --problems 164 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def program(problem: dict) -> str:
    """What ``check_humaneval`` runs for the canonical solution."""
    body = problem["prompt"] + problem["canonical_solution"]
    return body + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def run_bare(code: str) -> bool:
    done = subprocess.run([sys.executable, "-I", "-B", "-c", code], capture_output=True, timeout=30, cwd="/tmp")
    return done.returncode == 0


def run_without_known_libraries(sandbox, code: str, mode: str) -> bool:
    """The sandbox as first committed: the child's ``pyseccomp`` import runs ``find_library`` (``ldconfig -p``)
    for libc and libseccomp on every program."""
    known = sandbox._seccomp_libraries
    sandbox._seccomp_libraries = dict
    try:
        return sandbox._run(code, 10.0, 1024, mode).passed
    finally:
        sandbox._seccomp_libraries = known


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from tasks.evaluate import sandbox
    from tasks.evaluate.humaneval import load_humaneval

    problems = load_humaneval(limit=args.problems)
    best = sandbox.sandbox_mode()
    ways = {"bare": run_bare}
    ways["plain"] = lambda code: sandbox._run(code, 10.0, 1024, "plain").passed
    if best != "plain":
        ways[best] = lambda code: sandbox._run(code, 10.0, 1024, best).passed
        ways[f"{best}-old"] = lambda code: run_without_known_libraries(sandbox, code, best)
    times: dict[str, list[float]] = {w: [] for w in ways}
    load_before = os.getloadavg()[0]
    for w, fn in ways.items():  # warm the page cache and the interpreter's imports once each
        assert fn(program(problems[0])), f"{w}: the canonical solution failed"
    for _ in range(args.rounds):
        for problem in problems:
            code = program(problem)
            for w, fn in ways.items():
                start = time.perf_counter()
                ok = fn(code)
                times[w].append(time.perf_counter() - start)
                assert ok, f"{w}: {problem['task_id']} failed"

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} CPU cores ({cpu}), {platform.platform()}, Python {platform.python_version()}")
    print(f"{len(problems)} HumanEval problems x {args.rounds} rounds, one program at a time; sandbox mode: {best}")
    print(f"load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} (other work on the box)\n")
    base = statistics.median(times["bare"])
    print(f"{'way':<10}{'median ms':>11}{'mean ms':>10}{'p95 ms':>9}{'+ms vs bare':>13}{'x bare':>8}")
    for w, ts in times.items():
        ts = sorted(ts)
        med = statistics.median(ts)
        p95 = ts[min(len(ts) - 1, int(0.95 * len(ts)))]
        row = f"{w:<10}{med * 1e3:>11.1f}{statistics.mean(ts) * 1e3:>10.1f}{p95 * 1e3:>9.1f}"
        print(row + f"{(med - base) * 1e3:>+13.1f}{med / base:>8.2f}")


if __name__ == "__main__":
    main()
