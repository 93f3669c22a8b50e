"""Release operations on a local root and on the real S3 server: list/show/promote/rollback through
the CLI, every move of LATEST a compare-and-swap with its own log object, a nightly that refuses after
a rollback made between its gate and its release, racing promotions, the server stopped mid-move,
retention, one-line errors without secrets, and the ``release-ops`` Prefect flow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from flows.cli import main as tuneline
from tasks.artifacts.registry import ChampionRef, RegistryError, download_champion_model, latest_release
from tasks.artifacts.store import StageRef, Store, StoreError
from tasks.release.ops import promote, read_log
from tasks.release.retention import prune
from tasks.release.stage import LatestMoved, ReleaseError, fetch_release, publish_release
from tests.s3server import S3Server

MODEL = "ops-model"
REPO = Path(__file__).resolve().parents[1]


def rid(n: int) -> str:
    return f"202601{n:02d}T010000Z-{n:08x}"


@pytest.fixture(autouse=True)
def _quick_locks(monkeypatch):
    monkeypatch.setenv("TUNELINE_LOCK_HEARTBEAT_S", "0.3")  # a waiter polls as often: races settle quickly


def ship(store: Store, n: int, tmp: Path, *, passed=True, forced=False, champion: int | None = None, **kw) -> str:
    """Publish release ``n`` (adapter, merged weights, eval report) as a night would, plain call."""
    files = {}
    for rel, size in (
        ("adapter/adapter.safetensors", 2000),
        ("model/model.safetensors", 50_000),
        ("eval/report.json", 40),
    ):
        path = tmp / f"r{n}" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        files[rel] = path
    lineage = {
        "gate": {"passed": passed, "reasons": [] if passed else ["val_loss worse than the champion"]},
        "forced": forced,
        "champion": {"model_name": MODEL, "release_id": rid(champion), "manifest_sha256": "0" * 64}
        if champion
        else None,
        "stages": {"merge": f"merge-fp-{n}", "sft": f"sft-fp-{n}"},
        **kw,
    }
    publish_release(store, MODEL, rid(n), files, lineage)
    return rid(n)


def cli(store: Store, *args: str) -> int:
    return tuneline(["release", *args[:1], MODEL, *args[1:], "--root", store.root])


# ----------------------------------------------------------------------------------------------
def test_list_show_promote_rollback_and_one_log_object_per_move(store, tmp_path, capsys):
    ship(store, 1, tmp_path)
    ship(store, 2, tmp_path, champion=1)
    ship(store, 3, tmp_path, champion=2)
    assert cli(store, "list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("* " + rid(3)) and "passed" in out[1] and rid(2) in out[1] and "LATEST" in out[1]
    assert out[3].startswith("  " + rid(1)) and "(base only)" in out[3]

    assert cli(store, "rollback", "--reason", "night 3 answers in Klingon") == 0
    assert f"LATEST moved from {rid(3)} to {rid(2)}" in capsys.readouterr().out
    assert latest_release(store, MODEL) == rid(2)
    assert cli(store, "promote", rid(1), "--reason", "back to the January model") == 0
    assert latest_release(store, MODEL) == rid(1)

    log = read_log(store, MODEL)
    moves = [(e["action"], e["from"], e["to"]) for e in log]
    assert moves == [
        ("release", None, rid(1)),
        ("release", rid(1), rid(2)),
        ("release", rid(2), rid(3)),
        ("rollback", rid(3), rid(2)),
        ("promote", rid(2), rid(1)),
    ]
    assert len({e["key"] for e in log}) == 5  # one object per move
    assert log[3]["why"] == "night 3 answers in Klingon" and "@" in log[3]["who"] and log[3]["when"]
    assert "gate passed against champion " + rid(1) == log[1]["why"]

    assert cli(store, "show", rid(3)) == 0
    shown = capsys.readouterr().out
    assert f"release   {MODEL}/{rid(3)}" in shown and "gate      passed" in shown and f"champion  {rid(2)}" in shown
    assert "model/model.safetensors" in shown
    assert cli(store, "log") == 0
    assert f"rollback: {rid(3)} -> {rid(2)}" in capsys.readouterr().out


def test_rollback_skips_failed_forced_and_rolled_back_releases(store, tmp_path, capsys):
    ship(store, 1, tmp_path)
    ship(store, 2, tmp_path, passed=False, forced=True, champion=1)
    ship(store, 3, tmp_path, champion=2)
    ship(store, 4, tmp_path, champion=3)
    assert cli(store, "rollback") == 0 and latest_release(store, MODEL) == rid(3)
    ship(store, 5, tmp_path, champion=3)  # the next night, gated against 3
    assert latest_release(store, MODEL) == rid(5)
    assert cli(store, "rollback") == 0  # not to 4 (rolled back from), so to 3
    assert latest_release(store, MODEL) == rid(3)
    assert cli(store, "rollback") == 0  # not to 2 (forced past a failed gate)
    assert latest_release(store, MODEL) == rid(1)
    capsys.readouterr()
    assert cli(store, "rollback") == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: no earlier good release of {MODEL} at {store.where()} to roll back to from {rid(1)} " + (
        "(it is the oldest)"
    )


def test_a_release_whose_files_fail_their_checksums_cannot_be_promoted(store, tmp_path, capsys):
    ship(store, 1, tmp_path)
    ship(store, 2, tmp_path, champion=1)
    key = f"releases/{MODEL}/{rid(1)}/model/model.safetensors"
    store.write_bytes(key, b"x" * 50_000)  # same size, other bytes
    assert cli(store, "promote", rid(1)) == 1
    err = capsys.readouterr().err
    assert f"release {MODEL}/{rid(1)}" in err and "model/model.safetensors: checksum mismatch" in err
    assert "not promoted" in err and len(err.strip().splitlines()) == 1
    assert latest_release(store, MODEL) == rid(2)
    assert cli(store, "rollback") == 1  # the only earlier release is broken
    assert "fails its checksums" in capsys.readouterr().err
    assert [e["action"] for e in read_log(store, MODEL)] == ["release", "release"]


def test_nightly_gated_before_a_rollback_refuses_to_release(store, tmp_path, capsys):
    ship(store, 1, tmp_path)
    ship(store, 2, tmp_path, champion=1)
    gated_against = latest_release(store, MODEL)  # the night reads its champion: 2
    assert cli(store, "rollback", "--reason", "2 is bad") == 0  # meanwhile, between gate and release
    night = tmp_path / "night.safetensors"
    night.write_bytes(b"night")
    with pytest.raises(LatestMoved) as refused:
        publish_release(store, MODEL, rid(3), {"model/x": night}, {}, expected_latest=gated_against)
    assert f"LATEST of {MODEL} moved from {rid(2)} to {rid(1)}" in str(refused.value)
    assert "rerun to be gated against the new champion" in str(refused.value)
    assert latest_release(store, MODEL) == rid(1)
    assert not store.exists(f"releases/{MODEL}/{rid(3)}/manifest.json")


def test_the_move_itself_is_a_compare_and_swap(store, tmp_path):
    """The last check and the write are one step: a move made after the mover read LATEST wins."""
    from tasks.release.ops import move_latest

    ship(store, 1, tmp_path)
    ship(store, 2, tmp_path, champion=1)
    seen = latest_release(store, MODEL)
    move_latest(store, MODEL, rid(1), expected=seen, action="rollback", who="ops", why="first")
    with pytest.raises(LatestMoved, match=f"moved from {rid(2)} to {rid(1)} since this release read it"):
        move_latest(store, MODEL, rid(2), expected=seen, action="release", who="night", why="late")
    assert latest_release(store, MODEL) == rid(1)


def test_two_racing_promotions_one_wins_the_other_fails_cleanly(store, tmp_path):
    for n in (1, 2, 3):
        ship(store, n, tmp_path)
    start = threading.Barrier(2)
    results: dict[str, object] = {}

    def go(target: str) -> None:
        start.wait()
        try:
            results[target] = promote(store, MODEL, target, who=f"person-{target}", expected=rid(3))
        except LatestMoved as e:
            results[target] = e

    threads = [threading.Thread(target=go, args=(r,)) for r in (rid(1), rid(2))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    winners = [r for r, v in results.items() if isinstance(v, dict)]
    losers = [v for v in results.values() if isinstance(v, LatestMoved)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert latest_release(store, MODEL) == winners[0]
    assert f"moved from {rid(3)} to {winners[0]} since this promote read it" in str(losers[0])
    assert [e["to"] for e in read_log(store, MODEL) if e["action"] == "promote"] == winners


def test_server_stopped_mid_move_leaves_latest_old_or_new(tmp_path):
    server = S3Server(tmp_path / "weed").start()
    try:
        creds = {"aws_access_key_id": server.access_key, "aws_secret_access_key": server.secret_key}
        store = Store(f"s3://{server.bucket}/mid", endpoint_url=server.endpoint, credentials=creds, max_attempts=1)
        ship(store, 1, tmp_path)
        ship(store, 2, tmp_path, champion=1)
        failures: list[Exception] = []

        def flip() -> None:  # promotions back and forth until the server is gone
            try:
                while True:
                    current = latest_release(store, MODEL)
                    other = rid(1) if current == rid(2) else rid(2)
                    promote(store, MODEL, other, who="flipper", verify="metadata")
            except (StoreError, ReleaseError) as e:
                failures.append(e)

        mover = threading.Thread(target=flip)
        mover.start()
        time.sleep(2.0)
        server.stop()  # SIGKILL of the whole server, wherever the move was
        mover.join(120)
        assert failures and server.endpoint in str(failures[0])
        server.start()
        fresh = Store(f"s3://{server.bucket}/mid", endpoint_url=server.endpoint, credentials=creds)
        assert latest_release(fresh, MODEL) in (rid(1), rid(2))
        assert fetch_release(fresh, MODEL, "LATEST", tmp_path / "got")["release_id"] == latest_release(fresh, MODEL)
    finally:
        server.stop()


def test_process_killed_mid_move_on_disk_leaves_latest_old_or_new(tmp_path):
    store = Store(str(tmp_path / "root"))
    ship(store, 1, tmp_path)
    ship(store, 2, tmp_path, champion=1)
    code = (
        "import sys; from tasks.artifacts.store import Store; from tasks.release.ops import promote; "
        "from tasks.artifacts.registry import latest_release\n"
        "s = Store(sys.argv[1]); ids = sys.argv[2:]\n"
        "while True:\n"
        "    cur = latest_release(s, 'ops-model')\n"
        "    promote(s, 'ops-model', ids[cur == ids[0]], who='p', verify='metadata')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, store.root, rid(1), rid(2)], cwd=REPO)
    time.sleep(4.0)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_release(store, MODEL) in (rid(1), rid(2))
    assert len([e for e in read_log(store, MODEL) if e["action"] == "promote"]) >= 2  # it did move, many times


def _stage(store: Store, stage: str, fp: str, days_old: float) -> str:
    import datetime as dt

    when = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_old)
    ref = StageRef(
        stage=stage,
        fingerprint=fp,
        uri=store.uri(f"stages/{stage}/{fp}"),
        metrics={"lineage": {"time": when.isoformat()}},
    )
    store.write_bytes(f"stages/{stage}/{fp}/weights.bin", b"w" * 100)
    store.write_bytes(f"stages/{stage}/{fp}/_SUCCESS", ref.model_dump_json().encode())
    return f"stages/{stage}/{fp}"


def test_retention_keeps_what_lineage_and_people_need(store, tmp_path, capsys):
    for n in range(1, 7):
        ship(store, n, tmp_path, champion=n - 1 or None)
    assert cli(store, "promote", rid(2), "--reason", "customer pinned it") == 0
    for n in range(7, 11):
        ship(store, n, tmp_path, champion=5 if n == 10 else n - 1)
    assert latest_release(store, MODEL) == rid(10)
    old_kept = _stage(store, "merge", "merge-fp-9", days_old=90)  # a whole release points at it
    old_orphan = _stage(store, "sft", "sft-fp-orphan", days_old=90)
    old_of_pruned = _stage(store, "merge", "merge-fp-3", days_old=90)  # only a pruned release points at it
    young = _stage(store, "sft", "sft-fp-young", days_old=2)
    busy = _stage(store, "sft", "sft-fp-busy", days_old=90)
    store.write_bytes("locks/sft/sft-fp-busy", b"{}")  # a run holds it

    result = prune(store, MODEL, keep_last=3, stage_max_age_days=30, who="test")
    assert set(result["releases"]) == {rid(3), rid(4), rid(6), rid(7)}
    assert set(result["kept"]) == {rid(8), rid(9), rid(10), rid(5), rid(2), rid(1)}
    assert "anchor" in result["kept"][rid(1)]  # the first release: every night's anchor until a pin
    assert (
        "LATEST" in result["kept"][rid(10)]
        and "champion" in result["kept"][rid(5)]
        and "by hand" in result["kept"][rid(2)]
    )
    assert set(result["stages"]) == {old_orphan, old_of_pruned}
    for folder in (old_kept, young, busy):
        assert store.exists(f"{folder}/_SUCCESS")
    assert not store.exists(f"{old_orphan}/_SUCCESS") and not store.exists(f"{old_orphan}/weights.bin")

    pruned = f"releases/{MODEL}/{rid(3)}"
    assert not store.exists(f"{pruned}/model/model.safetensors")
    for rel in ("manifest.json", "adapter/adapter.safetensors", "eval/report.json"):
        assert store.exists(f"{pruned}/{rel}")
    assert store.exists(f"releases/{MODEL}/{rid(8)}/model/model.safetensors")
    assert read_log(store, MODEL)[-1]["action"] == "prune"
    assert prune(store, MODEL, keep_last=3, stage_max_age_days=30, who="test")["releases"] == {}

    assert cli(store, "list") == 0
    rows = {line[2:30].strip(): line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "pruned" in rows[rid(3)] and "pruned" not in rows[rid(8)]
    assert cli(store, "promote", rid(3)) == 1
    assert "was pruned by retention" in capsys.readouterr().err and latest_release(store, MODEL) == rid(10)
    with pytest.raises(ReleaseError, match="was pruned by retention"):
        fetch_release(store, MODEL, rid(3), tmp_path / "pruned")
    # The champion logic, asked for a pruned release's merged model, says so (never a half download).
    champ = ChampionRef(model_name=MODEL, release_id=rid(3), manifest_sha256="0" * 64)
    with pytest.raises(RegistryError, match=f"release {MODEL}/{rid(3)} .* was pruned by retention"):
        download_champion_model(store, champ, tmp_path / "champ")


# ----------------------------------------------------------------------------------------------
def _run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_errors_are_one_line_naming_what_was_tried_and_never_a_secret(s3_server, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base |= {
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    root = f"s3://{s3_server.bucket}/errors"
    store = Store(root)
    where = store.where()
    ship(store, 1, tmp_path)
    secret = f"wrong-{uuid.uuid4().hex}"
    cases = {
        "no credentials": (base | {"AWS_ENDPOINT_URL": s3_server.endpoint}, ["release", "list", MODEL, "--root", root]),
        "fetch without credentials": (
            base | {"AWS_ENDPOINT_URL": s3_server.endpoint},
            ["fetch", root, MODEL, "LATEST", str(tmp_path / "d")],
        ),
        "wrong secret": (
            base | s3_server.env() | {"AWS_SECRET_ACCESS_KEY": secret},
            ["release", "promote", MODEL, rid(1), "--root", root],
        ),
        "unreachable": (
            s3_server.env()
            | base
            | {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": secret},
            ["release", "rollback", MODEL, "--root", root],
        ),
        "missing bucket": (base | s3_server.env(), ["release", "list", MODEL, "--root", "s3://no-such-bucket-9/x"]),
        "unknown model": (base | s3_server.env(), ["release", "list", "nobody", "--root", root]),
        "unknown release": (
            base | s3_server.env(),
            ["release", "show", MODEL, rid(99), "--root", root],
        ),
    }
    expected = {
        "no credentials": "no credentials",
        "fetch without credentials": "no credentials",
        "wrong secret": "access denied: check the credentials",
        "unreachable": "cannot reach the endpoint",
        "missing bucket": "bucket 'no-such-bucket-9' does not exist",
        "unknown model": f"no releases of model 'nobody' at {where} (models there: {MODEL})",
        "unknown release": f"release {MODEL}/{rid(99)} at {where} is unknown; newest complete: {rid(1)}",
    }
    for name, (env, args) in cases.items():
        done = _run_cli(*args, env=env)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(err) == 1 and err[0].startswith("error: "), (name, done.stderr)
        assert expected[name] in err[0], (name, err[0])
        assert secret not in done.stderr + done.stdout and s3_server.secret_key not in done.stderr
        if name not in ("unknown model", "unknown release"):
            assert ("127.0.0.1:9" if name == "unreachable" else s3_server.endpoint) in err[0], (name, err[0])
    assert latest_release(store, MODEL) == rid(1)


def test_release_ops_flow_and_the_nightly_release_task_refusing(tmp_path):
    """The real Prefect flow ``release-ops`` rolls back and shows the move log as an artifact; the real
    release task of a night gated before that rollback fails at once with the reason (no retries)."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.release_ops import release_ops
    from tasks.core.stage import StageContext
    from tasks.release.stage import ReleaseParams, release

    root = str(tmp_path / "root")
    store = Store(root)
    ship(store, 1, tmp_path)
    ship(store, 2, tmp_path, champion=1)
    state = release_ops(
        action="rollback", model_name=MODEL, reason="bad answers", artifact_root=root, return_state=True
    )
    assert state.is_completed() and state.result()["to"] == rid(1)
    assert "flow run" in read_log(store, MODEL)[-1]["who"]
    with get_client(sync_client=True) as client:
        art = client.read_latest_artifacts()
        log_md = [a for a in art if a.key == "release-log"][0].data
    assert f"| rollback | {rid(2)} | {rid(1)} |" in log_md and "bad answers" in log_md

    # A night that read LATEST = 2 before the rollback reaches its release task now.
    parts = {}
    for name, files in (
        ("adapter", {"a.safetensors": b"a"}),
        ("merged", {"m.safetensors": b"m"}),
        ("eval", {"report.json": b""}),
    ):
        folder = tmp_path / "stages" / name
        folder.mkdir(parents=True)
        for f, data in files.items():
            (folder / f).write_bytes(data)
        parts[name] = StageRef(stage=name, fingerprint=f"{name}-fp", uri=str(folder))
    report = {"metrics": {"base": {"l": 1.0}, "tuned": {"l": 0.5}}, "gate": {"passed": True, "reasons": []}}
    (tmp_path / "stages" / "eval" / "report.json").write_text(json.dumps(report))
    dataset = StageRef(stage="data", fingerprint="data-fp", uri=str(tmp_path / "stages" / "data"))

    @flow
    def night():
        ctx = StageContext(base_model="tiny/base", root=root)
        params = {"base_model": "tiny/base", "base_revision": "main"}
        return release(
            ReleaseParams(model_name=MODEL),
            parts["adapter"],
            parts["merged"],
            parts["eval"],
            dataset,
            params,
            ctx=ctx,
            expected_latest=rid(2),
        )

    started = time.monotonic()
    refused = night(return_state=True)
    assert refused.is_failed() and time.monotonic() - started < 10  # not retried: a rerun must be gated again
    with pytest.raises(LatestMoved, match=f"moved from {rid(2)} to {rid(1)} since this run started"):
        refused.result()
    assert latest_release(store, MODEL) == rid(1)


