"""Reading rows from where data lives, for any stage: local files (json, jsonl, parquet, csv) and folders
of them, S3 objects, hub datasets (Hugging Face, ModelScope) and the built-in sets (self-cognition,
generated arithmetic), with fingerprints of their content.

Shared by the data stage (``read_source``, ``source_fingerprint``) and the evaluation stage
(``load_rows``, ``file_source_fingerprint``). It imports no stage: a caller passes what it needs
(seed, storage block, the spec text for messages) and the exception class to raise (``error``), so
each stage reports bad input with its own error type. The readers themselves live in
``tasks.core.file_sources`` (local files, S3) and ``tasks.core.hub_sources`` (hub datasets); their
public names are re-exported here.
"""

from __future__ import annotations

import hashlib
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator, Literal

from tasks.artifacts.store import sha256_file, store_for
from tasks.core.file_sources import (  # noqa: F401 - re-exported: callers import them from here
    FILE_SUFFIXES,
    ErrorType,
    RawRow,
    SourceError,
    local_files,
    read_file,
    read_s3,
    s3_content,
    s3_fingerprint,
    s3_objects,
)
from tasks.core.hub_ids import hub_id
from tasks.core.hub_sources import (  # noqa: F401 - re-exported
    OFFLINE_VARIABLES,
    Streaming,
    hub_dataset_revision,
    read_hub,
)

RESOURCES = Path(__file__).parent / "resources"
SELF_COGNITION = "swift/self-cognition"
ARITHMETIC = "tuneline/arithmetic"
EVAL_SUFFIXES = (".json", ".jsonl", ".parquet")  # what load_rows treats as a file; anything else is a hub id

Kind = Literal["builtin", "s3", "local", "hub"]


def source_kind(source: str) -> Kind:
    """builtin, s3, local (a path, or a name with a data-file suffix) or hub.

    >>> [source_kind(s) for s in ("swift/self-cognition", "s3://b/k.jsonl", "./x", "a.csv", "openai/gsm8k")]
    ['builtin', 's3', 'local', 'local', 'hub']
    """
    if source in (SELF_COGNITION, ARITHMETIC):
        return "builtin"
    if source.startswith("s3://"):
        return "s3"
    path = Path(source)
    if source.startswith((".", "/", "~")) or path.suffix in FILE_SUFFIXES or path.expanduser().exists():
        return "local"
    return "hub"


def read_builtin(
    source: str, subset: str | None = None, *, seed: int = 0, name: str | None = None, error: ErrorType = SourceError
) -> Iterator[RawRow]:
    """The built-in sets as query/response rows: 1000 arithmetic questions drawn from ``seed``, or the
    self-cognition set (``{{NAME}}`` / ``{{AUTHOR}}`` left for the caller, each row's ``lang`` kept for
    choosing them). Its subsets: ms-swift's ``default`` (both languages), ``qwen3`` (queries end with
    `` /no_think``, answers start with an empty think block) and ``empty_think`` (the empty think block
    only), tuneline's ``en`` and ``zh``; ``a/b`` concatenates, ``all`` is ms-swift's three.

    >>> [r.row["query"] for r in read_builtin(ARITHMETIC, seed=1)][:2]
    ['What is 19 + 74?', 'What is 34 - 17?']
    """
    if source == ARITHMETIC:
        rng = random.Random(seed)
        for i in range(1000):
            a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice("+-*")
            value = a + b if op == "+" else a - b if op == "-" else a * b
            row = {"query": f"What is {a} {op} {b}?", "response": f"{a} {op} {b} = {value}. The answer is {value}."}
            yield RawRow(ARITHMETIC, i, row)
        return
    think = "<think>\n\n</think>\n\n"
    subsets = {  # (languages, query suffix, response prefix): ms-swift's SelfCognitionPreprocessor arguments
        "default": (("en", "zh"), "", ""),
        "qwen3": (("en", "zh"), " /no_think", think),
        "empty_think": (("en", "zh"), "", think),
        "en": (("en",), "", ""),
        "zh": (("zh",), "", ""),
    }
    names = ["default", "qwen3", "empty_think"] if subset == "all" else (subset or "default").split("/")
    for part in names:
        if part not in subsets:
            raise error(
                f"dataset spec {name or source!r}: {SELF_COGNITION} has no subset {part!r}; "
                f"available: {', '.join(subsets)}, all"
            )
    rows = [r.row for r in read_file(RESOURCES / "self_cognition.jsonl", error=error) if isinstance(r.row, dict)]
    index = 0
    for part in names:
        langs, suffix, prefix = subsets[part]
        for row in rows:
            if row.get("lang") in langs:
                query, response = row["query"] + suffix, prefix + row["response"]
                yield RawRow(SELF_COGNITION, index, {"query": query, "response": response, "lang": row["lang"]})
                index += 1


def read_source(
    source: str,
    subset: str | None = None,
    *,
    hub: str = "huggingface",
    name: str | None = None,
    seed: int = 0,
    storage_block: str | None = None,
    streaming: Streaming = False,
    error: ErrorType = SourceError,
) -> Iterator[RawRow]:
    """Every row of one source, whatever its kind (see ``source_kind``). ``name``: the spec as
    written, for messages; ``seed``: the generated sets; ``storage_block``: S3 credentials;
    ``streaming``: how hub datasets are read (``hub_sources.read_hub``), the same rows either way."""
    kind = source_kind(source)
    if kind == "builtin":
        return read_builtin(source, subset, seed=seed, name=name, error=error)
    if kind == "local":
        files = local_files(source, subset, name=name, error=error)
        return (raw for path in files for raw in read_file(path, error=error))
    if kind == "s3":
        return read_s3(source, storage_block, name=name, error=error)
    return read_hub(source, subset, hub, name=name, streaming=streaming, error=error)


