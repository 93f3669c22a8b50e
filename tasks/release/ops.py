"""Release operations: list and show a model's releases, and move ``LATEST`` (promote, roll back, or a
nightly's release) by compare-and-swap, each move logged as one object under ``releases/<model>/log/``.

A shared piece (not a stage): the release stage (``tasks/release/stage.py``) moves ``LATEST`` through
``move_latest`` and the operator commands (``flows/release_ops.py``) use the rest. The layout::

    releases/<model>/LATEST                 the release id, moved only by ``move_latest``
    releases/<model>/log/<time>-<id>.json   one object per move: who, when, from, to, why (never rewritten);
                                            ``pin`` entries name the anchor (``tuneline release pin``)
    releases/<model>/<release_id>/pruned.json   retention removed its merged weights (tasks/release/retention.py)
    releases/<model>/.ops.lock              held by promote, rollback and prune (tasks/artifacts/locks.py)

Every move compares ``LATEST`` with the value its mover read and writes with the same conditional
write as the store locks (S3 ``If-Match``/``If-None-Match``, locally an exclusive create or a rename
under ``flock``): a nightly gated against yesterday's champion cannot overwrite a rollback made
meanwhile, and of two racing promotions one wins, the other fails with ``LatestMoved``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Literal

from tasks.artifacts.locks import PreconditionFailed, StoreLock, put_if, read_versioned
from tasks.artifacts.registry import LATEST, MANIFEST, first_release, latest_release, pinned_anchor, release_prefix
from tasks.artifacts.store import Store, StoreError, safe_key, sha256_file

LOG = "log"
PRUNED = "pruned.json"
OPS_LOCK = ".ops.lock"
HAND_MOVES = ("promote", "rollback", "pin")  # made by a person: their targets are never pruned


class ReleaseError(RuntimeError):
    """A release is incomplete, does not match its manifest, or cannot be moved; the one-line message
    names the model, the release and the store."""


class LatestMoved(ReleaseError):
    """``LATEST`` no longer names what the mover read: nothing was moved."""


def model_prefix(model: str) -> str:
    return f"releases/{safe_key(model)}"


def actor() -> str:
    """Who moves LATEST from this process: ``TUNELINE_ACTOR``, else ``user@host``."""
    if os.environ.get("TUNELINE_ACTOR"):
        return os.environ["TUNELINE_ACTOR"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def ops_lock(store: Store, model: str, owner: str, timeout_s: float = 900) -> StoreLock:
    """The lock promote, rollback and prune hold, so that prune never deletes what a move just chose."""
    return StoreLock(store, f"{model_prefix(model)}/{OPS_LOCK}", owner=owner, timeout_s=timeout_s)


# ----------------------------------------------------------------------------------------------
# The move log
# ----------------------------------------------------------------------------------------------
def write_log(store: Store, model: str, entry: dict[str, Any]) -> str:
    """One new object per entry (a conditional create: never a read-modify-write of a shared file)."""
    when = _now()
    key = f"{model_prefix(model)}/{LOG}/{when:%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex[:8]}.json"
    put_if(store, key, json.dumps({"when": when.isoformat(), **entry}, indent=2, default=str).encode())
    return key


def read_log(store: Store, model: str) -> list[dict[str, Any]]:
    """Every log entry of a model, oldest first (the key starts with the time)."""
    out = []
    for key in store.list(f"{model_prefix(model)}/{LOG}"):
        try:
            out.append({**json.loads(store.read_bytes(key)), "key": key})
        except (json.JSONDecodeError, UnicodeDecodeError):
            out.append({"key": key, "action": "unreadable"})
    return out


# ----------------------------------------------------------------------------------------------
# Moving LATEST
# ----------------------------------------------------------------------------------------------
def move_latest(
    store: Store, model: str, to: str, *, expected: str | None, action: str, who: str, why: str, **extra: Any
) -> dict[str, Any]:
    """Point ``LATEST`` at ``to`` if it still names ``expected`` (None: no release yet), by a
    conditional write at the moment of the write; then log the move. ``LatestMoved`` when it does
    not (nothing written). Returns the log entry."""
    key = f"{model_prefix(model)}/{LATEST}"
    current = read_versioned(store, key)
    now = current[0].decode().strip() if current else None
    if now != expected:
        raise LatestMoved(_moved(store, model, expected, now, action, to))
    try:
        put_if(store, key, to.encode(), version=current[1] if current else None)
    except PreconditionFailed:  # another mover wrote between our read and our write
        raise LatestMoved(_moved(store, model, expected, latest_release(store, model), action, to)) from None
    entry = {"action": action, "model": model, "from": expected, "to": to, "who": who, "why": why, **extra}
    try:
        write_log(store, model, entry)
    except StoreError as e:  # the move stands (LATEST is atomic); say that only its record is missing
        raise StoreError(f"LATEST of {model} moved from {expected} to {to}, but its log entry was not written: {e}")
    return entry


def _moved(store: Store, model: str, expected: str | None, now: str | None, action: str, to: str) -> str:
    return (
        f"LATEST of {model} at {store.where()} moved from {expected or '(none)'} to {now or '(none)'} since this "
        f"{action} read it: not moved to {to} (run it again to act on the new LATEST)"
    )


# ----------------------------------------------------------------------------------------------
# Reading releases
# ----------------------------------------------------------------------------------------------
def release_ids(store: Store, model: str) -> dict[str, bool]:
    """Every release folder of a model: id -> complete (has its manifest), oldest first."""
    found: dict[str, bool] = {}
    prefix = model_prefix(model) + "/"
    for key in store.list(model_prefix(model)):
        parts = key[len(prefix) :].split("/")
        if len(parts) < 2 or parts[0] in (LOG, ".pending") or parts[0].startswith("."):
            continue
        found[parts[0]] = found.get(parts[0], False) or parts[1:] == [MANIFEST]
    return dict(sorted(found.items()))


def known_models(store: Store) -> list[str]:
    return sorted({k.split("/")[1] for k in store.list("releases") if k.count("/") >= 2})


def require_model(store: Store, model: str) -> dict[str, bool]:
    """The model's releases; ``ReleaseError`` naming the store and the models it has when none."""
    ids = release_ids(store, model)
    if not ids:
        models = known_models(store)
        raise ReleaseError(
            f"no releases of model {model!r} at {store.where()} (models there: {', '.join(models) or 'none'})"
        )
    return ids


