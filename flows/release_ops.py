"""Release operations for people: ``tuneline release list|show|promote|rollback|prune|log`` and the
same actions as the Prefect flow ``release-ops`` (UI buttons through its deployment), whose move log
is shown as a markdown artifact. The work is in ``tasks/release/ops.py`` and ``tasks/release/retention.py``.

    tuneline release list MODEL --root s3://bucket/prefix          id, time, gate, champion beaten, size, LATEST
    tuneline release show MODEL ID                                 the manifest, readable (--json: as stored)
    tuneline release promote MODEL ID --reason "..."               LATEST -> ID (checksums first)
    tuneline release rollback MODEL --reason "..."                 LATEST -> the previous good release
    tuneline release pin MODEL ID --reason "..."                   the anchor every night is also gated against
    tuneline release prune MODEL [--keep-last 7]                   retention now (it also runs after each release)
    tuneline release log MODEL                                     every move of LATEST: who, when, from, to, why

The root is ``--root`` or ``TUNELINE_ROOT``; an ``s3://`` root takes its endpoint and credentials from
``--block`` (a saved 'Tuneline Artifact Store') or the environment (``AWS_*``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Literal

from prefect import flow, get_run_logger

Action = Literal["list", "show", "promote", "rollback", "pin", "prune", "log"]


def open_store(root: str | None, block: str | None, create: bool = False):
    """The store for a command, checked (bucket and credentials) before anything else is read. A local
    root must exist unless ``create`` (a mistyped root is an error, never a new empty folder)."""
    from tasks.artifacts.store import store_for

    if not root and not block:
        raise ValueError("no artifact root: give --root (a folder or s3://bucket/prefix) or set TUNELINE_ROOT")
    if block and not root:
        from blocks.storage import load_store_settings

        root = load_store_settings(block)["root"]
    store = store_for(root, block)
    store.max_attempts = 2  # a person waits: an unreachable endpoint fails in seconds, not after 5 backoffs
    store.check(create=create)
    return store


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def list_text(rows: list[dict[str, Any]]) -> str:
    """The ``release list`` table, newest first."""
    head = f"{'':2}{'release':<28}{'created':<22}{'gate':<8}{'beat':<28}{'forced':<8}{'size':>10}  state"
    lines = [head]
    for r in reversed(rows):
        mark = "* " if r.get("latest") else "  "
        if r.get("incomplete"):
            lines.append(f"{mark}{r['release_id']:<28}{'-':<22}{'-':<8}{'-':<28}{'-':<8}{'-':>10}  incomplete")
            continue
        state = ", ".join(s for s, on in (("LATEST", r["latest"]), ("pruned", r["pruned"])) if on) or "-"
        created = (r.get("created") or "?")[:19]
        lines.append(
            f"{mark}{r['release_id']:<28}{created:<22}{r['gate']:<8}{r['champion'] or '(base only)':<28}"
            f"{'yes' if r['forced'] else 'no':<8}{_size(r['size_bytes']):>10}  {state}"
        )
    return "\n".join(lines)


def show_text(manifest: dict[str, Any], latest: str | None, pruned: dict[str, Any] | None) -> str:
    """A manifest for people: what, from where, how it scored, which files."""
    gate = manifest.get("gate") or {}
    data = manifest.get("data") or {}
    metrics = manifest.get("metrics") or {}
    base, tuned = metrics.get("base") or {}, metrics.get("tuned") or {}
    revision = manifest.get("base_revision_resolved") or manifest.get("base_revision")
    lines = [
        f"release   {manifest.get('model_name')}/{manifest.get('release_id')}"
        + ("   (LATEST)" if manifest.get("release_id") == latest else ""),
        f"created   {manifest.get('created')}   flow run {manifest.get('flow_run_id')}",
        f"gate      {'passed' if gate.get('passed') else 'FAILED: ' + '; '.join(gate.get('reasons') or [])}"
        + ("   FORCED by eval.force_release" if manifest.get("forced") else ""),
        f"champion  {(manifest.get('champion') or {}).get('release_id') or '(none: gated against the base only)'}",
        f"code      {manifest.get('code_version')}",
        f"base      {manifest.get('base_model')} @ {revision}",
        f"data      {data.get('fingerprint')}: {data.get('train_rows')} train, {data.get('validation_rows')} val",
    ]
    lines += [
        f"            {s.get('spec')}: {s.get('rows_sampled')} of {s.get('rows_read')}"
        for s in data.get("sources") or []
    ]
    lines += [f"stage     {k}: {v}" for k, v in (manifest.get("stages") or {}).items()]
    if base or tuned:
        lines.append("metrics   " + "  ".join(f"{k} {base.get(k, '-')} -> {tuned.get(k, '-')}" for k in tuned))
    if pruned:
        lines.append(
            f"pruned    {pruned.get('when')} by {pruned.get('who')}: {len(pruned.get('deleted', []))} files gone"
        )
    files = manifest.get("files") or {}
    lines.append(f"files     {len(files)}, {_size(sum(e.get('size', 0) for e in files.values()))}")
    gone = set((pruned or {}).get("deleted", []))
    lines += [
        f"  {k}  {_size(e['size'])}  {e['sha256'][:12]}{'  (pruned)' if k in gone else ''}" for k, e in files.items()
    ]
    return "\n".join(lines)


def log_text(entries: list[dict[str, Any]]) -> str:
    """Every move (and prune) of a model, oldest first, one line each."""
    out = []
    for e in entries:
        if e.get("action") == "prune":
            what = f"pruned {len(e.get('releases') or {})} releases, {len(e.get('stages') or [])} stage folders"
        else:
            what = f"{e.get('action')}: {e.get('from') or '(none)'} -> {e.get('to')}"
        out.append(
            f"{(e.get('when') or '?')[:19]}  {what}  by {e.get('who')}" + (f"  ({e['why']})" if e.get("why") else "")
        )
    return "\n".join(out) or "(no moves logged)"


def run_action(
    store: Any,
    action: Action,
    model: str,
    release_id: str | None = None,
    *,
    who: str,
    reason: str = "",
    verify: Literal["content", "metadata"] = "content",
    keep_last: int = 7,
    stage_max_age_days: int = 30,
    tracking_uri: str | None = None,
) -> tuple[str, Any]:
    """Do one action; return (text for a person, data)."""
    from tasks.artifacts.registry import latest_release
    from tasks.release.ops import (
        list_releases,
        load_manifest,
        pin,
        promote,
        pruned_info,
        read_log,
        require_model,
        rollback,
    )
    from tasks.release.retention import prune

    if action == "list":
        rows = list_releases(store, model)
        return list_text(rows), rows
    if action in ("show", "promote", "pin") and not release_id:
        raise ValueError(f"release {action} needs a release id")
    if action == "show":
        manifest = load_manifest(store, model, release_id)
        pruned = pruned_info(store, model, release_id)
        return show_text(manifest, latest_release(store, model), pruned), manifest
    if action == "promote":
        entry = promote(store, model, release_id, who=who, why=reason, verify=verify)
        return _moved_text(model, entry, store, tracking_uri), entry
    if action == "pin":
        entry = pin(store, model, release_id, who=who, why=reason)
        if entry.get("unchanged"):
            return f"{model}: the anchor is already {release_id}; nothing pinned", entry
        text = f"{model}: anchor pinned to {release_id} (was {entry['from'] or '(none)'}; pin by {entry['who']})"
        return text, entry
    if action == "rollback":
        entry = rollback(store, model, who=who, why=reason, verify=verify)
        return _moved_text(model, entry, store, tracking_uri), entry
    if action == "prune":
        require_model(store, model)
        result = prune(store, model, keep_last, stage_max_age_days, who=who)
        text = f"pruned {len(result['releases'])} releases ({', '.join(result['releases']) or 'none'}), "
        text += f"{len(result['stages'])} stage folders; kept whole: " + ", ".join(
            f"{k} ({v})" for k, v in result["kept"].items()
        )
        return text, result
    if action == "log":
        require_model(store, model)
        entries = read_log(store, model)
        return log_text(entries), entries
    raise ValueError(f"unknown action {action!r} (list, show, promote, rollback, pin, prune, log)")


def _moved_text(model: str, entry: dict[str, Any], store: Any = None, tracking_uri: str | None = None) -> str:
    from flows.tracking import alias_after_move

    # the tracker's champion alias follows LATEST in the same operation (a failure is said, LATEST stands)
    alias = alias_after_move(tracking_uri, store, model, entry["to"]) if entry.get("to") else ""
    if entry.get("unchanged"):
        return f"{model}: LATEST already names {entry['to']}; nothing moved" + (f"\n{alias}" if alias else "")
    return (
        f"{model}: LATEST moved from {entry['from'] or '(none)'} to {entry['to']} ({entry['action']} by {entry['who']})"
    ) + (f"\n{alias}" if alias else "")


# ----------------------------------------------------------------------------------------------
# The Prefect flow (UI: the release-ops deployment)
# ----------------------------------------------------------------------------------------------
@flow(name="release-ops", log_prints=True)
def release_ops(
    action: Action = "list",
    model_name: str = "qwen2-7b-instruct-tuneline",
    release_id: str | None = None,
    reason: str = "",
    artifact_root: str = "./artifacts",
    storage_block: str | None = None,
    keep_last: int = 7,
    stage_max_age_days: int = 30,
    tracking_uri: str = "",
) -> Any:
    """List, show, promote, roll back or prune a model's releases; the move log becomes the markdown
    artifact ``release-log``. Promote and rollback refuse a release whose files fail their checksums."""
    from prefect.runtime import flow_run

    from tasks.core.common import publish_markdown
    from tasks.release.ops import read_log

    logger = get_run_logger()
    store = open_store(None if storage_block else artifact_root, storage_block)
    who = f"flow run {flow_run.name} ({flow_run.id})"
    options = {"who": who, "reason": reason, "keep_last": keep_last, "stage_max_age_days": stage_max_age_days}
    options["tracking_uri"] = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # the champion alias
    text, data = run_action(store, action, model_name, release_id, **options)
    logger.info("%s %s:\n%s", action, model_name, text)
    rows = "\n".join(
        f"| {(e.get('when') or '')[:19]} | {e.get('action')} | {e.get('from') or ''} | {e.get('to') or ''} | "
        f"{e.get('who')} | {e.get('why') or ''} |"
        for e in reversed(read_log(store, model_name))
    )
    publish_markdown(
        "release-log",
        f"## {model_name}: {action}\n\n```\n{text}\n```\n\n### Moves of LATEST (newest first)\n\n"
        f"| when (UTC) | action | from | to | who | why |\n|---|---|---|---|---|---|\n{rows}\n",
        f"Release operations on {model_name}",
    )
    return data


# ----------------------------------------------------------------------------------------------
# The CLI (flows/cli.py registers it)
# ----------------------------------------------------------------------------------------------
def cmd_release(args: argparse.Namespace) -> int:
    from flows.errors import one_line
    from tasks.artifacts.locks import LockTimeout
    from tasks.artifacts.registry import RegistryError
    from tasks.artifacts.store import StoreError
    from tasks.release.ops import ReleaseError, actor

    try:
        store = open_store(args.root, args.block)
        text, data = run_action(
            store,
            args.release_command,
            args.model,
            getattr(args, "release_id", None),
            who=actor(),
            reason=getattr(args, "reason", "") or "",
            verify=getattr(args, "verify", "content"),
            keep_last=getattr(args, "keep_last", 7),
            stage_max_age_days=getattr(args, "stage_max_age_days", 30),
            tracking_uri=getattr(args, "tracking_uri", None),
        )
    except (ReleaseError, StoreError, RegistryError, LockTimeout, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, default=str) if getattr(args, "json", False) else text)
    return 0


def add_release_parser(sub: Any) -> None:
    """``tuneline release …`` subcommands."""
    rel = sub.add_parser("release", help="list, show, promote, roll back, pin and prune releases")
    cmds = rel.add_subparsers(dest="release_command", required=True)

    def command(name: str, help: str, release_id: bool = False) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help)
        p.add_argument("model", help="released model name")
        if release_id:
            p.add_argument("release_id", help="a release id (tuneline release list MODEL shows them)")
        p.add_argument(
            "--root",
            default=os.environ.get("TUNELINE_ROOT"),
            help="artifact root: a folder or s3://bucket/prefix (default: TUNELINE_ROOT)",
        )
        p.add_argument("--block", default=None, help="a saved 'Tuneline Artifact Store' block: endpoint, credentials")
        p.set_defaults(func=cmd_release)
        return p

    command("list", "every release: id, time, gate, champion beaten, forced, size, LATEST").add_argument(
        "--json", action="store_true", help="print the rows as JSON"
    )
    command("show", "one release's manifest, readable", release_id=True).add_argument(
        "--json", action="store_true", help="print the manifest as stored"
    )
    command("log", "every move of LATEST: who, when, from, to, why").add_argument("--json", action="store_true")
    for name, help, rid in (
        ("promote", "make a release LATEST (its files must pass their checksums)", True),
        ("rollback", "move LATEST to the previous good release", False),
    ):
        p = command(name, help, release_id=rid)
        p.add_argument("--reason", default="", help="why (recorded in the move log)")
        p.add_argument(
            "--tracking-uri",
            default=os.environ.get("MLFLOW_TRACKING_URI"),
            help="MLflow tracker whose 'champion' alias follows LATEST (default: MLFLOW_TRACKING_URI)",
        )
        p.add_argument(
            "--verify",
            choices=["content", "metadata"],
            default="content",
            help="content: read every file and hash it (default); metadata: trust recorded sizes and digests",
        )
    p = command("pin", "make a release the anchor every night is also gated against (cumulative)", release_id=True)
    p.add_argument("--reason", default="", help="why (recorded in the move log)")
    from flows.options import field_type
    from tasks.release.stage import ReleaseParams  # the run's own bounds (keep_last ≥ 1), not re-declared here

    p = command("prune", "apply retention now (it also runs after each release)")
    p.add_argument(
        "--keep-last",
        type=field_type(ReleaseParams, "keep_last", "--keep-last"),
        default=7,
        help="releases kept whole besides the protected ones (≥ 1, as release.keep_last)",
    )
    p.add_argument(
        "--stage-max-age-days",
        type=field_type(ReleaseParams, "stage_max_age_days", "--stage-max-age-days"),
        default=30,
        help="stage folders older than this go (0: none)",
    )
