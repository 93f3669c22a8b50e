"""The data stage on sources bigger than memory (``tasks.data.stream``): it runs under a memory limit far
below what the in-memory stage grows to, it writes the same bytes as the in-memory reference (``prepare_in_memory``)
on mixed sources, and appending a row moves no other row across the split.

Offline: sources generated in the test's temp folder (JSON lines, Parquet, sharegpt JSON; English and
Chinese; duplicates, a bad row), the demo data in ../shared/data, the SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.data import DataParams, prepare, prepare_in_memory

REPO = Path(__file__).resolve().parents[1]
WORDS = "the of a model data train token night row split prompt answer memory stream disk hash".split()
HANZI = "数据模型训练分词夜晚行拆分提示回答内存流磁盘哈希"
OUTPUTS = ("train.jsonl", "validation.jsonl", "report.json", "report.md")


def _question(rng: random.Random, i: int) -> str:
    if i % 3 == 1:
        return "".join(rng.choice(HANZI) for _ in range(rng.randint(6, 20))) + f"{i}？"
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + f" {i}?"


def _answer(rng: random.Random, words: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, words)))


def write_source(folder: Path, n: int, seed: int = 0) -> Path:
    """A folder of two JSON-lines files (chat ``messages`` and alpaca), ``n`` rows in all; every 50th
    question repeats an earlier one (same prompt, another answer), every 97th row repeats a whole row."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (
        open(folder / "chat.jsonl", "w", encoding="utf-8") as chat,
        open(folder / "alpaca.jsonl", "w", encoding="utf-8") as alpaca,
    ):
        last = None
        for i in range(n):
            q = _question(rng, i - 25 if i % 50 == 49 else i)
            row = (q, _answer(rng)) if not (i % 97 == 96 and last) else last
            last = row
            if i % 2:
                alpaca.write(json.dumps({"instruction": row[0], "input": "", "output": row[1]}, ensure_ascii=False))
                alpaca.write("\n")
            else:
                turns = [{"role": "user", "content": row[0]}, {"role": "assistant", "content": row[1]}]
                chat.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")
    return folder


def _mixed_sources(tmp_path: Path) -> list[str]:
    """Three formats in three files: JSON lines with one bad line, Parquet (alpaca with history), and a
    sharegpt JSON list; multi-turn rows and long rows for truncation."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)
    lines = write_source(tmp_path / "lines", 3000)
    with open(lines / "chat.jsonl", "a", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "user", "content": "broken"\n')
    rows = [
        {
            "instruction": _question(rng, i),
            "input": "" if i % 4 else "context " + _answer(rng),
            "output": _answer(rng, 400 if i % 10 == 0 else 30),
            "history": [[_question(rng, i + 5000), _answer(rng)]] if i % 5 == 0 else [],
        }
        for i in range(1500)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "alpaca.parquet")
    share = [
        {"conversations": [{"from": "human", "value": _question(rng, i % 700)}, {"from": "gpt", "value": _answer(rng)}]}
        for i in range(900)
    ]
    (tmp_path / "share.json").write_text(json.dumps(share, ensure_ascii=False), encoding="utf-8")
    return [str(lines), f"{tmp_path / 'alpaca.parquet'}#2500", f"{tmp_path / 'share.json'}#300"]


CONFIGS = {
    "hash split, truncation, dedupe": dict(
        max_length=160, truncation="truncate_left", dedupe=True, validation_ratio=0.05, validation_max_rows=150
    ),
    "interleave, delete, no shuffle": dict(
        max_length=200, mixing="interleave", interleave_probs=[0.5, 0.3, 0.2], shuffle=False, system_mode="force"
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_streaming_writes_the_same_bytes_as_the_in_memory_stage(tmp_path, smollm2_dir, name):
    sources = _mixed_sources(tmp_path)
    config = DataParams(datasets=sources, seed=3, max_bad_rows=0.01, **CONFIGS[name])
    streamed = prepare(config, tmp_path / "stream", model=str(smollm2_dir))
    reference = prepare_in_memory(config, tmp_path / "memory", model=str(smollm2_dir))
    assert streamed == reference
    for file in OUTPUTS:
        assert (tmp_path / "stream" / file).read_bytes() == (tmp_path / "memory" / file).read_bytes(), file
    report = streamed["sources"]
    assert report[0]["rows_skipped"] == 1 and report[0]["duplicates"] > 0  # the bad line, the repeated rows
    assert streamed["validation_rows"] > 0 and streamed["train_validation_prompt_overlap"] == 0
    if name.startswith("hash"):
        assert sum(s["truncated"] for s in report) > 0 and streamed["duplicates_dropped"] > 0


def test_validation_sets_and_the_demo_data_match_too(tmp_path, smollm2_dir, shared_data):
    """``validation_datasets`` with ``#N`` (the lowest hashes), ``#N`` above a source's size, the demo data."""
    config = DataParams(
        datasets=[f"{shared_data}/alpaca/alpaca_en_demo.json#300", f"{shared_data}/self-cognition/identity.json#200"],
        validation_datasets=[f"{shared_data}/alpaca/alpaca_zh_demo.json#40"],
        max_length=512,
    )
    streamed = prepare(config, tmp_path / "stream", model=str(smollm2_dir))
    assert streamed == prepare_in_memory(config, tmp_path / "memory", model=str(smollm2_dir))
    for file in OUTPUTS:
        assert (tmp_path / "stream" / file).read_bytes() == (tmp_path / "memory" / file).read_bytes(), file
    assert 0 < streamed["validation_rows"] <= 40 and streamed["validation_from"] == "data.validation_datasets"


