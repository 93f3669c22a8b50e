"""Release stage: publish the adapter, the merged model and the evaluation report, with lineage.

Resource profile: CPU and network (reads every file twice: once to hash, once back from the store
to verify; no GPU, little memory).

A release is ``<root>/releases/<model_name>/<release_id>/``::

    adapter/        the LoRA adapter (and its tokenizer)
    model/          the merged model (optional: include_merged), verified against base + adapter
    eval/           the evaluation report
    README.md       model card: base model, evaluation table, gate, data, parameters
    manifest.json   lineage: parameters, code version, data sources, base model and revision,
                    metrics and gate, Prefect flow run id, each stage's fingerprint, digest and
                    lineage (the commit, code, libraries and run that produced it), every file
                    with its size and SHA-256

Order of writes, so that a reader never sees half a release:

1. the release id (UTC time + fingerprint) is fixed by the first attempt, kept at
   ``releases/<model>/.pending/<fingerprint>``: a retry continues the same release;
2. each file is uploaded unless the store already holds it with the same size and SHA-256
   (``x-amz-meta-sha256``), so a rerun uploads only what is missing or different (multipart above
   ``multipart_chunk_mib``; botocore retries transient errors with backoff, the task retries too);
3. every file is checked against the store (its content read back and hashed, by default);
4. ``manifest.json`` is written — only now is the release complete;
5. ``LATEST`` is moved to it by compare-and-swap against the release the run's gate compared with
   (``tasks/release/ops.py``): a rollback made meanwhile wins, and the night refuses with the reason.

S3 goes through boto3 with credentials from a ``Tuneline Artifact Store`` block (prefect-aws
``AwsCredentials``) or the environment; ``endpoint_url`` picks an S3-compatible server. Credentials
never appear in logs, artifacts, the manifest or errors.

Fetch a release and verify every checksum::

    tuneline fetch s3://bucket/prefix my-model LATEST ./here            # AWS_* from the environment
    tuneline fetch --block nightly s3://bucket/prefix my-model 20250101T000000Z-abcd1234 ./here
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Literal

from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts.registry import LATEST, MANIFEST, latest_release, release_prefix
from tasks.artifacts.stage_folders import FOR_PEOPLE
from tasks.artifacts.store import StageRef, Store, StoreError, safe_key, sha256_file
from tasks.core.common import publish_markdown, run_logger, task
from tasks.core.fingerprints import (
    code_identity,
    content_of,
    fingerprint,
    git_commit,
    stage_lineage,
    with_lineage,
)
from tasks.core.stage import StageContext, Workspace, run_stage, stage_cache_key
from tasks.release.ops import LatestMoved, ReleaseError, fetch_release, move_latest, read_log, verify_files
from tasks.release.servable import NotServable, check_servable

__all__ = ["ReleaseError", "LatestMoved", "fetch_release", "publish_release", "release", "verify_files"]

STAGE = "release"
CODE = "tasks.release.stage"  # the module of publish_release(): the code identity starts here
# publish_release's default: LATEST is not compared before it moves (plain calls, tests of the layout).
UNCHECKED = object()


class ReleaseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(
        default="qwen2-7b-instruct-tuneline",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="Name of the released model: the folder under releases/.",
    )
    include_merged: bool = Field(
        default=True,
        description="Also publish the merged model (the full weights, ~15 GB for 7B in 16 bits), not only the adapter "
        "(~tens of MB).",
    )
    verify_upload: Literal["content", "metadata"] = Field(
        default="content",
        description="How each uploaded file is checked against the store before the manifest is written. content: read "
        "it back and hash it (catches any corruption; reads the release once more). metadata: trust the size and the "
        "SHA-256 recorded at upload (fast; does not prove the bytes).",
    )
    multipart_chunk_mib: int = Field(
        default=64,
        ge=5,
        le=5120,
        description="Files larger than this go up in parts of this size (S3: ≥ 5 MiB a part, ≤ 10,000 parts). Smaller "
        "parts resume finer after a failure; larger parts mean fewer requests.",
    )
    servable_check: bool = Field(
        default=True,
        description="Before anything is uploaded, load the merged model in the serving engine (vLLM if importable, "
        "else transformers) and ask it who it is (tasks/release/servable.py); a folder it cannot load fails the night. "
        "Needs include_merged.",
    )
    keep_last: int = Field(
        default=7,
        ge=1,
        description="Retention: after each release, releases older than the newest keep_last lose their merged "
        "weights (manifest, adapter and evaluation report stay). Never pruned: LATEST, the champion its gate used, a "
        "release made LATEST by hand.",
    )
    stage_max_age_days: int = Field(
        default=30,
        ge=0,
        description="Retention: stage folders (stages/) older than this many days are deleted, unless a kept "
        "release's lineage points at them or a run holds their lock. 0: never.",
    )


# Retention settings decide what is deleted later, not what is released: not part of the fingerprint.
RETENTION_FIELDS = frozenset({"keep_last", "stage_max_age_days"})


# ----------------------------------------------------------------------------------------------
# Lineage and the model card
# ----------------------------------------------------------------------------------------------
def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "trl", "datasets", "prefect"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_lineage(
    params: dict[str, Any],
    adapter: StageRef,
    merged: StageRef,
    report: StageRef,
    dataset: StageRef,
    eval_report: dict[str, Any],
) -> dict[str, Any]:
    """Everything needed to know where a release came from (the manifest adds the files)."""
    sources = [
        {
            "spec": s.get("spec"),
            "fingerprint": s.get("fingerprint"),  # present when the data stage records it per source
            "rows_read": s.get("rows_read"),
            "rows_sampled": s.get("rows_sampled"),
        }
        for s in dataset.metrics.get("sources", [])
    ]
    return {
        "params": params,
        "code_version": git_commit(),
        "versions": _versions(),
        "base_model": params["base_model"],
        "base_revision": params.get("base_revision"),
        # The exact weights merged into (a hub commit, or the packaged model's version), from the merge stage.
        "base_revision_resolved": merged.metrics.get("base_revision_resolved"),
        "data": {
            "fingerprint": dataset.fingerprint,
            "train_rows": dataset.metrics.get("train_rows"),
            "validation_rows": dataset.metrics.get("validation_rows"),
            "sources": sources,
        },
        "stages": {r.stage: r.fingerprint for r in (dataset, adapter, merged, report)},
        # Per stage: what its folder holds (digest) and what produced it (lineage, recorded when it was
        # built: a cached stage keeps the commit, code and libraries of the run that computed it).
        "stage_lineage": {
            r.stage: {"fingerprint": r.fingerprint, "digest": content_of(r), "lineage": r.metrics.get("lineage")}
            for r in (dataset, adapter, merged, report)
        },
        "release_lineage": stage_lineage(STAGE, code_identity(CODE), {}, inputs=[dataset, adapter, merged, report]),
        "merge": {
            k: merged.metrics.get(k)
            for k in ("method", "dtype", "device", "max_logit_diff", "max_weight_rel_diff", "tolerance", "verified")
            if k in merged.metrics
        },
        # Precision follows the card (bf16 from compute capability 8.0, fp16 below, fp32 on CPU).
        "evaluation": {k: eval_report.get(k) for k in ("device", "precision", "engine")},
        "metrics": eval_report["metrics"],
        "gate": eval_report["gate"],
        "forced": not eval_report["gate"]["passed"],
        # The release this night was gated against (None: the first release of the name) and how its
        # numbers were obtained; the gate's checks hold every comparison (base and champion).
        "champion": eval_report.get("champion"),
        # The anchor (a pinned release, else the first) it was held to with the cumulative tolerances,
        # and any inconclusive comparison a person let pass (eval.allow_inconclusive).
        "anchor": eval_report.get("anchor"),
        "inconclusive_allowed": eval_report["gate"].get("inconclusive_allowed") or [],
        "ungated": bool(eval_report["gate"].get("ungated")),
        "comparisons": eval_report.get("comparisons"),
        "sandbox_mode": eval_report.get("sandbox_mode"),  # None: no generated code ran
        "flow_run_id": _flow_run_id(),
    }


def _merge_check(merge: dict[str, Any]) -> str:
    """How the merged weights were checked: logits for peft's merge, weights for the streaming merge
    (a model too big for one card is never loaded whole, so it has no logits to compare)."""
    if merge.get("max_weight_rel_diff") is not None:
        return (
            f"largest relative weight difference against base + adapter {merge['max_weight_rel_diff']:.3g} "
            f"≤ {merge.get('tolerance') or 0:.3g}, merged shard by shard"
        )
    limit = merge.get("tolerance") or 0
    return f"max |Δlogit| against base + adapter {merge.get('max_logit_diff') or 0:.3g} ≤ {limit:.3g}"


def model_card(model_name: str, lineage: dict[str, Any], report: dict[str, Any]) -> str:
    """The release's ``README.md``: what it is, how it scores against the base, how it was made."""
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    rows = "\n".join(
        f"| {k} | {base[k]:.4f} | {tuned[k]:.4f} | {tuned[k] - base[k]:+.4f} |" for k in base if k in tuned
    )
    gate = report["gate"]
    merge = lineage.get("merge", {})
    built = lineage.get("stage_lineage") or {}
    adapter = built.get("grpo") or built.get("sft") or {}
    trained = (adapter.get("lineage") or {}).get("git_commit")  # a cached adapter: an earlier commit's
    sources = "\n".join(
        f"- `{s['spec']}`: {s['rows_sampled']} rows sampled of {s['rows_read']}"
        + (f" (fingerprint `{s['fingerprint']}`)" if s.get("fingerprint") else "")
        for s in lineage["data"].get("sources", [])
    )
    return (
        f"# {model_name}\n\nLoRA fine-tune of `{lineage['base_model']}` (revision `{lineage['base_revision']}`"
        + (f", resolved `{lineage['base_revision_resolved']}`" if lineage.get("base_revision_resolved") else "")
        + f") made by tuneline (code `{lineage['code_version']}`, Prefect flow run `{lineage.get('flow_run_id')}`"
        + (f"; adapter trained by code `{trained}`" if trained and trained != lineage["code_version"] else "")
        + ").\n\n"
        f"Files: `adapter/` (LoRA adapter), `model/` (merged weights, {merge.get('dtype')}; {_merge_check(merge)}), "
        "`eval/`, "
        "`manifest.json` "
        f"(lineage and SHA-256 of every file).\n\n"
        f"## Evaluation (base vs this model)\n\n| metric | base | tuned | delta |\n|---|---|---|---|\n{rows}\n\n"
        f"Quality gate: **{'passed' if gate['passed'] else 'FAILED: ' + '; '.join(gate['reasons'])}**"
        f"{' (release forced by a person)' if lineage.get('forced') else ''}\n\n"
        f"## Training data\n\nDataset fingerprint `{lineage['data']['fingerprint']}`: "
        f"{lineage['data'].get('train_rows')} train rows, "
        f"{lineage['data'].get('validation_rows')} validation rows.\n\n{sources}\n\n"
        f"## Parameters\n\n```json\n{json.dumps(lineage['params'], indent=2, ensure_ascii=False)}\n```\n"
    )


