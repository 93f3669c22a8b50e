"""Experiment tracking plumbing (MLflow): the stage runs nested under a night's run, and the trainers' ``report_to``.

The flow (``flows/tracking.py``) opens one MLflow run per flow run and puts a ``TrackingTarget`` (the
tracker's URI, the experiment, that parent run's id; never a credential) on the ``StageContext``. Here:

- ``stage_run(target, stage, fp)``: ``run_stage`` wraps a stage's build in it; it opens the stage's
  nested run, and while the build runs ``child_env()`` gives ``launch_training`` the variables that
  make the training child's ``report_to="mlflow"`` (TRL/transformers' own ``MLflowCallback``) log its
  curves into that nested run (``MLFLOW_TRACKING_URI``, ``MLFLOW_RUN_ID``);
- ``report_to()``: what the child passes to its trainer's config, read from those variables (and, for
  ``mlflow``, ``use_stage_run_callback()``: the stage's run stays open for the final evaluation, and a
  tracker failure never stops training);
- ``built_runs``: which stages this process built under which parent, so the flow tags the others reused.

Tracking never decides anything: every call here is best effort. An unreachable tracker is one warning
(``warnings_for(parent)``) and the stage goes on untracked; ``flows/tracking.py`` backfills it later.
Credentials come from the environment (``MLFLOW_TRACKING_TOKEN`` / ``_USERNAME`` / ``_PASSWORD``, which
the child inherits), never from here.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("tuneline.tracking")

# MLflow's client retries an unreachable server for minutes by default; a tracker must not hold up a night.
CLIENT_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
TENSORBOARD_ENV = "TUNELINE_TENSORBOARD"

_child_env: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "tuneline_tracking_env", default=None
)
built_runs: dict[tuple[str, str, str], str | None] = {}  # (parent run, stage, fp) -> nested run id (None: untracked)
_warnings: dict[str, list[str]] = {}  # parent run id (or "") -> warnings said so far


class TrackingTarget(BaseModel):
    """Where a night's stage runs go; travels in ``StageContext`` (a task parameter: no credential in it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(description="MLflow tracking URI (a server URL or a local store).")
    experiment_id: str = Field(description="The experiment's id.")
    parent_run_id: str = Field(default="", description="The night's run; empty when the tracker was unreachable.")
    tensorboard: bool = Field(default=False, description="Trainers also write TensorBoard event files.")


def check_uri(uri: str) -> str:
    """A tracking URI without credentials in it (they come from the environment), else ``ValueError``.

    >>> check_uri("http://127.0.0.1:5000")
    'http://127.0.0.1:5000'
    >>> check_uri("https://bob:hunter2@mlflow.example")
    Traceback (most recent call last):
    ...
    ValueError: tracking.mlflow_uri: put no credentials in the URI; set MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN
    """
    if urlsplit(uri).password is not None or "@" in urlsplit(uri).netloc:
        raise ValueError(
            "tracking.mlflow_uri: put no credentials in the URI; set MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN"
        )
    return uri


MISSING = "tracking.mlflow_uri is set but mlflow is not installed: pip install 'tuneline[tracking]'"


