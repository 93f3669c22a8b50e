"""Checkpoints of a resumable stage copied to an S3 artifact store, so that a retry on another machine resumes.

With an ``s3://`` root a stage's scratch folder is a local cache (``Store.scratch_dir``), lost with its
machine. ``CheckpointSync`` copies each complete checkpoint (``checkpoint-N/`` with ``_COMPLETE`` in it,
tasks/sft/stage.py) to ``<root>/scratch/<stage>/<fp>/checkpoints/checkpoint-N/`` while training runs, and
before training brings the newest complete one back into a scratch folder that lacks it::

    with CheckpointSync(ctx.store(), "sft", fp, scratch) as sync:   # downloads, then uploads as it goes
        launch_training(...)
    sync.clear()                                                    # trained: the copies are not needed

- **Upload** (a thread of the flow process, every ``TUNELINE_CHECKPOINT_SYNC_S`` seconds, default 10,
  and once more when training failed): the newest complete local checkpoint not yet in the store is
  first pinned by hard links (the trainer's rotation may delete it while it goes up), its files go up
  with their SHA-256, then ``_COMPLETE`` last — a manifest of every file and its digest — so a reader
  never trusts a half-copied one. Then the store's older checkpoints are removed, ``_COMPLETE`` first.
  A checkpoint whose upload fails is skipped (logged); the next one is tried.
- **Download**: the store's newest checkpoint with ``_COMPLETE``, when newer than the newest complete
  local one, goes to a hidden temporary folder, each file checked against the manifest, ``_COMPLETE``
  last, and is renamed into place; the trainer then resumes from it as from its own.

For a local root nothing happens: the scratch folder is already in the root.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tasks.artifacts.store import Store, StoreError, sha256_file

COMPLETE = "_COMPLETE"  # the trainer's "this checkpoint is whole" marker (tasks/sft/stage.py)
DEFAULT_EVERY_S = 10.0


def _step(name: str) -> int:
    """The step of a ``checkpoint-N`` folder name (-1 for anything else).

    >>> _step("checkpoint-12"), _step(".sync-checkpoint-3-ab"), _step("final")
    (12, -1, -1)
    """
    prefix, _, number = name.partition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else -1


def latest_local(scratch: Path) -> int:
    """The step of the newest complete checkpoint in ``scratch`` (-1: none)."""
    return max((_step(p.name) for p in scratch.glob("checkpoint-*") if (p / COMPLETE).exists()), default=-1)


class CheckpointSync:
    """Keep a stage's complete checkpoints in an S3 store (see the module docstring); a context manager."""

    def __init__(
        self, store: Store, stage: str, fp: str, scratch: Path, *, every_s: float | None = None, log: Any = None
    ):
        self.store, self.scratch = store, Path(scratch)
        self.enabled = store.is_s3
        self.prefix = f"scratch/{stage}/{fp}/checkpoints"
        self.every_s = float(every_s or os.environ.get("TUNELINE_CHECKPOINT_SYNC_S") or DEFAULT_EVERY_S)
        self.log = log or logging.getLogger("tuneline.checkpoints")
        self.in_store = -1  # the newest step whose copy is complete in the store
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def remote_steps(self) -> list[int]:
        """Steps of the checkpoints whose ``_COMPLETE`` is in the store, oldest first."""
        return sorted(_step(k.split("/")[-2]) for k in self.store.list(self.prefix) if k.endswith(f"/{COMPLETE}"))

    # -- download ----------------------------------------------------------------------------
    def restore(self) -> int:
        """Bring the store's newest complete checkpoint here unless a local one is as new; return the
        step training will resume from (-1: none)."""
        local = latest_local(self.scratch)
        if not self.enabled:
            return local
        steps = self.remote_steps()
        self.in_store = steps[-1] if steps else -1
        if self.in_store <= local:
            return local
        name = f"checkpoint-{self.in_store}"
        manifest = self.store.read_json(f"{self.prefix}/{name}/{COMPLETE}")
        tmp = self.scratch / f".restore-{name}-{uuid.uuid4().hex[:8]}"
        try:
            for rel, sha in manifest["files"].items():
                self.store.download_file(f"{self.prefix}/{name}/{rel}", tmp / rel)
                if sha256_file(tmp / rel) != sha:
                    raise StoreError(f"{self.store.uri(f'{self.prefix}/{name}/{rel}')} does not match its manifest")
            (tmp / COMPLETE).write_text(json.dumps(manifest))  # last: the folder is whole
            dest = self.scratch / name
            if dest.exists():  # an incomplete local copy of the same step
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.log.info("restored %s from %s: training resumes from it", name, self.store.uri(self.prefix))
        return self.in_store

    # -- upload ------------------------------------------------------------------------------
    def upload_new(self) -> bool:
        """Copy the newest complete local checkpoint to the store if it is not there yet."""
        step = latest_local(self.scratch)
        if not self.enabled or step <= self.in_store:
            return False
        name = f"checkpoint-{step}"
        pinned = self._pin(self.scratch / name)
        if pinned is None:
            return False  # rotated away meanwhile: the next one goes up
        try:
            files = sorted(p for p in pinned.rglob("*") if p.is_file() and p.relative_to(pinned).as_posix() != COMPLETE)
            manifest: dict[str, Any] = {"step": step, "files": {}, "uploaded": time.time()}
            for path in files:
                rel = path.relative_to(pinned).as_posix()
                manifest["files"][rel] = sha = sha256_file(path)
                self.store.upload_file(path, f"{self.prefix}/{name}/{rel}", sha256=sha)
            self.store.write_json(f"{self.prefix}/{name}/{COMPLETE}", manifest)  # last: now it counts
        finally:
            shutil.rmtree(pinned, ignore_errors=True)
        self.in_store = step
        self.log.info("%s copied to %s", name, self.store.uri(f"{self.prefix}/{name}"))
        self._remove_older_than(step)
        return True

    def _pin(self, ckpt: Path) -> Path | None:
        """Hard links to a complete checkpoint's files (a copy across file systems), or None when it vanished."""
        pinned = self.scratch / f".sync-{ckpt.name}-{uuid.uuid4().hex[:8]}"
        try:
            if not (ckpt / COMPLETE).exists():
                return None
            for path in ckpt.rglob("*"):
                if path.is_file():
                    (pinned / path.relative_to(ckpt)).parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(path, pinned / path.relative_to(ckpt))
                    except FileNotFoundError:  # rotated away: give up on this one
                        raise
                    except OSError:  # another file system: copy
                        shutil.copy2(path, pinned / path.relative_to(ckpt))
            if not (pinned / COMPLETE).exists():
                raise FileNotFoundError(COMPLETE)
        except FileNotFoundError:
            shutil.rmtree(pinned, ignore_errors=True)
            return None
        return pinned

    def _remove_older_than(self, step: int) -> None:
        """Remove the store's other checkpoints (their ``_COMPLETE`` first: never a trusted half folder)."""
        names = {k[len(self.prefix) + 1 :].split("/")[0] for k in self.store.list(self.prefix)}
        for name in sorted(n for n in names if _step(n) != step):
            self.store.delete(f"{self.prefix}/{name}/{COMPLETE}")
            self.store.delete_prefix(f"{self.prefix}/{name}")

    def clear(self) -> None:
        """Remove every copy from the store (training is done; the stage is about to be published)."""
        if not self.enabled:
            return
        for step in self.remote_steps():
            self.store.delete(f"{self.prefix}/checkpoint-{step}/{COMPLETE}")
        self.store.delete_prefix(self.prefix)
        self.in_store = -1

    # -- while training ----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.upload_new()
            except Exception as e:  # noqa: BLE001 - the store may be away for a while: the next round tries again
                self.log.warning("copying a checkpoint to %s failed: %s", self.store.uri(self.prefix), e)

    def __enter__(self) -> CheckpointSync:
        self.restore()
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name="checkpoint sync", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is not None and self.enabled:  # training failed: keep its last checkpoint for the retry
            try:
                self.upload_new()
            except Exception as e:  # noqa: BLE001 - the original error matters more
                self.log.warning("copying the last checkpoint to %s failed: %s", self.store.uri(self.prefix), e)
