"""Two runs, one fingerprint: the store lock (tasks/artifacts/locks.py) and run_stage under it, on local disk and
on a real S3 server (SeaweedFS), with racing threads, racing processes and killed holders. Two real
``tuneline run`` at once: tests/test_concurrent_runs.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tasks.artifacts.locks import (
    LockLost,
    LockTimeout,
    PreconditionFailed,
    StoreLock,
    delete_if,
    put_if,
    read_versioned,
)
from tasks.artifacts.store import Store
from tasks.core.stage import StageContext, Workspace, run_stage
from tasks.release.ops import ops_lock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quick_locks(monkeypatch):
    """Heartbeats (and so polls) every half second: a waiter notices a release quickly."""
    monkeypatch.setenv("TUNELINE_LOCK_HEARTBEAT_S", "0.5")


def _python(code: str, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TUNELINE_LOCK_HEARTBEAT_S": "0.5", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}  # None: unset
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
    )


def _old_lock(owner: str, seconds_ago: float, ttl_s: float) -> bytes:
    stamp = (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).isoformat()
    fields = {"owner": owner, "host": "gone", "pid": 1, "acquired": stamp, "heartbeat": stamp, "ttl_s": ttl_s}
    return json.dumps({**fields, "token": owner}).encode()


# -- conditional writes --------------------------------------------------------------------------
def test_conditional_create_replace_and_delete(store):
    v1 = put_if(store, "cas/x", b"one")
    with pytest.raises(PreconditionFailed, match="cas/x"):
        put_if(store, "cas/x", b"two")  # create: it exists
    v2 = put_if(store, "cas/x", b"two", version=v1)  # replace: still v1
    with pytest.raises(PreconditionFailed):
        put_if(store, "cas/x", b"three", version=v1)  # replace: no longer v1
    with pytest.raises(PreconditionFailed):
        put_if(store, "cas/missing", b"x", version=v1)  # replace: nothing to replace
    with pytest.raises(PreconditionFailed):
        delete_if(store, "cas/x", v1)
    assert read_versioned(store, "cas/x") == (b"two", v2)
    delete_if(store, "cas/x", v2)
    assert read_versioned(store, "cas/x") is None


def _race(n: int, attempt) -> list[int]:
    """Run ``attempt(i)`` in n threads released at once; the indices that returned True."""
    barrier, won = threading.Barrier(n), []

    def run(i: int) -> None:
        barrier.wait()
        if attempt(i):
            won.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_racing_conditional_writes_have_exactly_one_winner(store):
    """Measured against the server, not assumed: 8 clients at once, 5 times, for create and for
    compare-and-swap. Each thread has its own client (its own connections). SeaweedFS queues
    concurrent conditional writes to one key and answers the losers 412 within about 1-3 s."""
    stores = [Store(store.root) for _ in range(8)]
    for s in stores:
        s.exists("warm-up")  # connect before the race

    def attempt(write):
        def run(i):
            try:
                write(stores[i], i)
                return True
            except PreconditionFailed:
                return False

        return run

    for trial in range(5):
        key = f"race/create-{trial}"
        won = _race(8, attempt(lambda s, i: put_if(s, key, f"writer {i}".encode())))
        assert len(won) == 1 and read_versioned(store, key)[0] == f"writer {won[0]}".encode()
        version = read_versioned(store, key)[1]
        won = _race(8, attempt(lambda s, i: put_if(s, key, f"swap {i}".encode(), version=version)))
        assert len(won) == 1 and read_versioned(store, key)[0] == f"swap {won[0]}".encode()


# -- the lock --------------------------------------------------------------------------------------
def test_racing_threads_exactly_one_acquires_and_a_stale_lock_has_one_taker(store):
    for trial in range(5):
        locks = [StoreLock(Store(store.root), f"locks/t/{trial}", owner=f"thread {i}") for i in range(6)]
        won = _race(6, lambda i: locks[i].try_acquire())
        assert len(won) == 1
        assert store.read_json(f"locks/t/{trial}")["owner"] == f"thread {won[0]}"
        locks[won[0]].release()
        assert not store.exists(f"locks/t/{trial}")
    put_if(store, "locks/t/stale", _old_lock("killed run", seconds_ago=3600, ttl_s=60))
    takers = [StoreLock(Store(store.root), "locks/t/stale", owner=f"taker {i}") for i in range(6)]
    won = _race(6, lambda i: takers[i].try_acquire())
    assert len(won) == 1 and takers[won[0]].holder().owner == f"taker {won[0]}"
    takers[won[0]].release()


RACER = """
import sys, time
from tasks.artifacts.store import Store
from tasks.artifacts.locks import StoreLock
store, start, owner = Store(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
store.exists("warm-up")
for trial in range(5):
    lock = StoreLock(store, f"locks/p/{trial}", owner=owner, heartbeat_s=60)
    while time.time() < start + trial * 0.5:
        pass
    if lock.try_acquire():
        print("won", trial, flush=True)  # and keep it: a late process must not get it either
"""


def test_racing_processes_exactly_one_acquires(store):
    start = time.time() + 8  # every process imported and connected by then
    procs = [_python(RACER, store.root, str(start), f"process {i}") for i in range(4)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode()[-2000:] for _, err in outputs]
    wins = sorted(line for out, _ in outputs for line in out.decode().splitlines())
    assert wins == [f"won {trial}" for trial in range(5)]  # each trial: one process, exactly
    for trial in range(5):
        assert store.read_json(f"locks/p/{trial}")["owner"].startswith("process ")


def test_a_busy_lock_times_out_naming_the_key_and_holder(store):
    holder = StoreLock(store, "locks/busy", owner="nightly run 7")
    with holder:
        with pytest.raises(LockTimeout) as err:
            StoreLock(store, "locks/busy", owner="manual run", timeout_s=1, poll_s=0.2).acquire()
    assert "locks/busy" in str(err.value) and "nightly run 7" in str(err.value)
    assert not store.exists("locks/busy")


def test_an_old_heartbeat_is_taken_over_and_the_old_holder_cannot_publish(store):
    put_if(store, "locks/old", _old_lock("killed run", seconds_ago=120, ttl_s=60))
    lock = StoreLock(store, "locks/old", owner="new run", timeout_s=5)
    with lock:
        assert lock.holder().owner == "new run"
    # a holder whose heartbeat stopped (a frozen process) loses its lock to the next run
    frozen = StoreLock(store, "locks/frozen", owner="frozen", ttl_s=0.5, heartbeat_s=3600)
    assert frozen.try_acquire()
    time.sleep(0.7)
    taker = StoreLock(store, "locks/frozen", owner="taker", ttl_s=0.5)
    assert taker.try_acquire()
    with pytest.raises(LockLost, match="taker"):
        frozen.check()
    frozen.release()  # deletes only its own lock: the taker's stays
    assert taker.holder().owner == "taker"
    taker.release()


HOLDER = """
import sys, time
from tasks.artifacts.store import Store
from tasks.artifacts.locks import StoreLock
lock = StoreLock(Store(sys.argv[1]), "locks/killed", owner="child", ttl_s=2, heartbeat_s=0.3).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_heartbeat_keeps_a_long_holder_alive_and_a_sigkilled_holder_is_taken_over(store):
    child = _python(HOLDER, store.root, start_new_session=True)
    try:
        assert child.stdout.readline().decode().strip() == "held", child.stderr.read().decode()[-2000:]
        waiter = StoreLock(store, "locks/killed", owner="parent", poll_s=0.2)
        deadline = time.monotonic() + 4  # twice the ttl: only the heartbeat keeps it
        while time.monotonic() < deadline:
            assert not waiter.try_acquire(), "took a live lock"
            time.sleep(0.2)
        assert waiter.holder().owner == "child"
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        killed_at = time.monotonic()
        waiter.timeout_s = 30
        with waiter:
            waited = time.monotonic() - killed_at
            assert waiter.holder().owner == "parent"
        assert waited < 1.5, f"took over after {waited:.1f}s: its process is gone, no need to wait the ttl (2s)"
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


# -- run_stage under the lock ----------------------------------------------------------------------
def test_two_concurrent_run_stage_threads_build_once_and_return_the_same_ref(store):
    ctx = StageContext(base_model="m", root=store.root)
    builds = []

    def build(work: Workspace) -> dict:
        builds.append(work)
        time.sleep(1.5)  # long enough for the other run to arrive and wait
        work.out.mkdir(exist_ok=True)
        (work.out / "result.txt").write_text("done")
        return {"rows": 3}

    for resumable in (False, True):
        refs = {}
        fp = f"fp-threads-{resumable}"

        def run(i: int) -> bool:
            refs[i] = run_stage("demo", fp, ctx, build, resumable=resumable, store=Store(store.root))
            return True

        _race(2, run)
        assert refs[0] == refs[1] and refs[0].digest
        assert not store.exists(f"locks/demo/{fp}")
    assert len(builds) == 2  # once per fingerprint, not once per run


RUN_STAGE = """
import logging, os, sys, time
from pathlib import Path
from tasks.core.stage import StageContext, run_stage
root, log, start = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
logging.basicConfig(level=logging.INFO)

def build(work):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(3)
    work.out.mkdir(exist_ok=True)
    (work.out / "result.txt").write_text("built")
    return {"pid": os.getpid()}

ctx = StageContext(base_model="m", root=root)
ctx.store().exists("warm-up")
while time.time() < start:
    pass
print("REF", run_stage("demo", "fp-processes", ctx, build, resumable=True).model_dump_json(), flush=True)
"""


def test_two_concurrent_run_stage_processes_build_once_and_return_the_same_ref(store, tmp_path):
    log, start = tmp_path / "builds.log", time.time() + 8
    procs = [_python(RUN_STAGE, store.root, str(log), str(start)) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode()[-2000:] for _, err in outputs]
    refs = [line.split(" ", 1)[1] for out, _ in outputs for line in out.decode().splitlines() if line.startswith("REF")]
    assert len(refs) == 2 and refs[0] == refs[1]
    assert len(log.read_text().split()) == 1  # one build
    assert store.read_bytes("stages/demo/fp-processes/result.txt") == b"built"
    assert "was built by" in "".join(err.decode() for _, err in outputs)  # the second one waited and took it


# -- dead owners (issue 28) ------------------------------------------------------------------------
KILLED_HOLDER = """
import sys, time
from tasks.artifacts.store import Store
from tasks.artifacts.locks import StoreLock
from tasks.release.ops import ops_lock
store = Store(sys.argv[1])
lock = ops_lock(store, "m", "release promote") if sys.argv[2] == "ops" else StoreLock(store, sys.argv[2], owner="run")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def _held_by_child(store: Store, key: str) -> subprocess.Popen:
    child = _python(KILLED_HOLDER, store.root, key)
    assert child.stdout.readline().decode().strip() == "held", child.stderr.read().decode()[-2000:]
    return child


@pytest.mark.parametrize("key", ["locks/sft/fp", "ops"])
def test_a_lock_of_a_sigkilled_process_on_this_host_is_taken_at_once(store, key):
    """A stage lock, and the `.ops.lock` of promote/rollback/prune: a killed owner's lock is taken at
    once (it used to hold up the next run for the whole ttl, 5 minutes); a live owner's still waits."""
    child = _held_by_child(store, key)
    lock = ops_lock(store, "m", "release rollback", timeout_s=1) if key == "ops" else None
    lock = lock or StoreLock(store, key, owner="next run", timeout_s=1, poll_s=0.2)
    try:
        with pytest.raises(LockTimeout):  # alive: respected
            lock.acquire()
        child.kill()
        child.wait(timeout=10)
        start = time.monotonic()
        lock.timeout_s = 20
        with lock:
            took = time.monotonic() - start
            assert lock.holder().owner == lock.owner
        assert took < 2, f"waited {took:.1f}s for a dead owner's lock (ttl {lock.ttl_s:.0f}s)"
    finally:
        child.kill()
        child.wait()


def test_a_dead_owner_is_recognised_only_on_its_own_host_and_by_its_start_time(store):
    """The owner is host + pid + the process's start: a lock naming another host waits for its ttl,
    and one naming a live pid with another start time (a reused pid) is taken at once."""
    me = json.loads(StoreLock(store, "x")._body())
    elsewhere = {**me, "host": "another-host", "pid": 999_999_999, "owner": "run elsewhere"}
    reused = {**me, "pid": os.getpid(), "process": me["process"].rsplit("/", 1)[0] + "/1", "owner": "reused pid"}
    put_if(store, "locks/elsewhere", json.dumps(elsewhere).encode())
    put_if(store, "locks/reused", json.dumps(reused).encode())
    with pytest.raises(LockTimeout, match="run elsewhere"):
        StoreLock(store, "locks/elsewhere", owner="next", timeout_s=1, poll_s=0.2).acquire()
    with StoreLock(store, "locks/reused", owner="next", timeout_s=1, poll_s=0.2) as lock:
        assert lock.holder().owner == "next"
