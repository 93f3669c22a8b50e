"""Tool calling end to end: glaive / ms-swift sharegpt, OpenAI and ms-swift tool rows become conversations
with ``tools`` and structured ``tool_calls`` (kept as JSON text), render with the ChatML fallback's and
Qwen2.5's tool sections, train the loss on the assistant's calls and answers only, and go through
``tuneline data check`` and the SFT stage on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.core.models import CHATML_TRAINING_TEMPLATE, tokenize_record, training_chat_template
from tasks.data import DataError, DataParams, prepare, qwen2_tokenizer

QWEN25_TEMPLATE = Path(__file__).parent / "fixtures" / "qwen2_5_chat_template.jinja"  # Qwen2.5-Instruct's own
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
STOCK = {  # a schema shaped differently from WEATHER: Arrow would merge the two
    "name": "stock_price",
    "description": "Latest price of a ticker",
    "parameters": {
        "type": "object",
        "properties": {"ticker": {"type": "string"}, "exchange": {"type": "string", "enum": ["NYSE", "XETRA"]}},
    },
}
ANSWER = "It is 3 °C in Oslo."


def _glaive(tools=(WEATHER,), call=None, conversations=None) -> dict:
    call = call if call is not None else json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})
    return {
        "tools": json.dumps(list(tools)),
        "conversations": conversations
        or [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": call},
            {"from": "observation", "value": '{"temp_c": 3}'},
            {"from": "gpt", "value": ANSWER},
        ],
    }


def _openai() -> dict:
    return {
        "tools": [{"type": "function", "function": STOCK}],
        "messages": [
            {"role": "user", "content": "Price of SAP on XETRA?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "stock_price", "arguments": '{"ticker": "SAP", "exchange": "XETRA"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"price": 201.5}'},
            {"role": "assistant", "content": "SAP trades at 201.50 EUR."},
        ],
    }


def _swift() -> dict:
    return {
        "tools": json.dumps([WEATHER, STOCK]),
        "messages": [
            {"role": "user", "content": "Weather in Oslo and the SAP price?"},
            {"role": "tool_call", "content": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
            {"role": "tool_call", "content": '{"name": "stock_price", "arguments": {"ticker": "SAP"}}'},
            {"role": "tool_response", "content": '{"temp_c": 3}'},
            {"role": "tool_response", "content": '{"price": 201.5}'},
            {"role": "assistant", "content": "3 °C, and SAP is at 201.50 EUR."},
        ],
    }


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _records(out: Path, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def _prepare(tmp_path: Path, files: list[Path], **kw) -> Path:
    out = tmp_path / "out"
    kw.setdefault("system_prompt", "")
    prepare(DataParams(datasets=[str(f) for f in files], validation_ratio=0.0, **kw), out)
    return out


def _masked(tokenizer, enc: dict) -> list[str]:
    """The decoded runs of tokens the loss sees."""
    runs, run = [], []
    for token, bit in zip(enc["input_ids"], enc["assistant_masks"]):
        if bit:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs + ([tokenizer.decode(run)] if run else [])


# ----------------------------------------------------------------------------------------------
# Reading: three dialects, one form
# ----------------------------------------------------------------------------------------------
def test_three_dialects_become_tools_and_structured_calls(tmp_path):
    files = [
        _write(tmp_path / "glaive.jsonl", [_glaive()]),
        _write(tmp_path / "openai.jsonl", [_openai()]),
        _write(tmp_path / "swift.jsonl", [_swift()]),
    ]
    rows = {r["messages"][0]["content"]: r for r in _records(_prepare(tmp_path, files))}
    glaive = rows["Weather in Oslo?"]
    assert json.loads(glaive["tools"]) == [{"type": "function", "function": WEATHER}]
    assert glaive["messages"][1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}],
        },
        {"role": "tool", "content": '{"temp_c": 3}'},
        {"role": "assistant", "content": ANSWER},
    ]
    openai = rows["Price of SAP on XETRA?"]
    assert openai["messages"][1]["tool_calls"][0]["function"] == {
        "name": "stock_price",
        "arguments": '{"ticker": "SAP", "exchange": "XETRA"}',
    }
    swift = rows["Weather in Oslo and the SAP price?"]
    assert [m["role"] for m in swift["messages"]] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c["function"]["name"] for c in swift["messages"][1]["tool_calls"]] == ["get_weather", "stock_price"]


def test_tools_stay_json_text_when_rows_have_different_schemas(tmp_path):
    """Arrow reads two rows with different schemas as one merged struct with nulls; JSON text survives."""
    from datasets import load_dataset

    other = _glaive(tools=(STOCK,), call='{"name": "stock_price", "arguments": {"ticker": "SAP"}}')
    out = _prepare(tmp_path, [_write(tmp_path / "both.jsonl", [_glaive(), other])])
    written = {json.loads(r["tools"])[0]["function"]["name"]: r for r in _records(out)}
    assert json.loads(written["get_weather"]["tools"]) == [{"type": "function", "function": WEATHER}]
    assert json.loads(written["stock_price"]["tools"]) == [{"type": "function", "function": STOCK}]
    loaded = load_dataset("json", data_files=str(out / "train.jsonl"), split="train")
    # byte for byte: no key added, none dropped, arguments included
    assert sorted(loaded["tools"]) == sorted(r["tools"] for r in written.values())
    calls = [m["tool_calls"][0]["function"]["arguments"] for r in loaded["messages"] for m in r if m.get("tool_calls")]
    assert sorted(calls) == ['{"city": "Oslo"}', '{"ticker": "SAP"}']


@pytest.mark.parametrize(
    "row, message",
    [
        (_glaive(call="get_weather(Oslo)"), "row 0: field 'conversations[1].value': a tool call must be JSON"),
        (
            _glaive(call='{"name": "get_stock", "arguments": {}}'),
            "row 0: field 'conversations[1].value': call to tool 'get_stock', which is not in tools "
            "(tools: get_weather)",
        ),
        (
            _glaive(
                conversations=[
                    {"from": "human", "value": "Weather?"},
                    {"from": "gpt", "value": "Let me look."},
                    {"from": "observation", "value": '{"temp_c": 3}'},
                    {"from": "gpt", "value": "3 °C."},
                ]
            ),
            "row 0: field 'conversations[2].from': tool turn without an assistant call before it",
        ),
        (
            _glaive(call='{"name": "get_weather", "arguments": "{city: Oslo}"}'),
            "row 0: field 'conversations[1].value': the call's arguments are not JSON",
        ),
        ({**_glaive(), "tools": "[{"}, "row 0: field 'tools': not valid JSON"),
    ],
)
def test_bad_tool_rows_name_file_row_and_field(tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=r"^" + str(path).replace(".", r"\.") + ": " + _escape(message)):
        _prepare(tmp_path, [path], strict=True)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


# ----------------------------------------------------------------------------------------------
# Rendering and the loss mask, on the rendered tokens
# ----------------------------------------------------------------------------------------------
def _swift_record(tmp_path: Path) -> dict:
    out = _prepare(tmp_path, [_write(tmp_path / "swift.jsonl", [_swift()])], system_prompt="Be brief.")
    return _records(out)[0]


def test_chatml_template_renders_tools_and_masks_only_the_assistant(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert training_chat_template(tokenizer) == CHATML_TRAINING_TEMPLATE  # SmolLM2: ChatML, unknown to TRL
    enc = tokenize_record(tokenizer, _swift_record(tmp_path), CHATML_TRAINING_TEMPLATE)
    text = tokenizer.decode(enc["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions")
    assert "<tools>\n" + json.dumps({"type": "function", "function": WEATHER}, ensure_ascii=False) + "\n" in text
    assert json.dumps({"type": "function", "function": STOCK}, ensure_ascii=False) + "\n</tools>" in text
    assert '<|im_start|>user\n<tool_response>\n{"temp_c": 3}\n</tool_response>\n<tool_response>\n' in text
    assert _masked(tokenizer, enc) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "stock_price", "arguments": {"ticker": "SAP"}}\n</tool_call><|im_end|>',
        "3 °C, and SAP is at 201.50 EUR.<|im_end|>",
    ]


def test_qwen25_template_renders_tools_and_masks_only_the_assistant(tmp_path):
    tokenizer = qwen2_tokenizer()
    tokenizer.chat_template = QWEN25_TEMPLATE.read_text(encoding="utf-8")
    template = training_chat_template(tokenizer)  # TRL's training variant of Qwen2.5's template
    assert template and "{% generation %}" in template.replace("{%- generation %}", "{% generation %}")
    enc = tokenize_record(tokenizer, _swift_record(tmp_path), template)
    text = tokenizer.decode(enc["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n")
    assert json.dumps({"type": "function", "function": STOCK}, ensure_ascii=False) in text
    assert text.count("<tool_call>\n{") == 3  # the instruction's example and the two calls
    assert [run.strip("\n") for run in _masked(tokenizer, enc)] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "stock_price", "arguments": {"ticker": "SAP"}}\n</tool_call><|im_end|>',
        "3 °C, and SAP is at 201.50 EUR.<|im_end|>",
    ]


# ----------------------------------------------------------------------------------------------
# The CLI and the SFT stage on the tiny model
# ----------------------------------------------------------------------------------------------
def test_data_check_and_sft_train_on_tool_rows(tmp_path, tiny_model_dir, capsys):
    from flows.cli import main
    from tasks.sft.stage import SFTParams, make_job, train

    files = {
        "glaive": _write(tmp_path / "glaive.jsonl", [_glaive()] * 1 + [_glaive(tools=(WEATHER, STOCK))]),
        "openai": _write(tmp_path / "openai.jsonl", [_openai()]),
        "swift": _write(tmp_path / "swift.jsonl", [_swift()]),
    }
    for name, path in files.items():
        out = tmp_path / f"check-{name}"
        code = main(["data", "check", str(path), "--model", str(tiny_model_dir), "--out", str(out)])
        printed = capsys.readouterr().out
        assert code == 0 and f"{name}.jsonl" in printed and "(local folder)" in printed
        assert all(r.get("tools") for r in _records(out) + _records(out, "validation"))

    out = tmp_path / "data"
    prepare(
        DataParams(datasets=[f"{p}#4" for p in files.values()], validation_ratio=0.0), out, model=str(tiny_model_dir)
    )
    cfg = SFTParams(profile="cpu", max_steps=2, per_device_batch_size=1, max_length=512, save_steps=2, logging_steps=1)
    metrics = train(make_job(cfg, tiny_model_dir, out, tmp_path / "scratch", "cpu"))
    assert metrics["global_step"] == 2 and metrics["train_tokens"] > 0
