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
    release has none."""
    key = f"{release_prefix(champion.model_name, champion.release_id)}/eval/report.json"
    if not store.exists(key):
        return None
    try:
        return json.loads(store.read_bytes(key))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(
            f"release {champion.model_name}/{champion.release_id} at {store.where()}: eval/report.json is not valid "
            f"JSON ({e})"
        ) from None


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
