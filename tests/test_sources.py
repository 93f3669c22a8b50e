"""Shared source readers (tasks/core/sources.py and its file_sources / hub_sources): whole-set loading for
evaluation with the caller's error type; S3 globs on the real S3 server (``s3_server``); hub datasets read
whole or streamed (``data.streaming``), through ``datasets.load_dataset`` on a local folder (no hub here)."""

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


# ----------------------------------------------------------------------------------------------
# S3 globs: shards read one object at a time, fingerprinted by key and content
# ----------------------------------------------------------------------------------------------
def _qa(start: int, n: int) -> list[dict]:
    return [{"query": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}."} for i in range(start, start + n)]


def _shards(tmp_path, s3_server, prefix: str):
    """Three shards (two JSON lines, one Parquet) both in a local folder and under an S3 prefix, with
    objects the glob must not match: another name, a deeper folder."""
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / prefix
    (folder / "old").mkdir(parents=True)
    (folder / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _qa(0, 30)))
    (folder / "part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _qa(30, 30)))
    pq.write_table(pa.Table.from_pylist(_qa(60, 30)), folder / "part-2.parquet")
    (folder / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _qa(100, 5)))
    (folder / "old" / "part-9.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _qa(200, 5)))
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.put_object(
            Bucket=s3_server.bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes()
        )
    return s3, folder


def test_an_s3_glob_gives_the_same_split_as_the_same_shards_on_disk(tmp_path, s3_server):
    from tasks.data import prepare
    from tasks.data.specs import DataParams, parse_spec

    s3, folder = _shards(tmp_path, s3_server, "glob-split")
    glob = f"s3://{s3_server.bucket}/glob-split/part-*"
    outs = {}
    for name, spec in (("s3", glob), ("local", f"{folder}/part-*")):
        config = DataParams(datasets=[spec], validation_ratio=0.1, system_prompt="")
        metrics = prepare(config, tmp_path / name)
        assert metrics["sources"][0]["rows_read"] == 90  # three shards; other.jsonl and old/ not matched
        outs[name] = [(tmp_path / name / f"{split}.jsonl").read_bytes() for split in ("train", "validation")]
    assert outs["s3"] == outs["local"] and all(outs["s3"])
    # A new shard is new data; an object the glob does not match is not.
    before = parse_spec(glob).fingerprint()
    s3.put_object(Bucket=s3_server.bucket, Key="glob-split/other2.jsonl", Body=b'{"query": "q", "response": "r"}\n')
    assert parse_spec(glob).fingerprint() == before
    s3.put_object(Bucket=s3_server.bucket, Key="glob-split/part-3.jsonl", Body=b'{"query": "q", "response": "r"}\n')
    assert parse_spec(glob).fingerprint() != before
    assert parse_spec(f"s3://{s3_server.bucket}/glob-split/part-*.jsonl").fingerprint() != before


def test_an_s3_glob_matching_nothing_is_a_one_line_error_before_any_tokenizer(tmp_path, s3_server, monkeypatch):
    from tasks.data import DataError, prepare
    from tasks.data.specs import DataParams

    _shards(tmp_path, s3_server, "glob-none")

    def no_tokenizer(*a, **kw):
        raise AssertionError("the tokenizer loaded before the sources were checked")

    monkeypatch.setattr("tasks.data.stream.load_tokenizer", no_tokenizer)
    spec = f"s3://{s3_server.bucket}/glob-none/shard-*.jsonl"
    with pytest.raises(DataError) as e:
        prepare(DataParams(datasets=[spec]), tmp_path / "out")
    assert str(e.value) == f"dataset spec {spec!r}: no .json/.jsonl/.parquet/.csv object matches"


def test_s3_shards_are_downloaded_one_at_a_time(tmp_path, s3_server, monkeypatch):
    from tasks.artifacts.store import Store

    _shards(tmp_path, s3_server, "glob-disk")
    real = Store.download_file
    on_disk = []

    def download(self, key, local):
        on_disk.append(sorted(p.name for p in local.parent.iterdir()))  # what the reader still holds
        real(self, key, local)

    monkeypatch.setattr(Store, "download_file", download)
    for source in (f"s3://{s3_server.bucket}/glob-disk/part-*", f"s3://{s3_server.bucket}/glob-disk"):
        on_disk.clear()
        rows = [r.row for r in read_source(source)]
        assert len(rows) == (90 if source.endswith("*") else 100)
        assert len(on_disk) == (3 if source.endswith("*") else 5) and on_disk == [[]] * len(on_disk)


# ----------------------------------------------------------------------------------------------
# Hub datasets in streaming mode (no hub here: datasets.load_dataset on a local folder, the same code path)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def hub_folder(tmp_path, monkeypatch):
    """A dataset folder of two JSON-lines shards read as the hub id ``org/qa`` (``hub_id`` maps the id to
    it), offline; records each ``datasets.load_dataset`` call's streaming flag and result type."""
    import datasets

    import tasks.core.hub_sources as hub_sources

    folder = tmp_path / "org-qa"
    folder.mkdir()
    for k in range(2):
        (folder / f"train-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _qa(40 * k, 40)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(hub_sources, "hub_id", lambda source, hub: str(folder) if source == "org/qa" else source)
    calls = []
    real = datasets.load_dataset

    def load_dataset(*args, **kwargs):
        loaded = real(*args, **kwargs)
        calls.append((kwargs.get("streaming"), type(loaded).__name__))
        return loaded

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return folder, calls


def test_a_streamed_hub_read_gives_the_same_rows(hub_folder):
    from tasks.core.hub_sources import read_hub

    folder, calls = hub_folder
    whole = [(r.where, r.index, r.row) for r in read_hub("org/qa", streaming=False)]
    streamed = [(r.where, r.index, r.row) for r in read_hub("org/qa", streaming=True)]
    assert calls == [(False, "Dataset"), (True, "IterableDataset")]
    assert streamed == whole and len(whole) == 80 and whole[0][2] == _qa(0, 1)[0]
    calls.clear()
    assert [r.row for r in read_hub("org/qa", streaming="auto")] == [r[2] for r in whole]
    assert calls == [(False, "Dataset")]  # auto, offline: the size is not known, so the datasets cache is read
    assert [r.row for r in read_hub("org/qa", "all", streaming=True)] == [r[2] for r in whole]  # every config
    # A streamed file is parsed while iterating: a bad one ends as the caller's one-line error, naming the set.
    (folder / "train-1.jsonl").write_text('{"query": "q", "response": "r"}\n{"query": \n')
    with pytest.raises(StageError, match=r"^.*org-qa \(huggingface; .*\): cannot read 'org/qa' while streaming \("):
        list(read_hub("org/qa", name="org/qa", streaming=True, error=StageError))


def test_data_streaming_gives_the_same_split_and_the_same_fingerprint(hub_folder, tmp_path):
    from tasks.core.stage import StageContext
    from tasks.data import DataParams, fingerprint_of, prepare

    _, calls = hub_folder
    ctx = StageContext(base_model="Qwen/Qwen2-7B-Instruct", root=str(tmp_path / "root"))
    outs, keys = {}, set()
    for streaming in (True, False, "auto"):
        config = DataParams(datasets=["org/qa#60"], streaming=streaming, validation_ratio=0.1, system_prompt="")
        prepare(config, tmp_path / str(streaming))
        outs[streaming] = [(tmp_path / str(streaming) / f"{s}.jsonl").read_bytes() for s in ("train", "validation")]
        keys.add(fingerprint_of(config, ctx))
    assert [c[0] for c in calls] == [True, False, False]  # the data stage passes the knob down
    assert outs[True] == outs[False] == outs["auto"] and all(outs[True])
    assert len(keys) == 1  # how rows are fetched is not what the stage computes
    assert fingerprint_of(DataParams(datasets=["org/qa#61"]), ctx) not in keys  # the key does follow the data
