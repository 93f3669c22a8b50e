"""Two ``tuneline run`` at the same moment on one artifact root (issue 27, "Concurrency measured"): each
stage is built once, both runs finish, there is exactly one release for the one fingerprint, and every
checksum of the release's manifest and every stage folder's digest verify. On local disk and on the
real S3 server.

Each command runs as a person runs it (``python -m flows.cli run``), each with its own ``PREFECT_HOME``
and its own ``TUNELINE_CACHE``, as on two machines that share only the artifact root. Not one Prefect
server for both: then Prefect's own result cache could hand the second run the first one's result, and
the test would not show that the artifact store's locks alone keep a stage from being built twice
(which is what holds across machines). Two temporary servers on one SQLite file would also contend
on migrating it, which is not what is measured here.

"The same moment" is made exact rather than left to start-up jitter: the test holds the data stage's
lock until both runs say they are waiting for it, then lets go, so both race for every stage from
there on. The local pair and the S3 pair run at the same time (one fixture): within a pair one run
builds while the other waits, so together they take about as long as one pair.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flows.params import load_params
from tasks.artifacts.locks import StoreLock
from tasks.artifacts.registry import MANIFEST, latest_release, release_prefix
from tasks.artifacts.stage_folders import content_hashes, folder_digest
from tasks.artifacts.store import Store, open_ref
from tasks.core.stage import stage_lock_key
from tasks.data.stage import fingerprint_of as data_fingerprint
from tasks.release.ops import read_log, release_ids, verify_files
from tests.prefect_stack import REPO, tiny_preset

MODEL = "concurrent-tiny"
STAGES = ("data", "sft", "merge", "evaluate", "release")
BUILDING = re.compile(r"building (\w+) ([0-9a-f]{8,})")
RUN_TIMEOUT_S = 420


def _sets(root: str) -> list[str]:
    # A random model's gate verdict is not what this test is about (a forced release is still one release),
    # nor is loading the merged model in a serving engine: the runs skip what costs time and proves nothing here.
    return [
        f"artifact_root={root}",
        f"release.model_name={MODEL}",
        "eval.force_release=true",
        "release.servable_check=false",
    ]


class Pair:
    """Two ``tuneline run`` on one artifact root, each as on its own machine (own Prefect home, own cache),
    held at the data stage's lock until both wait for it."""

    def __init__(self, preset: Path, root: str, tmp: Path):
        params = load_params(str(preset), _sets(root))
        ctx = params.stage_context().pinned()
        self.store = ctx.store()
        self.store.check()
        self.barrier = StoreLock(
            self.store, stage_lock_key("data", data_fingerprint(params.data, ctx)), owner="the test's barrier"
        ).acquire()
        self.met = False  # both runs waited at the barrier at once
        self.logs = [tmp / f"run-{i}.{uuid.uuid4().hex[:6]}.out" for i in (0, 1)]
        self.procs = [_start(preset, root, tmp / f"machine-{i}", log) for i, log in enumerate(self.logs)]

    def step(self) -> bool:
        """Let go of the barrier once both wait (or one has ended: the other must not wait forever);
        True while a run is still going."""
        if self.barrier.version is not None:
            self.met = all("waiting for lock" in log.read_text(errors="replace") for log in self.logs)
            if self.met or any(p.poll() is not None for p in self.procs):
                self.barrier.release()
        return any(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        self.barrier.release()
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.outputs = [log.read_text(errors="replace") for log in self.logs]
        self.returncodes = [p.returncode for p in self.procs]


def _start(preset: Path, root: str, home: Path, log: Path) -> subprocess.Popen:
    home.mkdir(exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "TUNELINE_CACHE": str(home / "cache")}
    env.pop("PREFECT_API_URL", None)  # each command starts its own temporary server
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["TUNELINE_LOCK_HEARTBEAT_S"] = "1"  # a waiting run polls every second (default 5 s): a faster test
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", str(preset)]
    for item in _sets(root):
        cmd += ["--set", item]
    with open(log, "wb") as out:  # the child writes through its own descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_model_dir, s3_server) -> dict[str, Pair]:
    """Both pairs at once, the local one and the S3 one: they share nothing but the CPU, and their
    stages build one after the other within a pair (the other run waits), so together they take
    little longer than one pair alone."""
    tmp = tmp_path_factory.mktemp("concurrent")
    preset = tiny_preset(tmp / "preset.yaml", tiny_model_dir, tmp / "unused")
    roots = {"local": str(tmp / "artifacts"), "s3": f"s3://{s3_server.bucket}/concurrent-{uuid.uuid4().hex[:8]}"}
    made: dict[str, Pair] = {}
    try:
        for name, root in roots.items():
            (tmp / name).mkdir()
            made[name] = Pair(preset, root, tmp / name)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while [pair.step() for pair in made.values()].count(True) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for pair in made.values():
            pair.stop()
    return made


def _finished(pair: Pair) -> None:
    for code, out in zip(pair.returncodes, pair.outputs):
        assert code == 0, out[-5000:]
        # A clean run says nothing alarming, and talks to its own temporary server only (no second one
        # started by a Prefect thread that missed the API URL: flows/cli.py, _point_prefect_at).
        assert [line for line in out.splitlines() if "ERROR" in line or "Traceback" in line] == [], out[-5000:]
        assert "Starting temporary server" not in out, out[-5000:]
    assert pair.met, "the two runs never waited for the data stage at the same time"


def _check(store: Store, outputs: list[str]) -> None:
    # Each stage built once, by one of the two runs; the other waited for it or found it complete.
    builds = [m.groups() for out in outputs for m in BUILDING.finditer(out)]
    assert sorted(s for s, _ in builds) == sorted(STAGES), builds
    for stage, fp in builds:
        folders = {k.split("/")[2] for k in store.list(f"stages/{stage}")}
        assert folders == {fp, f"{fp}.cache-key"}, (stage, folders)  # no second folder, no leftover .tmp/.trash
        ref = store.completed(stage, fp)
        assert ref is not None, (stage, fp)
        local = open_ref(ref)  # the folder's content is what its _SUCCESS says it is: not a mixture of two builds
        assert folder_digest(content_hashes(local, stage)) == ref.digest, stage
    assert store.list("locks") == []  # every stage lock was released
    # One release: both runs report it, LATEST names it, it moved LATEST once, and every file verifies.
    ids = release_ids(store, MODEL)
    assert list(ids.values()) == [True], ids
    (release_id,) = ids
    for out in outputs:
        assert re.search(rf"^release: .*/releases/{MODEL}/{release_id}$", out, re.M), out[-2000:]
    assert latest_release(store, MODEL) == release_id
    assert [(e["action"], e["to"]) for e in read_log(store, MODEL)] == [("release", release_id)]
    prefix = release_prefix(MODEL, release_id)
    manifest = json.loads(store.read_bytes(f"{prefix}/{MANIFEST}"))
    assert manifest["files"] and verify_files(store, prefix, manifest["files"], "content") == {}
    assert manifest["stages"] == {s: fp for s, fp in builds if s != "release"}  # the folders built, none other


def test_two_runs_at_once_on_local_disk_build_each_stage_once_and_release_once(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELINE_CACHE", str(tmp_path / "cache"))
    _finished(pairs["local"])
    _check(pairs["local"].store, pairs["local"].outputs)


def test_two_runs_at_once_on_s3_build_each_stage_once_and_release_once(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELINE_CACHE", str(tmp_path / "cache"))  # where the checks download stage folders
    _finished(pairs["s3"])
    _check(pairs["s3"].store, pairs["s3"].outputs)
