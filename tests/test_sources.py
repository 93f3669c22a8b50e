"""Shared source readers (tasks/core/sources.py): whole-set loading for evaluation, with the caller's error type."""

from __future__ import annotations

import json
import re

import pytest

from tasks.core.sources import SourceError, file_source_fingerprint, load_rows, read_source


class StageError(ValueError):
    """Stands in for a stage's own error (EvalError, DataError)."""


ROWS = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"}]


def test_load_rows_reads_json_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet")
    for name in ("rows.json", "rows.jsonl", "rows.parquet"):
        assert load_rows(str(tmp_path / name)) == ROWS


def test_bad_row_names_file_and_row_and_raises_the_callers_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"question": "2+2?",\n')
    with pytest.raises(StageError, match=re.escape(f"{path}: row 1 (line 3): invalid JSON (")):
        load_rows(str(path), error=StageError)
    with pytest.raises(SourceError, match=r"bad\.jsonl: row 1 \(line 3\): invalid JSON"):
        load_rows(str(path))
    with pytest.raises(StageError, match=re.escape(f"evaluation data not found: {tmp_path / 'missing.jsonl'}")):
        load_rows(str(tmp_path / "missing.jsonl"), error=StageError)
    (tmp_path / "object.json").write_text(json.dumps({"a": 1, "b": 2}))
    with pytest.raises(StageError, match=re.escape("object.json: expected a JSON list of rows (or use .jsonl)")):
        load_rows(str(tmp_path / "object.json"), error=StageError)
    with pytest.raises(StageError, match=re.escape("s3://bucket/rows.csv: expected a .json, .jsonl or .parquet file")):
        load_rows("s3://bucket/rows.csv", error=StageError)


def test_load_rows_reads_s3(tmp_path, s3_server):
    from tasks.artifacts.store import Store

    Store(f"s3://{s3_server.bucket}/sources").write_bytes(
        "rows.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    )
    assert load_rows(f"s3://{s3_server.bucket}/sources/rows.jsonl") == ROWS


def test_file_fingerprint_follows_the_content(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    before = file_source_fingerprint(str(path))
    assert before.startswith(f"{path}@") and file_source_fingerprint(str(path)) == before
    path.write_text(json.dumps(ROWS[:1]))
    assert file_source_fingerprint(str(path)) != before
    # a hub id: its resolved revision (or @unresolved when neither the hub nor a cache knows it; see
    # tests/test_fingerprints.py for the offline cache)
    assert file_source_fingerprint("openai/gsm8k").startswith("openai/gsm8k@")


def test_read_source_keeps_bad_rows_as_rows_with_an_error(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"q": 1}\n[1, 2]\nnot json\n')
    got = [(r.index, r.row, r.error) for r in read_source(str(path))]
    assert got == [(0, {"q": 1}, None), (1, [1, 2], None), (2, None, "invalid JSON (Expecting value at column 1)")]
    with pytest.raises(StageError, match=r"dataset file not found: .*nope\.jsonl"):
        list(read_source(str(tmp_path / "nope.jsonl"), error=StageError))
