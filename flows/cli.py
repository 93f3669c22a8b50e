"""``tuneline``: run the retrain flow, check data, fetch a release.

tuneline run --preset demo [--set sft.max_steps=10 ...]   run the flow here
tuneline data check [SPEC ...] [--preset P] [--set data.K=V] [--max-length N ...]  validate datasets
tuneline params [--preset demo] [--json-schema]           every parameter: type, default, help
tuneline fetch ROOT MODEL [RELEASE_ID|LATEST] DEST        download a release, verify checksums
tuneline serve MODEL [RELEASE_ID|LATEST] --root ROOT [--follow-latest]   serve a release (vLLM, OpenAI API)
tuneline release list|show|promote|rollback|pin|prune|log MODEL [ID] --root ROOT   operate releases
tuneline compare MODEL --root ROOT [--releases base,LATEST] [--prompts FILE]   models side by side
tuneline deploy --pool gpu-v100                           apply pools + deployments (infra/prefect.yaml)
tuneline serve-local                                      Prefect server + worker on 127.0.0.1:4200
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flows.errors import InputError, OneLineParser, guarded, one_line
from flows.options import add_model_options

# Prefect's temporary server migrates a fresh SQLite database on its first start; on a busy 2-core
# machine that can take longer than Prefect's default 20 s wait. Set before prefect is imported.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def cmd_run(args: argparse.Namespace) -> int:
    """Run the flow here. Ctrl-C or SIGTERM: trainer stopped, run Cancelled, exit 130 / 143 (flows/stopping.py)."""
    from contextlib import ExitStack

    from pydantic import ValidationError

    from flows.params import load_params
    from flows.stopping import (
        Stop,
        Stopper,
        flush_prefect,
        mark_cancelled,
        mark_orphans_crashed,
        owner_tag,
        reap_when_gone,
    )
    from tasks.runtime.hardware import HardwareError

    stopper = Stopper().install()
    try:
        params = load_params(args.preset, args.set)
        preset = load_params(args.preset).model_dump(mode="json") if args.preset else None  # what --set overrides
    except (ValidationError, InputError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except Stop:
        return stopper.exit_code
    reap_when_gone()  # before anything is started (the preflight's device probe is the first)
    try:  # what each GPU task needs, against this machine: seconds, before a server starts or a model loads
        from flows.retrain import preflight_run

        preflight_run(params)
    except (HardwareError, ValueError) as e:  # ValueError: a setting this machine cannot run (sft.precision=fp8)
        print(f"error: preflight: {e}", file=sys.stderr)
        return 2
    from prefect.exceptions import TerminationSignal

    state = summary = None
    with ExitStack() as cleanup:
        try:
            _use_temporary_server(cleanup)
            from prefect import tags

            from flows.retrain import retrain

            try:  # a run killed earlier on this host stays "Running" for good unless someone says it crashed
                for name in mark_orphans_crashed():
                    print(f"flow run {name}: its process is gone; marked Crashed", file=sys.stderr, flush=True)
            except Exception as e:  # noqa: BLE001 — a record of the past must not stop this run
                print(f"could not look for crashed runs: {one_line(e)}", file=sys.stderr)
            cleanup.enter_context(tags(owner_tag()))

            run = retrain.with_options(on_running=[*retrain.on_running_hooks, stopper.on_running])
            state = run(params, preset, return_state=True)
            summary = state.result() if state.is_completed() else None
        except (Stop, TerminationSignal):
            pass  # the first signal, wherever it landed: the run is recorded below
        finally:
            stopper.hold()  # a signal now must not cut short the cleanup that stops the server
            if stopper.signum is not None and stopper.flow_run_id is not None:
                try:
                    mark_cancelled(stopper.flow_run_id, stopper.reason)
                except Exception as e:  # noqa: BLE001 — stopping matters more than the record
                    print(f"could not record the run as Cancelled: {e}", file=sys.stderr)
            flush_prefect()  # queued logs reach the server before it stops
    if stopper.signum is not None:
        print(f"\nretrain cancelled: {stopper.reason}; rerun the same command to resume", file=sys.stderr)
        return stopper.exit_code
    assert state is not None
    from flows.results import print_results

    if not state.is_completed():  # the reason (gate, stage error) is also in the run's ERROR log
        refused = _refused_results(state)
        if refused:  # the gate refused: what it measured, then the reason, last
            print_results(refused)
        else:
            print("\nrelease: none — the run failed before its release (the reason follows)")
        sys.stdout.flush()
        print(f"\nretrain {state.name}: {state.message}", file=sys.stderr)
        return 1
    print_results(summary)
    return 0


def _refused_results(state) -> dict | None:
    """What a run the quality gate refused measured (``QualityGateFailed.results``), else None."""
    from flows.retrain import QualityGateFailed

    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 — a result that cannot be read back only costs the table
        return None
    return error.results if isinstance(error, QualityGateFailed) else None


def _use_temporary_server(cleanup) -> None:
    """With no Prefect server configured, start the temporary one ourselves (flows/stopping.py says
    why) and point this process at it; ``cleanup`` stops it."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.stopping import TemporaryServer

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return
    server = TemporaryServer()
    cleanup.callback(server.stop)
    server.start(timeout=settings.server.ephemeral.startup_timeout_seconds)
    print(
        f"temporary Prefect server on {server.api_url}, without the UI; it stops when this command ends. To follow "
        "runs in the UI: `tuneline serve-local`, then run with PREFECT_API_URL=http://127.0.0.1:4200/api",
        flush=True,
    )
    _drop_run_links()
    cleanup.callback(_point_prefect_at, os.environ.get("PREFECT_API_URL"))  # at the end: as it was
    _point_prefect_at(server.api_url)
    cleanup.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url}))


