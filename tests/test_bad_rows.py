"""Bad rows within a budget (issue 28): a source with a few rows that fail validation trains without
them, and the report lists each (file, row, field, reason); more than ``data.max_bad_rows`` of a
source's rows fail it naming the first reasons; ``data.strict`` stops at the first bad row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.data import DataError, DataParams, prepare

WEATHER = {
    "name": "get_weather",
    "description": "查询城市的当前天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CITIES = ["北京", "上海", "广州", "深圳", "成都", "杭州", "西安", "武汉", "南京", "重庆"]


def _glaive_zh(i: int, bad: bool = False) -> dict:
    """A multi-turn glaive-style row (sharegpt with ``tools`` as JSON text); ``bad``: the call is written
    as text where a structured call is required, as row 197 of the glaive Chinese file does."""
    city = CITIES[i % len(CITIES)]
    call = f"get_weather(city='{city}')" if bad else json.dumps({"name": "get_weather", "arguments": {"city": city}})
    return {
        "tools": json.dumps([WEATHER], ensure_ascii=False),
        "conversations": [
            {"from": "human", "value": f"第{i}个问题：{city}今天天气怎么样？"},
            {"from": "function_call", "value": call},
            {"from": "observation", "value": json.dumps({"temp_c": i % 30}, ensure_ascii=False)},
            {"from": "gpt", "value": f"{city}现在{i % 30}摄氏度。"},
            {"from": "human", "value": f"谢谢！第{i}个问题问完了。"},
            {"from": "gpt", "value": "不客气，祝你愉快。"},
        ],
    }


def _source(tmp_path: Path, bad_rows: set[int], n: int = 150) -> Path:
    path = tmp_path / "glaive_zh.jsonl"
    rows = [_glaive_zh(i, bad=i in bad_rows) for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _prepare(path: Path, out: Path, **kw) -> dict:
    return prepare(DataParams(datasets=[str(path)], validation_ratio=0.0, system_prompt="", **kw), out)


def test_one_bad_row_in_150_is_skipped_and_reported(tmp_path):
    path = _source(tmp_path, {97})
    metrics = _prepare(path, tmp_path / "out")
    train = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(train) == 149 and not any("第97个问题" in line for line in train)
    source = json.loads((tmp_path / "out" / "report.json").read_text())["sources"][0]
    assert source["rows_read"] == 150 and source["rows_skipped"] == 1
    [skipped] = source["skipped"]
    assert skipped["file"] == str(path) and skipped["row"] == 97
    assert skipped["field"] == "conversations[1].value"
    assert skipped["reason"].startswith("a tool call must be JSON")
    # People see it too: the report the CLI prints and report.md name the file, row, field and reason.
    line = f"skipped {path}: row 97: field 'conversations[1].value': a tool call must be JSON"
    assert line in (tmp_path / "out" / "report.md").read_text()
    from tasks.data import report_text

    assert line in report_text(metrics) and "1 of 150 rows skipped" in report_text(metrics)


def test_more_bad_rows_than_the_budget_fail_the_source_with_the_first_reasons(tmp_path):
    path = _source(tmp_path, {10, 40, 70, 100, 130})
    first = f"{path}: row 10: field 'conversations[1].value': a tool call must be JSON"
    with pytest.raises(DataError) as raised:
        _prepare(path, tmp_path / "out")
    message = str(raised.value)
    assert "5 of 150 rows failed validation, more than data.max_bad_rows=0.01 allows" in message
    assert f"first: {first}" in message and "row 40" in message and "row 70" in message
    assert not (tmp_path / "out" / "train.jsonl").exists()
    # A larger budget takes them (and lists all five); a budget of 0 refuses even one.
    _prepare(path, tmp_path / "out", max_bad_rows=0.05)
    source = json.loads((tmp_path / "out" / "report.json").read_text())["sources"][0]
    assert [s["row"] for s in source["skipped"]] == [10, 40, 70, 100, 130]
    with pytest.raises(DataError, match="1 of 150 rows failed validation, more than data.max_bad_rows=0 allows"):
        _prepare(_source(tmp_path, {97}), tmp_path / "out0", max_bad_rows=0)


def test_strict_fails_on_the_first_bad_row_as_before(tmp_path):
    path = _source(tmp_path, {97, 120})
    expected = f"{path}: row 97: field 'conversations[1].value': a tool call must be JSON"
    with pytest.raises(DataError, match="^" + re.escape(expected)) as raised:
        _prepare(path, tmp_path / "out", strict=True, max_bad_rows=1.0)
    assert "row 120" not in str(raised.value)


def test_the_data_stage_says_in_the_run_log_which_rows_it_skipped(tmp_path, tiny_model_dir, caplog):
    from tasks.core.stage import StageContext
    from tasks.data import prepare_dataset

    path = _source(tmp_path, {97})
    ctx = StageContext(base_model=str(tiny_model_dir), root=str(tmp_path / "artifacts"))
    with caplog.at_level("WARNING"):
        ref = prepare_dataset.fn(DataParams(datasets=[str(path)], validation_ratio=0.0), ctx)
    assert ref.metrics["sources"][0]["rows_skipped"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{path}: 1 of 150 rows skipped (failed validation)" in warnings
    assert f"  skipped {path}: row 97: field 'conversations[1].value': a tool call must be JSON" in "\n".join(warnings)
