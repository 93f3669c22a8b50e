"""Reading rows from where data lives, for any stage: local files (json, jsonl, parquet, csv) and folders
of them, S3 objects, hub datasets (Hugging Face, ModelScope) and the built-in sets (self-cognition,
generated arithmetic), with fingerprints of their content.

Shared by the data stage (``read_source``, ``source_fingerprint``) and the evaluation stage
(``load_rows``, ``file_source_fingerprint``). It imports no stage: a caller passes what it needs
(seed, storage block, the spec text for messages) and the exception class to raise (``error``), so
each stage reports bad input with its own error type.

Readers yield ``RawRow``s: a row that cannot be read at all (a bad line of a ``.jsonl`` file) is a
row with an ``error``, so the caller decides whether it stops the run or is dropped and counted. A
file that cannot be parsed as a whole (truncated ``.json``, bad bytes in a ``.json`` / ``.csv``)
raises: its rows cannot be located.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from tasks.artifacts.store import sha256_file, store_for
from tasks.core.hub_ids import hub_dataset, hub_id

RESOURCES = Path(__file__).parent / "resources"
SELF_COGNITION = "swift/self-cognition"
ARITHMETIC = "tuneline/arithmetic"
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
EVAL_SUFFIXES = (".json", ".jsonl", ".parquet")  # what load_rows treats as a file; anything else is a hub id
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

Kind = Literal["builtin", "s3", "local", "hub"]
ErrorType = type[Exception]


class SourceError(ValueError):
    """Bad source input; the message names the source (file) and, where there is one, the row."""


@dataclass
class RawRow:
    """One row as read, before any format check."""

    where: str  # file (or hub id) for messages
    index: int  # row index; in JSON lines the 0-based line number
    row: Any  # the parsed value (a dict for a well-formed row); None when ``error`` is set
    error: str | None = None  # why the row could not be read at all
    line: int | None = None  # 1-based line number (JSON lines only)


# ----------------------------------------------------------------------------------------------
# Files: every format yields RawRows
# ----------------------------------------------------------------------------------------------
def read_file(path: Path, where: str | None = None, *, error: ErrorType = SourceError) -> Iterator[RawRow]:
    """Rows of a local file, by suffix: ``.parquet``, ``.jsonl``, ``.csv``; anything else is JSON (a
    list of rows, ``{"key": [rows]}``, or one object per line). ``where`` names the file in errors.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> _ = p.write_text('{"q": 1}\\n\\nnot json\\n')
    >>> [(r.index, r.row, r.error) for r in read_file(p)]
    [(0, {'q': 1}, None), (2, None, 'invalid JSON (Expecting value at column 1)')]
    """
    where = where or str(path)
    if path.suffix == ".parquet":  # streamed, a batch (JSON lines: a line) at a time: never whole in memory
        from pyarrow.parquet import ParquetFile

        rows = (row for batch in ParquetFile(path).iter_batches(batch_size=1024) for row in batch.to_pylist())
        yield from (RawRow(where, i, row) for i, row in enumerate(rows))
        return
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            yield from _read_jsonl(where, f)
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{where}: line {line}: invalid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if path.suffix == ".csv":
        for i, row in enumerate(csv.DictReader(io.StringIO(text, newline=""))):
            yield RawRow(where, i, {k: v for k, v in row.items() if k is not None})
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a .json file holding one object per line
            yield from _read_jsonl(where, data)
            return
        hint = " (the file looks truncated)" if e.pos >= len(text.rstrip()) else ""
        raise error(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}") from None
    if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
        rows = next(iter(rows.values()))  # {"data": [...]}
    if not isinstance(rows, list):
        raise error(f"{where}: expected a JSON list of rows (or use .jsonl), got a {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield RawRow(where, i, row)


def _read_jsonl(where: str, data: bytes | Iterable[bytes]) -> Iterator[RawRow]:
    """JSON lines (bytes, or a file's lines) by hand, not datasets' loader: a bad line is reported by its row."""
    for i, line in enumerate(data.split(b"\n") if isinstance(data, bytes) else (x.rstrip(b"\n") for x in data)):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            reason = f"invalid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start})"
            yield RawRow(where, i, None, reason, i + 1)
            continue
        except json.JSONDecodeError as e:
            yield RawRow(where, i, None, f"invalid JSON ({e.msg} at column {e.colno})", i + 1)
            continue
        yield RawRow(where, i, row, None, i + 1)


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


def local_files(
    source: str,
    subset: str | None = None,
    *,
    name: str | None = None,
    check: bool = True,
    error: ErrorType = SourceError,
) -> list[Path]:
    """The data files of a local source: the file itself, or every data file under the folder (or its
    ``subset``: a file stem or a sub-folder). ``name`` (the spec as written) names it in errors;
    ``check=False`` returns what exists instead of raising."""
    name = name or source
    path = Path(source).expanduser()
    if subset and "/" in subset and path.is_dir():  # ms-swift's :a/b, each a file stem or a sub-folder
        parts = [local_files(source, s, name=name, check=check, error=error) for s in subset.split("/")]
        return [p for part in parts for p in part]
    if subset == "all" and path.is_dir() and not (path / "all").exists():
        subset = None
    if path.is_file():
        if subset:
            raise error(f"dataset spec {name!r}: a single file has no subsets (got :{subset})")
        return [path]
    if path.is_dir():
        base = path
        if subset:
            sub = path / subset
            found = [p for p in path.iterdir() if p.is_file() and p.stem == subset and p.suffix in FILE_SUFFIXES]
            if sub.is_dir():
                base = sub
            elif found:
                return sorted(found)
            else:
                names = {p.stem for p in path.iterdir() if p.suffix in FILE_SUFFIXES}
                names |= {p.name for p in path.iterdir() if p.is_dir()}
                available = ", ".join(sorted(names)) or "none"
                raise error(f"dataset spec {name!r}: no subset {subset!r} in {path}; available: {available}")
        files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files and check:
            raise error(f"dataset folder {base} holds no {'/'.join(FILE_SUFFIXES)} file")
        return files
    if check:
        raise error(f"dataset file not found: {path} (spec {name!r})")
    return []


# ----------------------------------------------------------------------------------------------
# S3, hubs, built-in sets
# ----------------------------------------------------------------------------------------------
def s3_objects(source: str, storage_block: str | None = None) -> list[tuple[str, str]]:
    """(key relative to the bucket, content) of the object ``s3://bucket/key``, or of every data file
    under the prefix. Endpoint and credentials from the environment, or the storage block."""
    bucket, _, key = source[5:].partition("/")
    store = store_for(f"s3://{bucket}", storage_block)
    keys = (
        [key] if Path(key).suffix in FILE_SUFFIXES else [k for k in store.list(key) if Path(k).suffix in FILE_SUFFIXES]
    )
    return [(k, s3_content(store.client.head_object(Bucket=bucket, Key=k))) for k in keys]


def s3_content(head: dict[str, Any]) -> str:
    """What an S3 object is, from its HEAD: ``sha256:<hex>`` when the uploader stored its SHA-256
    (``x-amz-meta-sha256``, as tuneline's uploads do), else ``etag:<etag>``, said so: an ETag is the
    MD5 of a plain upload but of the part list of a multipart one, so the same bytes uploaded
    differently read as different (a needless rerun, never a stale result).

    >>> s3_content({"ETag": '"abc"', "Metadata": {}}), s3_content({"ETag": '"abc"', "Metadata": {"sha256": "f0"}})
    ('etag:abc', 'sha256:f0')
    """
    sha = (head.get("Metadata") or {}).get("sha256")
    return f"sha256:{sha}" if sha else "etag:" + head["ETag"].strip('"')


def read_s3(source: str, storage_block: str | None = None, *, error: ErrorType = SourceError) -> Iterator[RawRow]:
    """Rows of an S3 object or of every data file under a prefix (each downloaded to a temp folder)."""
    bucket = source[5:].partition("/")[0]
    store = store_for(f"s3://{bucket}", storage_block)
    try:
        objects = s3_objects(source, storage_block)
    except Exception as e:
        raise error(f"{source}: cannot read from S3 ({type(e).__name__})") from None
    if not objects:
        raise error(f"{source}: no {'/'.join(FILE_SUFFIXES)} object found")
    with tempfile.TemporaryDirectory(prefix="tuneline-s3-") as tmp:
        for key, _ in objects:
            local = Path(tmp) / key
            store.download_file(key, local)
            yield from read_file(local, f"s3://{bucket}/{key}", error=error)


def read_hub(
    source: str,
    subset: str | None = None,
    hub: str = "huggingface",
    *,
    name: str | None = None,
    error: ErrorType = SourceError,
) -> Iterator[RawRow]:
    """The ``train`` split of a hub dataset: Hugging Face through ``datasets``, or ModelScope (extra).
    ``subset``: one config, several joined by ``/`` (concatenated), or ``all`` (every config). An id
    of ms-swift's table is read under its id on ``hub`` (``tasks.core.hub_ids``), with its row clean-up."""
    entry, asked = hub_dataset(source), hub_id(source, hub)
    where = f"{asked} ({hub})" if asked == source else f"{asked} ({hub}; ms-swift's id for {source})"
    parts = [_hub_rows(asked, s, hub, where=where, name=name, error=error) for s in (subset or "").split("/")]
    for i, row in enumerate(row for rows in parts for row in rows):  # one row count across the subsets
        row = dict(row)
        yield RawRow(where, i, entry.clean(row) if entry and entry.clean else row)


def _hub_rows(source: str, subset: str | None, hub: str, *, where: str, name: str | None, error: ErrorType) -> Any:
    """One subset of a hub dataset as an iterable of rows."""
    subset = subset or None
    if hub == "modelscope":
        try:
            from modelscope import MsDataset
        except ImportError:
            raise error(
                f"{where}: ModelScope datasets need the modelscope extra: pip install 'tuneline[modelscope]'"
            ) from None
        try:
            rows = MsDataset.load(source, subset_name=subset or "default", split="train").to_hf_dataset()
        except Exception as e:
            raise error(f"{where}: cannot load ({type(e).__name__}: {str(e)[:300]})") from None
    else:
        import os

        import datasets

        if not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")):
            try:  # a quick probe: an unreachable hub makes load_dataset retry for a minute
                from huggingface_hub import HfApi

                HfApi().dataset_info(source, timeout=10)
            except Exception as e:
                raise error(
                    f"{where}: cannot reach the dataset on the hub ({type(e).__name__}: {str(e)[:200]}); "
                    "set HF_HUB_OFFLINE=1 to use the local cache"
                ) from None
        try:
            if subset == "all":  # every config of the dataset (ms-swift: every registered subset)
                configs = datasets.get_dataset_config_names(source)
                return [row for c in configs for row in datasets.load_dataset(source, c, split="train")]
            rows = datasets.load_dataset(source, subset, split="train")
        except Exception as e:  # missing subset, unknown id, no network: all end the same way, with the reason
            raise error(f"{where}: cannot load {name or source!r} ({type(e).__name__}: {str(e)[:300]})") from None
    return rows


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
    error: ErrorType = SourceError,
) -> Iterator[RawRow]:
    """Every row of one source, whatever its kind (see ``source_kind``). ``name``: the spec as
    written, for messages; ``seed``: the generated sets; ``storage_block``: S3 credentials."""
    kind = source_kind(source)
    if kind == "builtin":
        return read_builtin(source, subset, seed=seed, name=name, error=error)
    if kind == "local":
        files = local_files(source, subset, name=name, error=error)
        return (raw for path in files for raw in read_file(path, error=error))
    if kind == "s3":
        return read_s3(source, storage_block, error=error)
    return read_hub(source, subset, hub, name=name, error=error)


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
            return name + "@" + ",".join(content for _, content in s3_objects(source, storage_block))
        except Exception as e:  # unreachable S3: the stage itself reports it
            return f"{name}@unresolved:{type(e).__name__}"
    if hub == "huggingface":
        return f"{name}@{hub_dataset_revision(hub_id(source, hub)) or 'unresolved'}"
    return f"{name}@modelscope"  # ModelScope revisions are not resolved: the name is all we know


def hub_dataset_revision(source: str, revision: str = "main") -> str | None:
    """The commit a hub dataset's revision names: asked of the hub; offline (or the hub unreachable)
    the commit this machine last downloaded (the hub cache's ref, else the newest ``datasets`` cache
    folder, named by commit — the one ``load_dataset`` will read offline). None when neither is known:
    then loading fails too, and says why."""
    import os

    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)
    if not offline:
        try:
            from huggingface_hub import HfApi

            return HfApi().dataset_info(source, revision=revision, timeout=10).sha
        except Exception:  # unreachable, or unknown: the cache below, else None (loading reports it)
            pass
    try:
        from huggingface_hub import try_to_load_from_cache

        card = try_to_load_from_cache(source, "README.md", revision=revision, repo_type="dataset")
        if isinstance(card, str):
            return Path(card).parent.name  # .../snapshots/<commit>/README.md
        from datasets import config as datasets_config

        folder = Path(datasets_config.HF_DATASETS_CACHE) / "___".join(source.split("/"))
        cached = sorted((p for p in folder.glob("*/*/*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        return f"cached:{cached[-1].name}" if cached else None
    except Exception:  # a malformed id: loading reports it
        return None


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