def test_a_retried_night_does_not_undo_a_rollback_of_its_own_release(store, tmp_path):
    ship(store, 1, tmp_path)
    night = tmp_path / "night.safetensors"
    night.write_bytes(b"night")
    publish_release(store, MODEL, rid(2), {"model/x": night}, {"gate": {"passed": True}}, expected_latest=rid(1))
    assert latest_release(store, MODEL) == rid(2)
    promote(store, MODEL, rid(1), who="ops", why="2 is bad")  # a person undoes the night
    # The night's task is retried (e.g. it failed after moving LATEST): its release stands, LATEST stays.
    publish_release(store, MODEL, rid(2), {"model/x": night}, {"gate": {"passed": True}}, expected_latest=rid(1))
    assert latest_release(store, MODEL) == rid(1)
    assert [e["action"] for e in read_log(store, MODEL)] == ["release", "release", "promote"]


def test_movers_racing_without_the_lock_have_exactly_one_winner(store, tmp_path):
    """Eight movers read LATEST at once and write at once: a read-then-write would let several win;
    the conditional write lets exactly one (a night's move takes no lock, so this is its guarantee)."""
    from tasks.release.ops import move_latest

    for n in range(1, 10):
        ship(store, n, tmp_path)
    start = threading.Barrier(8)
    won: list[str] = []
    lost: list[LatestMoved] = []

    def go(n: int) -> None:
        start.wait()
        try:
            move_latest(store, MODEL, rid(n), expected=rid(9), action="release", who=f"night-{n}", why="race")
            won.append(rid(n))
        except LatestMoved as e:
            lost.append(e)

    threads = [threading.Thread(target=go, args=(n,)) for n in range(1, 9)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert len(won) == 1 and len(lost) == 7
    assert latest_release(store, MODEL) == won[0]
    assert [e["to"] for e in read_log(store, MODEL) if e["why"] == "race"] == won