def _point_prefect_at(api_url: str | None) -> None:
    """Set ``PREFECT_API_URL`` in the environment (Prefect's worker threads read it) and in Prefect's
    process-wide settings. A thread started without a copy of the caller's context (Prefect's events
    worker, restarted after a hiccup) reads those global settings, made when prefect was imported,
    without an API URL: it then starts a second temporary server of its own (25 s on a busy machine,
    events sent where nobody reads them, an ERROR line at exit). Seen with two runs at once
    (tests/test_concurrent_runs.py)."""
    import prefect.context

    if api_url is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = api_url
    refresh = getattr(prefect.context, "refresh_global_settings_context", None)  # not in every Prefect 3
    if refresh is not None:
        refresh()


def _drop_run_links() -> None:
    """Prefect logs "View at <ui>/runs/flow-run/<id>" for every run; the temporary server has no UI (and
    is gone after the run), so that link would be a 404: drop the line rather than print it."""
    import logging

    logging.getLogger("prefect.flow_runs").addFilter(lambda record: not record.getMessage().startswith("View at "))


def cmd_data_check(args: argparse.Namespace) -> int:
    """Load, validate, count tokens and report, as the dataset stage does; no training, no GPU.

    The data section comes from ``--preset`` / ``--set data.KEY=VALUE`` (as for ``tuneline run``),
    then the ``DataParams`` options typed here, then the SPECs (which replace the datasets)."""
    import tempfile

    from pydantic import ValidationError

    from flows.options import model_overrides
    from flows.params import load_params
    from tasks.data import DataError, DataParams, prepare, report_text

    try:
        params = load_params(args.preset, args.set)
        data = {**params.data.model_dump(), **model_overrides(args, DataParams)}
        if args.specs:
            data["datasets"] = args.specs
        config = DataParams.model_validate(data)
        # The tokenizer that counts tokens: --model, else the preset's base model, else the Qwen2 tokenizer.
        model = args.model or (params.model.base if args.preset else None)
        revision = args.revision or params.model.revision
        if args.out:
            report = prepare(config, Path(args.out), model=model, revision=revision)
        else:
            with tempfile.TemporaryDirectory(prefix="tuneline-data-check-") as tmp:
                report = prepare(config, Path(tmp), model=model, revision=revision)
    except (DataError, ValidationError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    print(report_text(report))
    if args.out:
        print(f"written to {args.out}: train.jsonl, validation.jsonl, report.json, report.md, token_lengths.png")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download a release and verify every file's SHA-256 against its manifest. For an s3:// root the
    endpoint and credentials come from --block (a saved 'Tuneline Artifact Store') or the environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or an AWS profile)."""
    from tasks.artifacts.store import StoreError, store_for
    from tasks.release.stage import ReleaseError, fetch_release

    try:
        store = store_for(args.root, args.block)
        store.max_attempts = 2  # a person waits: an unreachable endpoint fails in seconds
        store.check(create=False)  # missing root, credentials, bucket or endpoint: one line, before any download
        manifest = fetch_release(store, args.model, args.release_id, Path(args.dest))
    except (ReleaseError, StoreError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    size = sum(f["size"] for f in manifest["files"].values())
    print(
        f"fetched {manifest['model_name']}/{manifest['release_id']} into {args.dest}: {len(manifest['files'])} files, "
        f"{size / 1e6:.1f} MB, every SHA-256 verified"
    )
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy

    try:
        deploy(args.pool, args.kind, args.preset, args.code_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"deployed retrain/nightly, retrain/manual and compare/compare to work pool {args.pool!r}, "
        f"release-ops/release-ops to 'cpu' ({args.kind} pools applied)"
    )
    return 0


def cmd_serve_local(args: argparse.Namespace) -> int:
    from flows.deploy import serve_local
    from flows.stopping import reap_when_gone

    reap_when_gone()  # the server, the workers and their flow runs end with this command

    try:
        serve_local(
            args.port,
            args.pool,
            [] if args.no_worker else (args.worker or None),
            args.preset,
            Path(args.log_dir) if args.log_dir else None,
        )
    except (ValueError, FileNotFoundError) as e:  # a bad --worker or work-pools.yaml: one line, nothing started
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="tuneline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (one line without)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the retrain flow here")
    run.add_argument("--preset", default=None, help="YAML preset: a path or a name in flows/presets (demo)")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter, e.g. sft.max_steps=10"
    )
    run.set_defaults(func=cmd_run)
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="load, validate and report datasets without training (exit 1 on bad input)")
    check.add_argument(
        "specs",
        nargs="*",
        help="SOURCE[:SUBSET][#N] specs: files, folders, s3://, hub ids, "
        "swift/self-cognition (replace data.datasets; default: the preset's)",
    )
    check.add_argument("--preset", default=None, help="YAML preset whose data section (and base model) to check")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.seed=1")
    check.add_argument(
        "--model",
        default=None,
        help="model whose tokenizer counts tokens (default: the preset's base "
        "model; without a preset the Qwen2 tokenizer)",
    )
    check.add_argument("--revision", default=None, help="hub revision of --model")
    check.add_argument("--out", default=None, help="keep the output (splits, report, histogram) in this folder")
    from tasks.data import DataParams

    add_model_options(
        check,
        DataParams,
        exclude=frozenset({"datasets"}),
        aliases={"model_name": ["--name"], "model_author": ["--author"], "system_prompt": ["--system"]},
    )
    check.set_defaults(func=cmd_data_check)
    fetch = sub.add_parser("fetch", help="download a release and verify every checksum")
    fetch.add_argument(
        "root", help="artifact root: a folder or s3://bucket/prefix (endpoint/credentials: --block or AWS_* variables)"
    )
    fetch.add_argument("model", help="released model name")
    fetch.add_argument("release_id", nargs="?", default="LATEST", help="a release id, or LATEST (default)")
    fetch.add_argument("dest", nargs="?", default="./release", help="an empty or new folder (default ./release)")
    fetch.add_argument(
        "--block",
        default=None,
        help="name of a saved 'Tuneline Artifact Store' block giving the endpoint and credentials",
    )
    fetch.set_defaults(func=cmd_fetch)
    from flows.serve_cli import add_serve_parser

    add_serve_parser(sub)
    from flows.release_ops import add_release_parser

    add_release_parser(sub)
    from flows.compare import add_compare_parser

    add_compare_parser(sub)
    from flows.params_cli import add_params_parser

    add_params_parser(sub)
    from flows.tracking import add_tracking_parser

    add_tracking_parser(sub)
    dep = sub.add_parser("deploy", help="apply work pools and the deployments of infra/prefect.yaml (PREFECT_API_URL)")
    dep.add_argument("--pool", default="gpu-v100", help="work pool the deployments target: cpu, gpu-v100, gpu-a100x2")
    dep.add_argument(
        "--kind", default="process", choices=["process", "kubernetes"], help="base job template of the pools"
    )
    dep.add_argument("--preset", default=None, help="parameter preset (default infra/presets/nightly.yaml)")
    dep.add_argument(
        "--code-dir", default=None, help="where workers find this checkout (default: here; /opt/tuneline in the image)"
    )
    dep.set_defaults(func=cmd_deploy)
    srv = sub.add_parser("serve-local", help="Prefect server + worker(s) on 127.0.0.1, deployments applied")
    srv.add_argument("--port", type=int, default=4200)
    srv.add_argument("--pool", default="cpu", help="work pool the deployments target")
    srv.add_argument(
        "--worker",
        action="append",
        metavar="POOL[:GPUS]",
        help="a worker (repeatable), e.g. gpu-v100:0; default: one for --pool",
    )
    srv.add_argument("--no-worker", action="store_true", help="server and deployments only")
    srv.add_argument("--preset", default=None, help="parameter preset (default infra/presets/nightly.yaml)")
    srv.add_argument("--log-dir", default=None, help="write server and worker output to files here")
    srv.set_defaults(func=cmd_serve_local)
    _add_debug(parser)
    args = parser.parse_args(argv)
    return guarded(args.func, args)


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` also after any subcommand (``tuneline run --debug``), not only before it."""
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for child in getattr(action, "choices", {}).values():
            if "--debug" not in child._option_string_actions:
                child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            _add_debug(child)


if __name__ == "__main__":
    sys.exit(main())
