"""After `tuneline run` is SIGKILLed (issue 28): nothing it started keeps running, on a local and an S3
root, and the next run marks the killed one Crashed and takes its stage lock at once (no ttl to wait).

The command is killed alone (`kill -9 PID`, not its process group), as an operator or the OOM killer
does: whatever it started must go by itself, through its death signal."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.test_signals import Run, _check_roles, _final_states, _preset, _survivors


def _training(run: Run, tree: dict[int, str]) -> bool:
    """Its temporary server and its trainer run."""
    try:
        _check_roles(tree)
        return True
    except AssertionError:
        return False


def _kill_alone(run: Run, ready, timeout: float = 240) -> dict[int, str]:
    """SIGKILL the command alone once ``ready(tree)``; its tree, 10 s later or once all of it is gone."""
    deadline = time.monotonic() + timeout
    seen: dict[int, str] = {}
    while not ready(run, tree := run.tree()):
        seen.update(tree)
        assert run.proc.poll() is None, f"run exited early with {run.proc.returncode}:\n{run.output()[-3000:]}"
        assert time.monotonic() < deadline, f"not ready after {timeout:.0f} s: {seen}"
        time.sleep(0.3)
    seen.update(tree)
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _survivors(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    return seen


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "artifacts")
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.bucket}/killed-{uuid.uuid4().hex[:8]}"


def test_sigkill_of_the_command_leaves_nothing_running_and_the_rerun_cleans_up(tiny_model_dir, tmp_path, root):
    """Killed while it trains (temporary server, trainer guard and trainer up), on either root."""
    preset = _preset(tmp_path, tiny_model_dir)
    settings = yaml.safe_load(preset.read_text())
    preset.write_text(yaml.safe_dump({**settings, "artifact_root": root}, sort_keys=False))
    tree = _kill_alone(Run(tmp_path, preset, "killed"), _training)
    assert not _survivors(tree), f"still running 10 s after the command was SIGKILLed: {_survivors(tree)}"
    if root.startswith("s3://"):
        return  # the rerun below is the same on either root: its locks are tested on both in test_locks.py

    rerun = Run(tmp_path, preset, "rerun")
    try:
        deadline = time.monotonic() + 150
        while "(its process is gone)" not in rerun.output():  # its SFT lock, taken over at once
            out = rerun.output()
            assert "waiting for lock" not in out, f"the rerun waits for the killed run's lock:\n{out[-3000:]}"
            assert "[tuneline.sft] starting from step 0" not in out, f"trained without the lock?\n{out[-3000:]}"
            assert time.monotonic() < deadline and rerun.proc.poll() is None, out[-3000:]
            time.sleep(0.2)
        assert "its process is gone; marked Crashed" in rerun.output()
    finally:
        os.killpg(rerun.proc.pid, signal.SIGKILL)
        rerun.proc.wait()
    states = _final_states(Path(tmp_path) / "prefect")
    assert states[0][1] == "Crashed" and "ended without recording a state" in states[0][2], states


STARTER = """
import subprocess, sys
from flows.stopping import reap_when_gone
reap_when_gone()
# as Prefect starts its own temporary server: no death signal, here even in a session of its own
child = subprocess.Popen(["sleep", sys.argv[1]], start_new_session=True)
grandchild = subprocess.Popen(["sh", "-c", f"sleep {sys.argv[1]} & echo $!"], stdout=subprocess.PIPE)
print(child.pid, grandchild.stdout.readline().decode().strip(), flush=True)
subprocess.Popen(["sleep", "600"]).wait()
"""


def test_processes_started_without_a_death_signal_die_with_the_command(tmp_path):
    """The net under the death signals: whatever the command started, by any code and however deep
    (here a child in its own session and an orphaned grandchild), is killed when it is SIGKILLed;
    a process it did not start is left alone."""
    import subprocess
    import sys

    from tests.prefect_stack import REPO

    seconds = f"{700 + os.getpid() % 1000}.5"  # unique: no other process sleeps this long
    bystander = subprocess.Popen(["sleep", seconds])
    command = subprocess.Popen(
        [sys.executable, "-c", STARTER, seconds],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        started = [int(p) for p in command.stdout.readline().split()]
        assert len(started) == 2 and all(_alive(p) for p in started), started
        os.kill(command.pid, signal.SIGKILL)
        command.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in started if _alive(p)], "a process of the SIGKILLed command is still running"
        assert bystander.poll() is None, "the watcher killed a process the command did not start"
    finally:
        bystander.kill()
        bystander.wait()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
