"""The retrain flow: a recipe read top to bottom, one task per stage (docs/design.md).

    prepare_dataset → lora_sft → grpo (optional) → merge_lora → evaluate (quality gate) → release

Each task returns a small ref (where its output lives, its fingerprint, a few metrics); a rerun
with nothing new is all cache hits. A quality gate that fails ends the run as Failed with the
reason in its message, and nothing is released (unless ``eval.force_release``).

Run it::

    tuneline run --preset demo                       # offline demo, CPU
    tuneline run --preset demo --set sft.max_steps=5 # any field, dotted
    python -m flows.retrain                          # the reference job (needs a GPU and the hub)
"""

from __future__ import annotations

import json
import os
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.effective import effective_params, params_markdown
from flows.hooks import report_failure
from flows.params import RetrainParams
from flows.results import run_samples
from flows.tracking import open_night
from tasks.artifacts.registry import current_anchor, current_champion, gate_anchor, gate_champion
from tasks.data import prepare_dataset
from tasks.evaluate import check_eval_data, check_validation_power, evaluate, metrics_table
from tasks.grpo.stage import grpo
from tasks.merge.stage import merge_lora
from tasks.release.retention import after_release
from tasks.release.stage import release
from tasks.runtime.hardware import detect_machine
from tasks.runtime.requirements import TaskNeed, check_needs
from tasks.sft.stage import lora_sft


class QualityGateFailed(RuntimeError):
    """The tuned model is worse than the base on a gating metric; nothing was released. ``results`` is
    what the run measured, as the flow would have returned it but without a release, so that
    ``tuneline run`` can print the numbers that refused it (flows/results.py)."""

    def __init__(self, message: str, results: dict[str, Any] | None = None):
        super().__init__(message)
        self.results = results