# ----------------------------------------------------------------------------------------------
# Publishing (plain functions: a store, local files, no Prefect)
# ----------------------------------------------------------------------------------------------
def release_id_for(store: Store, model_name: str, fp: str) -> str:
    """``YYYYMMDDTHHMMSSZ-<fp8>``, fixed by the first attempt (kept at ``releases/<model>/.pending/<fp>``)."""
    pending = f"releases/{safe_key(model_name)}/.pending/{safe_key(fp)}"
    if store.exists(pending):
        return store.read_bytes(pending).decode().strip()
    rid = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{fp[:8]}"
    store.write_bytes(pending, rid.encode())
    return rid


def publish_release(
    store: Store,
    model_name: str,
    release_id: str,
    files: dict[str, Path],
    lineage: dict[str, Any],
    verify: Literal["content", "metadata"] = "content",
    on_progress: Callable[[str, bool], None] | None = None,
    expected_latest: Any = UNCHECKED,
    who: str = "",
) -> dict[str, Any]:
    """Upload ``files`` (release-relative key -> local path) unless already there, verify them
    against the store, then write the manifest and move ``LATEST``. Returns the manifest.
    ``on_progress(key, uploaded)`` is called after each file (uploaded False: it was already there).
    ``expected_latest``: the release id (or None) ``LATEST`` named when the run read its champion; if
    it moved meanwhile (a rollback, another run), ``LatestMoved``: checked before the upload, before
    the manifest, and by the compare-and-swap that moves LATEST (then the release is complete but not
    LATEST; a person may promote it)."""
    prefix = release_prefix(model_name, release_id)
    _check_latest(store, model_name, release_id, expected_latest)
    entries: dict[str, dict[str, Any]] = {}
    for rel, path in sorted(files.items()):
        rel = safe_key(rel)
        if rel in (MANIFEST, LATEST):
            raise ReleaseError(f"{rel} is written by the release itself, not a file to publish")
        entry = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        entries[rel] = entry
        there = store.head(f"{prefix}/{rel}")
        uploaded = there != entry
        if uploaded:
            store.upload_file(path, f"{prefix}/{rel}", sha256=entry["sha256"])
        if on_progress:
            on_progress(rel, uploaded)
    problems = verify_files(store, prefix, entries, verify)
    if problems:
        for rel in problems:  # so that a retry uploads them again instead of trusting their metadata
            store.delete(f"{prefix}/{rel}")
        raise ReleaseError(
            f"release {model_name}/{release_id} at {store.where()} does not match what was uploaded: "
            + "; ".join(f"{k}: {v}" for k, v in problems.items())
        )
    _check_latest(store, model_name, release_id, expected_latest)
    manifest = {
        "model_name": model_name,
        "release_id": release_id,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        **lineage,
        "files": entries,
    }
    retry = store.exists(f"{prefix}/{MANIFEST}")
    store.write_json(f"{prefix}/{MANIFEST}", manifest)
    current = latest_release(store, model_name)
    if current == release_id or (retry and _moved_before(store, model_name, release_id)):
        return manifest  # a retry after LATEST was moved (and maybe moved on by a person since: leave it)
    if expected_latest is UNCHECKED:
        # Plain calls: ids start with the UTC time of their first attempt, never move LATEST to an older
        # one (the time part only: two releases started in the same second go by publication order).
        if current is not None and current.split("-", 1)[0] > release_id.split("-", 1)[0]:
            return manifest
        expected_latest = current
    champion = (lineage.get("champion") or {}).get("release_id")
    why = ("forced past a failed gate" if lineage.get("forced") else "gate passed") + (
        f" against champion {champion}" if champion else " (no champion: first release)"
    )
    try:
        move_latest(
            store, model_name, release_id, expected=expected_latest, action="release", who=who or "release", why=why
        )
    except LatestMoved as e:
        raise LatestMoved(
            f"{e}; release {release_id} is complete but not LATEST (promote it by hand if wanted)"
        ) from None
    return manifest


