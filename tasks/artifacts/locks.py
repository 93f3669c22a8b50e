"""Locks and conditional writes on the artifact store: the one lock mechanism of the whole project.

Three conditional writes, the same on S3 and on a local root (docs/operating.md, "Locks and publishing"):

- ``put_if(store, key, data)``: create, only if the key does not exist (S3 ``If-None-Match: *``);
- ``put_if(store, key, data, version=v)``: replace, only if the key still has version ``v``
  (S3 ``If-Match: <ETag>``): a compare-and-swap, what a ``LATEST`` move needs;
- ``delete_if(store, key, version=v)``: delete, only if unchanged.

A loser gets ``PreconditionFailed``. A version is the S3 ETag, or a hash of the content locally; the
values written here carry a unique token, so equal content means the same write. Locally each
check-and-write happens under ``flock`` on the key's folder: a compare-then-rename without it lets
two takers of one stale lock both win (the slower one renames away the faster one's fresh lock).

``StoreLock`` builds a lock on them: the lock is an object holding JSON (owner, host, pid, acquired,
heartbeat, ttl); acquiring is a conditional create; a background thread refreshes the heartbeat by
compare-and-swap; a lock whose heartbeat is older than its ttl (or that a waiter has seen unchanged
for a ttl, whatever the clocks say) is stale, and is taken over by compare-and-swap on the stale
version, so of two takers exactly one wins; release deletes it only while it is still ours.

A lock whose owner is a dead process on this host is taken at once, without waiting for its ttl: the
owner is host + pid + the process's identity (boot, pid namespace, start time: ``process_identity``),
so a reused pid is not mistaken for the owner, and a lock from another host (or container) still
waits for its ttl. ``owner_dead`` is the one test of it, also for flow runs (flows/stopping.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from tasks.artifacts.store import Store, StoreError

# A lock lives while its holder heartbeats; 5 minutes without one and it is stale. Ten heartbeats fit
# in a ttl, so a slow S3 request or a short network outage never loses a live lock, and a killed run
# holds up the next one by at most 5 minutes (of a run measured in hours).
DEFAULT_TTL_S = 300.0
DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_POLL_S = 5.0
# S3 answers a lost condition with 412; AWS says 409 while another conditional write is in flight,
# and 404 for If-Match on a key that is gone.
_CONFLICT_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


class PreconditionFailed(StoreError):
    """A conditional write lost: the key already exists (create), or changed or vanished (replace, delete)."""


class LockTimeout(TimeoutError):
    """Waiting for a lock took longer than the timeout; the message names the key and its holder."""


class LockLost(RuntimeError):
    """A held lock was taken over (its heartbeat stopped for a ttl); the holder must not publish."""


def lock_defaults() -> tuple[float, float]:
    """(ttl, heartbeat) in seconds: ``TUNELINE_LOCK_TTL_S`` / ``TUNELINE_LOCK_HEARTBEAT_S`` or the defaults."""
    ttl = float(os.environ.get("TUNELINE_LOCK_TTL_S") or DEFAULT_TTL_S)
    return ttl, float(os.environ.get("TUNELINE_LOCK_HEARTBEAT_S") or min(DEFAULT_HEARTBEAT_S, ttl / 10))


# ----------------------------------------------------------------------------------------------
# Owners: is the process that wrote a lock (or started a run) gone?
# ----------------------------------------------------------------------------------------------
_boot_and_ns: str | None = None


def _this_boot_and_pid_ns() -> str:
    """'<boot id>/<pid namespace inode>': pids and start times mean the same only within both; '' off Linux."""
    global _boot_and_ns
    if _boot_and_ns is None:
        try:
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            _boot_and_ns = f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
        except OSError:
            _boot_and_ns = ""
    return _boot_and_ns


def process_identity(pid: int | None = None) -> str:
    """'<boot id>/<pid namespace>/<start time in clock ticks>' of a live process ('' when it is gone
    or a zombie, or off Linux): a pid reused by another process gets another identity."""
    prefix = _this_boot_and_pid_ns()
    try:
        fields = Path(f"/proc/{pid or os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    if not prefix or len(fields) < 20 or fields[0] in ("Z", "X"):  # a zombie does nothing more; nobody may reap it
        return ""
    return f"{prefix}/{fields[19]}"


def owner_dead(host: str, pid: int, identity: str) -> bool:
    """True only when it is certain: ``identity`` was taken on this host, boot and pid namespace, and
    ``pid`` is now gone or another process. Anything else (another host, an old lock without an
    identity) is False: such an owner is judged by its heartbeat."""
    prefix = _this_boot_and_pid_ns()
    if not identity or not prefix or host != socket.gethostname() or not identity.startswith(prefix + "/"):
        return False
    if int(pid) <= 0:
        return False
    return process_identity(int(pid)) != identity


# ----------------------------------------------------------------------------------------------
# Conditional writes
# ----------------------------------------------------------------------------------------------
def _conflict(store: Store, what: str, key: str, code: str) -> PreconditionFailed:
    return PreconditionFailed(f"conditional {what} of {store.uri(key)} lost ({code}): it exists or changed")


def _content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@contextmanager
def _guard(path: Path) -> Iterator[None]:
    """Serialise check-and-write on one local folder across processes and threads (flock on the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock, also when the process is killed


def read_versioned(store: Store, key: str) -> tuple[bytes, str] | None:
    """The content of ``key`` and its version, or None when it does not exist."""
    if not store.is_s3:
        try:
            data = store.local_path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, _content_version(data)
    from botocore.exceptions import ClientError

    def get() -> tuple[bytes, str] | None:
        try:
            obj = store.client.get_object(Bucket=store.bucket, Key=store._object_key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return obj["Body"].read(), obj["ETag"]

    return store._s3(f"get {key}", get)


def put_if(store: Store, key: str, data: bytes, version: str | None = None) -> str:
    """Create ``key`` (``version`` None: only if absent) or replace it (only if its version is still
    ``version``); return the new version. Raises ``PreconditionFailed`` when the condition fails."""
    if not store.is_s3:
        path = store.local_path(key)
        with _guard(path):
            current = read_versioned(store, key)
            if not (current is None if version is None else (current is not None and current[1] == version)):
                raise _conflict(store, "create" if version is None else "replace", key, "exists or changed")
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            if version is None:
                os.link(tmp, path)  # an exclusive create, complete from its first byte
                tmp.unlink()
            else:
                os.replace(tmp, path)  # atomic: readers see the old content or the new
        return _content_version(data)
    from botocore.exceptions import ClientError

    cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}

    def put() -> str:
        try:
            return store.client.put_object(Bucket=store.bucket, Key=store._object_key(key), Body=data, **cond)["ETag"]
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            if code not in _CONFLICT_CODES and not (version and code in ("NoSuchKey", "404")):
                raise
        # botocore retries a request whose answer was lost; the retry then fails on our own write
        now = read_versioned(store, key)
        if now is not None and now[0] == data:
            return now[1]
        raise _conflict(store, "create" if version is None else "replace", key, code)

    return store._s3(f"put {key}", put)


def delete_if(store: Store, key: str, version: str) -> None:
    """Delete ``key`` only if its version is still ``version`` (``PreconditionFailed`` otherwise)."""
    if not store.is_s3:
        path = store.local_path(key)
        with _guard(path):
            current = read_versioned(store, key)
            if current is None or current[1] != version:
                raise _conflict(store, "delete", key, "changed or gone")
            path.unlink()
        return
    from botocore.exceptions import ClientError

    def delete() -> None:
        try:
            store.client.delete_object(Bucket=store.bucket, Key=store._object_key(key), IfMatch=version)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            if code in _CONFLICT_CODES or code in ("NoSuchKey", "404"):
                raise _conflict(store, "delete", key, code) from None
            raise

    store._s3(f"delete {key}", delete)


# ----------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _age_s(stamp: str) -> float:
    """Seconds since an ISO time stamp (infinite when unreadable: such a lock is judged by observation).

    >>> _age_s("not a time")
    inf
    """
    try:
        return time.time() - datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):
        return float("inf")


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its object says."""

    owner: str = "?"
    host: str = "?"
    pid: int = 0
    acquired: str = ""
    heartbeat: str = ""
    ttl_s: float = 0.0
    token: str = ""
    process: str = ""  # process_identity of pid

    def dead(self) -> bool:
        """Its process is gone from this host (see ``owner_dead``)."""
        return owner_dead(self.host, self.pid, self.process)

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except (ValueError, TypeError, KeyError):
            return None

    def __str__(self) -> str:
        return f"{self.owner} on {self.host} (pid {self.pid}), heartbeat {_age_s(self.heartbeat):.0f}s ago"


class StoreLock:
    """A lock on ``<root>/<key>`` of an artifact store, kept alive by a heartbeat; a context manager.

    ``with StoreLock(store, "locks/sft/<fp>", owner="flow run nightly-fox"):`` waits (forever with
    ``timeout_s=None``, polling every ``poll_s``) until it holds the lock, takes over a stale one, and
    releases it on exit. ``check()`` raises ``LockLost`` once another process has taken it over.
    ``take_dead=False`` leaves a dead owner's lock to its ttl (for a caller with its own, stricter test).
    """

    def __init__(
        self,
        store: Store,
        key: str,
        owner: str = "",
        ttl_s: float | None = None,
        heartbeat_s: float | None = None,
        *,
        timeout_s: float | None = None,
        poll_s: float | None = None,
        log: Any = None,
        take_dead: bool = True,
    ):
        default_ttl, default_beat = lock_defaults()
        self.store, self.key = store, key
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.ttl_s = float(ttl_s or default_ttl)
        self.heartbeat_s = float(heartbeat_s or min(default_beat, self.ttl_s / 3))
        self.timeout_s = timeout_s
        self.poll_s = float(poll_s or min(DEFAULT_POLL_S, self.heartbeat_s))
        self.log = log or logging.getLogger("tuneline.locks")
        self.take_dead = take_dead
        self.token = uuid.uuid4().hex
        self.acquired_at = ""
        self.version: str | None = None  # of our lock object while we hold it
        self.lost = False
        self.waited_for: Holder | None = None  # the holder we waited for, if any
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: tuple[str, float] | None = None  # (version, monotonic time first seen) of another's lock

    def __repr__(self) -> str:
        return f"StoreLock({self.store.uri(self.key)!r}, owner={self.owner!r})"

    def _body(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "acquired": self.acquired_at,
                "heartbeat": _now(),
                "ttl_s": self.ttl_s,
                "token": self.token,
                "process": process_identity(),
            },
            indent=2,
        ).encode()

    def holder(self) -> Holder | None:
        """Who holds the lock now (None: nobody)."""
        current = read_versioned(self.store, self.key)
        return Holder.parse(current[0]) if current else None

    # -- acquire -----------------------------------------------------------------------------
    def try_acquire(self) -> bool:
        """One attempt: create the lock, or take it over when it is stale. True when it is ours."""
        self.acquired_at = _now()
        current = read_versioned(self.store, self.key)
        try:
            if current is None:
                self.version = put_if(self.store, self.key, self._body())
            elif self._is_stale(*current):
                holder = Holder.parse(current[0])
                why = "its process is gone" if holder and holder.dead() else "stale"
                self.log.warning("taking over the lock %s of %s (%s)", self.store.uri(self.key), holder or "?", why)
                self.version = put_if(self.store, self.key, self._body(), version=current[1])
            else:
                self.waited_for = Holder.parse(current[0]) or self.waited_for
                return False
        except PreconditionFailed:
            return False  # another process was faster
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.key}", daemon=True)
        self._thread.start()
        return True

    def _is_stale(self, data: bytes, version: str) -> bool:
        """Stale: its owner is a dead process on this host, its heartbeat is older than its ttl, or we
        have seen it unchanged for a ttl (a holder whose clock runs ahead still loses a dead lock)."""
        holder = Holder.parse(data)
        if self.take_dead and holder is not None and holder.dead():
            return True
        ttl = holder.ttl_s if holder and holder.ttl_s else self.ttl_s
        if self._seen is None or self._seen[0] != version:
            self._seen = (version, time.monotonic())
        unchanged = time.monotonic() - self._seen[1]
        return (holder is not None and _age_s(holder.heartbeat) > ttl) or unchanged > ttl

    def acquire(self) -> StoreLock:
        """Wait until the lock is ours (``LockTimeout`` after ``timeout_s``, naming the holder)."""
        start = next_note = time.monotonic()
        while not self.try_acquire():
            now = time.monotonic()
            if self.timeout_s is not None and now - start >= self.timeout_s:
                raise LockTimeout(
                    f"lock {self.store.uri(self.key)} still held after {now - start:.0f}s by "
                    f"{self.holder() or 'nobody now'}"
                )
            if now >= next_note:  # once at first, then every minute: a waiting run says what it waits for
                self.log.info("waiting for lock %s held by %s", self.store.uri(self.key), self.waited_for or "?")
                next_note = now + 60
            time.sleep(self.poll_s)
        return self

    # -- hold --------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._mutex:
                if self._stop.is_set():
                    return
                try:
                    self.version = put_if(self.store, self.key, self._body(), version=self.version)
                except PreconditionFailed:
                    if not self._still_ours():
                        self.lost = True
                        self.log.error("lock %s was taken over by %s", self.store.uri(self.key), self.holder())
                        return
                except Exception as e:  # noqa: BLE001 - transient (network): the next beat tries again
                    self.log.warning("heartbeat of lock %s failed: %s", self.store.uri(self.key), e)

    def _still_ours(self) -> bool:
        """Re-read the lock: ours when it carries our token (adopting its version: a heartbeat whose
        answer was lost did land)."""
        current = read_versioned(self.store, self.key)
        holder = Holder.parse(current[0]) if current else None
        if current and holder and holder.token == self.token:
            self.version = current[1]
            return True
        return False

    def check(self) -> None:
        """Raise ``LockLost`` unless the lock is still ours (call before writing what it protects)."""
        with self._mutex:
            if self.lost or self.version is None or not self._still_ours():
                self.lost = True
                raise LockLost(f"lock {self.store.uri(self.key)} is no longer held by {self.owner}: {self.holder()}")

    # -- release -----------------------------------------------------------------------------
    def release(self) -> None:
        """Stop the heartbeat and delete the lock, only if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self.version is None:
                return
            try:
                delete_if(self.store, self.key, self.version)
            except PreconditionFailed:
                try:
                    if self._still_ours():  # a version we missed (a heartbeat whose answer was lost)
                        delete_if(self.store, self.key, self.version)
                except StoreError as e:
                    self.log.warning("could not release lock %s (it expires after %.0fs): %s", self.key, self.ttl_s, e)
            except StoreError as e:  # the work is done; a lock left behind only delays the next run by a ttl
                self.log.warning("could not release lock %s (it expires after %.0fs): %s", self.key, self.ttl_s, e)
            finally:
                self.version = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
