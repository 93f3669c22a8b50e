"""The champion a night is gated against (tasks/artifacts/registry.py), and LATEST that must not move under a
release: a broken champion is a clear error before training, a rerun with nothing new is not compared
with itself, and a release refuses when LATEST moved during the run (on the real S3 server too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.artifacts.registry import (
    ChampionRef,
    RegistryError,
    current_champion,
    download_champion_model,
    gate_champion,
    latest_release,
)
from tasks.artifacts.store import Store
from tasks.release.stage import ReleaseError, publish_release

MODEL = "champ"


def _release(store: Store, rid: str, merge_fp: str, champion: dict | None, tmp: Path) -> None:
    weights = tmp / rid / "model.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(rid.encode() * 100)
    lineage = {"stages": {"merge": merge_fp}, "champion": champion}
    publish_release(store, MODEL, rid, {"model/model.safetensors": weights}, lineage)


def test_no_release_yet_means_no_champion(tmp_path):
    assert current_champion(Store(str(tmp_path)), MODEL) is None


def test_champion_is_latest_with_its_manifest_digest(tmp_path):
    store = Store(str(tmp_path / "root"))
    _release(store, "20260101T000000Z-aaaa", "m1", None, tmp_path)
    champ = current_champion(store, MODEL)
    assert champ.release_id == "20260101T000000Z-aaaa" and len(champ.manifest_sha256) == 64
    model = download_champion_model(store, champ, tmp_path / "dl")
    assert (model / "model.safetensors").read_bytes() == b"20260101T000000Z-aaaa" * 100


@pytest.mark.parametrize("content, message", [("{not json", "is not valid JSON"), ('{"x": 1}', "no 'files' table")])
def test_unreadable_champion_manifest_names_the_release_and_the_file(tmp_path, content, message):
    store = Store(str(tmp_path))
    store.write_bytes(f"releases/{MODEL}/LATEST", b"r1")
    store.write_bytes(f"releases/{MODEL}/r1/manifest.json", content.encode())
    with pytest.raises(RegistryError) as err:
        current_champion(store, MODEL)
    assert f"release {MODEL}/r1" in str(err.value) and "manifest.json" in str(err.value) and message in str(err.value)


def test_a_night_that_reproduces_the_champion_keeps_the_champion_it_was_gated_against(tmp_path):
    store = Store(str(tmp_path / "root"))
    _release(store, "20260101T000000Z-aaaa", "m1", None, tmp_path)
    first = current_champion(store, MODEL)
    _release(store, "20260102T000000Z-bbbb", "m2", first.model_dump(), tmp_path)
    latest = current_champion(store, MODEL)
    assert gate_champion(store, latest, "m3") == latest  # a new model: beat LATEST
    assert gate_champion(store, latest, "m2") == first  # LATEST's own model: its own champion, not itself
    assert gate_champion(store, first, "m1") is None  # the first release was gated against the base only
    assert gate_champion(store, None, "m9") is None


def test_release_refuses_when_latest_moved_during_the_run(store, tmp_path):
    _release(store, "20260101T000000Z-aaaa", "m1", None, tmp_path)
    seen_at_start = latest_release(store, MODEL)
    # Meanwhile an operator rolls back (or another run releases): LATEST names something else.
    _release(store, "20260102T000000Z-bbbb", "m2", None, tmp_path)
    weights = tmp_path / "night.safetensors"
    weights.write_bytes(b"night")
    with pytest.raises(ReleaseError, match="LATEST of champ moved from 20260101T000000Z-aaaa to 20260102T000000Z-bbbb"):
        publish_release(store, MODEL, "20260103T000000Z-cccc", {"model/x": weights}, {}, expected_latest=seen_at_start)
    assert not store.exists(f"releases/{MODEL}/20260103T000000Z-cccc/manifest.json")
    assert latest_release(store, MODEL) == "20260102T000000Z-bbbb"  # the move made meanwhile stands
    # Gated against the current LATEST, the same night publishes.
    manifest = publish_release(
        store, MODEL, "20260103T000000Z-cccc", {"model/x": weights}, {}, expected_latest="20260102T000000Z-bbbb"
    )
    assert manifest["release_id"] == latest_release(store, MODEL) == "20260103T000000Z-cccc"
    assert json.loads(store.read_bytes(f"releases/{MODEL}/20260103T000000Z-cccc/manifest.json"))["files"]


def test_champion_ref_is_what_the_fingerprint_sees():
    a = ChampionRef(model_name=MODEL, release_id="r1", manifest_sha256="0" * 64)
    assert a.model_dump() == {"model_name": MODEL, "release_id": "r1", "manifest_sha256": "0" * 64}
