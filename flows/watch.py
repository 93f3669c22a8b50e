"""Retrain when data lands: the ``watch-data`` flow, which lists a watched source and says when it changed.

    data.trigger.source: s3://bucket/incoming     # or a local folder
    data.trigger.every_minutes: 5                 # the watch-data deployment's schedule
    data.trigger.quiet_minutes: 10                # debounce: the night starts once the source is quiet

Each run lists the source (an S3 prefix through boto3, with the endpoint and credentials of the artifact
root's block or environment; or a local folder), summarises the listing into a content digest (names,
sizes, ETags or modification times), and compares it with the previous one. When it changed, it emits
the Prefect event ``tuneline.data.changed`` whose resource names the source, with the digest and what
changed in the payload. Nothing here starts a run: the nightly deployment carries a Prefect deployment
trigger (infra/prefect.yaml, an automation on the server) that waits until ``quiet_minutes`` pass with no
further change event and then starts one run, passing the last event's payload as the ``trigger``
parameter (the night's ``data-trigger`` artifact says which change started it).

State: the listing is kept in the artifact root (``watch/<source id>.json``: the next run's "before"),
and the digest in the Prefect Variable ``tuneline_watch_<source id>`` (Variables page of the UI). The
first run of a source records a baseline and emits nothing: deploying does not start a night.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.errors import InputError

EVENT = "tuneline.data.changed"
RESOURCE_PREFIX = "tuneline.data-source."
SHOWN = 20  # names per kind of change in the payload (counts are complete)


def normalized_source(source: str) -> str:
    """The source as the trigger matches it: ``s3://bucket/prefix`` without a trailing slash, or an
    absolute folder path (a relative one is relative to the checkout, where the workers run)."""
    source = source.strip()
    if not source:
        raise InputError("data.trigger.source: empty; set an S3 prefix (s3://bucket/prefix) or a local folder")
    if source.lower().startswith("s3:"):
        if not source.startswith("s3://") or not source[5:].split("/", 1)[0]:
            raise InputError(f"data.trigger.source {source[:200]!r}: expected s3://bucket/prefix")
        return source.rstrip("/")
    return str(Path(source).expanduser().resolve())


def source_id(source: str) -> str:
    """A short, stable name for a source (state key and Variable name)."""
    return hashlib.sha256(normalized_source(source).encode()).hexdigest()[:16]


def resource_id(source: str) -> str:
    """The event resource id naming the source; the deployment trigger matches it exactly."""
    return RESOURCE_PREFIX + normalized_source(source)


def list_source(source: str, storage_block: str | None = None) -> dict[str, str]:
    """Every file under the source, by name relative to it: ``size:etag`` (S3) or ``size:mtime_ns`` (folder)."""
    source = normalized_source(source)
    if source.startswith("s3://"):
        from tasks.artifacts.store import store_for

        store = store_for(source, storage_block)
        prefix = f"{store.prefix}/" if store.prefix else ""
        entries: dict[str, str] = {}

        def collect() -> None:
            for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    entries[obj["Key"][len(prefix) :]] = f"{obj['Size']}:{obj['ETag'].strip(chr(34))}"

        store._s3(f"list {source}", collect)  # the store's one-line errors (endpoint, bucket; never credentials)
        return entries
    root = Path(source)
    if not root.is_dir():
        raise InputError(f"data.trigger.source {source!r}: not a folder")
    out = {}
    for path in root.rglob("*"):
        if path.is_file():
            st = path.stat()
            out[path.relative_to(root).as_posix()] = f"{st.st_size}:{st.st_mtime_ns}"
    return out


def digest_of(entries: dict[str, str]) -> str:
    """The listing's content digest: names with their sizes and ETags (or modification times)."""
    text = json.dumps(sorted(entries.items()), separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def changes(before: dict[str, str], after: dict[str, str]) -> dict[str, Any]:
    """Names added, changed and removed (the first ``SHOWN`` of each) and how many of each."""
    kinds = {
        "added": sorted(set(after) - set(before)),
        "changed": sorted(k for k in set(after) & set(before) if after[k] != before[k]),
        "removed": sorted(set(before) - set(after)),
    }
    return {**{k: v[:SHOWN] for k, v in kinds.items()}, **{f"{k}_count": len(v) for k, v in kinds.items()}}


def trigger_values(trigger: Any) -> dict[str, Any]:
    """``data.trigger`` (``TriggerParams``) as infra/prefect.yaml uses it (its build step, flows/deploy.py):
    the watch-data deployment's source and schedule, and the nightly's trigger (on when a source is set)."""
    on = bool(trigger.source.strip())
    return {
        "enabled": on,
        "source": normalized_source(trigger.source) if on else "",
        "resource_id": resource_id(trigger.source) if on else "tuneline.data-source.off",
        "within": max(15, round(trigger.quiet_minutes * 60)),  # seconds; a proactive trigger needs >= 10
        # the watch-data schedule as an RRULE: prefect.yaml cannot template an interval (a number)
        "every": f"DTSTART:20260101T000000\nRRULE:FREQ=MINUTELY;INTERVAL={trigger.every_minutes}",
    }


@flow(name="watch-data", log_prints=True)
def watch_data(source: str, artifact_root: str, storage_block: str | None = None) -> dict[str, Any]:
    """List the watched source; emit ``tuneline.data.changed`` when its digest differs from the last run's.

    Args:
        source: The watched S3 prefix (s3://bucket/prefix) or local folder (data.trigger.source).
        artifact_root: Where the previous listing is kept (watch/<source id>.json).
        storage_block: The block with the S3 endpoint and credentials (the artifact root's), if any.
    """
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.variables import Variable

    from tasks.artifacts.store import store_for

    logger = get_run_logger()
    name, sid = normalized_source(source), source_id(source)
    entries = list_source(name, storage_block)
    digest = digest_of(entries)
    store = store_for(artifact_root, storage_block)
    key = f"watch/{sid}.json"
    before = store.read_json(key) if store.exists(key) else None
    result: dict[str, Any] = {"source": name, "digest": digest, "files": len(entries), "emitted": False}
    if before is not None and before.get("digest") == digest:
        logger.info("%s: unchanged (%d files, %s)", name, len(entries), digest[:19])
        return result
    now = time.time()
    if before is None:
        logger.info("%s: first look, %d files (%s): the baseline, no event", name, len(entries), digest[:19])
    else:
        diff = changes(before.get("entries", {}), entries)
        event_id = uuid.uuid4()
        payload = {
            "source": name,
            "digest": digest,
            "previous_digest": before.get("digest"),
            "files": len(entries),
            "event_id": str(event_id),
            **diff,
        }
        # The event first, then the new state: a failed emit leaves the change to the next run.
        emit_event(
            event=EVENT,
            resource={"prefect.resource.id": resource_id(name), "prefect.resource.name": name},
            payload=payload,
            id=event_id,
        )
        EventsWorker.drain_all()  # sent before this run ends
        logger.info(
            "%s changed: %d added, %d changed, %d removed (%s); event %s emitted",
            name,
            diff["added_count"],
            diff["changed_count"],
            diff["removed_count"],
            digest[:19],
            EVENT,
        )
        result.update(emitted=True, **diff)
    store.write_json(key, {"source": name, "digest": digest, "checked_at": now, "entries": entries})
    Variable.set(
        f"tuneline_watch_{sid}", {"source": name, "digest": digest, "files": len(entries), "at": now}, overwrite=True
    )
    return result
