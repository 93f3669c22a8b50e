"""``tuneline compare`` and the ``compare`` flow: several models of a release line answer the same prompts,
side by side, greedy and sampled with a fixed seed.

    tuneline compare MODEL --root ROOT [--releases base,LATEST] [--prompts FILE] [--prompt TEXT ...]
                     [--out compare.md] [--max-new-tokens N] [--seed S]

A model is named by a release id or an alias: ``LATEST`` (= ``champion``, the release LATEST names),
``previous`` (the release LATEST was gated against), ``anchor`` (= ``pinned``: the pinned release, else the
first), ``base`` (the base model recorded in the first named release's manifest, else LATEST's). Every
name and every prompt is checked before anything is downloaded or loaded. Each release is fetched into a
temporary folder with every file's SHA-256 verified against its manifest (``tuneline fetch``'s code),
its merged model answers (tasks/release/answers.py: transformers, one model at a time), and the folder
goes. The table is printed (rich) and written as markdown; the flow publishes it as the artifact
``model-compare`` (the UI's ``compare`` deployment).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.compare_prompts import DEFAULT_PROMPTS, gather_prompts
from flows.errors import InputError
from tasks.release.answers import Sampling

ALIASES = {"LATEST": "LATEST", "champion": "LATEST", "previous": "previous", "anchor": "anchor", "pinned": "anchor"}
DEFAULT_RELEASES = "base,LATEST"
ARTIFACT_KEY = "model-compare"


@dataclass
class Target:
    """One column: the names it was asked by, and what it is (a release id, or the base model's spec)."""

    names: list[str]
    release_id: str | None = None
    base: str | None = None
    base_revision: str = "main"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return " = ".join(self.names)

    @property
    def what(self) -> str:
        return self.release_id or f"base model {self.base}"


def resolve_targets(store: Any, model: str, releases: str) -> list[Target]:
    """The columns ``releases`` names, in order, each model once; ``InputError`` (one line) for a name
    that names nothing, before any download."""
    from tasks.artifacts.registry import current_anchor, latest_release, read_manifest
    from tasks.release.ops import pruned_info, require_model

    names = [n.strip() for n in releases.split(",") if n.strip()]
    if not names:
        raise InputError("--releases names no model (e.g. base,LATEST or two release ids)")
    known = require_model(store, model)  # {release id: complete}; none: the models the store has, in one line

    def release(name: str) -> str:
        alias = ALIASES.get(name, ALIASES.get(name.lower()))
        if alias == "LATEST":
            rid = latest_release(store, model)
            if rid is None:
                raise InputError(f"{name}: {model} has no LATEST at {store.where()}")
        elif alias == "previous":
            latest = latest_release(store, model)
            manifest, _ = read_manifest(store, model, latest) if latest else ({}, "")
            rid = (manifest.get("champion") or {}).get("release_id")
            if not rid:
                raise InputError(f"{name}: LATEST ({latest}) of {model} was gated against no earlier release")
        elif alias == "anchor":
            ref = current_anchor(store, model)
            rid = ref.release_id if ref else None
        else:
            rid = name
        if not known.get(rid):
            raise InputError(f"{name}: no complete release {model}/{rid} at {store.where()} (tuneline release list)")
        pruned = pruned_info(store, model, rid)
        if pruned:
            raise InputError(f"{name}: release {model}/{rid} was pruned on {pruned.get('when')}: its weights are gone")
        return rid

    resolved = [(n, None if n.lower() == "base" else release(n)) for n in names]
    reference = next((rid for _, rid in resolved if rid), None) or release("LATEST")
    targets: dict[str, Target] = {}
    for name, rid in resolved:
        if rid is None:
            manifest, _ = read_manifest(store, model, reference)
            if not manifest.get("base_model"):
                raise InputError(f"base: the manifest of {model}/{reference} records no base_model")
            key = "base:" + manifest["base_model"]
            rev = manifest.get("base_revision_resolved") or manifest.get("base_revision") or "main"
            target = Target([], base=manifest["base_model"], base_revision=str(rev))
        else:
            key, target = rid, Target([], release_id=rid)
        targets.setdefault(key, target).names.append(name)
    return list(targets.values())


def _model_dir(store: Any, model: str, target: Target, work: Path) -> tuple[Path, str]:
    """A folder holding the target's weights, and how it got there."""
    from tasks.core.models import resolve_model
    from tasks.release.ops import fetch_release

    if target.base:
        return resolve_model(target.base, target.base_revision), f"base model {target.base} @ {target.base_revision}"
    dest = work / target.release_id
    manifest = fetch_release(store, model, target.release_id, dest)
    if not (dest / "model" / "config.json").is_file():
        raise InputError(
            f"release {model}/{target.release_id} holds no merged model (model/): it was released with "
            "release.include_merged off"
        )
    return dest / "model", f"release {target.release_id}: {len(manifest['files'])} files, every SHA-256 verified"


def answer_target(
    store: Any,
    model: str,
    target: Target,
    conversations: list[list[dict[str, str]]],
    sampling: Sampling,
    work_dir: str | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fetch (or resolve) one model, answer every conversation, remove the fetched folder."""
    from tasks.release.answers import answer_all

    with tempfile.TemporaryDirectory(prefix="tuneline-compare-", dir=work_dir) as work:
        say(f"{target.label}: fetching {target.what}")
        folder, source = _model_dir(store, model, target, Path(work))
        say(f"{target.label}: {source}; loading")
        result = answer_all(folder, conversations, sampling, progress=lambda m: say(f"{target.label}: {m}"))
    return {**result, "source": source}


def run_compare(
    store: Any,
    model: str,
    releases: str,
    prompts: list[tuple[str, list[dict[str, str]]]],
    sampling: Sampling,
    work_dir: str | None = None,
    say: Callable[[str], None] = print,
    answer: Callable[..., dict[str, Any]] = answer_target,
) -> dict[str, Any]:
    """Every target answers every prompt; the result the table and the markdown are made of."""
    targets = resolve_targets(store, model, releases)
    conversations = [c for _, c in prompts]
    columns = []
    for n, target in enumerate(targets, 1):
        say(f"model {n}/{len(targets)}: {target.label} ({target.what})")
        done = answer(store, model, target, conversations, sampling, work_dir, say)
        columns.append({"label": target.label, "release_id": target.release_id, "base_model": target.base, **done})
    return {
        "model_name": model,
        "root": store.where(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sampling": sampling.as_dict(),
        "settings": sampling.describe(),
        "prompts": [{"id": title, "messages": conv} for title, conv in prompts],
        "columns": columns,
    }


# ----------------------------------------------------------------------------------------------
# Output: markdown (the file and the artifact) and the terminal table
# ----------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    """An answer inside a markdown table cell: one line, pipes escaped, no raw HTML."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "<br>".join(text.splitlines()) or "*(empty)*"


def _column_head(col: dict[str, Any]) -> str:
    return f"{col['label']} `{col['release_id'] or col['base_model']}`"


def to_markdown(result: dict[str, Any]) -> str:
    cols = result["columns"]
    lines = [
        f"## Compare {result['model_name']}",
        "",
        f"Store `{result['root']}`, {result['created']}. Each model: {result['settings']}.",
        "",
    ]
    lines += [
        f"- **{c['label']}**: {c['source']} ({c['engine']} {c['version']} on {c['device']}, loaded in {c['load_s']}s)"
        for c in cols
    ]
    for n, prompt in enumerate(result["prompts"]):
        lines += ["", f"### {n + 1}. {prompt['id']}", ""]
        lines += [f"> **{m['role']}:** {_cell(m['content'])}  " for m in prompt["messages"]]
        lines += ["", "| | " + " | ".join(_column_head(c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for mode, title in (("greedy", "greedy"), ("sampled", f"sampled (seed {result['sampling']['seed']})")):
            lines.append(f"| {title} | " + " | ".join(_cell(c["answers"][n][mode]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def print_table(result: dict[str, Any], file: Any = None) -> None:
    """The answers as a rich table: one row per prompt and mode, one column per model. Answers are
    plain ``Text`` (a model writing ``[bold]`` must not restyle the table)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{result['model_name']}: {result['settings']}", show_lines=True)
    table.add_column("prompt", ratio=1)
    for col in result["columns"]:
        table.add_column(Text(f"{col['label']}\n{col['release_id'] or col['base_model']}"), ratio=2)
    seed = result["sampling"]["seed"]
    for n, prompt in enumerate(result["prompts"]):
        turns = "\n".join(f"{m['role']}: {m['content']}" for m in prompt["messages"])
        head = Text.assemble((prompt["id"], "bold"), "\n", turns, ("\n(greedy)", "dim"))
        table.add_row(head, *(Text(c["answers"][n]["greedy"]) for c in result["columns"]))
        table.add_row(
            Text(f"(sampled, seed {seed})", "dim"), *(Text(c["answers"][n]["sampled"]) for c in result["columns"])
        )
    Console(file=file or sys.stdout).print(table)


# ----------------------------------------------------------------------------------------------
# The Prefect flow (UI: the compare deployment)
# ----------------------------------------------------------------------------------------------
@flow(name="compare", log_prints=True)
def compare(
    model_name: str = "qwen2-7b-instruct-tuneline",
    releases: str = DEFAULT_RELEASES,
    prompts_file: str | None = DEFAULT_PROMPTS,
    prompts: list[str] | None = None,
    artifact_root: str = "./artifacts",
    storage_block: str | None = None,
    max_new_tokens: int = 128,
    seed: int = 0,
    temperature: float = 0.7,
    top_p: float = 0.9,
) -> dict[str, Any]:
    """Models of a release line (release ids, or LATEST / champion / previous / anchor / base) answer the
    same prompts (a JSONL file: a shipped name such as after-retrain, or a path on the worker; and/or
    single prompts), greedy and sampled with a fixed seed. The table is the markdown artifact
    ``model-compare``. Each model is answered in a task tagged ``gpu`` (it waits for the GPU slot).

    Args:
        model_name: The released model name (release.model_name).
        releases: Comma-separated columns: release ids, LATEST (= champion), previous, anchor (= pinned), base.
        prompts_file: JSONL prompts on the worker: a shipped name (after-retrain) or a path; empty: only `prompts`.
        prompts: More single-turn prompts, one per item.
        artifact_root: The artifact root: a folder or s3://bucket/prefix.
        storage_block: A saved 'Tuneline Artifact Store' block (endpoint, credentials); replaces artifact_root.
        max_new_tokens: At most this many new tokens per answer.
        seed: Seed of the sampled answers (the same seed gives the same answers).
        temperature: Temperature of the sampled answers.
        top_p: Nucleus sampling of the sampled answers.
    """
    from flows.release_ops import open_store
    from tasks.core.common import publish_markdown

    rows = gather_prompts([prompts_file] if prompts_file else [], prompts or [])  # bad input: one line, first
    sampling = _sampling(max_new_tokens, seed, temperature, top_p)
    store = open_store(None if storage_block else artifact_root, storage_block)
    # one task run per model, tagged gpu: on a GPU pool it waits for the slot the nightly's GPU stages hold
    answer = task(name="answer", tags=["gpu"], cache_policy=NO_CACHE)(answer_target)
    result = run_compare(store, model_name, releases, rows, sampling, answer=answer)  # print: the run's log
    markdown = to_markdown(result)
    get_run_logger().info("compared %s: %s; the table is the artifact %s", model_name, releases, ARTIFACT_KEY)
    publish_markdown(ARTIFACT_KEY, markdown, f"{model_name}: {releases} side by side")
    return result


def _sampling(max_new_tokens: int, seed: int, temperature: float, top_p: float) -> Sampling:
    """The settings, checked (a user's typo is one line naming the parameter)."""
    if not 1 <= max_new_tokens <= 4096:
        raise InputError(f"max_new_tokens must be between 1 and 4096, not {max_new_tokens}")
    if not 0 < temperature <= 5:
        raise InputError(f"temperature must be above 0 and at most 5, not {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be above 0 and at most 1, not {top_p}")
    if seed < 0:
        raise InputError(f"seed must be 0 or more, not {seed}")
    return Sampling(max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p)


# ----------------------------------------------------------------------------------------------
# The CLI (flows/cli.py registers it)
# ----------------------------------------------------------------------------------------------
def cmd_compare(args: argparse.Namespace) -> int:
    from flows.errors import one_line
    from flows.release_ops import open_store
    from tasks.artifacts.registry import RegistryError
    from tasks.artifacts.store import StoreError
    from tasks.release.ops import ReleaseError

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:  # prompts, settings, store and names: all checked before anything is downloaded or loaded
        rows = gather_prompts(args.prompts, args.prompt)
        sampling = _sampling(args.max_new_tokens, args.seed, args.temperature, args.top_p)
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir():  # found now, not after every model has answered
            raise InputError(f"--out {out}: " + ("is a folder" if out.is_dir() else f"no folder {out.parent}"))
        store = open_store(args.root, args.block)
        result = run_compare(store, args.model, args.releases, rows, sampling, args.work_dir, say)
        out.write_text(to_markdown(result), encoding="utf-8")
    except (ReleaseError, StoreError, RegistryError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1 if not isinstance(e, InputError) else 2
    print_table(result)
    print(f"written to {out}")
    return 0


def add_compare_parser(sub: Any) -> None:
    """``tuneline compare …``."""
    p = sub.add_parser("compare", help="models of a release line answer the same prompts, side by side")
    p.add_argument("model", help="released model name")
    p.add_argument(
        "--root",
        default=os.environ.get("TUNELINE_ROOT"),
        help="artifact root: a folder or s3://bucket/prefix (default: TUNELINE_ROOT)",
    )
    p.add_argument("--block", default=None, help="a saved 'Tuneline Artifact Store' block: endpoint, credentials")
    p.add_argument(
        "--releases",
        default=DEFAULT_RELEASES,
        help="comma-separated: release ids, LATEST (= champion), previous, anchor (= pinned), base "
        f"(default {DEFAULT_RELEASES})",
    )
    p.add_argument(
        "--prompts",
        action="append",
        metavar="FILE",
        help=f"JSONL prompts (repeatable): a path or a shipped name (default {DEFAULT_PROMPTS} unless --prompt)",
    )
    p.add_argument("--prompt", action="append", metavar="TEXT", help="one more single-turn prompt (repeatable)")
    p.add_argument("--out", default="compare.md", help="the markdown file written (default compare.md)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per answer (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled answers (default 0)")
    p.add_argument("--temperature", type=float, default=0.7, help="of the sampled answers (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="of the sampled answers (default 0.9)")
    p.add_argument("--work-dir", default=None, help="where releases are fetched, one at a time (default: temp)")
    p.set_defaults(func=cmd_compare)
