"""Publishing a stage folder into the artifact store: once, atomically, with a digest of its files.

``publish`` never deletes what another run wrote, and a reader sees a stage folder whole or not at
all (``completed`` trusts only folders with ``_SUCCESS``). It is called under the stage's lock
(``run_stage``, ``tasks/artifacts/locks.py``), so one run at a time publishes a fingerprint:

- **Local root**: the files are copied into ``stages/<stage>/.tmp-<fp>-<uuid>/`` with ``_SUCCESS``,
  then ``os.rename``-d to ``stages/<stage>/<fp>/`` — one atomic step on one filesystem. A folder
  already there without ``_SUCCESS`` (a publish killed half-way, in the days before this one) is
  moved aside to ``.trash-<fp>-<uuid>`` first; a complete one is never touched: it wins.
- **S3 root** (no rename): every file is uploaded, leftovers of a killed attempt that this build did
  not produce are removed, and ``_SUCCESS`` is written last by a conditional create
  (``If-None-Match: *``). That is enough because readers trust only folders with ``_SUCCESS``; the
  only writer of an incomplete folder is the lock's holder, whose same-key uploads overwrite what a
  killed attempt left; and the conditional create means that even two publishers without the lock
  get one ``_SUCCESS``, the first complete one — the second learns it lost and returns the winner's
  ref. Before committing, every object's recorded SHA-256 is checked against ours, so a run that lost
  its lock while uploading fails instead of committing a mixture.

The ref in ``_SUCCESS`` carries ``digest``: what the folder *is*, for its consumers' fingerprints — a
SHA-256 over the sorted lines ``<relative path> <content SHA-256>`` of the folder (``_SUCCESS``
excluded), computed from the local folder before upload (``content_hashes``). So that the same result
has one digest: a JSON file counts by its canonical form, without volatile measurements (wall times,
rates, peak memory: ``VOLATILE``) and with set-valued lists sorted (``SET_KEYS``: peft writes
``target_modules`` in a Python set's per-process order), and the files a stage writes for people from
the rest of its folder (``DESCRIPTIONS``: the data report; ``FOR_PEOPLE``: TensorBoard event files) do not count. Checksums of the bytes
(``file_hashes``) still guard every upload and every release.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from tasks.artifacts.locks import PreconditionFailed, put_if
from tasks.artifacts.store import SUCCESS, StageRef, Store, StoreError, sha256_file


def file_hashes(folder: Path) -> dict[str, str]:
    """``{relative POSIX path: SHA-256}`` of every file under ``folder``, ``_SUCCESS`` excluded."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != SUCCESS)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


#: Per stage, files written for people from the rest of the folder: not part of what the folder is (the
#: data stage's rows are its content; a change to the report's wording must not retrain everything after).
DESCRIPTIONS: dict[str, frozenset[str]] = {"data": frozenset({"report.md", "report.json", "token_lengths.png"})}
#: Folders any stage may hold for people, never part of what it is: TensorBoard's event files (tracking.tensorboard;
#: their names carry a time and a host, so two runs that computed the same thing differ there).
FOR_PEOPLE = ("tensorboard/",)
#: JSON keys whose values are measurements of the run, not of its result: they differ between two runs
#: that computed the same thing.
VOLATILE = re.compile(r"runtime|seconds|per_second|wall|timestamp|^time$|_time$|peak_\w*memory")
#: JSON keys whose list values are sets: their order carries nothing.
SET_KEYS = frozenset({"target_modules", "modules_to_save", "exclude_modules", "trainable_token_indices"})


def _canonical_json(value: object) -> object:
    """``value`` without volatile keys, with set-valued lists sorted (see the module docstring).

    >>> _canonical_json({"train_runtime": 3.2, "loss": 1.0, "target_modules": ["v_proj", "q_proj"]})
    {'loss': 1.0, 'target_modules': ['q_proj', 'v_proj']}
    """
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if VOLATILE.search(str(key)):
                continue
            if key in SET_KEYS and isinstance(item, list):
                item = sorted(item, key=lambda x: json.dumps(x, sort_keys=True))
            out[key] = _canonical_json(item)
        return out
    if isinstance(value, list):
        return [_canonical_json(v) for v in value]
    return value


