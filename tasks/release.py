"""Release stage: publish the adapter, the merged model and the evaluation report, with lineage.

Resource profile: CPU and network.

A release is ``<root>/releases/<model_name>/<release_id>/``: ``adapter/``, ``model/`` (the merged
model, optional), ``eval/``, a model card ``README.md`` and ``manifest.json`` (parameters, code
version, data sources, base model, metrics, gate, flow run id, and every file with its size and
SHA-256). The manifest is written last and the ``LATEST`` pointer after it, so a reader never sees
half a release. The release id (UTC date + fingerprint) is fixed at the first attempt, so a retry
continues the same release; files already present with the right checksum are not uploaded again.

Fetch and verify a release::

    tuneline fetch s3://bucket/prefix my-model LATEST ./here
"""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.store import StageRef, Store, code_version, fingerprint, open_ref, safe_key, sha256_file, stage_cache_key, store_for

STAGE = "release"


class ReleaseError(RuntimeError):
    """A release is incomplete or does not match its manifest."""


class ReleaseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = Field(default="qwen2-7b-instruct-tuneline", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", description="Name of the released model: the folder under releases/.")
    include_merged: bool = Field(default=True, description="Also publish the merged model (the full weights), not only the adapter.")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:
        return None


def model_card(model_name: str, lineage: dict[str, Any], report: dict[str, Any]) -> str:
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    rows = "\n".join(f"| {k} | {base[k]:.4f} | {tuned[k]:.4f} | {tuned[k] - base[k]:+.4f} |" for k in base if k in tuned)
    gate = report["gate"]
    return (
        f"# {model_name}\n\nLoRA fine-tune of `{lineage['base_model']}` (revision `{lineage['base_revision']}`) "
        f"made by tuneline (code `{lineage['code_version']}`).\n\n"
        f"## Evaluation (base vs this model)\n\n| metric | base | tuned | delta |\n|---|---|---|---|\n{rows}\n\n"
        f"Quality gate: **{'passed' if gate['passed'] else 'FAILED: ' + '; '.join(gate['reasons'])}**"
        f"{' (release forced by a person)' if lineage.get('forced') else ''}\n\n"
        f"## Training data\n\n" + "\n".join(f"- `{s['spec']}`: {s['rows_sampled']} rows" for s in lineage["data"].get("sources", []))
        + f"\n\n## Parameters\n\n```json\n{json.dumps(lineage['params'], indent=2, ensure_ascii=False)}\n```\n"
    )


def release_id_for(store: Store, model_name: str, fp: str) -> str:
    """``YYYYMMDDTHHMMSSZ-<fp8>``, fixed by the first attempt (kept at ``releases/<model>/.pending/<fp>``)."""
    pending = f"releases/{safe_key(model_name)}/.pending/{fp}"
    if store.exists(pending):
        return store.read_bytes(pending).decode().strip()
    rid = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{fp[:8]}"
    store.write_bytes(pending, rid.encode())
    return rid


def publish_release(store: Store, model_name: str, release_id: str, files: dict[str, Path], lineage: dict[str, Any]) -> dict[str, Any]:
    """Upload ``files`` (release-relative key -> local path) unless already there, verify, then write
    the manifest and the ``LATEST`` pointer. Returns the manifest."""
    prefix = f"releases/{safe_key(model_name)}/{safe_key(release_id)}"
    existing = _existing_checksums(store, prefix)
    entries = {}
    for rel, path in sorted(files.items()):
        digest = sha256_file(path)
        entries[safe_key(rel)] = {"size": path.stat().st_size, "sha256": digest}
        if existing.get(safe_key(rel)) != digest:
            store.upload_file(path, f"{prefix}/{safe_key(rel)}")
            store.write_bytes(f"{prefix}/.checksums/{safe_key(rel)}", digest.encode())
    problems = verify_files(store, prefix, entries)
    if problems:
        raise ReleaseError(f"release {prefix} does not match what was uploaded: " + "; ".join(problems))
    manifest = {"model_name": model_name, "release_id": release_id, "created": dt.datetime.now(dt.timezone.utc).isoformat(), **lineage, "files": entries}
    store.write_json(f"{prefix}/manifest.json", manifest)
    store.write_bytes(f"releases/{safe_key(model_name)}/LATEST", release_id.encode())
    return manifest


def _existing_checksums(store: Store, prefix: str) -> dict[str, str]:
    out = {}
    for key in store.list(f"{prefix}/.checksums"):
        rel = key[len(prefix) + len("/.checksums/") :]
        out[rel] = store.read_bytes(key).decode().strip()
    return out


def verify_files(store: Store, prefix: str, entries: dict[str, dict[str, Any]]) -> list[str]:
    """Download each file and compare its SHA-256 with the manifest's; return the problems."""
    problems = []
    with tempfile.TemporaryDirectory(prefix="tuneline-verify-") as tmp:
        for rel, entry in entries.items():
            local = Path(tmp) / "f"
            try:
                store.download_file(f"{prefix}/{rel}", local)
            except Exception as e:  # noqa: BLE001 - reported, not raised: the caller lists every problem
                problems.append(f"{rel}: missing ({type(e).__name__})")
                continue
            if sha256_file(local) != entry["sha256"]:
                problems.append(f"{rel}: checksum mismatch")
    return problems


def fetch_release(store: Store, model_name: str, release_id: str, dest: Path) -> dict[str, Any]:
    """Download a release (``LATEST`` or an id) into ``dest`` and verify every checksum."""
    if release_id == "LATEST":
        release_id = store.read_bytes(f"releases/{safe_key(model_name)}/LATEST").decode().strip()
    prefix = f"releases/{safe_key(model_name)}/{safe_key(release_id)}"
    manifest = store.read_json(f"{prefix}/manifest.json")
    bad = []
    for rel, entry in manifest["files"].items():
        target = dest / rel
        store.download_file(f"{prefix}/{rel}", target)
        if sha256_file(target) != entry["sha256"]:
            bad.append(rel)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    if bad:
        raise ReleaseError(f"release {model_name}/{release_id}: checksum mismatch for {', '.join(bad)}")
    return manifest


def fingerprint_of(config: ReleaseParams, adapter: StageRef, merged: StageRef, report: StageRef, dataset: StageRef, params: dict[str, Any], root: str, storage_block: str | None = None) -> str:
    return fingerprint(STAGE, code_version(publish_release), {"config": config, "params": params}, upstream=[adapter.fingerprint, merged.fingerprint, report.fingerprint, dataset.fingerprint])


@task(name="release", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["cpu"], retries=2, retry_delay_seconds=5)
def release(config: ReleaseParams, adapter: StageRef, merged: StageRef, report: StageRef, dataset: StageRef, params: dict[str, Any], root: str, storage_block: str | None = None) -> StageRef:
    """Publish a release; ``manifest.json`` last, then ``LATEST``. CPU."""
    fp = fingerprint_of(config, adapter, merged, report, dataset, params, root)
    store = store_for(root, storage_block)
    if (ref := store.completed(STAGE, fp)) is not None:
        return ref
    release_id = release_id_for(store, config.model_name, fp)
    files: dict[str, Path] = {}
    parts = {"adapter": adapter, "eval": report} | ({"model": merged} if config.include_merged else {})
    for name, ref in parts.items():
        folder = open_ref(ref, storage_block)
        files.update({f"{name}/{p.relative_to(folder).as_posix()}": p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("_")})
    eval_report = json.loads((open_ref(report, storage_block) / "report.json").read_text())
    data_report = dataset.metrics
    lineage = {
        "params": params,
        "code_version": git_commit(),
        "base_model": params["base_model"],
        "base_revision": params.get("base_revision"),
        "data": {"fingerprint": dataset.fingerprint, **data_report},
        "stages": {r.stage: r.fingerprint for r in (dataset, adapter, merged, report)},
        "metrics": eval_report["metrics"],
        "gate": eval_report["gate"],
        "forced": not eval_report["gate"]["passed"],
        "flow_run_id": _flow_run_id(),
    }
    with tempfile.TemporaryDirectory(prefix="tuneline-release-") as tmp:
        card = Path(tmp) / "README.md"
        card.write_text(model_card(config.model_name, lineage, eval_report), encoding="utf-8")
        files["README.md"] = card
        manifest = publish_release(store, config.model_name, release_id, files, lineage)
    uri = store.uri(f"releases/{safe_key(config.model_name)}/{release_id}")
    with tempfile.TemporaryDirectory(prefix="tuneline-release-ref-") as tmp:
        (Path(tmp) / "release.json").write_text(json.dumps({"uri": uri, "release_id": release_id}))
        return store.publish(STAGE, fp, Path(tmp), {"release_uri": uri, "release_id": release_id, "files": len(manifest["files"])})
