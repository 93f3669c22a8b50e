"""ms-swift spec parity in the data stage: ``hf::`` / ``ms::``, ``:a/b`` and ``:all``, the reference job's
hub ids and their clean-up, (zh, en) name pairs, the self-cognition subsets, and ``#N`` without shuffling.
Offline: local files, the built-in self-cognition set, the Qwen2 tokenizer.
"""

from __future__ import annotations

import json

import pytest

from tasks.core.hub_ids import _strip_zh_input_prefix, hub_id
from tasks.data import DataError, DataParams, parse_spec
from tests.test_data import _rows, _run  # the data tests' own helpers: prepare and read back


def test_hub_prefixes_and_subsets_parse_like_ms_swift():
    assert (parse_spec("hf::openai/gsm8k:main#20").hub, parse_spec("hf::openai/gsm8k:main#20").subset) == (
        "huggingface",
        "main",
    )
    s = parse_spec("ms::AI-ModelScope/alpaca-gpt4-data-zh#5", hub="huggingface")
    assert (s.source, s.hub, s.n) == ("AI-ModelScope/alpaca-gpt4-data-zh", "modelscope", 5)
    s = parse_spec("HF::swift/self-cognition:qwen3/empty_think#4", hub="modelscope")
    assert (s.source, s.subset, s.hub, s.kind) == (
        "swift/self-cognition",
        "qwen3/empty_think",
        "huggingface",
        "builtin",
    )
    assert parse_spec("ms://swift/self-cognition:all").subset == "all"  # tuneline's own prefixes still work
    assert parse_spec("hf://openai/gsm8k").hub == "huggingface"


def test_several_subsets_and_all_of_a_folder_and_of_self_cognition(tmp_path):
    folder = tmp_path / "mix"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps({"query": f"{name}{i}?", "response": f"{name}{i}."}) + "\n" for i in range(3))
        )
    metrics, out = _run(tmp_path / "1", [f"{folder}:a/c"])
    assert metrics["sources"][0]["rows_read"] == 6
    assert {m[0]["content"][0] for m in _rows(out)} == {"a", "c"}
    metrics, _ = _run(tmp_path / "2", [f"{folder}:all"])
    assert metrics["sources"][0]["rows_read"] == 9
    with pytest.raises(DataError, match=r"no subset 'd' in .*available: a, b, c"):
        _run(tmp_path / "3", [f"{folder}:a/d"])

    default, _ = _run(tmp_path / "4", ["swift/self-cognition"])
    both, _ = _run(tmp_path / "5", ["swift/self-cognition:default/qwen3"])
    every, _ = _run(tmp_path / "6", ["swift/self-cognition:all"])
    n = default["sources"][0]["rows_read"]
    assert (both["sources"][0]["rows_read"], every["sources"][0]["rows_read"]) == (2 * n, 3 * n)
    with pytest.raises(DataError, match=r"no subset 'fr'; available: default, qwen3, empty_think, en, zh, all"):
        _run(tmp_path / "7", ["swift/self-cognition:fr"])


def test_self_cognition_qwen3_and_empty_think_as_ms_swift_defines_them(tmp_path):
    _, out = _run(tmp_path / "q", ["swift/self-cognition:qwen3#20"])
    rows = _rows(out)
    assert len(rows) == 20
    assert all(m[0]["content"].endswith(" /no_think") for m in rows)
    assert all(m[1]["content"].startswith("<think>\n\n</think>\n\n") for m in rows)
    _, out = _run(tmp_path / "e", ["swift/self-cognition:empty_think#20"])
    rows = _rows(out)
    assert not any(m[0]["content"].endswith("/no_think") for m in rows)
    assert all(m[1]["content"].startswith("<think>\n\n</think>\n\n") for m in rows)


def test_name_and_author_pairs_are_chosen_by_the_rows_language(tmp_path):
    own = tmp_path / "identity.jsonl"
    own.write_text(
        json.dumps({"query": "你是谁？", "response": "我是{{NAME}}，由{{AUTHOR}}开发。"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"query": "Who are you?", "response": "I am {{NAME}} by {{AUTHOR}}."})
        + "\n",
        encoding="utf-8",
    )
    _, out = _run(
        tmp_path,
        ["swift/self-cognition:zh#10", "swift/self-cognition:en#10", str(own)],
        model_name=["小鲸", "Whale"],
        model_author=["鲸鱼实验室", "Whale Labs"],
    )
    answers = [m[-1]["content"] for m in _rows(out)]
    chinese = [
        a for a in answers if any("\u4e00" <= ch <= "\u9fff" for ch in a.replace("小鲸", "").replace("鲸鱼实验室", ""))
    ]
    english = [a for a in answers if a not in chinese]
    assert len(chinese) == 11 and len(english) == 11
    assert all("Whale" not in a for a in chinese) and sum("小鲸" in a for a in chinese) >= 10
    assert all("小鲸" not in a and "鲸鱼" not in a for a in english) and sum("Whale" in a for a in english) >= 10
    assert "我是小鲸，由鲸鱼实验室开发。" in answers and "I am Whale by Whale Labs." in answers
    # One value still fills both languages.
    _, out = _run(tmp_path / "one", ["swift/self-cognition:zh#5"], model_name="Quokka")
    assert sum("Quokka" in m[-1]["content"] for m in _rows(out)) >= 4


def test_without_shuffling_n_takes_the_first_rows(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"query": f"q{i}?", "response": f"a{i}."}) + "\n" for i in range(10)))
    _, out = _run(tmp_path / "a", [f"{data}#4"], shuffle=False)
    assert [m[0]["content"] for m in _rows(out)] == ["q0?", "q1?", "q2?", "q3?"]
    _, out = _run(tmp_path / "b", [f"{data}#12"], shuffle=False)  # the whole set, then the first 2 again
    assert [m[0]["content"] for m in _rows(out)] == [f"q{i}?" for i in [*range(10), 0, 1]]
    _, out = _run(tmp_path / "c", [f"{data}#4"])  # shuffling (the default): a seeded sample
    assert [m[0]["content"] for m in _rows(out)] != ["q0?", "q1?", "q2?", "q3?"]


def test_reference_job_ids_map_to_ms_swifts_hugging_face_ids(tmp_path, capsys):
    from flows.cli import main

    assert hub_id("AI-ModelScope/alpaca-gpt4-data-zh", "huggingface") == "llm-wizard/alpaca-gpt4-data-zh"
    assert hub_id("AI-ModelScope/alpaca-gpt4-data-en", "huggingface") == "vicgalle/alpaca-gpt4"
    assert hub_id("AI-ModelScope/alpaca-gpt4-data-en", "modelscope") == "AI-ModelScope/alpaca-gpt4-data-en"
    assert _strip_zh_input_prefix({"instruction": "翻译", "input": "输入：猫"})["input"] == "猫"
    # The reference job's default specs, offline: the error names the mapped id and the hub.
    for spec, mapped in (
        ("AI-ModelScope/alpaca-gpt4-data-zh#5", "llm-wizard/alpaca-gpt4-data-zh"),
        ("AI-ModelScope/alpaca-gpt4-data-en#5", "vicgalle/alpaca-gpt4"),
    ):
        assert main(["data", "check", spec]) == 1
        err = capsys.readouterr().err
        assert f"{mapped} (huggingface; ms-swift's id for {spec[:-2]}): cannot reach the dataset on the hub" in err
    assert DataParams().datasets[:2] == [
        "AI-ModelScope/alpaca-gpt4-data-zh#500",
        "AI-ModelScope/alpaca-gpt4-data-en#500",
    ]
