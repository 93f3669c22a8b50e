"""The anchor and the champion's report on a local root and on the real S3 server: ``tuneline release
pin`` moves the anchor (a move-log entry, like any move of LATEST; LATEST stays), the first release is
the anchor until then, retention keeps it, and the champion's per-item report is reused only when its
bytes match the manifest's SHA-256."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.artifacts.registry import (
    ChampionRef,
    RegistryError,
    champion_report,
    current_anchor,
    gate_anchor,
    latest_release,
)
from tasks.evaluate.champion import prepare_champion
from tasks.release.ops import read_log
from tasks.release.stage import publish_release
from tests.test_release_ops import MODEL, cli, rid, ship


def test_the_first_release_is_the_anchor_until_a_person_pins_another(store, tmp_path, capsys):
    assert current_anchor(store, MODEL) is None  # no release yet: no anchor
    for n in (1, 2, 3):
        ship(store, n, tmp_path, champion=n - 1 or None)
    assert latest_release(store, MODEL) == rid(3) and current_anchor(store, MODEL).release_id == rid(1)

    assert cli(store, "pin", rid(2), "--reason", "the release the customer signed off") == 0
    assert f"anchor pinned to {rid(2)} (was {rid(1)}" in capsys.readouterr().out
    anchor = current_anchor(store, MODEL)
    assert anchor.release_id == rid(2) and len(anchor.manifest_sha256) == 64
    assert latest_release(store, MODEL) == rid(3)  # pinning never moves LATEST
    entry = read_log(store, MODEL)[-1]
    assert (entry["action"], entry["from"], entry["to"]) == ("pin", rid(1), rid(2))
    assert entry["why"] == "the release the customer signed off" and entry["who"]
    assert cli(store, "log") == 0
    assert f"pin: {rid(1)} -> {rid(2)}" in capsys.readouterr().out

    # An unknown release is refused in one line; the anchor stays.
    assert cli(store, "pin", rid(9)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: release {MODEL}/{rid(9)}") and "\n" not in err
    assert current_anchor(store, MODEL).release_id == rid(2)

    # A rerun whose merged model *is* the anchor keeps the anchor that release was held to (none):
    # evaluation stays a cache hit instead of comparing a model with itself.
    assert gate_anchor(store, anchor, "merge-fp-2") is None
    assert gate_anchor(store, anchor, "merge-fp-new") == anchor


def _release_with_report(store, tmp: Path, n: int, report: dict) -> ChampionRef:
    files = {}
    for rel, data in (
        ("model/model.safetensors", b"weights" * 100),
        ("eval/report.json", json.dumps(report).encode()),
    ):
        path = tmp / f"r{n}" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = path
    publish_release(store, MODEL, rid(n), files, {"gate": {"passed": True}, "stages": {"merge": f"m{n}"}})
    return current_anchor(store, MODEL)


def test_the_champions_report_is_reused_only_when_it_matches_its_manifest(store, tmp_path):
    report = {"measurement": "m-key", "items": {"tuned": {"validation_loss": [1.0, 1.1, 0.9, 1.2, 1.0]}}}
    champion = _release_with_report(store, tmp_path, 1, report)
    reused = prepare_champion(store, champion, "m-key", cache=tmp_path / "cache")
    assert reused.how == "reused" and reused.items == report["items"]["tuned"]

    # Someone rewrites the stored report (better numbers for the champion): not reused, measured again
    # from its merged model (whose files are checked against the manifest).
    forged = {**report, "items": {"tuned": {"validation_loss": [9.0] * 5}}}
    store.write_bytes(f"releases/{MODEL}/{rid(1)}/eval/report.json", json.dumps(forged).encode())
    again = prepare_champion(store, champion, "m-key", cache=tmp_path / "cache")
    assert again.how == "evaluated" and again.items == {}
    assert again.why == (
        f"release {MODEL}/{rid(1)} at {store.where()}: eval/report.json does not match its manifest's SHA-256; "
        "its per-item results are not reused"
    )
    assert (Path(again.model_dir) / "model.safetensors").read_bytes() == b"weights" * 100
    with pytest.raises(RegistryError, match="does not match its manifest's SHA-256"):
        champion_report(store, champion)
