"""Released models as the pipeline reads them: a model's champion (the release its ``LATEST`` names),
the champion's manifest, evaluation report and merged weights.

Shared by the evaluation stage (the champion is the model a night must beat) and the release stage
(``LATEST`` must still name that champion when the night publishes), so neither imports the other.
The layout is the release stage's (``tasks/release/stage.py``): ``<root>/releases/<model>/<release_id>/``
with ``manifest.json`` written last and ``LATEST`` after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts.store import Store, StoreError, safe_key, sha256_file

MANIFEST = "manifest.json"
LATEST = "LATEST"


class RegistryError(RuntimeError):
    """A release the pipeline must read is unreadable or incomplete; the message names it."""


class ChampionRef(BaseModel):
    """The release a night is compared with: its id and the digest of its manifest (its content)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(description="Released model name.")
    release_id: str = Field(description="The release LATEST named when the run read it.")
    manifest_sha256: str = Field(description="SHA-256 of its manifest.json: the champion's content, for fingerprints.")


def release_prefix(model_name: str, release_id: str) -> str:
    return f"releases/{safe_key(model_name)}/{safe_key(release_id)}"


def latest_release(store: Store, model_name: str) -> str | None:
    """The release id ``LATEST`` names, or None before the first release."""
    key = f"releases/{safe_key(model_name)}/{LATEST}"
    return store.read_bytes(key).decode().strip() if store.exists(key) else None


def read_manifest(store: Store, model_name: str, release_id: str) -> tuple[dict[str, Any], str]:
    """A release's manifest and its SHA-256; ``RegistryError`` naming the release and the file when it
    is missing or not a JSON manifest."""
    key = f"{release_prefix(model_name, release_id)}/{MANIFEST}"
    where = f"release {model_name}/{release_id} at {store.where()}: {MANIFEST}"
    try:
        raw = store.read_bytes(key)
    except (StoreError, OSError) as e:
        raise RegistryError(f"{where} cannot be read ({type(e).__name__}: {e})") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise RegistryError(f"{where} has no 'files' table: not a tuneline manifest")
    import hashlib

    return manifest, hashlib.sha256(raw).hexdigest()


def current_champion(store: Store, model_name: str) -> ChampionRef | None:
    """The champion to beat: the release ``LATEST`` names (None for a model's first release). Its
    manifest must be readable: a broken champion stops the night before any training."""
    release_id = latest_release(store, model_name)
    if release_id is None:
        return None
    _, digest = read_manifest(store, model_name, release_id)
    return ChampionRef(model_name=model_name, release_id=release_id, manifest_sha256=digest)


def champion_report(store: Store, champion: ChampionRef) -> dict[str, Any] | None:
    """The champion's own evaluation report (``eval/report.json`` of its release), or None when the
    release has none. Verified before anyone reuses it: the manifest must still be the one the run
    read (``manifest_sha256``) and the report's bytes must match the manifest's SHA-256 for it;
    ``RegistryError`` naming the release and the file otherwise."""
    import hashlib

    key = f"{release_prefix(champion.model_name, champion.release_id)}/eval/report.json"
    if not store.exists(key):
        return None
    name = f"release {champion.model_name}/{champion.release_id} at {store.where()}"
    manifest, digest = read_manifest(store, champion.model_name, champion.release_id)
    if digest != champion.manifest_sha256:
        raise RegistryError(f"{name}: {MANIFEST} changed since this run read it (SHA-256 {digest[:12]}…)")
    entry = manifest["files"].get("eval/report.json")
    raw = store.read_bytes(key)
    if not entry or hashlib.sha256(raw).hexdigest() != entry.get("sha256"):
        why = "is not in its manifest" if not entry else "does not match its manifest's SHA-256"
        raise RegistryError(f"{name}: eval/report.json {why}; its per-item results are not reused")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"{name}: eval/report.json is not valid JSON ({e})") from None