def load_manifest(store: Store, model: str, release_id: str) -> dict[str, Any]:
    """A complete release's manifest; ``ReleaseError`` naming the id (and some known ones) when unknown."""
    safe_key(release_id)
    key = f"{release_prefix(model, release_id)}/{MANIFEST}"
    if not store.exists(key):
        ids = [r for r, complete in require_model(store, model).items() if complete]
        state = "incomplete (no manifest)" if release_id in release_ids(store, model) else "unknown"
        raise ReleaseError(
            f"release {model}/{release_id} at {store.where()} is {state}; newest complete: "
            f"{', '.join(ids[-5:][::-1]) or 'none'}"
        )
    try:
        return json.loads(store.read_bytes(key))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReleaseError(f"release {model}/{release_id} at {store.where()}: {MANIFEST} is unreadable ({e})") from None


def pruned_info(store: Store, model: str, release_id: str) -> dict[str, Any] | None:
    key = f"{release_prefix(model, release_id)}/{PRUNED}"
    return json.loads(store.read_bytes(key)) if store.exists(key) else None


def summary(manifest: dict[str, Any], latest: str | None, pruned: dict[str, Any] | None) -> dict[str, Any]:
    """One row of ``release list``: id, time, verdict, champion beaten, forced, size, LATEST, pruned."""
    gate = manifest.get("gate") or {}
    files = manifest.get("files") or {}
    kept = {k: e for k, e in files.items() if not (pruned and k in pruned.get("deleted", []))}
    return {
        "release_id": manifest.get("release_id"),
        "created": manifest.get("created"),
        "gate": "passed" if gate.get("passed") else ("FAILED" if gate else "?"),
        "champion": (manifest.get("champion") or {}).get("release_id"),
        "forced": bool(manifest.get("forced")),
        "size_bytes": sum(e.get("size", 0) for e in kept.values()),
        "latest": manifest.get("release_id") == latest,
        "pruned": bool(pruned),
    }


