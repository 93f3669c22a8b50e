"""Stopping `tuneline run` (flows/stopping.py): real signals sent to the real command, run as a user runs it.

Ctrl-C is sent as a terminal sends it, to the command's whole process group; the command is started
with SIGINT ignored, as `cmd &` in a script starts it, which is how it once ignored Ctrl-C. The
final state is read from the temporary server's SQLite database in PREFECT_HOME after the command
has exited: that is the server these runs use, and reading it afterwards shows the state was written
before the server stopped (a separate real server would test another path: PREFECT_API_URL set)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.prefect_stack import REPO, tiny_preset


def _preset(tmp: Path, model_dir: Path) -> Path:
    """The tiny preset, trained long enough (20 000 steps) to be interrupted, checkpointing every 3 steps."""
    path = tiny_preset(tmp / "preset.yaml", model_dir, tmp / "artifacts")
    preset = yaml.safe_load(path.read_text())
    preset["sft"].update(max_steps=20_000, save_steps=3, eval_steps=20_000, logging_steps=50)
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    return path


class Run:
    """`python -m flows.cli run --preset P` in its own process group, output to a file."""

    def __init__(self, tmp: Path, preset: Path, name: str):
        self.tmp, self.out_path = tmp, tmp / f"{name}.out"
        env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)  # the command starts its temporary server
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flows.cli", "run", "--preset", str(preset)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own, as a terminal gives a foreground job
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `cmd &` in a script
            )

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for_checkpoint(self, timeout: float = 150) -> None:
        """Training has started (the trainer's job.pid exists) and a complete checkpoint is on disk."""
        deadline = time.monotonic() + timeout
        scratch = self.tmp / "artifacts" / "scratch" / "sft"
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"run exited early with {self.proc.returncode}:\n{self.output()[-3000:]}"
            if list(scratch.glob("*/job.pid")) and list(scratch.glob("*/checkpoint-*/_COMPLETE")):
                return
            time.sleep(0.2)
        raise TimeoutError(f"no checkpoint after {timeout:.0f} s:\n{self.output()[-3000:]}")

    def tree(self) -> dict[int, str]:
        """Every descendant of the command: pid -> command line (the trainer, the temporary server)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(stat.parent.name))
        found, todo = {}, [self.proc.pid]
        while todo:
            for pid in children.get(todo.pop(), []):
                found[pid] = _cmdline(pid)
                todo.append(pid)
        return found

    def stop(self, sig: int, timeout: float) -> tuple[int, float]:
        os.killpg(self.proc.pid, sig)  # the whole foreground group, as a terminal's Ctrl-C
        start = time.monotonic()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"still running {timeout} s after {signal.Signals(sig).name}:\n{self.output()[-3000:]}")
        return rc, time.monotonic() - start


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _survivors(tree: dict[int, str]) -> dict[int, str]:
    """The processes of ``tree`` still running (same pid and command line: not a reused pid)."""
    return {pid: cmd for pid, cmd in tree.items() if _cmdline(pid) == cmd and not _zombie(pid)}


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _final_states(prefect_home: Path) -> list[tuple[str, str, str]]:
    """(flow run name, state name, state message) of every flow run, oldest first."""
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return db.execute(
            "SELECT f.name, s.name, s.message FROM flow_run f JOIN flow_run_state s ON s.id = f.state_id "
            "ORDER BY f.created"
        ).fetchall()


def _check_roles(tree: dict[int, str]) -> None:
    assert any("-m tasks.sft.stage" in c for c in tree.values()), f"no trainer among {tree}"
    assert any("prefect.server.api.server:create_app" in c for c in tree.values()), f"no temporary server in {tree}"


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir, tmp_path_factory) -> dict:
    """A run stopped by Ctrl-C once a checkpoint is complete."""
    tmp = tmp_path_factory.mktemp("signals")
    preset = _preset(tmp, tiny_model_dir)
    run = Run(tmp, preset, "first")
    run.wait_for_checkpoint()
    tree = run.tree()
    rc, took = run.stop(signal.SIGINT, timeout=60)
    time.sleep(1)  # a process the command left behind would still be there now
    return {"tmp": tmp, "preset": preset, "rc": rc, "took": took, "tree": tree, "output": run.output()}


def test_ctrl_c_stops_everything_and_the_run_is_cancelled(interrupted):
    out = interrupted["output"]
    assert interrupted["rc"] == 130, out[-3000:]
    assert interrupted["took"] < 30, f"took {interrupted['took']:.1f} s"
    _check_roles(interrupted["tree"])
    assert not _survivors(interrupted["tree"]), f"left running: {_survivors(interrupted['tree'])}"
    assert out.rstrip().splitlines()[-1] == (
        "retrain cancelled: interrupted by the user (SIGINT); rerun the same command to resume"
    )
    states = _final_states(interrupted["tmp"] / "prefect")
    assert [(s, m) for _, s, m in states] == [("Cancelled", "interrupted by the user (SIGINT)")], states


def test_rerun_resumes_and_sigterm_stops_everything(interrupted):
    tmp = interrupted["tmp"]
    run = Run(tmp, interrupted["preset"], "rerun")
    deadline = time.monotonic() + 150
    while "[tuneline.sft] resuming from checkpoint-" not in run.output():
        assert "[tuneline.sft] starting from step 0" not in run.output(), run.output()[-3000:]
        assert time.monotonic() < deadline and run.proc.poll() is None, run.output()[-3000:]
        time.sleep(0.2)
    run.wait_for_checkpoint()
    tree = run.tree()
    _check_roles(tree)
    rc, took = run.stop(signal.SIGTERM, timeout=60)
    time.sleep(1)
    assert rc == 143, run.output()[-3000:]
    assert took < 30, f"took {took:.1f} s"
    assert not _survivors(tree), f"left running: {_survivors(tree)}"
    states = _final_states(tmp / "prefect")
    assert [(s, m) for _, s, m in states][-1] == ("Cancelled", "terminated (SIGTERM)"), states


def test_a_second_ctrl_c_ends_at_once(tiny_model_dir, tmp_path):
    """The second Ctrl-C does not wait for the first one's cleanup; still nothing is left running."""
    run = Run(tmp_path, _preset(tmp_path, tiny_model_dir), "twice")
    deadline = time.monotonic() + 150
    while not list((tmp_path / "artifacts" / "scratch" / "sft").glob("*/job.pid")):
        assert time.monotonic() < deadline and run.proc.poll() is None, run.output()[-3000:]
        time.sleep(0.2)
    tree = run.tree()
    os.killpg(run.proc.pid, signal.SIGINT)
    time.sleep(0.2)  # inside the first one's cleanup (stopping the trainer, recording the run)
    rc, took = run.stop(signal.SIGINT, timeout=10)
    time.sleep(1)
    assert rc == 130, run.output()[-3000:]
    assert not _survivors(tree), f"left running: {_survivors(tree)}"
    assert "retrain stopped at once (SIGINT again)" in run.output()