def download_champion_model(store: Store, champion: ChampionRef, dest: Path) -> Path:
    """The champion's merged model (``model/`` of its release) in ``dest``, every file checked against
    the manifest; ``RegistryError`` when the release has no merged model or a file does not match."""
    manifest, _ = read_manifest(store, champion.model_name, champion.release_id)
    files = {rel: e for rel, e in manifest["files"].items() if rel.startswith("model/")}
    name = f"release {champion.model_name}/{champion.release_id} at {store.where()}"
    prefix = release_prefix(champion.model_name, champion.release_id)
    if store.exists(f"{prefix}/pruned.json"):  # retention (tasks/release/retention.py) removed its merged weights
        raise RegistryError(
            f"{name} was pruned by retention (its merged model is gone) and its evaluation report cannot be reused "
            "for this measurement: promote a whole release as the champion, or evaluate with the champion's settings"
        )
    if not files:
        raise RegistryError(f"{name} has no merged model (release.include_merged was off) to evaluate as the champion")
    for rel, entry in sorted(files.items()):
        target = dest / safe_key(rel).removeprefix("model/")
        if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
            continue  # already here from an earlier attempt
        store.download_file(f"{prefix}/{safe_key(rel)}", target)
        if sha256_file(target) != entry["sha256"]:
            raise RegistryError(f"{name}: {rel} does not match its manifest checksum")
    return dest


def check_latest_unchanged(store: Store, model_name: str, expected: str | None) -> None:
    """Raise ``RegistryError`` when ``LATEST`` no longer names the champion the gate compared with
    (a rollback or another run moved it meanwhile): publishing now would overwrite that decision."""
    current = latest_release(store, model_name)
    if current != expected:
        raise RegistryError(
            f"LATEST of {model_name} moved from {expected or '(none)'} to {current or '(none)'} since this run's gate "
            "compared with it: nothing released (rerun to be compared with the new champion)"
        )


def gate_champion(store: Store, latest: ChampionRef | None, merged_fingerprint: str) -> ChampionRef | None:
    """The champion a night is gated against: the release ``LATEST`` named at the start of the run —
    unless that release *is* this night's merged model (a rerun with nothing new). Then the night is
    the champion itself, and keeps the champion that release was gated against: evaluation and release
    stay cache hits instead of comparing a model with itself."""
    if latest is None:
        return None
    manifest, _ = read_manifest(store, latest.model_name, latest.release_id)
    if manifest.get("stages", {}).get("merge") != merged_fingerprint:
        return latest
    previous = manifest.get("champion") or None
    if not previous or not previous.get("release_id"):
        return None
    return ChampionRef(**{k: previous[k] for k in ChampionRef.model_fields})


def pinned_anchor(store: Store, model_name: str) -> str | None:
    """The release the newest ``pin`` entry of the move log names (``tuneline release pin``), or None.
    The log's layout is the release operations' (``tasks/release/ops.py``: one JSON object per move
    under ``releases/<model>/log/``, keys starting with the time, so sorted keys are oldest first)."""
    pinned = None
    for key in sorted(store.list(f"releases/{safe_key(model_name)}/log")):
        try:
            entry = json.loads(store.read_bytes(key))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(entry, dict) and entry.get("action") == "pin" and entry.get("to"):
            pinned = str(entry["to"])
    return pinned


def first_release(store: Store, model_name: str) -> str | None:
    """The oldest complete release of a model (release ids start with their UTC time), or None."""
    prefix = f"releases/{safe_key(model_name)}/"
    parts = (k[len(prefix) :].split("/") for k in store.list(prefix.rstrip("/")))
    ids = sorted(p[0] for p in parts if len(p) == 2 and p[1] == MANIFEST and not p[0].startswith("."))
    return ids[0] if ids else None


def current_anchor(store: Store, model_name: str) -> ChampionRef | None:
    """The anchor every night is also compared with (cumulative tolerances): the release a person
    pinned, else the model's first release; None before the first release."""
    release_id = pinned_anchor(store, model_name) or first_release(store, model_name)
    if release_id is None:
        return None
    _, digest = read_manifest(store, model_name, release_id)
    return ChampionRef(model_name=model_name, release_id=release_id, manifest_sha256=digest)


def gate_anchor(store: Store, anchor: ChampionRef | None, merged_fingerprint: str) -> ChampionRef | None:
    """As ``gate_champion`` for the anchor: when the anchor release *is* this night's merged model (a
    rerun with nothing new), the anchor that release was gated against, so reruns stay cache hits."""
    if anchor is None:
        return None
    manifest, _ = read_manifest(store, anchor.model_name, anchor.release_id)
    if manifest.get("stages", {}).get("merge") != merged_fingerprint:
        return anchor
    previous = manifest.get("anchor") or None
    if not previous or not previous.get("release_id"):
        return None
    return ChampionRef(**{k: previous[k] for k in ChampionRef.model_fields})