@flow(name="retrain", log_prints=True, on_failure=[report_failure])
def retrain(
    params: RetrainParams = RetrainParams(),
    preset: dict[str, Any] | None = None,
    trigger: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Dataset → LoRA SFT → GRPO (optional) → merge → evaluate (quality gate) → release.

    Args:
        params: The run's parameters. Fields not sent come from ``preset``.
        preset: The deployment's preset, stored at deploy time: every field of params a caller does not
            send comes from here (docs/operating.md, Parameters). Leave it as it is.
        trigger: Set by the deployment trigger when new data started this run (flows/watch.py): the
            watched source's digest and what changed. Leave it empty.
    """
    logger = get_run_logger()
    params, overridden = effective_params(params, preset)  # flows/effective.py: a partial object keeps the preset
    create_markdown_artifact(
        key="effective-parameters",
        markdown=params_markdown(params, overridden, preset is not None),
        description="The parameters this run used, and the fields that differ from the deployment's preset",
    )
    logger.info(
        "parameters: %s",
        "; ".join(f"{k}={json.dumps(b)} (preset {json.dumps(a)})" for k, (a, b) in overridden.items())
        or "the preset's, unchanged",
    )
    if trigger:  # which change started this night: the run's artifact, its log and its results
        create_markdown_artifact(key="data-trigger", markdown=trigger_markdown(trigger), description="What started it")
        logger.info("started by new data: %s", json.dumps(trigger, sort_keys=True)[:2000])
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    logger.info("devices: CUDA_VISIBLE_DEVICES=%s", devices if devices is not None else "(unset)")
    # Every GPU task's requirement, checked before anything is loaded (tasks/runtime/requirements.py).
    needs = preflight_run(params, logger)
    ctx = params.stage_context().pinned()  # built once (hub revision resolved once); every stage gets it by keyword
    check_eval_data(params.eval, ctx.storage_block)  # bad evaluation data fails now, not after hours of training
    # The champion is the release LATEST names now; a broken one stops the night before any training.
    latest = current_champion(ctx.store(), params.release.model_name)
    logger.info("champion: %s", f"release {latest.release_id}" if latest else "none yet (first release: base only)")
    pinned = current_anchor(ctx.store(), params.release.model_name)  # a pin, else the first release
    # tracking.*: the night's MLflow run, stages nested in it; never decides anything (flows/tracking.py).
    # Opened after the checks above: a night they stop leaves no trace in the tracker or the root.
    night, ctx = open_night(params, ctx, logger)
    track = night.stage if night else (lambda ref: ref)
    dataset = prepare_dataset(params.data, ctx=ctx)
    check_validation_power(params.eval, dataset.metrics.get("validation_rows"))  # before hours of training
    track(dataset)
    adapter = lora_sft.with_options(tags=needs["lora_sft"].tags)(params.sft, dataset=dataset, ctx=ctx)
    track(adapter)
    if params.grpo.enabled:
        prompts = prepare_dataset(params.grpo_prompt_data(), ctx=ctx)
        adapter = grpo.with_options(tags=needs["grpo"].tags)(params.grpo, adapter=adapter, dataset=prompts, ctx=ctx)
        track(adapter)
    merge_task = merge_lora.with_options(tags=needs["merge_lora"].tags)
    merged = merge_task(params.merge, adapter=adapter, sft_profile=params.sft.profile, ctx=ctx)
    track(merged)
    champion = gate_champion(ctx.store(), latest, merged.fingerprint)
    anchor = gate_anchor(ctx.store(), pinned, merged.fingerprint)
    identity = {"name": params.data.model_name, "author": params.data.model_author}
    report = evaluate.with_options(tags=needs["evaluate"].tags)(
        params.eval.model_copy(update={"device": needs["evaluate"].device}),  # auto resolved: cpu or cuda
        merged=merged,
        dataset=dataset,
        system_prompt=params.data.system_prompt,
        ctx=ctx,
        champion=champion,
        anchor=anchor,
        **identity,
    )
    track(report)
    stored = json.loads((ctx.open(report) / "report.json").read_text(encoding="utf-8"))
    if night:
        night.evaluation(stored)
    gate = report.metrics["gate"]
    results = {
        "base": report.metrics["base"],
        "tuned": report.metrics["tuned"],
        "champion": report.metrics.get("champion"),
        "table": metrics_table(stored),  # every metric with its deltas and 95% intervals, as the UI shows
        "samples": run_samples(stored),  # a few prompts with both models' answers
        "gate": gate,
        "release_uri": None,
        "release_id": None,
        "sft": adapter.metrics,
        "devices": devices,
        "needs": {task: need.describe() for task, need in needs.items()},
        "trigger": trigger,
    }
    if not gate["passed"]:
        reason = "quality gate failed: " + "; ".join(gate["reasons"])
        if not params.eval.force_release:
            raise QualityGateFailed(reason + " (nothing released; set eval.force_release to override)", results)
        logger.warning("%s — released anyway: eval.force_release is on", reason)
    # The release's fingerprint covers these: tracking.* is observation, not computation, so it is left out
    # (turning tracking on or off, or pointing it elsewhere, must not make a new release).
    lineage_params = {
        # data.trigger says when a night starts and data.streaming how hub rows are fetched, not what it
        # computes: left out too.
        **params.model_dump(mode="json", exclude={"tracking": True, "data": {"trigger", "streaming"}}),
        "base_model": ctx.base_model,
        "base_revision": ctx.base_revision,
        "overridden": sorted(
            k for k in overridden if not k.startswith(("tracking.", "data.trigger.", "data.streaming"))
        ),  # vs preset
    }
    released = release(
        params.release,
        adapter=adapter,
        merged=merged,
        report=report,
        dataset=dataset,
        params=lineage_params,
        ctx=ctx,
        expected_latest=latest.release_id if latest else None,
    )
    # Retention (release.keep_last, tasks/release/retention.py); a failure is logged, the release stands.
    after_release(
        ctx.store(), params.release.model_name, params.release.keep_last, params.release.stage_max_age_days, logger
    )
    track(released)
    if night:
        night.released(released, params.release.model_name)
    return {
        **results,
        "release_uri": released.metrics["release_uri"],
        "release_id": released.metrics["release_id"],
        "tracking": {"warnings": night.close()} if night else None,  # an unreachable tracker: warnings, not a failure
    }


def trigger_markdown(trigger: dict[str, Any]) -> str:
    """The ``data-trigger`` artifact: the watched source, its digest and the names that changed."""
    lines = [
        f"# Started by new data in `{trigger.get('source', '?')}`",
        "",
        f"- digest: `{trigger.get('digest', '?')}` (before: `{trigger.get('previous_digest', '?')}`)",
        f"- files now: {trigger.get('files', '?')}",
    ]
    for kind in ("added", "changed", "removed"):
        names = trigger.get(kind) or []
        count = trigger.get(f"{kind}_count", len(names))
        shown = ", ".join(f"`{n}`" for n in names) + (f" … ({count} in all)" if count > len(names) else "")
        lines.append(f"- {kind}: {count}" + (f": {shown}" if names else ""))
    lines.append(f"- event: `{trigger.get('event_id', '?')}` (tuneline.data.changed, Event Feed)")
    return "\n".join(lines) + "\n"


def preflight_run(params: RetrainParams, logger: Any = None) -> dict[str, TaskNeed]:
    """Each GPU-capable task's requirement, resolved and checked against this machine (read once, in
    a subprocess: this process never initialises CUDA); raises ``HardwareError`` naming the task, the
    parameter, the requirement and what was found."""
    machine = detect_machine()
    needs = params.task_needs(machine)
    check_needs(list(needs.values()), machine)
    for need in needs.values() if logger else ():
        logger.info("preflight: %s; %s -> passed", need.describe(), machine.describe())
    return needs


if __name__ == "__main__":
    retrain()