def _moved_before(store: Store, model_name: str, release_id: str) -> bool:
    """Whether an earlier attempt already moved LATEST to this release (the move log says so)."""
    return any(e.get("action") == "release" and e.get("to") == release_id for e in read_log(store, model_name))


def _check_latest(store: Store, model_name: str, release_id: str, expected: Any) -> None:
    if expected is UNCHECKED:
        return
    current = latest_release(store, model_name)
    if current not in (expected, release_id):  # our own id: a retry after LATEST was already moved
        raise LatestMoved(
            f"LATEST of {model_name} moved from {expected or '(none)'} to {current} since this run started (a "
            "rollback or another run): nothing released; rerun to be gated against the new champion"
        )


# ----------------------------------------------------------------------------------------------
# Prefect task
# ----------------------------------------------------------------------------------------------
def fingerprint_of(
    config: ReleaseParams,
    adapter: StageRef,
    merged: StageRef,
    report: StageRef,
    dataset: StageRef,
    params: dict[str, Any],
    ctx: StageContext,
    expected_latest: str | None = None,  # not counted: see release()
) -> str:
    """The release code, the parameters and the content of everything it publishes (docs/caching.md)."""
    upstream = [content_of(r) for r in (adapter, merged, report, dataset)]
    released = config.model_dump(mode="json", exclude=RETENTION_FIELDS)
    return fingerprint(STAGE, code_identity(CODE), {"config": released, "params": params}, upstream=upstream)