def list_releases(store: Store, model: str) -> list[dict[str, Any]]:
    """Every release of a model, oldest first; an incomplete one has only its id and ``incomplete``."""
    ids = require_model(store, model)
    latest = latest_release(store, model)
    rows = []
    for rid, complete in ids.items():
        if complete:
            rows.append(summary(load_manifest(store, model, rid), latest, pruned_info(store, model, rid)))
        else:
            rows.append({"release_id": rid, "incomplete": True, "latest": rid == latest})
    return rows


def verify_files(
    store: Store, prefix: str, entries: dict[str, dict[str, Any]], how: Literal["content", "metadata"] = "content"
) -> dict[str, str]:
    """Compare each file in the store with its entry (size and SHA-256); return ``{key: problem}``."""
    problems = {}
    for rel, entry in entries.items():
        key = f"{prefix}/{rel}"
        there = store.head(key)
        if there is None:
            problems[rel] = "missing"
        elif there["size"] != entry["size"]:
            problems[rel] = f"size {there['size']} != {entry['size']}"
        elif how == "content" and store.sha256_of(key) != entry["sha256"]:
            problems[rel] = "checksum mismatch"
        elif how == "metadata" and there["sha256"] != entry["sha256"]:
            problems[rel] = "checksum mismatch"
    return problems


# ----------------------------------------------------------------------------------------------
# Promote and roll back
# ----------------------------------------------------------------------------------------------
def _check_promotable(store: Store, model: str, release_id: str, verify: Literal["content", "metadata"]) -> None:
    manifest = load_manifest(store, model, release_id)
    pruned = pruned_info(store, model, release_id)
    if pruned:
        raise ReleaseError(
            f"release {model}/{release_id} at {store.where()} was pruned by retention on {pruned.get('when')} (its "
            "merged weights are gone): it cannot be LATEST; re-merge its adapter in a new run instead"
        )
    problems = verify_files(store, release_prefix(model, release_id), manifest["files"], verify)
    if problems:
        shown = "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:5])
        raise ReleaseError(
            f"release {model}/{release_id} at {store.where()} fails its checksums ({shown}"
            f"{'; …' if len(problems) > 5 else ''}): not promoted"
        )


def promote(
    store: Store,
    model: str,
    release_id: str,
    *,
    who: str,
    why: str = "",
    verify: Literal["content", "metadata"] = "content",
    expected: str | None | object = ...,
) -> dict[str, Any]:
    """Make ``release_id`` LATEST, if its files pass their checksums and LATEST still names what this
    call read first (``expected``, or LATEST as read on entry). Returns the log entry."""
    load_manifest(store, model, release_id)  # an unknown release is refused before the lock: nothing written
    seen = latest_release(store, model) if expected is ... else expected
    with ops_lock(store, model, who):
        _check_promotable(store, model, release_id, verify)
        if seen == release_id and latest_release(store, model) == release_id:
            return {"action": "promote", "from": seen, "to": release_id, "unchanged": True}
        return move_latest(
            store, model, release_id, expected=seen, action="promote", who=who, why=why or "promoted by hand"
        )


def pin(store: Store, model: str, release_id: str, *, who: str, why: str = "") -> dict[str, Any]:
    """Make ``release_id`` the anchor every night is also gated against, with the cumulative
    tolerances (``tasks/evaluate/gate.py``): a log entry ``pin`` (from the previous anchor), written
    under the ops lock like any move of LATEST; LATEST itself does not move. The release must be
    complete, unpruned and pass its checksums (its merged model may have to be evaluated again)."""
    require_model(store, model)
    load_manifest(store, model, release_id)  # an unknown release is refused before the lock: nothing written
    with ops_lock(store, model, who):
        _check_promotable(store, model, release_id, "content")
        before = pinned_anchor(store, model)
        if before == release_id:
            return {"action": "pin", "from": before, "to": release_id, "unchanged": True}
        entry = {
            "action": "pin",
            "model": model,
            "from": before or first_release(store, model),
            "to": release_id,
            "who": who,
            "why": why or "pinned by hand",
        }
        write_log(store, model, entry)
        return entry


def rejected_releases(log: list[dict[str, Any]]) -> set[str]:
    """Releases a rollback moved away from, unless a person promoted them again afterwards."""
    rejected: set[str] = set()
    for entry in log:
        if entry.get("action") == "rollback" and entry.get("from"):
            rejected.add(entry["from"])
        elif entry.get("action") == "promote":
            rejected.discard(entry.get("to"))
    return rejected


