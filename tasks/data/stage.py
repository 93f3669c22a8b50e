"""The data stage as a Prefect task: ``prepare_dataset`` runs ``prepare`` inside the stage skeleton
(fingerprint → complete? → build → publish) and publishes the report as artifacts; ``fingerprint_of``
is its cache key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.artifacts.store import StageRef
from tasks.core.common import picture_markdown, publish_markdown, publish_table, run_logger, task
from tasks.core.fingerprints import code_identity, fingerprint, stack_versions, with_lineage
from tasks.core.stage import StageContext, Workspace, run_stage, stage_cache_key
from tasks.data.report import report_markdown, report_rows, skipped_lines
from tasks.data.specs import DataError, DataParams, Spec, parse_spec
from tasks.data.stream import prepare
from tasks.data.tokens import tokenizer_id

STAGE = "data"
CODE = "tasks.data.stage"  # its imports reach the whole package and the shared readers


def fingerprint_of(config: DataParams, ctx: StageContext) -> str:
    """The stage's cache key: its code, the data stack, the parameters, each source's content (training
    and validation sets) and the tokenizer that counts (``config.tokenizer``, else the base model).

    A local file or folder and an S3 object count by their content and ``#N``, not where they live: the
    same bytes at another path are the same data (``content_spec``). A hub id or built-in set is named by
    its spec, with the revision it resolves to."""
    try:
        every = [parse_spec(s, config.hub) for s in (*config.datasets, *config.validation_datasets)]
        sources_fp = [s.fingerprint(ctx.storage_block) for s in every]
    except DataError:  # a bad spec: the task runs and raises it with the full message
        return fingerprint(STAGE, "bad-spec", config)
    n = len(config.datasets)
    specs = [content_spec(spec, fp) for spec, fp in zip(every, sources_fp)]
    # data.trigger is when a night starts, and data.streaming how hub rows are fetched (the same rows),
    # not what the stage computes: neither is in the key.
    dumped = config.model_dump(mode="json", exclude={"trigger", "streaming"}) | {
        "datasets": specs[:n],
        "validation_datasets": specs[n:],
    }
    tokenizer = tokenizer_id(config.tokenizer or ctx.base_model, ctx.base_revision)
    return fingerprint(
        STAGE, code_identity(CODE), dumped, sources=[f"tokenizer={tokenizer}"], stack=stack_versions("data")
    )


def content_spec(spec: Spec, source_fp: str) -> str:
    """A spec as the fingerprint sees it: a local or S3 source by its content (the part of its source
    fingerprint after the name), its subset and ``#N``; a hub or built-in one as written, with its
    resolved revision.

    >>> s = parse_spec("/data/a.jsonl#5")
    >>> content_spec(s, "/data/a.jsonl#5@0123") == content_spec(parse_spec("b.jsonl#5"), "b.jsonl#5@0123")
    True
    """
    if spec.kind in ("local", "s3"):
        return f"{spec.kind}:{source_fp.rpartition('@')[2]}:{spec.subset or ''}#{spec.n or ''}"
    return source_fp


def _publish_artifacts(ref: StageRef, out: Path) -> None:
    """The per-source table and the report with its histogram, as Prefect artifacts."""
    metrics = ref.metrics
    publish_table(
        "data-sources",
        report_rows(metrics),
        f"Dataset stage: {metrics['train_rows']} train / {metrics['validation_rows']} validation rows; "
        f"tokens counted by {metrics['tokenizer']}. Output: {ref.uri}",
    )
    image = picture_markdown(out / "token_lengths.png", "token lengths")
    publish_markdown(
        "data-report",
        report_markdown(metrics) + "\n" + image + f"Files: `{ref.uri}` (token_lengths.png, report.json)\n",
        "Dataset stage: token-length histogram and per-source table",
    )


@task(name="prepare_dataset", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["cpu"])
def prepare_dataset(config: DataParams, ctx: StageContext) -> StageRef:
    """Read, convert, validate, dedupe, split, sample, count tokens and mix the datasets; publish the report.

    Resource profile: CPU only (the tokenizer's threads use every core); memory flat in the rows read
    (``tasks.data.stream``), scratch disk about the size of the sources under TMPDIR.
    The base model's tokenizer counts tokens (``config.tokenizer`` wins).
    """
    fp = fingerprint_of(config, ctx)

    def build(work: Workspace) -> dict[str, Any]:
        metrics = prepare(
            config, work.out, model=ctx.base_model, revision=ctx.base_revision, storage_block=ctx.storage_block
        )
        for line in skipped_lines(metrics, limit=5):  # rows skipped within data.max_bad_rows: said in the run's log
            run_logger().warning(line)
        return metrics

    built = with_lineage(build, stage=STAGE, code=code_identity(CODE), stack=stack_versions("data"))
    return run_stage(STAGE, fp, ctx, built, on_published=_publish_artifacts)
