"""The SFT stage's rows on disk (tasks/sft/rows.py): the same tokens as the in-memory lists, the same
one-line errors, and memory that stays flat as the split grows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.sft.rows import arrow_rows, check_trainable_tokens, rows_dir, tokenize_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    """SmolLM2's tokenizer with the training template the stage uses (assistant masks)."""
    from tasks.core.common import load_tokenizer
    from tasks.core.models import training_chat_template

    tok = load_tokenizer(smollm2_dir)
    tok.chat_template = training_chat_template(tok) or tok.chat_template
    return tok


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _write(path: Path, rows: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _demo_rows(shared_data: Path) -> list[dict]:
    """alpaca en and zh as chat rows (two writer batches and more), plus multi-turn rows with a system
    prompt, Chinese and a tool call, and a blank line the readers skip."""
    rows = []
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        for r in json.loads((shared_data / "alpaca" / name).read_text(encoding="utf-8")):
            rows.append(_chat((r["instruction"] + "\n" + r.get("input", "")).strip(), r["output"]))
    multi = {
        "messages": [
            {"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "北京是哪个国家的首都？"},
            {"role": "assistant", "content": "北京是中国的首都。"},
            {"role": "user", "content": "And in English?"},
            {"role": "assistant", "content": "Beijing is the capital of China."},
        ]
    }
    tool = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 °C in Paris."},
        ],
        "tools": json.dumps([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]),
    }
    return [multi, tool, *rows[:700], "", multi, *rows[700:]]


def test_arrow_rows_hold_the_same_tokens_in_the_same_order_as_the_lists(tmp_path, tokenizer, shared_data):
    data = _write(tmp_path / "train.jsonl", _demo_rows(shared_data))
    cache = rows_dir(tmp_path / "scratch", 0, "train")

    dataset, stats = arrow_rows(tokenizer, data, cache, max_length=1024)

    old = tokenize_rows(tokenizer, data)
    assert len(dataset) == len(old["input_ids"]) > 2000  # more than two writer batches
    assert dataset["input_ids"] == old["input_ids"]
    assert dataset["assistant_masks"] == old["assistant_masks"]
    assert any("北京" in tokenizer.decode(ids) for ids in dataset[:3]["input_ids"])
    # the check's figures come out of the same pass
    trainable, mean = check_trainable_tokens(tokenizer, data, 1024)
    assert (stats.trainable_tokens, stats.mean_row_tokens) == (trainable, pytest.approx(mean))
    # the rows live on disk under scratch/rows/rank0/train, memory-mapped, not in memory
    assert [Path(f["filename"]).is_relative_to(cache) for f in dataset.cache_files] == [True]

    # built again (a retry): the old files go, the pass and its figures are redone
    again, stats_again = arrow_rows(tokenizer, data, cache, max_length=1024)
    assert stats_again == stats and again["input_ids"][-1] == old["input_ids"][-1]


@pytest.mark.parametrize(
    "bad, message",
    [
        (_chat("word " * 400, "ok"), r"train\.jsonl line 3, field messages: no assistant token within max_length=64"),
        ('{"messages": [', r"train\.jsonl line 3: not JSON"),
        ({"text": "no messages"}, r"train\.jsonl line 3, field messages: missing"),
    ],
)
def test_a_bad_row_is_a_one_line_error_naming_file_and_line(tmp_path, tokenizer, bad, message):
    data = _write(tmp_path / "train.jsonl", [_chat("hi", "hello"), _chat("2+2?", "4"), bad, _chat("a", "b")])
    with pytest.raises(ValueError, match=message) as caught:
        arrow_rows(tokenizer, data, tmp_path / "rows", max_length=64)
    assert "\n" not in str(caught.value)


def test_an_empty_split_is_an_error_naming_the_file(tmp_path, tokenizer):
    data = _write(tmp_path / "train.jsonl", ["", ""])
    with pytest.raises(ValueError, match=r"train\.jsonl: no rows to train or evaluate on"):
        arrow_rows(tokenizer, data, tmp_path / "rows", max_length=64)


# Builds one path's rows from a tiny split, then from the big one; prints ru_maxrss growth in MB.
_CHILD = """
import json, sys
from pathlib import Path
from tasks.core.common import load_tokenizer
from tasks.core.models import training_chat_template
from tasks.sft.rows import arrow_rows, tokenize_rows

path, model_dir, small, big, scratch = sys.argv[1:]
tok = load_tokenizer(model_dir)
tok.chat_template = training_chat_template(tok) or tok.chat_template

def build(data_file, name):
    if path == "arrow":
        return len(arrow_rows(tok, Path(data_file), Path(scratch) / name, 256)[0])
    return len(tokenize_rows(tok, Path(data_file))["input_ids"])

def peak_rss_kib():  # VmHWM: the process's peak RSS (ru_maxrss), which clear_refs can reset
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM:")).split()[1])

build(small, "small")  # imports, tokenizer caches and Arrow writer warmed up
# Loading torch/transformers peaks far above the steady RSS: reset the peak to the current RSS. Not
# ru_maxrss: it also keeps the peak recorded when any thread exits, which clear_refs leaves alone.
Path("/proc/self/clear_refs").write_text("5")
before = peak_rss_kib()
rows = build(big, "big")
print(json.dumps({"rows": rows, "growth_mb": (peak_rss_kib() - before) / 1024}))
"""


def test_memory_stays_flat_on_arrow_rows_where_the_lists_grow(tmp_path, smollm2_dir):
    rows = [_chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(150_000)]
    big, small = _write(tmp_path / "big.jsonl", rows), _write(tmp_path / "small.jsonl", rows[:2000])
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    children = {
        path: subprocess.Popen(
            [sys.executable, "-c", _CHILD, path, str(smollm2_dir), str(small), str(big), str(tmp_path / path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for path in ("arrow", "lists")
    }  # both at once: each is one core's tokenizing
    growth = {}
    for path, child in children.items():
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-2000:]
        result = json.loads(out.splitlines()[-1])
        assert result["rows"] == 150_000
        growth[path] = result["growth_mb"]
    # ~4.5M tokens: the lists hold them as Python objects (~200 MB); the Arrow rows hold one writer batch
    assert growth["arrow"] < 40, growth
    assert growth["lists"] > 100 and growth["lists"] > 5 * max(growth["arrow"], 1), growth