def source_fingerprint(
    source: str,
    subset: str | None = None,
    *,
    hub: str = "huggingface",
    name: str | None = None,
    storage_block: str | None = None,
    error: ErrorType = SourceError,
) -> str:
    """``name@content``: checksums for local files, the stored SHA-256 (else the ETag) of S3 objects, the
    resolved commit for hub ids (``hub_dataset_revision``). A source that cannot be reached now gets a
    marker (reading it reports why); only a local spec that can never be read (a subset of a single
    file, a missing subset) raises ``error``."""
    name = name or source
    kind = source_kind(source)
    if kind == "builtin":
        return f"{name}@{sha256_file(RESOURCES / 'self_cognition.jsonl')[:12]}"
    if kind == "local":
        files = local_files(source, subset, name=name, check=False, error=error)
        if not files:
            return f"{name}@missing"
        base = Path(source).expanduser()  # a file by its place in the source, not where the source lives
        places = [p.relative_to(base).as_posix() if base.is_dir() else p.suffix for p in files]
        listing = "".join(f"{place}:{sha256_file(p)}" for place, p in zip(places, files))
        return name + "@" + hashlib.sha256(listing.encode()).hexdigest()[:16]
    if kind == "s3":
        try:
            return f"{name}@{s3_fingerprint(source, storage_block)}"
        except Exception as e:  # unreachable S3: the stage itself reports it
            return f"{name}@unresolved:{type(e).__name__}"
    if hub == "huggingface":
        return f"{name}@{hub_dataset_revision(hub_id(source, hub)) or 'unresolved'}"
    return f"{name}@modelscope"  # ModelScope revisions are not resolved: the name is all we know


# ----------------------------------------------------------------------------------------------
# Whole sets as lists of rows (the evaluation stage's loader)
# ----------------------------------------------------------------------------------------------
def _is_file(source: str) -> bool:
    """Narrower than ``source_kind``: an evaluation set is a .json, .jsonl or .parquet file; any other
    bare name is a hub id."""
    return source.startswith(("s3://", ".", "/", "~")) or Path(source).suffix in EVAL_SUFFIXES


def _file_rows(path: Path, name: str, error: ErrorType) -> list[Any]:
    """Every row of a local file, in order; the first unreadable row raises ``error``."""
    if not path.is_file():
        raise error(f"evaluation data not found: {name}")
    rows: list[Any] = []
    for raw in read_file(path, name, error=error):
        if raw.error:
            at = f" (line {raw.line})" if raw.line else ""
            raise error(f"{name}: row {len(rows)}{at}: {raw.error}")
        rows.append(raw.row)
    return rows


def load_rows(
    source: str,
    subset: str | None = None,
    split: str = "test",
    storage_block: str | None = None,
    error: ErrorType = SourceError,
) -> list[dict[str, Any]]:
    """Rows of a whole set: a local file (.json, .jsonl, .parquet), an ``s3://`` URI of one (downloaded
    to a temp file), or a hub dataset id (``datasets.load_dataset`` with ``subset`` and ``split``).
    Bad input raises ``error`` naming the file and row.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> _ = p.write_text('{"q": 1}\\n{"q": 2\\n')
    >>> class EvalError(ValueError): ...
    >>> load_rows(str(p), error=EvalError)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    tasks.core.sources.EvalError: .../rows.jsonl: row 1 (line 2): invalid JSON (Expecting ',' delimiter at column 8)
    """
    if source.startswith("s3://"):
        parent, _, key = source.rpartition("/")
        suffix = Path(key).suffix
        if suffix not in EVAL_SUFFIXES:
            raise error(f"{source}: expected a .json, .jsonl or .parquet file")
        with tempfile.TemporaryDirectory(prefix="tuneline-evaldata-") as tmp:
            local = Path(tmp) / f"data{suffix}"
            store_for(parent, storage_block).download_file(key, local)
            return _file_rows(local, source, error)
    if _is_file(source):
        return _file_rows(Path(source).expanduser(), source, error)
    import datasets

    return list(datasets.load_dataset(source, subset, split=split))


def file_source_fingerprint(source: str, storage_block: str | None = None) -> str:
    """What an evaluation set's content is: ``source@<checksum>`` for a local file, ``source@sha256:…``
    (or ``@etag:…``, see ``s3_content``) for an S3 object, ``source@<commit>`` for a hub dataset;
    ``@missing`` / ``@unresolved`` when it cannot be read now (loading it then fails, saying why).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "gsm8k.jsonl"
    >>> _ = p.write_text("{}")
    >>> file_source_fingerprint(str(p)).endswith("@44136fa355b3678a")
    True
    """
    if source.startswith("s3://"):
        bucket, _, key = source[5:].partition("/")
        try:
            head = store_for(f"s3://{bucket}", storage_block).client.head_object(Bucket=bucket, Key=key)
            return f"{source}@{s3_content(head)}"
        except Exception as e:  # unreachable or missing: loading reports it
            return f"{source}@unresolved:{type(e).__name__}"
    path = Path(source).expanduser()
    if _is_file(source):
        return f"{source}@{sha256_file(path)[:16]}" if path.is_file() else f"{source}@missing"
    return f"{source}@{hub_dataset_revision(source) or 'unresolved'}"