def _release_files(
    config: ReleaseParams, adapter: StageRef, merged: StageRef, report: StageRef, ctx: StageContext
) -> dict[str, Path]:
    files: dict[str, Path] = {}
    parts = {"adapter": adapter, "eval": report} | ({"model": merged} if config.include_merged else {})
    for name, ref in parts.items():
        folder = ctx.open(ref)
        files.update(
            {
                f"{name}/{p.relative_to(folder).as_posix()}": p
                for p in sorted(folder.rglob("*"))
                if p.is_file()
                and not p.name.startswith("_")
                # TensorBoard event files (tracking.tensorboard) stay with the stage, in the artifact store
                and not p.relative_to(folder).as_posix().startswith(FOR_PEOPLE)
            }
        )
    return files


def _worth_retrying(task, task_run, state) -> bool:
    """Retry transient failures; a missing bucket, rejected credentials, a moved LATEST or an unservable model
    fail at once."""
    permanent = (LatestMoved, NotServable)  # the same folder fails the same way again
    return not (isinstance(state.data, StoreError) and state.data.permanent or isinstance(state.data, permanent))


# Transient failures (the store went away, a timeout) are retried with growing pauses: 10 s, 20 s, 40 s
# (botocore has already retried each request a few times). A retry continues the same release id.
@task(
    name="release",
    cache_key_fn=stage_cache_key(STAGE, fingerprint_of),
    persist_result=True,
    tags=["cpu"],
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    retry_condition_fn=_worth_retrying,
)
def release(
    config: ReleaseParams,
    adapter: StageRef,
    merged: StageRef,
    report: StageRef,
    dataset: StageRef,
    params: dict[str, Any],
    ctx: StageContext,
    expected_latest: str | None = None,
) -> StageRef:
    """Publish a release; ``manifest.json`` last, then ``LATEST``. CPU and network.

    ``expected_latest``: the release ``LATEST`` named when the run started (None: no release yet).
    If it moved meanwhile, nothing is published. Not part of the fingerprint: a rerun with nothing
    new stays a cache hit whatever LATEST says now."""
    from prefect.runtime import flow_run

    logger = run_logger()
    fp = fingerprint_of(config, adapter, merged, report, dataset, params, ctx)
    store = ctx.store()
    store.multipart_threshold = store.multipart_chunksize = config.multipart_chunk_mib << 20
    store.check()  # a missing bucket or wrong credentials fail here, naming endpoint and bucket

    def build(work: Workspace) -> dict[str, Any]:
        release_id = release_id_for(store, config.model_name, fp)
        files = _release_files(config, adapter, merged, report, ctx)
        eval_report = json.loads((ctx.open(report) / "report.json").read_text())
        lineage = build_lineage(params, adapter, merged, report, dataset, eval_report)
        if config.include_merged and config.servable_check:  # before any upload, before LATEST moves
            # A LATEST that moved since the run started refuses the release anyway: say so before loading.
            _check_latest(store, config.model_name, release_id, expected_latest)
            data = params.get("data") or {}
            try:
                lineage["servable"] = check_servable(
                    ctx.open(merged), system_prompt=data.get("system_prompt"), name=data.get("model_name")
                )
            except NotServable as e:
                raise NotServable(f"merged model is not servable: {e}") from None
            logger.info("servable: %(engine)s %(version)s answered %(question)r: %(answer)r", lineage["servable"])
        counts = {"uploaded": 0, "present": 0}

        def progress(rel: str, uploaded: bool) -> None:
            counts["uploaded" if uploaded else "present"] += 1
            logger.info(
                "%s %s (%d/%d)", "uploaded" if uploaded else "already there:", rel, sum(counts.values()), len(files)
            )

        with tempfile.TemporaryDirectory(prefix="tuneline-release-") as tmp:
            card = Path(tmp) / "README.md"
            card.write_text(model_card(config.model_name, lineage, eval_report), encoding="utf-8")
            files["README.md"] = card
            who = f"flow run {flow_run.name or '?'} ({flow_run.id or '?'})"
            args = (config.verify_upload, progress, expected_latest, who)
            manifest = publish_release(store, config.model_name, release_id, files, lineage, *args)
        uri = store.uri(release_prefix(config.model_name, release_id))
        size = sum(e["size"] for e in manifest["files"].values())
        logger.info(
            "released %s: %d files, %.1f MB (%d uploaded, %d already there), checksums verified",
            uri,
            len(files),
            size / 1e6,
            counts["uploaded"],
            counts["present"],
        )
        publish_markdown(
            "release",
            f"**{config.model_name}** release `{release_id}`\n\n`{uri}`\n\n{len(files)} files, {size / 1e6:.1f} MB, "
            f"SHA-256 verified ({config.verify_upload}). Fetch it:\n\n```\ntuneline fetch {store.root} "
            f"{config.model_name} {release_id} ./{config.model_name}\n```",
            "The published release",
        )
        (work.out / "release.json").write_text(json.dumps({"uri": uri, "release_id": release_id}))
        return {"release_uri": uri, "release_id": release_id, "files": len(manifest["files"]), "size_bytes": size}

    built = with_lineage(
        build, stage=STAGE, code=code_identity(CODE), stack={}, inputs=[dataset, adapter, merged, report]
    )
    return run_stage(STAGE, fp, ctx, built, store=store)
