"""Experiment tracking for the retrain flow (``tracking.*``, docs/operating.md "Experiment tracking").

One MLflow run per flow run (tags: the Prefect flow run's id and URL), a nested run per stage (built
stages open theirs in ``run_stage``, tasks/artifacts/tracking.py, and the trainers log their curves into
it; cached stages get one tagged ``tuneline.reused`` with their fingerprint and nothing new), the
parameters under their dotted names, the data report's counts, evaluation metrics (base, champion,
tuned, deltas and 95% intervals), the gate's verdict, and links (URIs) to the stage folders and the
release. Each release becomes a registered model version; the alias ``champion`` follows LATEST.

Tracking never decides anything and never loses a night. The night's record is kept in the artifact
store (``tracking/nights/<flow run id>.json``) before anything is sent; a tracker that cannot be
reached is a warning in the run log and in the run's result, and the record stays pending until a
later run, or ``tuneline tracking sync``, sends it (idempotent: what the tracker already has is kept).
Credentials come from the environment (``MLFLOW_TRACKING_TOKEN`` or ``_USERNAME``/``_PASSWORD``) or a
Prefect Secret block named by ``tracking.secret_block``; never a parameter, never logged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tasks.artifacts.tracking import (
    TrackingTarget,
    built_runs,
    check_uri,
    client,
    flat,
    log_values,
    numbers,
    start_stage_run,
    warn,
    warnings_for,
)

RECORDS = "tracking/nights"
ALIAS = "champion"
_open: dict[str, Night] = {}  # flow run id -> its open night (the failure hook closes it)


def resolve_uri(uri: str, root: str) -> str:
    """``local`` means a SQLite store under a local artifact root (``mlflow ui --backend-store-uri`` it).

    >>> import tempfile; root = tempfile.mkdtemp()
    >>> resolve_uri("local", root) == f"sqlite:///{root}/mlflow/mlflow.db"
    True
    >>> resolve_uri("http://127.0.0.1:5000", "s3://b/p")
    'http://127.0.0.1:5000'
    """
    if uri != "local":
        return check_uri(uri)
    if root.startswith("s3://"):
        raise ValueError("tracking.mlflow_uri=local needs a local artifact_root; give a server URL for an s3:// root")
    folder = Path(root).expanduser().resolve() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder}/mlflow.db"


CREDENTIAL_VARS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def secret_env(value: Any) -> dict[str, str]:
    """A Secret block's value as MLflow's credential variables: JSON ``{"username", "password"}`` (or a dict),
    ``user:password``, or a token.

    >>> secret_env('{"username": "bob", "password": "pw"}') == {
    ...     "MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "pw"}
    True
    >>> secret_env("bob:pw:x")["MLFLOW_TRACKING_PASSWORD"], secret_env("tok-1")
    ('pw:x', {'MLFLOW_TRACKING_TOKEN': 'tok-1'})
    """
    if isinstance(value, str) and value.lstrip().startswith("{"):
        import json

        value = json.loads(value)
    if isinstance(value, dict):
        if not value.get("username") or not value.get("password"):
            raise ValueError("the Secret block's JSON needs 'username' and 'password'")
        return {"MLFLOW_TRACKING_USERNAME": str(value["username"]), "MLFLOW_TRACKING_PASSWORD": str(value["password"])}
    user, sep, password = str(value).partition(":")
    if sep:
        return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
    return {"MLFLOW_TRACKING_TOKEN": str(value)}


def load_secret(block: str | None) -> dict[str, str | None]:
    """A Prefect Secret block's value into this process's environment for the night, where MLflow's client
    (and, through ``child_env``'s inheritance, the training child's callback) reads it; never into parameters,
    logs or the record. Returns the variables it replaced, for ``restore_env`` when the night closes."""
    if not block:
        return {}
    from prefect.blocks.system import Secret

    env = secret_env(Secret.load(block).get())
    saved = {k: os.environ.get(k) for k in CREDENTIAL_VARS}
    for key in CREDENTIAL_VARS:  # the block's credential, not a mix with one set in the environment
        os.environ.pop(key, None)
    os.environ.update(env)
    return saved


def restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def experiment_id(mlflow: Any, name: str, uri: str) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # the local store keeps its (few) artifacts beside its database
        location = Path(uri[len("sqlite:///") :]).parent.joinpath("artifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def find_run(mlflow: Any, exp: str, tags: dict[str, str]) -> Any | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = mlflow.search_runs([exp], filter_string=query, max_results=1)
    return runs[0] if runs else None


class Night:
    """One flow run's tracking: the record kept in the store and the MLflow runs it becomes."""

    def __init__(self, store: Any, record: dict[str, Any]):
        self.store, self.record = store, record
        self.target: TrackingTarget | None = None
        self.saved_env: dict[str, str | None] = {}  # credential variables a Secret block replaced for the night

    @property
    def key(self) -> str:
        return f"{RECORDS}/{self.record['flow_run_id']}.json"

    def save(self) -> None:
        try:
            self.store.write_json(self.key, self.record)
        except Exception as e:  # noqa: BLE001 — the night goes on
            self.warn("could not keep the night's record", e)

    def warn(self, what: str, error: BaseException | str) -> None:
        text = warn(self.record.get("parent_run_id") or self.record["flow_run_id"], what, error)
        if text not in self.record["warnings"]:
            self.record["warnings"].append(text)

    def warnings(self) -> list[str]:
        said = warnings_for(self.record.get("parent_run_id") or "") + self.record["warnings"]
        return list(dict.fromkeys(said))

    # -- the MLflow side; each raises when the tracker cannot be reached -------------------------
    def _parent(self, mlflow: Any) -> str:
        exp = experiment_id(mlflow, self.record["experiment"], self.record["uri"])
        self.record["experiment_id"] = exp
        run = find_run(mlflow, exp, {"tuneline.flow_run_id": self.record["flow_run_id"]})
        if run is None:
            tags = {"tuneline.flow_run_id": self.record["flow_run_id"], "tuneline.flow_run_url": self.record["url"]}
            run = mlflow.create_run(exp, run_name=self.record["flow_run_name"], tags=tags)
            log_values(mlflow, run.info.run_id, {}, {}, self.record["params"])
        self.record["parent_run_id"] = run.info.run_id
        return run.info.run_id

    def push(self) -> None:
        """Send everything recorded so far (what the tracker already has is kept)."""
        mlflow = client(self.record["uri"])
        parent = self.record.get("parent_run_id") or self._parent(mlflow)
        exp = self.record["experiment_id"]
        target = TrackingTarget(uri=self.record["uri"], experiment_id=exp, parent_run_id=parent)
        for stage in self.record["stages"]:
            if stage.get("run_id"):
                continue
            found = find_run(mlflow, exp, {"mlflow.parentRunId": parent, "tuneline.fingerprint": stage["fingerprint"]})
            if found is not None:
                stage["run_id"] = found.info.run_id
                continue
            stage["run_id"] = start_stage_run(
                target, stage["stage"], stage["fingerprint"], stage["reused"], stage["uri"]
            )
            if not stage["reused"]:  # built while the tracker was away: its numbers, from the stage's metrics
                log_values(mlflow, stage["run_id"], numbers(stage["metrics"]), {}, {})
            mlflow.set_terminated(stage["run_id"], "FINISHED")
        tags = {f"tuneline.uri.{s['stage']}": s["uri"] for s in self.record["stages"]}
        tags.update({k: str(v) for k, v in self.record["tags"].items()})
        log_values(mlflow, parent, self.record["metrics"], tags, {})
        release = self.record.get("release")
        if release and not release.get("version"):
            release["version"] = register(mlflow, release, parent)
        if release and not release.get("alias_moved"):  # the alias follows LATEST, wherever it is now
            repair_alias(self.store, self.record["uri"], release["model"])
            release["alias_moved"] = True
        if self.record["status"] != "RUNNING":
            # the whole night in one file beside the run (its stages, URIs, fingerprints, warnings; no credential);
            # a tracker whose artifact store fails still gets the night's numbers
            try:
                mlflow.log_dict(parent, self.record, "tuneline/night.json")
            except Exception as e:  # noqa: BLE001
                self.warn("could not store the night's record as an artifact", e)
            mlflow.set_terminated(parent, self.record["status"])
            self.record["synced"] = True

    def try_push(self, what: str) -> bool:
        try:
            self.push()
            return True
        except Exception as e:  # noqa: BLE001 — tracking never fails a night
            self.warn(what, e)
            return False

    # -- what the flow calls ----------------------------------------------------------------------
    def stage(self, ref: Any) -> None:
        """After a stage task: a ref this run did not build is a reused stage (cache hit)."""
        parent = self.record.get("parent_run_id") or ""
        built = (parent, ref.stage, ref.fingerprint) in built_runs
        run_id = built_runs.get((parent, ref.stage, ref.fingerprint))
        entry = {"stage": ref.stage, "fingerprint": ref.fingerprint, "uri": ref.uri, "reused": not built}
        entry |= {"metrics": numbers(ref.metrics), "run_id": run_id}
        self.record["stages"].append(entry)
        if ref.stage == "data":
            self.record["metrics"].update(numbers(ref.metrics, "data."))
        if self.target is not None and parent and not built:
            try:
                entry["run_id"] = start_stage_run(self.target, ref.stage, ref.fingerprint, True, ref.uri)
                client(self.target.uri).set_terminated(entry["run_id"], "FINISHED")
            except Exception as e:  # noqa: BLE001
                self.warn(f"{ref.stage}: could not record the reused stage", e)
        self.save()

    def evaluation(self, report: dict[str, Any]) -> None:
        """Base, champion and tuned metrics, their deltas and intervals, and the gate's verdict."""
        metrics = report.get("metrics", {})
        for who in ("base", "champion", "tuned"):
            self.record["metrics"].update(numbers(metrics.get(who) or {}, f"eval.{who}."))
        for c in report.get("comparisons", []):
            ref, m = c.get("reference"), c.get("metric")
            if c.get("delta") is not None:
                self.record["metrics"].update(numbers({f"eval.delta_vs_{ref}.{m}": c["delta"]}))
            if c.get("interval"):
                low, high = c["interval"]
                self.record["metrics"].update(numbers({f"eval.interval_vs_{ref}.{m}.low": low}))
                self.record["metrics"].update(numbers({f"eval.interval_vs_{ref}.{m}.high": high}))
        gate = report.get("gate", {})
        self.record["metrics"]["gate.passed"] = 1.0 if gate.get("passed") else 0.0
        self.record["tags"]["tuneline.gate"] = "passed" if gate.get("passed") else "failed"
        self.record["tags"]["tuneline.gate.reasons"] = "; ".join(gate.get("reasons", []))[:4000] or "-"
        self.save()

    def released(self, ref: Any, model: str) -> None:
        m = ref.metrics
        self.record["release"] = {
            "model": model,
            "release_id": m["release_id"],
            "uri": m["release_uri"],
            "gate": self.record["tags"].get("tuneline.gate", "-"),
            "fingerprints": {s["stage"]: s["fingerprint"] for s in self.record["stages"]},
        }
        self.record["tags"]["tuneline.release_uri"] = m["release_uri"]
        self.save()

    def close(self, status: str = "FINISHED", reason: str = "") -> list[str]:
        """End the night's run; returns the tracking warnings (also in the run's result)."""
        _open.pop(self.record["flow_run_id"], None)
        self.record["status"] = status
        if reason:
            self.record["tags"]["tuneline.failure"] = reason[:4000]
        self.try_push("could not send the night's results")
        self.save()
        restore_env(self.saved_env)  # the Secret block's credential leaves the process with the night
        return self.warnings()


def register(mlflow: Any, release: dict[str, Any], run_id: str | None) -> str:
    """The release as a registered model version (source: its URI; no copy of the weights)."""
    from mlflow.exceptions import MlflowException

    name = release["model"]
    for version in mlflow.search_model_versions(f"name='{name}'"):
        if version.tags.get("tuneline.release_id") == release["release_id"]:
            return version.version
    try:
        mlflow.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    tags = {"tuneline.release_id": release["release_id"], "tuneline.gate": release.get("gate", "-")}
    tags |= {"tuneline.release_uri": release["uri"]}
    tags |= {f"tuneline.fingerprint.{k}": v for k, v in (release.get("fingerprints") or {}).items()}
    source = release["uri"]
    if "://" not in source:
        # A tracking server refuses a local path as a version's source unless it lies in the run's artifacts;
        # the night's run stands for it then (the path is in the tag tuneline.release_uri).
        if not run_id:
            raise LookupError(f"release {release['release_id']} is a local folder with no tracked night to register")
        source = f"runs:/{run_id}/release"
    version = mlflow.create_model_version(name, source, run_id=run_id, tags=tags)
    return version.version


def move_champion_alias(uri: str, model: str, release_id: str, *, latest_uri: str | None = None) -> str:
    """Point the registered model's ``champion`` alias at the version of release ``release_id`` (what LATEST
    names); registers that release first when it has no version yet (``latest_uri`` needed then). Raises
    when the tracker cannot be reached: callers say so, LATEST stays the truth, and a later sync repairs it."""
    mlflow = client(check_uri(uri))
    release = {"model": model, "release_id": release_id, "uri": latest_uri}
    versions = [
        v for v in mlflow.search_model_versions(f"name='{model}'") if v.tags.get("tuneline.release_id") == release_id
    ]
    if versions:
        version = versions[0].version
    elif latest_uri:
        version = register(mlflow, release, None)
    else:
        raise LookupError(f"release {release_id} of {model} has no registered model version")
    mlflow.set_registered_model_alias(model, ALIAS, version)
    return version


def alias_after_move(uri: str | None, store: Any, model: str, release_id: str) -> str:
    """For release operations: move the alias after LATEST moved; one line saying what happened."""
    if not uri:
        return ""
    try:
        version = move_champion_alias(uri, model, release_id, latest_uri=store.uri(f"releases/{model}/{release_id}"))
        return f"tracker: alias {ALIAS} -> version {version} of {model}"
    except Exception as e:  # noqa: BLE001 — LATEST is the truth; the alias is repaired by `tuneline tracking sync`
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return (
            f"warning: LATEST moved, but the tracker's {ALIAS} alias could not be moved ({why});"
            f" `tuneline tracking sync --model {model}` repairs it"
        )


def open_night(params: Any, ctx: Any, logger: Any) -> tuple[Night | None, Any]:
    """Start tracking a flow run (``tracking.mlflow_uri`` empty: off). Sends the pending records of earlier
    nights first. Returns the night and the context whose stages log into it."""
    tracking = params.tracking
    uri = tracking.mlflow_uri
    if uri:
        from tasks.artifacts.tracking import MISSING, mlflow_installed

        # Tracking never decides anything: a tracker this night cannot use is one warning line, and the night
        # goes on untracked (the demo preset tracks to `local` by default, with or without the extra).
        if not mlflow_installed():
            logger.warning("%s; the night goes on untracked", MISSING)
            uri = ""
        else:
            try:
                uri = resolve_uri(uri, ctx.root)
            except ValueError as e:
                logger.warning("tracking: %s; the night goes on untracked", e)
                uri = ""
    if not uri:  # TensorBoard alone needs no tracker: the trainers write event files into their stage folders
        target = TrackingTarget(uri="", experiment_id="", tensorboard=True) if tracking.tensorboard else None
        return None, (ctx.model_copy(update={"tracking": target}) if target else ctx)
    from prefect.runtime import flow_run

    try:
        saved_env, secret_error = load_secret(tracking.secret_block), None
    except Exception as e:  # noqa: BLE001 — a Secret block that cannot be read: a warning, never a failure
        saved_env, secret_error = {}, e
    run_id = str(flow_run.id or "local")
    record = {
        "flow_run_id": run_id,
        "flow_run_name": flow_run.name or run_id,
        "url": flow_run.ui_url or "",
        "uri": uri,
        "experiment": tracking.experiment or params.release.model_name,
        "params": {k: v for k, v in flat(params.model_dump(mode="json")).items()},
        "stages": [],
        "metrics": {},
        "tags": {"tuneline.base_model": ctx.base_model, "tuneline.base_revision": ctx.base_revision},
        "status": "RUNNING",
        "synced": False,
        "warnings": [],
    }
    night = Night(ctx.store(), record)
    night.saved_env = saved_env
    if secret_error is not None:
        night.warn(f"tracking.secret_block {tracking.secret_block!r} could not be read", secret_error)
    night.save()
    backfilled = sync(ctx.store(), uri, exclude=run_id)
    if backfilled:
        logger.info("tracking: sent %d earlier night(s) the tracker had missed", backfilled)
    if night.try_push("unreachable; the night is kept in the store"):
        logger.info("tracking: MLflow run %s in experiment %r (%s)", record["parent_run_id"], record["experiment"], uri)
    # Unreachable: no parent run, but the stages still say which of them this run built (for the backfill).
    night.target = TrackingTarget(
        uri=uri,
        experiment_id=record.get("experiment_id", ""),
        parent_run_id=record.get("parent_run_id", ""),
        tensorboard=tracking.tensorboard,
    )
    _open[run_id] = night
    return night, ctx.model_copy(update={"tracking": night.target})


def close_failed(flow_run_id: str, reason: str) -> None:
    """The failure hook's part: a night that failed ends its run FAILED (with the reason)."""
    night = _open.get(str(flow_run_id))
    if night is not None:
        night.close("FAILED", reason)


def sync(store: Any, uri: str | None = None, exclude: str = "") -> int:
    """Send every pending night record of ``store`` (to its own tracker, or ``uri``); returns how many."""
    sent = 0
    for key in store.list(RECORDS):
        if not key.endswith(".json") or key.endswith(f"/{exclude}.json"):
            continue
        record = store.read_json(key)
        if record.get("synced") or (uri and record.get("uri") != uri):
            continue
        if record.get("status") == "RUNNING":
            record["status"] = "KILLED"  # a night whose process died without closing it
        night = Night(store, record)
        if night.try_push("could not backfill an earlier night"):
            sent += 1
        night.save()
    return sent


def repair_alias(store: Any, uri: str, model: str) -> str:
    """Point ``champion`` at LATEST's version again (after an alias move that failed)."""
    from tasks.artifacts.registry import latest_release

    latest = latest_release(store, model)
    if latest is None:
        return f"{model}: no LATEST release; alias left as it is"
    version = move_champion_alias(uri, model, latest, latest_uri=store.uri(f"releases/{model}/{latest}"))
    return f"{model}: alias {ALIAS} -> version {version} (release {latest}, LATEST)"


def cmd_tracking(args: argparse.Namespace) -> int:
    """``tuneline tracking sync``: backfill pending nights, repair the champion alias."""
    from tasks.artifacts.store import store_for

    try:
        if not args.root and not args.block:
            raise ValueError("no artifact root: give --root (a folder or s3://bucket/prefix) or set TUNELINE_ROOT")
        root = args.root
        if args.block and not root:
            from blocks.storage import load_store_settings

            root = load_store_settings(args.block)["root"]
        store = store_for(root, args.block)
        uri = resolve_uri(args.uri, str(store.uri())) if args.uri else None
        sent = sync(store, uri)
        print(f"sent {sent} pending night(s)")
        pending = [k for k in store.list(RECORDS) if not store.read_json(k).get("synced")]
        if args.model:
            if not uri:
                raise ValueError("--model needs --uri (or MLFLOW_TRACKING_URI): where the registered model lives")
            print(repair_alias(store, uri, args.model))
    except Exception as e:  # noqa: BLE001 — one line for a person
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    if pending:
        print(f"still pending (tracker unreachable?): {len(pending)}", file=sys.stderr)
        return 1
    return 0


def add_tracking_parser(sub: Any) -> None:
    """``tuneline tracking sync``."""
    cmds = sub.add_parser("tracking", help="experiment tracking (MLflow)").add_subparsers(
        dest="tracking_command", required=True
    )
    p = cmds.add_parser("sync", help="send the nights the tracker missed; --model: point champion at LATEST again")
    p.add_argument("--root", default=os.environ.get("TUNELINE_ROOT"), help="artifact root (default: TUNELINE_ROOT)")
    p.add_argument("--block", default=None, help="a saved 'Tuneline Artifact Store' block")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    p.add_argument("--uri", default=uri, help="the tracker (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--model", default=None, help="registered model whose champion alias is repaired")
    p.set_defaults(func=cmd_tracking)
