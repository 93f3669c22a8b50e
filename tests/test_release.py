"""Release stage against a real S3 server: manifest last, LATEST after it, idempotent reruns, a
release that survives the server going away, corruption caught by ``tuneline fetch``, clear errors,
and credentials that never leak."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from flows.cli import main as tuneline
from tasks.artifacts.store import StageRef, Store, StoreError
from tasks.release.stage import (
    ReleaseError,
    ReleaseParams,
    fetch_release,
    latest_release,
    publish_release,
    release_id_for,
)
from tests.s3server import S3Server

MODEL = "tiny-tuneline"
EVAL_REPORT = {
    "metrics": {
        "base": {"val_loss": 2.5, "self_cognition_acc": 0.1},
        "tuned": {"val_loss": 2.1, "self_cognition_acc": 0.9},
    },
    "gate": {"passed": True, "reasons": [], "checks": []},
}


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def stage_refs(tmp_path_factory) -> dict[str, StageRef]:
    """Completed stage folders as the upstream stages leave them (local root), with a 12 MB shard."""
    root = tmp_path_factory.mktemp("stages")
    rnd = os.urandom
    adapter, merged, report = root / "adapter", root / "merged", root / "eval"
    _write(adapter / "adapter_model.safetensors", rnd(300_000))
    _write(adapter / "adapter_config.json", b'{"r": 8}')
    _write(merged / "model-00001-of-00002.safetensors", rnd(12 << 20))
    _write(merged / "model-00002-of-00002.safetensors", rnd(1 << 20))
    _write(merged / "config.json", b'{"dtype": "bfloat16"}')
    _write(merged / "_SUCCESS", b"{}")  # stage bookkeeping: not part of a release
    _write(report / "report.json", json.dumps(EVAL_REPORT).encode())
    return {
        "adapter": StageRef(stage="sft", fingerprint="sft0", uri=str(adapter), metrics={"dtype": "bf16"}),
        "merged": StageRef(
            stage="merge",
            fingerprint="merge0",
            uri=str(merged),
            metrics={
                "dtype": "bf16",
                "max_logit_diff": 0.01,
                "tolerance": 0.2,
                "verified": True,
                "base_revision_resolved": "abc123",
            },
        ),
        "report": StageRef(stage="evaluate", fingerprint="eval0", uri=str(report), metrics={}),
        "dataset": StageRef(
            stage="data",
            fingerprint="data0",
            uri=str(root / "data"),
            metrics={
                "train_rows": 90,
                "validation_rows": 10,
                "sources": [
                    {
                        "spec": "alpaca_en_demo.json#60",
                        "fingerprint": "alpaca@1234",
                        "rows_read": 100,
                        "rows_sampled": 60,
                    },
                    {"spec": "self-cognition#40", "fingerprint": "self@5678", "rows_read": 108, "rows_sampled": 40},
                ],
            },
        ),
    }


def _files(refs: dict[str, StageRef]) -> dict[str, Path]:
    out = {}
    for name, ref in (("adapter", refs["adapter"]), ("model", refs["merged"]), ("eval", refs["report"])):
        out.update({f"{name}/{p.name}": p for p in Path(ref.uri).iterdir() if not p.name.startswith("_")})
    return out


def _uploader() -> tuple[dict[str, int], callable]:
    counts = {"uploaded": 0, "present": 0}

    def progress(rel: str, uploaded: bool) -> None:
        counts["uploaded" if uploaded else "present"] += 1

    return counts, progress


@pytest.fixture()
def s3_root(s3_server) -> str:
    return f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:8]}"


def _store(root: str, **kw) -> Store:
    return Store(root, multipart_threshold=5 << 20, multipart_chunksize=5 << 20, **kw)


# ----------------------------------------------------------------------------------------------
def test_rerun_uploads_only_what_is_missing_or_different_and_big_files_go_multipart(stage_refs, s3_root, s3_server):
    store = _store(s3_root)
    files = _files(stage_refs)
    rid = release_id_for(store, MODEL, "fp-idem")
    assert release_id_for(store, MODEL, "fp-idem") == rid  # fixed by the first attempt

    counts, progress = _uploader()
    manifest = publish_release(store, MODEL, rid, files, {"note": "first"}, on_progress=progress)
    assert counts == {"uploaded": len(files), "present": 0}
    assert latest_release(store, MODEL) == rid
    head = store.client.head_object(
        Bucket=s3_server.bucket, Key=store._object_key(f"releases/{MODEL}/{rid}/model/model-00001-of-00002.safetensors")
    )
    assert head["ETag"].strip('"').endswith("-3")  # 12 MiB in 5 MiB parts
    assert manifest["files"]["model/model-00001-of-00002.safetensors"]["size"] == 12 << 20
    assert "model/_SUCCESS" not in manifest["files"]

    counts, progress = _uploader()
    publish_release(store, MODEL, rid, files, {"note": "rerun"}, on_progress=progress)
    assert counts == {"uploaded": 0, "present": len(files)}

    # One object missing and one different on the store: exactly those two go up again.
    prefix = f"releases/{MODEL}/{rid}"
    store.delete(f"{prefix}/adapter/adapter_config.json")
    store.write_bytes(f"{prefix}/model/config.json", b'{"dtype": "float32"}')
    counts, progress = _uploader()
    publish_release(store, MODEL, rid, files, {"note": "repair"}, on_progress=progress)
    assert counts == {"uploaded": 2, "present": len(files) - 2}
    assert store.read_bytes(f"{prefix}/model/config.json") == b'{"dtype": "bfloat16"}'


def test_server_stopped_mid_upload_never_publishes_half_a_release(stage_refs, tmp_path):
    server = S3Server(tmp_path / "weed").start()
    try:
        root = f"s3://{server.bucket}/midway"
        creds = {"aws_access_key_id": server.access_key, "aws_secret_access_key": server.secret_key}
        store = _store(root, endpoint_url=server.endpoint, credentials=creds, max_attempts=2)
        files = _files(stage_refs)
        previous = release_id_for(store, MODEL, "fp-old")
        publish_release(store, MODEL, previous, files, {})

        # A new release (new fingerprint, new id); the server dies after the second file.
        changed = dict(files, **{"eval/report.json": _write(tmp_path / "report.json", b'{"new": true}')})
        rid = release_id_for(store, MODEL, "fp-new")
        assert rid != previous
        done: list[str] = []

        def die_after_two(rel: str, uploaded: bool) -> None:
            done.append(rel)
            if len(done) == 2:
                server.stop()

        with pytest.raises(StoreError) as failure:
            publish_release(store, MODEL, rid, changed, {}, on_progress=die_after_two)
        assert server.endpoint in str(failure.value) and server.bucket in str(failure.value)

        server.start()  # same ports, same data folder
        fresh = _store(root, endpoint_url=server.endpoint, credentials=creds)
        assert latest_release(fresh, MODEL) == previous
        assert not fresh.exists(f"releases/{MODEL}/{rid}/manifest.json")
        with pytest.raises(ReleaseError, match="no complete release"):
            fetch_release(fresh, MODEL, rid, tmp_path / "half")

        # The retry continues the same release: same id, LATEST untouched until the manifest is written.
        assert release_id_for(fresh, MODEL, "fp-new") == rid
        seen_latest: set[str | None] = set()
        counts = {"uploaded": 0}

        def watch(rel: str, uploaded: bool) -> None:
            seen_latest.add(latest_release(fresh, MODEL))
            counts["uploaded"] += uploaded

        publish_release(fresh, MODEL, rid, changed, {}, on_progress=watch)
        assert seen_latest == {previous}
        assert counts["uploaded"] < len(changed)  # what made it up before the failure is not sent again
        assert latest_release(fresh, MODEL) == rid
        assert fetch_release(fresh, MODEL, "LATEST", tmp_path / "got")["release_id"] == rid
    finally:
        server.stop()


def test_fetch_detects_an_object_corrupted_on_the_server(stage_refs, s3_root, s3_server, tmp_path, capsys):
    store = _store(s3_root)
    rid = release_id_for(store, MODEL, "fp-fetch")
    manifest = publish_release(store, MODEL, rid, _files(stage_refs), {})

    assert tuneline(["fetch", s3_root, MODEL, "LATEST", str(tmp_path / "ok")]) == 0
    for rel, entry in manifest["files"].items():
        assert (tmp_path / "ok" / rel).stat().st_size == entry["size"]
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["release_id"] == rid

    # Same size, same claimed sha256 metadata, different bytes: only hashing the content catches it.
    key = store._object_key(f"releases/{MODEL}/{rid}/adapter/adapter_model.safetensors")
    original = store.read_bytes(f"releases/{MODEL}/{rid}/adapter/adapter_model.safetensors")
    corrupted = bytes([original[0] ^ 0xFF]) + original[1:]
    store.client.put_object(
        Bucket=s3_server.bucket,
        Key=key,
        Body=corrupted,
        Metadata={"sha256": manifest["files"]["adapter/adapter_model.safetensors"]["sha256"]},
    )
    capsys.readouterr()
    assert tuneline(["fetch", s3_root, MODEL, rid, str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch for adapter/adapter_model.safetensors" in err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.partial-*"))


def test_upload_verification_catches_corruption_and_the_retry_repairs_it(stage_refs, s3_root, s3_server):
    """An object altered between upload and check fails the release (no manifest, LATEST untouched);
    the bad object is removed, so the retry uploads it again instead of trusting its metadata."""
    store = _store(s3_root)
    files = _files(stage_refs)
    rid = release_id_for(store, MODEL, "fp-verify")
    target = f"releases/{MODEL}/{rid}/model/config.json"

    def tamper(rel: str, uploaded: bool) -> None:
        if rel == "model/config.json":
            meta = store.head(target)
            store.client.put_object(
                Bucket=s3_server.bucket,
                Key=store._object_key(target),
                Body=b'{"dtype": "bfloat17"}',
                Metadata={"sha256": meta["sha256"]},
            )

    with pytest.raises(ReleaseError, match="model/config.json: checksum mismatch"):
        publish_release(store, MODEL, rid, files, {}, on_progress=tamper)
    assert not store.exists(f"releases/{MODEL}/{rid}/manifest.json") and latest_release(store, MODEL) is None
    publish_release(store, MODEL, rid, files, {})
    assert store.read_bytes(target) == b'{"dtype": "bfloat16"}'


def test_wrong_credentials_and_missing_bucket_name_endpoint_and_bucket(s3_server, tmp_path, capsys):
    wrong = Store(
        f"s3://{s3_server.bucket}/x",
        credentials={"aws_access_key_id": s3_server.access_key, "aws_secret_access_key": "not-the-secret-4242"},
    )
    with pytest.raises(StoreError) as e:
        wrong.check()
    msg = str(e.value)
    assert s3_server.endpoint in msg and f"bucket {s3_server.bucket}" in msg and "access denied" in msg
    assert "not-the-secret-4242" not in msg and e.value.permanent

    with pytest.raises(StoreError, match="bucket 'no-such-bucket-7' does not exist") as e:
        Store("s3://no-such-bucket-7/x").check()
    assert s3_server.endpoint in str(e.value)

    assert tuneline(["fetch", "s3://no-such-bucket-7/x", MODEL, "LATEST", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "no-such-bucket-7" in err and s3_server.endpoint in err


def test_keys_from_a_tampered_manifest_cannot_escape_the_destination(stage_refs, tmp_path, capsys):
    store = Store(str(tmp_path / "root"))
    rid = release_id_for(store, MODEL, "fp-evil")
    manifest = publish_release(store, MODEL, rid, _files(stage_refs), {})
    manifest["files"]["../../outside.txt"] = {"size": 1, "sha256": "0" * 64}
    store.write_json(f"releases/{MODEL}/{rid}/manifest.json", manifest)
    assert tuneline(["fetch", str(tmp_path / "root"), MODEL, rid, str(tmp_path / "dest" / "here")]) == 1
    assert "unsafe object key" in capsys.readouterr().err
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "dest" / "here").exists()


# ----------------------------------------------------------------------------------------------
def test_release_task_with_a_block_writes_lineage_and_never_leaks_the_secret(stage_refs, tmp_path):
    """The real Prefect task, credentials from a saved block with a unique secret: the manifest
    carries the lineage; the secret is nowhere in the store, the logs, the artifacts, or errors."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker
    from prefect_aws import AwsCredentials

    from blocks.storage import ArtifactStore
    from tasks.core.stage import StageContext
    from tasks.release.stage import release

    secret = f"s3cr3t-{uuid.uuid4().hex}"
    server = S3Server(tmp_path / "weed", secret_key=secret).start()
    try:
        root = f"s3://{server.bucket}/nightly"
        creds = AwsCredentials(aws_access_key_id=server.access_key, aws_secret_access_key=secret)
        ArtifactStore(root=root, endpoint_url=server.endpoint, credentials=creds).save("rel-test", overwrite=True)
        ArtifactStore(root=f"s3://missing-{server.bucket}/x", endpoint_url=server.endpoint, credentials=creds).save(
            "rel-missing", overwrite=True
        )
        refs = stage_refs
        params = {
            "base_model": "tiny/base",
            "base_revision": "main",
            "storage_block": "rel-test",
            "sft": {"max_steps": 3},
        }
        config = ReleaseParams(model_name=MODEL, multipart_chunk_mib=5, servable_check=False)  # random bytes

        @flow
        def ship(block: str, where: str):
            ctx = StageContext(base_model="tiny/base", root=where, storage_block=block)
            return release(config, refs["adapter"], refs["merged"], refs["report"], refs["dataset"], params, ctx=ctx)

        state = ship("rel-test", root, return_state=True)
        ref = state.result()
        failed = ship("rel-missing", f"s3://missing-{server.bucket}/x", return_state=True)
        assert failed.is_failed()  # at once: a missing bucket is not retried
        with pytest.raises(StoreError) as error:
            failed.result()
        assert f"missing-{server.bucket}" in str(error.value) and server.endpoint in str(error.value)

        # Lineage in the manifest, read back through the fetch command.
        store = Store(
            root,
            endpoint_url=server.endpoint,
            credentials={"aws_access_key_id": server.access_key, "aws_secret_access_key": secret},
        )
        rid = ref.metrics["release_id"]
        assert latest_release(store, MODEL) == rid and rid.endswith("-" + ref.fingerprint[:8])
        manifest = fetch_release(store, MODEL, "LATEST", tmp_path / "fetched")
        assert manifest["flow_run_id"] == str(state.state_details.flow_run_id)
        assert manifest["base_model"] == "tiny/base" and manifest["base_revision_resolved"] == "abc123"
        assert manifest["params"]["sft"] == {"max_steps": 3}
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        if head.returncode == 0:  # a checkout without .git records TUNELINE_GIT_COMMIT or "unknown"
            assert manifest["code_version"].startswith(head.stdout.strip())
        assert manifest["data"]["sources"][0] == {
            "spec": "alpaca_en_demo.json#60",
            "fingerprint": "alpaca@1234",
            "rows_read": 100,
            "rows_sampled": 60,
        }
        assert manifest["metrics"] == EVAL_REPORT["metrics"] and manifest["gate"]["passed"] is True
        assert set(manifest["files"]) >= {
            "README.md",
            "adapter/adapter_model.safetensors",
            "model/model-00001-of-00002.safetensors",
            "eval/report.json",
        }
        assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in manifest["files"].values())
        card = (tmp_path / "fetched" / "README.md").read_text()
        assert "| self_cognition_acc | 0.1000 | 0.9000 | +0.8000 |" in card and "Quality gate: **passed**" in card

        # The secret: not in any stored object, log, artifact, state message or raised error.
        everything = [store.read_bytes(k) for k in store.list("")] + [
            Store(str(tmp_path / "fetched")).read_bytes(k) for k in Store(str(tmp_path / "fetched")).list("")
        ]
        APILogWorker.drain_all()
        with get_client(sync_client=True) as client:
            texts = [
                log.message
                for log in client.read_logs(
                    LogFilter(
                        flow_run_id=LogFilterFlowRunId(
                            any_=[state.state_details.flow_run_id, failed.state_details.flow_run_id]
                        )
                    )
                )
            ]
            texts += [json.dumps(a.model_dump(mode="json")) for a in client.read_artifacts()]
            texts += [json.dumps(r.model_dump(mode="json")) for r in client.read_task_runs()]
            texts += [
                json.dumps(client.read_flow_run(s.state_details.flow_run_id).model_dump(mode="json"))
                for s in (state, failed)
            ]
        texts += [str(error.value), repr(error.value), repr(store)]
        assert any("released s3://" in t for t in texts)  # the logs were read
        assert any("tuneline fetch" in t for t in texts)  # the release artifact was read
        assert not any(secret.encode() in blob for blob in everything)
        assert not any(secret in t for t in texts)
    finally:
        server.stop()


def test_model_card_says_how_the_merged_weights_were_checked():
    """peft's merge compares logits; the streaming merge (models bigger than a card) compares weights,
    and the card must not print a logit check that never ran."""
    from tasks.release.stage import model_card

    lineage = {
        "base_model": "org/base",
        "base_revision": "main",
        "code_version": "abc",
        "data": {"fingerprint": "d0", "sources": []},
        "params": {},
    }
    peft = {**lineage, "merge": {"dtype": "bf16", "max_logit_diff": 0.012, "tolerance": 0.05}}
    stream = {
        **lineage,
        "merge": {"method": "stream", "dtype": "bf16", "max_weight_rel_diff": 0.0031, "tolerance": 0.0078},
    }
    assert "max |Δlogit| against base + adapter 0.012 ≤ 0.05" in model_card(MODEL, peft, EVAL_REPORT)
    card = model_card(MODEL, stream, EVAL_REPORT)
    assert "relative weight difference against base + adapter 0.0031 ≤ 0.0078, merged shard by shard" in card
    assert "Δlogit" not in card