def content_hashes(folder: Path, stage: str = "", hashes: dict[str, str] | None = None) -> dict[str, str]:
    """``{relative path: content SHA-256}``: ``file_hashes`` less the stage's ``DESCRIPTIONS``, with each
    JSON file hashed on its canonical form (sorted keys, no volatile measurements, sets sorted)."""
    folder = Path(folder)
    hashes = file_hashes(folder) if hashes is None else hashes
    out = {}
    for rel, sha in hashes.items():
        if rel in DESCRIPTIONS.get(stage, ()) or rel.startswith(FOR_PEOPLE):
            continue
        if rel.endswith(".json"):
            try:
                value = json.loads((folder / rel).read_text(encoding="utf-8"))
            except (OSError, ValueError):  # not JSON after all: its bytes are its content
                out[rel] = sha
                continue
            text = json.dumps(_canonical_json(value), sort_keys=True, ensure_ascii=False)
            sha = "json:" + hashlib.sha256(text.encode()).hexdigest()
        out[rel] = sha
    return out


def folder_digest(hashes: dict[str, str]) -> str:
    """The digest of a folder from its ``file_hashes``: SHA-256 of the sorted ``"<path> <sha256>\\n"`` lines.

    >>> folder_digest({"b.txt": "22", "a.txt": "11"}) == hashlib.sha256(b"a.txt 11\\nb.txt 22\\n").hexdigest()
    True
    """
    return hashlib.sha256("".join(f"{rel} {hashes[rel]}\n" for rel in sorted(hashes)).encode()).hexdigest()


def publish(store: Store, stage: str, fp: str, local_dir: Path, metrics: dict[str, Any]) -> StageRef:
    """Publish a finished stage's folder (see the module docstring); return the stored ref. A folder
    already complete is kept, and its ref returned: a stage folder is written once."""
    if (done := store.completed(stage, fp)) is not None:
        return done
    key = store.stage_key(stage, fp)
    hashes = file_hashes(local_dir)
    digest = folder_digest(content_hashes(local_dir, stage, hashes))
    ref = StageRef(stage=stage, fingerprint=fp, uri=store.uri(key), metrics=metrics, digest=digest)
    success = json.dumps(ref.model_dump(mode="json"), indent=2, ensure_ascii=False, default=str).encode()
    if store.is_s3:
        return _publish_s3(store, key, Path(local_dir), hashes, ref, success)
    return _publish_local(store, key, Path(local_dir), ref, success)


def _publish_local(store: Store, key: str, local_dir: Path, ref: StageRef, success: bytes) -> StageRef:
    dest = store.local_path(key)
    if local_dir.resolve() == dest.resolve():  # built in place: only the commit is left
        put_if(store, f"{key}/{SUCCESS}", success)
        return ref
    dest.parent.mkdir(parents=True, exist_ok=True)
    for leftover in dest.parent.glob(f".t*-{dest.name}-*"):  # .tmp/.trash of a killed attempt (we hold the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:12]}"
    try:
        shutil.copytree(local_dir, tmp, ignore=lambda d, names: [SUCCESS] if Path(d) == local_dir else [])
        (tmp / SUCCESS).write_bytes(success)
        try:
            os.rename(tmp, dest)  # atomic; fails when dest is a non-empty folder
        except OSError:
            if (dest / SUCCESS).exists():  # completed meanwhile by a run without the lock: it wins
                return store.completed(ref.stage, ref.fingerprint) or ref
            trash = dest.parent / f".trash-{dest.name}-{uuid.uuid4().hex[:12]}"
            os.rename(dest, trash)  # half-written and nobody's result
            os.rename(tmp, dest)
            if not (trash / SUCCESS).exists():
                shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ref


def _publish_s3(
    store: Store, key: str, local_dir: Path, hashes: dict[str, str], ref: StageRef, success: bytes
) -> StageRef:
    for rel, sha in hashes.items():
        head = store.head(f"{key}/{rel}")
        if head is None or head["sha256"] != sha or head["size"] != (local_dir / rel).stat().st_size:
            store.upload_file(local_dir / rel, f"{key}/{rel}", sha256=sha)  # same key: overwrites a killed attempt's
    strip = len(key) + 1
    for leftover in store.list(key):
        if leftover[strip:] not in hashes and leftover[strip:] != SUCCESS:
            store.delete(leftover)  # a file only a killed attempt produced: not part of this result
    for rel, sha in hashes.items():
        if (store.head(f"{key}/{rel}") or {}).get("sha256") != sha:
            raise StoreError(f"{store.uri(f'{key}/{rel}')} changed while publishing: another run writes here")
    try:
        put_if(store, f"{key}/{SUCCESS}", success)  # the commit: the first complete _SUCCESS wins
    except PreconditionFailed:
        winner = store.completed(ref.stage, ref.fingerprint)
        if winner is None:
            raise
        return winner
    return ref
