"""Retention: old releases lose their merged weights, old stage folders go; what lineage needs stays.

A shared piece, run after each release (``after_release``, by the retrain flow) and by
``tuneline release prune``. For one model:

- the newest ``keep_last`` complete releases stay whole, and so do the release ``LATEST`` names, the
  champion its gate used, and every release a person made LATEST (promote, rollback: the move log);
- every other complete release loses its ``model/`` files (the merged weights, the bulk of it) and
  keeps its manifest, adapter, evaluation report and model card, so lineage, champion comparisons
  and a re-merge stay possible. ``pruned.json`` is written *first*, so a half-pruned release already
  reads as pruned and is never promoted;
- stage folders (``stages/<stage>/<fp>/``) older than ``stage_max_age_days`` go, unless a whole
  release of any model points at them (its manifest's stages and their inputs) or a run holds their
  lock; ``_SUCCESS`` is deleted first so a half-deleted folder is never trusted.

Everything deleted is logged (the run's log and one ``prune`` entry in the model's move log). All of
it runs under the model's operations lock (``tasks/release/ops.py``), so a promotion never races it.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from tasks.artifacts.registry import first_release, latest_release, pinned_anchor, release_prefix
from tasks.artifacts.store import SUCCESS, StageRef, Store, safe_key
from tasks.core.common import run_logger
from tasks.release.ops import (
    HAND_MOVES,
    PRUNED,
    load_manifest,
    model_prefix,
    ops_lock,
    pruned_info,
    read_log,
    release_ids,
    write_log,
)


def protected_releases(store: Store, model: str, keep_last: int) -> dict[str, str]:
    """Release id -> why it keeps its merged weights."""
    complete = [rid for rid, ok in release_ids(store, model).items() if ok]
    keep = {rid: f"one of the newest {keep_last}" for rid in complete[-keep_last:]} if keep_last > 0 else {}
    latest = latest_release(store, model)
    if latest:
        keep[latest] = "LATEST"
        if latest in complete:
            champion = (load_manifest(store, model, latest).get("champion") or {}).get("release_id")
            if champion:
                keep[champion] = "the champion LATEST's gate used"
    anchor = pinned_anchor(store, model) or first_release(store, model)
    if anchor:  # every night is gated against it; its weights are needed when its report cannot be reused
        keep.setdefault(anchor, "the anchor (pinned, else the first release)")
    for entry in read_log(store, model):
        if entry.get("action") in HAND_MOVES and entry.get("to"):
            keep.setdefault(entry["to"], f"chosen by hand ({entry['action']} by {entry.get('who')})")
    return keep


def _kept_fingerprints(store: Store) -> set[str]:
    """Stage fingerprints a whole (unpruned) release of any model points at, with their inputs."""
    fps: set[str] = set()
    keys = store.list("releases")
    pruned = {k.rsplit("/", 1)[0] for k in keys if k.endswith(f"/{PRUNED}") and k.count("/") == 3}
    for key in keys:
        if not key.endswith("/manifest.json") or key.count("/") != 3 or key.rsplit("/", 1)[0] in pruned:
            continue
        manifest = json.loads(store.read_bytes(key))
        fps.update(v for v in (manifest.get("stages") or {}).values() if v)
        for stage in (manifest.get("stage_lineage") or {}).values():
            fps.add(stage.get("fingerprint"))
            fps.update(i.get("fingerprint") for i in ((stage.get("lineage") or {}).get("inputs") or []))
    return {fp for fp in fps if fp}


def _stage_time(ref: StageRef) -> dt.datetime | None:
    stamp = (ref.metrics.get("lineage") or {}).get("time")
    try:
        return dt.datetime.fromisoformat(stamp) if stamp else None
    except ValueError:
        return None


def prune_stages(store: Store, max_age_days: int, logger: Any) -> list[str]:
    """Delete stage folders older than ``max_age_days`` that no whole release needs; returns them."""
    if max_age_days <= 0:
        return []
    kept = _kept_fingerprints(store)
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=max_age_days)
    deleted = []
    for key in store.list("stages"):
        parts = key.split("/")
        if len(parts) != 4 or parts[3] != SUCCESS or parts[2] in kept or store.exists(f"locks/{parts[1]}/{parts[2]}"):
            continue  # not a complete folder's marker, needed by a release, or in use by a run
        try:
            ref = StageRef.model_validate_json(store.read_bytes(key))
        except ValueError:
            continue
        built = _stage_time(ref)
        if built is None or built > cutoff:  # unknown age: keep
            continue
        folder = f"stages/{safe_key(parts[1])}/{safe_key(parts[2])}"
        store.delete(f"{folder}/{SUCCESS}")  # first: a half-deleted folder is never taken as complete
        store.delete_prefix(folder)
        logger.info("retention: deleted stage folder %s (built %s)", store.uri(folder), built.isoformat())
        deleted.append(folder)
    return deleted


def prune(
    store: Store, model: str, keep_last: int = 7, stage_max_age_days: int = 30, *, who: str, logger: Any = None
) -> dict[str, Any]:
    """Apply retention to one model's releases and to the stage folders; returns what was deleted."""
    logger = logger or run_logger()
    with ops_lock(store, model, who):
        keep = protected_releases(store, model, keep_last)
        releases: dict[str, int] = {}
        for rid, complete in release_ids(store, model).items():
            if not complete or rid in keep or pruned_info(store, model, rid):
                continue
            prefix = release_prefix(model, rid)
            doomed = [k for k in load_manifest(store, model, rid)["files"] if k.startswith("model/")]
            marker = {"when": dt.datetime.now(dt.timezone.utc).isoformat(), "who": who, "deleted": doomed}
            store.write_bytes(f"{prefix}/{PRUNED}", json.dumps(marker, indent=2).encode())
            for rel in doomed:
                store.delete(f"{prefix}/{safe_key(rel)}")
            logger.info("retention: %s/%s lost its merged weights (%d files)", model, rid, len(doomed))
            releases[rid] = len(doomed)
        stages = prune_stages(store, stage_max_age_days, logger)
        result = {"releases": releases, "stages": stages, "kept": keep}
        if releases or stages:
            write_log(store, model, {"action": "prune", "model": model, "who": who, **result})
    return result


def after_release(store: Store, model: str, keep_last: int, stage_max_age_days: int, logger: Any) -> dict | None:
    """Retention after a night's release, as its flow run. Not a task: a rerun with nothing new stays
    all cache hits. A failure is logged as an error and leaves the release standing."""
    from prefect.runtime import flow_run

    from tasks.artifacts.locks import LockTimeout
    from tasks.artifacts.store import StoreError
    from tasks.release.ops import ReleaseError

    who = f"flow run {flow_run.name or '?'} ({flow_run.id or '?'})"
    try:
        return prune(store, model, keep_last, stage_max_age_days, who=who, logger=logger)
    except (StoreError, ReleaseError, LockTimeout) as e:
        logger.error("retention failed (the release stands; run `tuneline release prune %s`): %s", model, e)
        return None


__all__ = ["after_release", "prune", "prune_stages", "protected_releases", "model_prefix"]