def mlflow_installed() -> bool:
    """Whether MLflow can be imported (it is the optional extra ``tracking``: heavy, and off by default)."""
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri`` that gives up quickly when the server is down; ``ImportError`` naming
    the extra when MLflow is not installed."""
    for key, value in CLIENT_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not mlflow_installed():
        raise ImportError(MISSING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def warn(parent: str, what: str, error: BaseException | str) -> str:
    """Log and remember one tracking warning (said once per parent run and kind of failure)."""
    text = f"tracking: {what}: {str(error).splitlines()[0][:300] if str(error) else type(error).__name__}"
    said = _warnings.setdefault(parent, [])
    if not any(w.startswith(f"tracking: {what}:") for w in said):
        said.append(text)
        try:
            from tasks.core.common import run_logger

            run_logger().warning("%s (the night goes on; `tuneline tracking sync` backfills it)", text)
        except Exception:  # noqa: BLE001 — outside a Prefect run
            log.warning(text)
    return text


def warnings_for(parent: str) -> list[str]:
    """The tracking warnings said for a parent run (its stage runs included)."""
    return list(_warnings.get(parent, []))


def flat(values: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (lists kept whole).

    >>> flat({"sft": {"lora_rank": 8, "targets": ["q", "v"]}, "seed": 1})
    {'sft.lora_rank': 8, 'sft.targets': ['q', 'v'], 'seed': 1}
    """
    out: dict[str, Any] = {}
    for key, value in (values or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) metrics dict, dotted, for ``log_batch`` (booleans excluded).

    >>> numbers({"loss": 1.5, "gate": {"passed": True}, "steps": 40, "name": "x"})
    {'loss': 1.5, 'steps': 40.0}
    """
    out = {}
    for key, value in flat(values, prefix).items():
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value == value
            and abs(value) != float("inf")
        ):
            out[key] = float(value)
    return out


def log_values(
    mlflow: Any, run_id: str, metrics: dict[str, float], tags: dict[str, str], params: dict[str, Any]
) -> None:
    """One ``log_batch`` per 900 entries (the server's limit is 1000); values cut to MLflow's sizes."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    items: list[Any] = [Metric(k[:250], v, now, 0) for k, v in metrics.items()]
    items += [RunTag(k[:250], str(v)[:5000]) for k, v in tags.items()]
    items += [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 900):
        chunk = items[start : start + 900]
        mlflow.log_batch(
            run_id,
            metrics=[i for i in chunk if isinstance(i, Metric)],
            params=[i for i in chunk if isinstance(i, Param)],
            tags=[i for i in chunk if isinstance(i, RunTag)],
        )


def start_stage_run(target: TrackingTarget, stage: str, fp: str, reused: bool, uri: str = "") -> str:
    """Create a stage's nested run under the night's run (raises when the tracker is unreachable)."""
    mlflow = client(target.uri)
    tags = {
        "mlflow.parentRunId": target.parent_run_id,
        "tuneline.stage": stage,
        "tuneline.fingerprint": fp,
        "tuneline.reused": str(reused).lower(),
    }
    if uri:
        tags["tuneline.uri"] = uri
    run = mlflow.create_run(target.experiment_id, run_name=stage + (" (reused)" if reused else ""), tags=tags)
    return run.info.run_id


def finish_stage_run(target: TrackingTarget, run_id: str, ref: Any | None) -> None:
    """The stage's own metrics and the link to its folder, then the run's end (FAILED when ``ref`` is None)."""
    mlflow = client(target.uri)
    if ref is not None:
        log_values(mlflow, run_id, numbers(ref.metrics), {"tuneline.uri": ref.uri}, {})
    mlflow.set_terminated(run_id, "FINISHED" if ref is not None else "FAILED")


@contextlib.contextmanager
def stage_run(target: TrackingTarget | None, stage: str, fp: str) -> Iterator[dict[str, Any]]:
    """Around a stage's build: its nested run, and ``child_env()`` pointing the training child at it.

    Yields a dict; set ``["ref"]`` to the published ref so its metrics and URI are logged."""
    out: dict[str, Any] = {}
    if target is None:
        yield out
        return
    run_id = None
    if target.parent_run_id:
        try:
            run_id = start_stage_run(target, stage, fp, reused=False)
        except Exception as e:  # noqa: BLE001 — tracking never fails a stage
            warn(target.parent_run_id, f"{stage}: could not open its run", e)
    built_runs[(target.parent_run_id, stage, fp)] = run_id
    env = {TENSORBOARD_ENV: "1"} if target.tensorboard else {}
    if run_id:
        env.update({"MLFLOW_TRACKING_URI": target.uri, "MLFLOW_RUN_ID": run_id, **CLIENT_ENV_DEFAULTS})
        env["MLFLOW_FLATTEN_PARAMS"] = "1"
    token = _child_env.set(env)
    try:
        yield out
    finally:
        _child_env.reset(token)
        if run_id:
            try:
                finish_stage_run(target, run_id, out.get("ref"))
            except Exception as e:  # noqa: BLE001
                warn(target.parent_run_id, f"{stage}: could not log its results", e)


def child_env() -> dict[str, str]:
    """Environment for a training child started inside ``stage_run`` (empty outside it)."""
    return dict(_child_env.get() or {})


def report_to(output_dir: Path | None = None, env: dict[str, str] | None = None) -> list[str]:
    """The trainer's ``report_to``, in the training child: ``mlflow`` when the stage has a run to log its
    curves into (and MLflow is installed), ``tensorboard`` when ``tracking.tensorboard`` is on (its event
    files go to ``<output_dir>/tensorboard``, published with the stage).

    >>> report_to(env={})
    []
    >>> report_to(env={"TUNELINE_TENSORBOARD": "1"})
    ['tensorboard']
    """
    env = os.environ if env is None else env
    if env.get(TENSORBOARD_ENV) and output_dir is not None:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir(output_dir))  # transformers' TensorBoardCallback
    out = []
    if env.get("MLFLOW_RUN_ID"):
        try:
            import mlflow  # noqa: F401

            out.append("mlflow")
            use_stage_run_callback()
        except ImportError:
            log.warning("tracking: mlflow is not installed in the training environment; no curves logged")
    if env.get(TENSORBOARD_ENV):
        out.append("tensorboard")
    return out


