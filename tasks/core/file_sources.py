"""Reading rows from data files: local files (json, jsonl, parquet, csv), folders of them, and S3
objects (one object, every data file under a prefix), with the content of S3 objects for fingerprints.

Part of the shared source readers (``tasks.core.sources`` is the entry point and re-exports these
names). Readers yield ``RawRow``s: a row that cannot be read at all (a bad line of a ``.jsonl`` file)
is a row with an ``error``, so the caller decides whether it stops the run or is dropped and counted.
A file that cannot be parsed as a whole (truncated ``.json``, bad bytes in a ``.json`` / ``.csv``)
raises ``error`` (the caller's exception class): its rows cannot be located.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterable, Iterator

from tasks.artifacts.store import Store, store_for

FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")

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
# S3 objects
# ----------------------------------------------------------------------------------------------
WILDCARDS = "*?["


def s3_keys(source: str, store: Store) -> list[str]:
    """Keys (relative to the bucket) of the data files ``source`` names, in key order: the object
    ``s3://bucket/key``, every data file under a prefix, or the keys a glob matches
    (``s3://bucket/prefix/part-*.jsonl``)."""
    key = source[5:].partition("/")[2]
    if any(c in key for c in WILDCARDS):
        return s3_glob(key, store)
    if Path(key).suffix in FILE_SUFFIXES:
        return [key]
    return [k for k in store.list(key) if Path(k).suffix in FILE_SUFFIXES]


def s3_glob(pattern: str, store: Store) -> list[str]:
    """The data files whose keys match ``pattern``, listed (boto3's paginator) under its literal part
    before the first wildcard. Matched a ``/``-separated part at a time, as a local glob: ``*`` stays
    within one folder level, so ``prefix/*.parquet`` does not reach ``prefix/old/x.parquet``.

    >>> fnmatchcase("a/old/x.parquet", "a/*.parquet")  # why a part at a time: fnmatch's * crosses "/"
    True
    """
    literal = pattern[: min(pattern.index(c) for c in WILDCARDS if c in pattern)]
    parts = pattern.split("/")
    keys = []
    for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=literal):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return sorted(
        k
        for k in keys
        if Path(k).suffix in FILE_SUFFIXES
        and len(k.split("/")) == len(parts)
        and all(fnmatchcase(a, b) for a, b in zip(k.split("/"), parts))
    )


def s3_objects(source: str, storage_block: str | None = None) -> list[tuple[str, str]]:
    """(key relative to the bucket, content) of each data file ``source`` names (``s3_keys``).
    Endpoint and credentials from the environment, or the storage block."""
    bucket = source[5:].partition("/")[0]
    store = store_for(f"s3://{bucket}", storage_block)
    return [(k, s3_content(store.client.head_object(Bucket=bucket, Key=k))) for k in s3_keys(source, store)]


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


def s3_fingerprint(source: str, storage_block: str | None = None) -> str:
    """The content part of an S3 source's fingerprint: its objects' contents (``s3_content``); for a glob
    a digest over each matched key (after the pattern's folder) and its content, so a new or replaced
    shard is new data; ``missing`` when a glob matches nothing (reading it then says so)."""
    objects = s3_objects(source, storage_block)
    key = source[5:].partition("/")[2]
    if not any(c in key for c in WILDCARDS):
        return ",".join(content for _, content in objects)
    if not objects:
        return "missing"
    folder = key[: min(key.index(c) for c in WILDCARDS if c in key)].rpartition("/")[0]
    listing = "".join(f"{k[len(folder) :]}:{content}\n" for k, content in objects)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def read_s3(
    source: str, storage_block: str | None = None, *, name: str | None = None, error: ErrorType = SourceError
) -> Iterator[RawRow]:
    """Rows of an S3 object, of every data file under a prefix, or of the objects a glob matches: one
    object at a time, downloaded to a temp file that is deleted before the next (a prefix of shards
    never needs its whole size on disk). ``name``: the spec as written, for messages."""
    bucket, _, key = source[5:].partition("/")
    store = store_for(f"s3://{bucket}", storage_block)
    try:
        keys = s3_keys(source, store)
    except Exception as e:
        raise error(f"{source}: cannot read from S3 ({type(e).__name__})") from None
    if not keys and any(c in key for c in WILDCARDS):
        raise error(f"dataset spec {name or source!r}: no {'/'.join(FILE_SUFFIXES)} object matches")
    if not keys:
        raise error(f"{source}: no {'/'.join(FILE_SUFFIXES)} object found")
    with tempfile.TemporaryDirectory(prefix="tuneline-s3-") as tmp:
        for k in keys:
            local = Path(tmp) / f"object{Path(k).suffix}"  # read_file goes by the suffix
            store.download_file(k, local)
            try:
                yield from read_file(local, f"s3://{bucket}/{k}", error=error)
            finally:
                local.unlink(missing_ok=True)
