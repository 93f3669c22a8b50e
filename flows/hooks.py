"""Failure reporting: put the reason where operators look.

The retrain flow's ``on_failure`` hook. When a run fails — an error in a stage, or the quality
gate blocking the release — it records the reason three ways, each visible without a shell:

- an ERROR line in the run's own log (UI: the flow run's Logs tab; ``prefect flow-run logs ID``);
- a markdown artifact under the key ``retrain-failure`` (UI: Artifacts → retrain-failure, always
  the latest failure, linked to its run);
- a Prefect event, ``tuneline.retrain.failed`` or ``tuneline.retrain.gate-blocked`` (UI: Event
  Feed), which an automation can turn into a Slack/e-mail/webhook notification
  (docs/operating.md, "Failure reporting").

Attach it with ``@flow(..., on_failure=[report_failure])``. A hook that fails must not hide the
run's own failure, so every step here is best effort and logged.
"""

from __future__ import annotations

from typing import Any

FAILED_EVENT = "tuneline.retrain.failed"
GATE_EVENT = "tuneline.retrain.gate-blocked"
ARTIFACT_KEY = "retrain-failure"


def failure_kind(message: str | None) -> str:
    """``gate-blocked`` when the quality gate stopped the release, else ``failed``.

    >>> failure_kind("quality gate failed: validation_loss 2.1 > 1.9 (nothing released; ...)")
    'gate-blocked'
    >>> failure_kind("training process exited with -9")
    'failed'
    """
    return "gate-blocked" if message and "quality gate failed" in message else "failed"


def report_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_failure`` hook: ERROR log line, markdown artifact, and an event, all with the reason."""
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run, flow)
    reason = (state.message or "no message").strip()
    kind = failure_kind(reason)
    deployment = getattr(flow_run, "deployment_id", None)
    logger.error(
        "retrain %s (run %s, %s): %s",
        "blocked by the quality gate" if kind == "gate-blocked" else "FAILED",
        flow_run.name,
        "deployment " + str(deployment) if deployment else "no deployment",
        reason,
    )
    try:
        from flows.tracking import close_failed

        close_failed(flow_run.id, reason)  # the night's MLflow run ends FAILED, with the reason
    except Exception as e:  # noqa: BLE001
        logger.error("could not close the night's tracking run: %s", e)
    try:
        _create_artifact(flow_run, kind, reason)
    except Exception as e:  # noqa: BLE001 — the run's failure matters more than the report's
        logger.error("could not write the %s artifact: %s", ARTIFACT_KEY, e)
    try:
        _emit(flow_run, kind, reason)
    except Exception as e:  # noqa: BLE001
        logger.error("could not emit the failure event: %s", e)


def _create_artifact(flow_run: Any, kind: str, reason: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    title = "Quality gate blocked the release" if kind == "gate-blocked" else "Retrain failed"
    markdown = (
        f"# {title}\n\n"
        f"- run: `{flow_run.name}` (`{flow_run.id}`)\n"
        f"- deployment: `{getattr(flow_run, 'deployment_id', None) or '-'}`\n\n"
        f"## Reason\n\n```\n{reason}\n```\n"
    )
    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                key=ARTIFACT_KEY,
                type="markdown",
                data=markdown,
                flow_run_id=flow_run.id,
                description=f"{title}: {reason[:200]}",
            )
        )


def _emit(flow_run: Any, kind: str, reason: str) -> None:
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    related = []
    if getattr(flow_run, "deployment_id", None):
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                "prefect.resource.role": "deployment",
            }
        )
    emit_event(
        event=GATE_EVENT if kind == "gate-blocked" else FAILED_EVENT,
        resource={"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.name": flow_run.name},
        related=related,
        payload={"reason": reason, "kind": kind},
    )
    EventsWorker.drain_all()  # the run's process may exit right after the hook: send it now