def _sides(out: Path) -> dict[str, str]:
    sides = {}
    for split in ("train", "validation"):
        for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            sides[line] = split
    return sides


def test_appending_a_row_changes_only_that_rows_side(tmp_path, smollm2_dir):
    source = write_source(tmp_path / "src", 4000)
    config = DataParams(datasets=[str(source)], validation_ratio=0.1, validation_max_rows=100_000, max_length=512)
    prepare(config, tmp_path / "night1", model=str(smollm2_dir))
    with open(source / "chat.jsonl", "a", encoding="utf-8") as f:
        turns = [
            {"role": "user", "content": "A question that arrived today?"},
            {"role": "assistant", "content": "Yes."},
        ]
        f.write(json.dumps({"messages": turns}) + "\n")
    prepare(config, tmp_path / "night2", model=str(smollm2_dir))
    before, after = _sides(tmp_path / "night1"), _sides(tmp_path / "night2")
    assert set(after) - set(before) == {next(line for line in after if "arrived today" in line)}
    assert set(before) <= set(after)
    assert all(after[line] == side for line, side in before.items())  # no old row crossed the split
    assert 300 < sum(side == "validation" for side in after.values()) < 500  # ~10% of the prompts


def test_a_glob_of_shards_reads_like_its_folder_and_a_new_shard_is_new_data(tmp_path, smollm2_dir):
    from tasks.core.stage import StageContext
    from tasks.data import DataError, fingerprint_of

    shards = write_source(tmp_path / "shards", 600)
    (shards / "notes.txt").write_text("not data")
    by_glob, by_folder = DataParams(datasets=[f"{shards}/*.jsonl"]), DataParams(datasets=[str(shards)])
    prepare(by_glob, tmp_path / "glob", model=str(smollm2_dir))
    prepare(by_folder, tmp_path / "folder", model=str(smollm2_dir))
    for split in ("train", "validation"):
        assert (tmp_path / "glob" / f"{split}.jsonl").read_bytes() == (
            tmp_path / "folder" / f"{split}.jsonl"
        ).read_bytes()
    ctx = StageContext(base_model=str(smollm2_dir), root=str(tmp_path / "root"))
    before = fingerprint_of(by_glob, ctx)
    (shards / "part-3.jsonl").write_text((shards / "chat.jsonl").read_text(encoding="utf-8").replace("?", "!"))
    assert fingerprint_of(by_glob, ctx) != before
    with pytest.raises(DataError, match=r"no \.json/\.jsonl/\.parquet/\.csv file matches"):
        prepare(DataParams(datasets=[f"{shards}/*.parquet"]), tmp_path / "none")