def use_stage_run_callback() -> None:
    """Make ``report_to="mlflow"`` use ``StageRunMLflowCallback`` in this (training) process.

    transformers picks a ``report_to`` name's callback from its registry ``INTEGRATION_TO_CALLBACK``; replacing
    the entry keeps TRL's own callback (its parameters and curves, unchanged) while the trainers are built as
    they always are. Two changes, both for the stage's run: ``train()``'s end leaves the run open, so the final
    ``evaluate()`` logs into it (MLflow's ``end_run`` drops ``MLFLOW_RUN_ID``, and the next ``log_metrics``
    would start a stray run in the Default experiment; the flow ends the stage's run); and a tracker failure
    is one warning line in the training log, never a failed training (tracking never fails a night)."""
    from transformers.integrations import integration_utils

    base = integration_utils.MLflowCallback

    class StageRunMLflowCallback(base):  # type: ignore[misc, valid-type]
        _failed = False

        def _safely(self, hook: Any, *args: Any, **kwargs: Any) -> Any:
            if self._failed:
                return None
            try:
                return hook(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 — the trainer goes on untracked
                self._failed = True
                why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                print(f"[tuneline.tracking] warning: the trainer's MLflow logging stopped: {why}", flush=True)
                return None

        def setup(self, args: Any, state: Any, model: Any) -> None:
            self._safely(super().setup, args, state, model)
            self._async_log = False  # a failed call raises here, in _safely, not in a thread at exit
            self._initialized = True

        def on_log(self, *args: Any, **kwargs: Any) -> Any:
            return self._safely(super().on_log, *args, **kwargs)

        def on_save(self, *args: Any, **kwargs: Any) -> Any:
            return self._safely(super().on_save, *args, **kwargs)

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            return None  # the stage's run stays open for evaluate(); MLflow ends it at exit, the flow after

        def __del__(self) -> None:
            return None

    integration_utils.INTEGRATION_TO_CALLBACK["mlflow"] = StageRunMLflowCallback


def tensorboard_dir(output_dir: Path) -> Path:
    """Where a trainer's TensorBoard event files go: inside the stage folder, published with it."""
    return Path(output_dir) / "tensorboard"