def rollback_target(store: Store, model: str, current: str, verify: Literal["content", "metadata"]) -> str:
    """The newest release older than ``current`` that is good: complete, gate passed and not forced,
    not pruned, not rolled back from, and whose files pass their checksums."""
    rejected = rejected_releases(read_log(store, model))
    skipped = []
    for rid, complete in reversed(release_ids(store, model).items()):
        if rid >= current or not complete:
            continue
        manifest = load_manifest(store, model, rid)
        why_not = (
            "gate failed or forced"
            if manifest.get("forced") or not (manifest.get("gate") or {}).get("passed")
            else "rolled back from before"
            if rid in rejected
            else "pruned"
            if pruned_info(store, model, rid)
            else None
        )
        if why_not is None:
            try:
                _check_promotable(store, model, rid, verify)
                return rid
            except ReleaseError:
                why_not = "fails its checksums"
        skipped.append(f"{rid}: {why_not}")
    raise ReleaseError(
        f"no earlier good release of {model} at {store.where()} to roll back to from {current}"
        + (f" ({'; '.join(skipped[:5])})" if skipped else " (it is the oldest)")
    )


def rollback(
    store: Store, model: str, *, who: str, why: str = "", verify: Literal["content", "metadata"] = "content"
) -> dict[str, Any]:
    """Move LATEST to the previous good release (``rollback_target``). Returns the log entry."""
    require_model(store, model)
    current = latest_release(store, model)
    if current is None:
        raise ReleaseError(f"model {model} at {store.where()} has no LATEST: nothing to roll back")
    with ops_lock(store, model, who):
        target = rollback_target(store, model, current, verify)
        return move_latest(
            store, model, target, expected=current, action="rollback", who=who, why=why or "rolled back by hand"
        )


# ----------------------------------------------------------------------------------------------
# Fetching (``tuneline fetch``)
# ----------------------------------------------------------------------------------------------
def fetch_release(store: Store, model_name: str, release_id: str, dest: Path) -> dict[str, Any]:
    """Download a release (``LATEST`` or an id) into ``dest`` and verify every file's size and SHA-256
    against the manifest. Files land in ``dest`` only when all of them are right; on a mismatch
    nothing is left behind and ``ReleaseError`` names the bad files."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ReleaseError(f"destination {dest} is not a folder")
    if dest.exists() and any(dest.iterdir()):
        raise ReleaseError(f"destination {dest} is not empty")
    if dest.parent.exists() and not dest.parent.is_dir():
        raise ReleaseError(f"cannot create the destination {dest}: {dest.parent} is not a folder")
    if release_id == LATEST:
        release_id = latest_release(store, model_name)
        if release_id is None:
            raise ReleaseError(f"no release of {model_name!r} at {store.where()} ({LATEST} is missing)")
    prefix = release_prefix(model_name, release_id)
    if not store.exists(f"{prefix}/{MANIFEST}"):
        raise ReleaseError(f"no complete release {model_name}/{release_id} at {store.where()} (no {MANIFEST})")
    manifest = store.read_json(f"{prefix}/{MANIFEST}")
    pruned = pruned_info(store, model_name, release_id)
    if pruned:
        raise ReleaseError(
            f"release {model_name}/{release_id} at {store.where()} was pruned by retention on {pruned.get('when')}: "
            "its merged weights are gone (adapter/, eval/ and the manifest remain)"
        )
    try:  # a parent that is a file, or a place no folder can be made (/proc): one line naming dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    except OSError as e:
        raise ReleaseError(f"cannot create the destination {dest}: {e.strerror or type(e).__name__}") from None
    try:
        bad = []
        for rel, entry in sorted(manifest["files"].items()):
            rel = safe_key(rel)  # the manifest is data from the store: never a path outside dest
            target = tmp / rel
            store.download_file(f"{prefix}/{rel}", target)
            if target.stat().st_size != entry["size"] or sha256_file(target) != entry["sha256"]:
                bad.append(rel)
        if bad:
            raise ReleaseError(
                f"release {model_name}/{release_id} at {store.where()}: checksum mismatch for {', '.join(bad)}; "
                "nothing was kept"
            )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        if dest.exists():
            dest.rmdir()
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