def test_a_bad_validation_set_is_reported_before_the_tokenizer_loads(tmp_path, monkeypatch):
    """test_split's guard, on the stage that runs (it patches ``mix``, the in-memory reference)."""
    import tasks.data.stream
    from tasks.data import DataError

    def no_tokenizer(*_args, **_kw):
        raise AssertionError("the tokenizer was loaded before the bad validation spec was reported")

    monkeypatch.setattr(tasks.data.stream, "load_tokenizer", no_tokenizer)
    (tmp_path / "empty.jsonl").write_text("")
    config = DataParams(
        datasets=["AI-ModelScope/alpaca-gpt4-data-en#5"], validation_datasets=[f"{tmp_path}/empty.jsonl"]
    )
    with pytest.raises(DataError, match=r"^data\.validation_datasets: .*empty\.jsonl: the source has no rows$"):
        prepare(config, tmp_path / "out")


CHILD = """
import resource, sys
limit = int(sys.argv[4])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from pathlib import Path
from tasks.data import DataParams, prepare, prepare_in_memory
run = prepare if sys.argv[1] == "stream" else prepare_in_memory
metrics = run(DataParams(datasets=[sys.argv[2]], max_length=512), Path(sys.argv[3]), model=sys.argv[5])
# VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's (pytest's) peak.
status = {line.split(":")[0]: line.split()[1] for line in open("/proc/self/status") if line.startswith("Vm")}
rows = metrics["train_rows"] + metrics["validation_rows"]
print("rows", rows, "vmhwm_kb", status["VmHWM"], "vmpeak_kb", status["VmPeak"])
"""

#: Rows of the big source. 1M rows take ~5 minutes of CPU here (2 cores, shared), over this file's time
#: budget; 100k keep it under 2 minutes, and the limit is what 1M would get: the stage's memory is flat.
BIG_ROWS = 100_000
#: What the limit allows above a tiny source's peak address space (VmPeak); the in-memory stage's resident
#: memory grows ~2.5 KB a row (~250 MB here).
HEADROOM_MB = 150


def _child(mode: str, source: Path, out: Path, limit: int, model: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "true"}
    argv = [sys.executable, "-c", CHILD, mode, str(source), str(out), str(limit), str(model)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


def _peaks(done: subprocess.CompletedProcess) -> tuple[int, int]:
    """(rows written, peak resident memory in bytes) from a child's last line."""
    words = done.stdout.split()
    return int(words[1]), int(words[3]) * 1024


def test_a_big_source_runs_under_a_memory_limit_while_the_in_memory_stage_grows_with_it(tmp_path, smollm2_dir):
    """The streaming stage runs 100k rows under an address-space limit of a tiny run's peak + 150 MB, and its
    resident memory barely moves; the in-memory reference's grows by more than that headroom. (Running the
    in-memory stage under the same limit and expecting a MemoryError was flaky: glibc reserves malloc arenas
    per thread up front, so on some machines the rows fit in address space already reserved.)"""
    small = _child("stream", write_source(tmp_path / "small", 1000), tmp_path / "o-small", 0, smollm2_dir)
    assert small.returncode == 0, small.stderr[-2000:]
    base = int(small.stdout.split()[-1]) * 1024  # the process's own peak: interpreter, libraries, tokenizer
    _, base_rss = _peaks(small)
    limit = base + HEADROOM_MB * 2**20
    big = write_source(tmp_path / "big", BIG_ROWS)
    streamed = _child("stream", big, tmp_path / "o-stream", limit, smollm2_dir)
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    rows, stream_rss = _peaks(streamed)
    assert rows > 0.9 * BIG_ROWS  # all but duplicates, long rows, prompts over the cap
    assert (tmp_path / "o-stream" / "train.jsonl").stat().st_size > 20 * 2**20

    in_memory = _child("memory", big, tmp_path / "o-memory", 0, smollm2_dir)
    assert in_memory.returncode == 0, in_memory.stderr[-2000:]
    memory_rows, memory_rss = _peaks(in_memory)
    assert memory_rows == rows  # the same rows: only the memory differs
    stream_growth, memory_growth = stream_rss - base_rss, memory_rss - base_rss
    assert memory_growth > HEADROOM_MB * 2**20, (memory_growth, stream_growth)
    assert memory_growth > 3 * max(stream_growth, 0), (memory_growth, stream_growth)
