"""Trainers never outlive their flow (tasks/runtime/launch.py, tasks/runtime/guard.py,
tasks/artifacts/checkpoint_sync.py): real processes, real signals, torchrun with gloo workers, and the real S3
server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.artifacts.store import Store
from tests.test_sft import _cfg, _write, alpaca  # noqa: F401 - alpaca is a fixture

REPO = Path(__file__).resolve().parents[1]

# The flow's stand-in: a real Python process that calls launch_training from a worker thread, as a
# Prefect task does, and exits 0 when training succeeded (1 with the error otherwise).
FLOW = """
import json, sys, threading
from pathlib import Path
from tasks.runtime.launch import launch_training
spec = json.loads(sys.argv[1])
failed = []
def run():
    try:
        launch_training(spec["module"], spec["job"], Path(spec["job_path"]), spec["nproc"])
    except Exception as e:
        print("LAUNCH FAILED:", e, flush=True)
        failed.append(e)
t = threading.Thread(target=run)
t.start()
t.join()
sys.exit(1 if failed else 0)
"""

# A stage run as a fresh machine runs it: the sft task's body without Prefect's engine around it.
STAGE = """
import json, sys
from tasks.sft.stage import SFTParams, lora_sft
from tasks.core.stage import StageContext
from tasks.artifacts.store import StageRef
spec = json.loads(sys.argv[1])
ref = lora_sft.fn(SFTParams(**spec["cfg"]), StageRef(**spec["dataset"]), ctx=StageContext(**spec["ctx"]))
print("REF " + ref.model_dump_json(), flush=True)
"""


def _start(script: str, spec: dict, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(spec)],
        cwd=REPO,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "TUNELINE_TRAINER_GRACE_S": "5", **env},
        start_new_session=True,  # a kill of it never reaches pytest
    )


def _flow(tmp: Path, name: str, steps: int = 0, nproc: int = 1, **env: str) -> subprocess.Popen:
    scratch = tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    job = {"out": str(scratch), "name": name, "steps": steps}
    spec = {"module": "tests.launch_worker", "job": job, "job_path": str(scratch / "job.json"), "nproc": nproc}
    return _start(FLOW, spec, tmp / f"{name}.out", **env)


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Running (a zombie has ended: in a container nobody may reap an orphan)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _tree(root: int) -> list[int]:
    """``root``'s descendants now."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))):
            children.setdefault(int(st[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found


def _wait(cond, timeout: float, what: str, out: Path | None = None) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:.0f}s: {what}\n" + (out.read_text()[-3000:] if out else ""))
        time.sleep(0.05)
    return time.monotonic() - start


def _beat(scratch: Path, name: str, rank: int = 0) -> int:
    try:
        return int((scratch / f"{name}-{rank}.beat").read_text() or 0)
    except (OSError, ValueError):
        return 0


def test_sigkill_of_the_flow_stops_torchrun_and_both_gloo_workers(tmp_path):
    scratch = tmp_path / "scratch"
    flow = _flow(tmp_path, "run", nproc=2)
    try:
        _wait(
            lambda: _beat(scratch, "run", 0) > 5 and _beat(scratch, "run", 1) > 5,
            120,
            "workers train",
            tmp_path / "run.out",
        )
        tree = _tree(flow.pid)  # the guard, torchrun, its two workers
        workers = [json.loads((scratch / f"run-{r}.pid").read_text())["pid"] for r in (0, 1)]
        torchrun = int((scratch / "job.pid").read_text())
        assert set(workers) | {torchrun} <= set(tree) and len(tree) >= 4, tree
        assert (scratch / "trainer.lock").exists()

        os.kill(flow.pid, signal.SIGKILL)
        flow.wait()
        took = _wait(lambda: not [p for p in tree if _alive(p)], 15, f"every trainer process gone: {tree}")
    finally:
        for pid in _tree(flow.pid):  # never leave a trainer behind, whatever failed
            os.kill(pid, signal.SIGKILL)
    beats = (_beat(scratch, "run", 0), _beat(scratch, "run", 1))
    time.sleep(0.5)
    assert (_beat(scratch, "run", 0), _beat(scratch, "run", 1)) == beats  # nobody trains any more
    assert took < 10
    assert not (scratch / "trainer.lock").exists() and not (scratch / "job.pid").exists()
    assert "the flow process (pid %d) is gone: stopping the trainer" % flow.pid in (scratch / "job.log").read_text()


def test_a_second_launch_on_the_same_scratch_waits_while_the_first_trainer_lives(tmp_path):
    scratch = tmp_path / "scratch"
    first = _flow(tmp_path, "first")
    try:
        _wait(lambda: _beat(scratch, "first") > 3, 60, "first trains", tmp_path / "first.out")
        job = (scratch / "job.json").read_text()

        # with a short timeout: it fails, naming the holder, and starts nothing
        late = _flow(tmp_path, "late", steps=3, TUNELINE_TRAINER_LOCK_TIMEOUT_S="2")
        assert late.wait(60) == 1
        out = (tmp_path / "late.out").read_text()
        assert "is still locked after 2s by trainer guard of" in out and f"flow pid {first.pid}" in out, out
        assert not (scratch / "late-0.pid").exists() and (scratch / "job.json").read_text() == job

        # with the default timeout: it waits, and starts once the first trainer is gone
        second = _flow(tmp_path, "second", steps=5)
        _wait(lambda: "waiting: another trainer holds" in (tmp_path / "second.out").read_text(), 60, "second waits")
        time.sleep(1)
        assert second.poll() is None and not (scratch / "second-0.pid").exists()
        assert (scratch / "job.json").read_text() == job  # the running trainer's job is untouched
        first_worker = json.loads((scratch / "first-0.pid").read_text())["pid"]
        os.kill(first.pid, signal.SIGKILL)
        assert second.wait(90) == 0, (tmp_path / "second.out").read_text()
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None:
                for pid in _tree(proc.pid):
                    os.kill(pid, signal.SIGKILL)
    assert _beat(scratch, "second") == 5
    assert not _alive(first_worker)
    # the first trainer's last beat came before the second trainer started
    assert (scratch / "first-0.beat").stat().st_mtime <= (scratch / "second-0.pid").stat().st_mtime
    assert json.loads((scratch / "job.json").read_text())["name"] == "second"


def test_a_killed_guard_takes_its_trainer_along_and_frees_the_scratch_at_once(tmp_path):
    scratch = tmp_path / "scratch"
    flow = _flow(tmp_path, "first")
    _wait(lambda: _beat(scratch, "first") > 3, 60, "first trains", tmp_path / "first.out")
    worker = json.loads((scratch / "first-0.pid").read_text())
    guard = worker["ppid"]
    assert "tasks.runtime.guard" in Path(f"/proc/{guard}/cmdline").read_text()
    os.kill(guard, signal.SIGKILL)  # no cleanup possible: the trainer's death signal must do it
    assert flow.wait(30) == 1
    assert "training process exited with -9" in (tmp_path / "first.out").read_text()
    _wait(lambda: not _alive(worker["pid"]), 10, "the trainer follows its guard")
    assert (scratch / "trainer.lock").exists()  # left behind, with a dead holder and no trainer

    second = _flow(tmp_path, "second", steps=3)
    assert second.wait(60) == 0, (tmp_path / "second.out").read_text()  # no ttl (5 min) to wait
    assert "took over the lock of a dead guard" in (tmp_path / "second.out").read_text()
    assert _beat(scratch, "second") == 3


def _remote_steps(store: Store) -> list[int]:
    keys = [k for k in store.list("scratch/sft") if k.endswith("/_COMPLETE") and "/checkpoints/" in k]
    return sorted(int(k.split("/")[-2].split("-")[1]) for k in keys)


def test_s3_retry_on_a_fresh_machine_resumes_from_the_stored_checkpoint(tmp_path, tiny_model_dir, alpaca, s3_server):  # noqa: F811
    store = Store(f"s3://{s3_server.bucket}/{tmp_path.name}")
    data = _write(tmp_path / "data", alpaca[:24], alpaca[24:26])
    cfg = _cfg(max_steps=20, save_steps=4, eval_steps=1000, gradient_accumulation_steps=2)
    spec = {
        "cfg": cfg.model_dump(mode="json"),
        "dataset": {"stage": "data", "fingerprint": "test-data", "uri": str(data)},
        "ctx": {"base_model": str(tiny_model_dir), "base_revision": "test", "root": store.root},
    }
    fast = {"TUNELINE_CHECKPOINT_SYNC_S": "0.2", "TUNELINE_LOCK_TTL_S": "4"}  # the killed run's stage lock: 4 s

    first = _start(STAGE, spec, tmp_path / "first.out", TUNELINE_CACHE=str(tmp_path / "machine-a"), **fast)
    try:
        _wait(lambda: _remote_steps(store), 300, "a checkpoint in the store", tmp_path / "first.out")
        tree = _tree(first.pid)
        os.kill(first.pid, signal.SIGKILL)  # the machine goes away
        first.wait()
        _wait(lambda: not [p for p in tree if _alive(p)], 15, "the first trainer stops")
    finally:
        for pid in _tree(first.pid):
            os.kill(pid, signal.SIGKILL)
    steps = _remote_steps(store)
    assert len(steps) == 1 and 0 < steps[0] < 20, steps  # older copies are pruned
    assert "REF" not in (tmp_path / "first.out").read_text()  # it did not finish

    machine_b = tmp_path / "machine-b"  # empty: nothing local to resume from
    second = _start(STAGE, spec, tmp_path / "second.out", TUNELINE_CACHE=str(machine_b), **fast)
    assert second.wait(300) == 0, (tmp_path / "second.out").read_text()[-3000:]
    out = (tmp_path / "second.out").read_text()
    ref = json.loads(out.split("REF ", 1)[1].splitlines()[0])
    assert f"[tuneline.sft] resuming from checkpoint-{steps[0]}" in out
    assert ref["metrics"]["resumed_from_step"] == steps[0] and ref["metrics"]["global_step"] == 20
    assert ref["uri"].startswith(store.root) and store.exists(f"stages/sft/{ref['fingerprint']}/_SUCCESS")
    assert _remote_steps(store) == []  # trained and published: the copies are gone


# A trainer that draws a progress bar as tqdm does: the line is redrawn with \r and ends only when done.
PROGRESS_TRAINER = """
import json, sys, time
from pathlib import Path
go = Path(json.loads(Path(sys.argv[1]).read_text())["go"])
sys.stdout.write("training: step 1/2\\r"); sys.stdout.flush()
while not go.exists():
    time.sleep(0.1)
sys.stdout.write("training: step 2/2\\n"); sys.stdout.flush()
"""


def test_the_trainers_progress_bar_reaches_the_terminal_as_it_moves(tmp_path):
    (tmp_path / "progress_trainer.py").write_text(PROGRESS_TRAINER)
    go, log = tmp_path / "go", tmp_path / "flow.log"
    spec = {"module": "progress_trainer", "job": {"go": str(go)}, "job_path": str(tmp_path / "job.json"), "nproc": 1}
    proc = _start(FLOW, spec, log, PYTHONPATH=str(tmp_path))
    try:
        # the half-drawn line is on the terminal while the trainer is still at step 1 (it waits for `go`)
        deadline = time.monotonic() + 120
        while b"step 1/2" not in log.read_bytes():
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, f"no progress relayed: {log.read_bytes()!r}"
            time.sleep(0.2)
        go.touch()
        assert proc.wait(timeout=120) == 0, log.read_text(errors="replace")
        assert b"training: step 1/2\rtraining: step 2/2\n" in log.read_bytes()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
