"""Row formats: detect a row's format from its field names, convert it to chat turns, check the turns
and fill ``{{NAME}}`` / ``{{AUTHOR}}``; ``load_source`` does all of it for one source.

A converted row is a list of (role, content, content field, role field) turns: the fields name the
source's own fields in errors (``field 'conversations[1].value': empty assistant turn``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

from tasks.data.report import SourceReport, skipped_text
from tasks.data.specs import DataError, DataParams, Spec
from tasks.data.tools import ToolError, merge_calls, parse_tools, with_tools

# Detection order: the first format whose key fields are all present wins.
FORMAT_KEYS: list[tuple[str, tuple[str, ...]]] = [
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("alpaca", ("instruction", "output")),
    ("query_response", ("query", "response")),
    ("prompt_completion", ("prompt", "completion")),
    ("problem_solution", ("problem", "solution")),
    ("question_answer", ("question", "answer")),
]
_SHAREGPT_ROLES = {  # ms-swift's MessagesPreprocessor names, plus OpenAI's
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "tool_call",
    "tool_call": "tool_call",
    "observation": "tool",
    "observations": "tool",
    "function_response": "tool",
    "tool_response": "tool",
    "tool": "tool",
    "function": "tool",
}
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_PLACEHOLDER = re.compile(r"\{\{\s*(?i:name|author)\s*\}\}")


class _RowError(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def detect_format(row: dict[str, Any]) -> str | None:
    """The first format whose key fields the row has.

    >>> detect_format({"instruction": "hi", "input": "", "output": "hello"})
    'alpaca'
    >>> detect_format({"question": "1+1?", "answer": "#### 2"})
    'question_answer'
    """
    return next((name for name, keys in FORMAT_KEYS if all(k in row for k in keys)), None)


def _get(row: dict[str, Any], key: str, required: bool = True) -> Any:
    if key not in row or row[key] is None:
        if required:
            raise _RowError(key, "missing field")
        return None
    return row[key]


def _history(row: dict[str, Any]) -> list[tuple[str, Any, str, str]]:
    turns: list[tuple[str, Any, str, str]] = []
    history = _get(row, "history", required=False) or []
    if not isinstance(history, list):
        raise _RowError("history", "must be a list of [query, response] pairs")
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _RowError(f"history[{i}]", "must be a [query, response] pair")
        turns += [
            ("user", pair[0], f"history[{i}][0]", "history"),
            ("assistant", pair[1], f"history[{i}][1]", "history"),
        ]
    return turns


def _system(row: dict[str, Any]) -> list[tuple[str, Any, str, str]]:
    system = _get(row, "system", required=False)
    return [("system", system, "system", "system")] if system else []


def _convert(fmt: str, row: dict[str, Any]) -> list[tuple[Any, Any, str, str]]:
    if fmt == "messages":
        messages = _get(row, "messages")
        if not isinstance(messages, list):
            raise _RowError("messages", "must be a list of {role, content}")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise _RowError(f"messages[{i}]", "must be an object with role and content")
            role, content = m.get("role"), m.get("content")
            role = _SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
            where, role_field = f"messages[{i}].content", f"messages[{i}].role"
            calls = m.get("tool_calls")
            if role == "assistant" and calls:  # OpenAI: text (maybe none) and calls in one message
                if not isinstance(calls, list):
                    raise _RowError(f"messages[{i}].tool_calls", "must be a list of calls")
                turns.append((role, "" if content is None else content, where, role_field))
                turns += [("tool_call", c, f"messages[{i}].tool_calls[{j}]", role_field) for j, c in enumerate(calls)]
                continue
            if role in ("tool", "tool_call") and isinstance(content, (dict, list)):
                content = json.dumps(content, ensure_ascii=False)
            turns.append((role, content, where, role_field))
        return turns
    if fmt == "sharegpt":
        conversations = _get(row, "conversations")
        if not isinstance(conversations, list):
            raise _RowError("conversations", "must be a list of {from, value}")
        turns = _system(row)
        for i, m in enumerate(conversations):
            if not isinstance(m, dict):
                raise _RowError(f"conversations[{i}]", "must be an object with from and value")
            speaker = m.get("from", m.get("role"))
            if speaker not in _SHAREGPT_ROLES:
                raise _RowError(
                    f"conversations[{i}].from", f"unknown speaker {speaker!r} (expected {', '.join(_SHAREGPT_ROLES)})"
                )
            role, content = _SHAREGPT_ROLES[speaker], m.get("value", m.get("content"))
            if role == "tool" and isinstance(content, (dict, list)):
                content = json.dumps(content, ensure_ascii=False)
            turns.append((role, content, f"conversations[{i}].value", f"conversations[{i}].from"))
        return turns
    if fmt in ("alpaca", "query_response"):
        q, a = ("instruction", "output") if fmt == "alpaca" else ("query", "response")
        prompt = _get(row, q)
        extra = _get(row, "input", required=False) if fmt == "alpaca" else None
        if extra:
            if not isinstance(extra, str) or not isinstance(prompt, str):
                raise _RowError("input" if not isinstance(extra, str) else q, "must be a string")
            prompt = f"{prompt}\n{extra}"
        return [*_system(row), *_history(row), ("user", prompt, q, q), ("assistant", _get(row, a), a, a)]
    if fmt == "prompt_completion":
        prompt, completion = _get(row, "prompt"), _get(row, "completion")
        if isinstance(prompt, list):  # TRL's conversational prompt-completion
            turns = _convert("messages", {"messages": prompt + (completion if isinstance(completion, list) else [])})
            return [
                (r, c, f.replace("messages", "prompt", 1), g.replace("messages", "prompt", 1)) for r, c, f, g in turns
            ]
        return [
            *_system(row),
            ("user", prompt, "prompt", "prompt"),
            ("assistant", completion, "completion", "completion"),
        ]
    q, a = ("question", "answer") if fmt == "question_answer" else ("problem", "solution")
    return [*_system(row), ("user", _get(row, q), q, q), ("assistant", _get(row, a), a, a)]


def _check_turns(turns: list[tuple[Any, Any, str, str, Any]]) -> None:
    """Roles in a valid order, strings, valid UTF-8, non-empty user and assistant turns (an assistant
    turn may be calls alone), every tool result after a call."""
    if not turns:
        raise _RowError("messages", "no turns")
    prev = None
    for i, (role, content, where, role_field, calls) in enumerate(turns):
        if not isinstance(role, str) or role not in ("system", "user", "assistant", "tool"):
            raise _RowError(role_field, f"unknown role {role!r}")
        if not isinstance(content, str):
            raise _RowError(where, f"must be a string, got {type(content).__name__}")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _RowError(where, f"invalid UTF-8 (lone surrogate at character {e.start})") from None
        if role == "system":
            if i != 0:
                raise _RowError(role_field, f"system turn at position {i}: only the first turn may be a system turn")
        elif role == "user":
            if prev == "user":
                raise _RowError(role_field, "two user turns in a row")
            if prev == "tool":
                raise _RowError(role_field, "a user turn after a tool turn (the assistant must answer the tool first)")
        elif role == "assistant":
            if prev not in ("user", "tool"):
                raise _RowError(role_field, "assistant turn without a user turn before it")
        elif prev != "tool" and not (prev == "assistant" and turns[i - 1][4]):
            raise _RowError(role_field, "tool turn without an assistant call before it")
        if role in ("user", "assistant") and not content.strip() and not calls:
            raise _RowError(where, f"empty {role} turn")
        prev = role
    if prev != "assistant":
        raise _RowError(turns[-1][3], f"the conversation ends with a {prev} turn, not an assistant answer")


def _fill(content: Any, name: str, author: str) -> Any:
    if isinstance(content, str) and "{{" in content:
        for key, value in (("{{NAME}}", name), ("{{name}}", name), ("{{AUTHOR}}", author), ("{{author}}", author)):
            content = content.replace(key, value)
        if m := _PLACEHOLDER.search(content):
            raise _RowError("", f"placeholder {m.group(0)!r} left after filling {{{{NAME}}}}/{{{{AUTHOR}}}}")
    return content


def _name_author(config: DataParams, lang: str | None, turns: list[tuple]) -> tuple[str, str]:
    """The row's (name, author): ``model_name`` / ``model_author`` are one value or a (zh, en) pair, and
    a pair is chosen by the row's language, as ms-swift's self-cognition does (its ``lang`` for the
    built-in set, else Chinese iff the row holds CJK characters)."""
    if lang is None:
        lang = "zh" if any(isinstance(t[1], str) and _CJK.search(t[1]) for t in turns) else "en"
    k = 0 if lang == "zh" else 1
    pick = [v if isinstance(v, str) else v[min(k, len(v) - 1)] for v in (config.model_name, config.model_author)]
    return pick[0], pick[1]


def load_source(
    spec: Spec, config: DataParams, storage_block: str | None = None
) -> tuple[list[list[dict[str, str]]], SourceReport]:
    """Read, convert and validate one source. Strict: the first bad row raises; otherwise bad rows are
    skipped and listed in the report, and more of them than ``max_bad_rows`` of the rows read raise."""
    report = SourceReport(spec=spec.text)
    return list(iter_source(spec, config, report, storage_block)), report


def iter_source(
    spec: Spec, config: DataParams, report: SourceReport, storage_block: str | None = None
) -> Iterator[list[dict[str, str]]]:
    """``load_source`` as a stream: each valid row as it is read, counted in ``report``; the checks on
    the whole source (no rows, too many bad ones) raise after the last row."""
    override = config.formats.get(spec.source, config.formats.get(spec.text, config.formats.get("*", "auto")))
    detected: dict[str, str] = {}  # per file: a folder may hold files of different formats
    rename = config.columns
    for raw in spec.read(config.seed, storage_block, config.streaming):
        report.rows_read += 1
        try:
            if raw.error:
                raise _RowError("", raw.error)
            if not isinstance(raw.row, dict):
                raise _RowError("", "row is not a JSON object")
            row = raw.row
            if rename:
                row = {rename.get(k, k): v for k, v in row.items()}
            fmt = override if override != "auto" else detected.get(raw.where)
            if fmt is None:
                fmt = detected[raw.where] = detect_format(row)
                if fmt is None:
                    raise DataError(
                        f"{raw.where}: row {raw.index}: cannot detect the format from fields {sorted(row)}; expected "
                        + " | ".join("+".join(keys) for _, keys in FORMAT_KEYS)
                        + " (rename fields with `columns`, or set `formats`)"
                    )
            tools = parse_tools(row.get("tools"))
            turns = merge_calls(_convert(fmt, row), tools, "tools")
            _check_turns(turns)
            name, author = _name_author(config, raw.row.get("lang") if spec.kind == "builtin" else None, turns)
            messages = []
            for role, content, where, _, calls in turns:
                try:
                    messages.append({"role": role, "content": _fill(content, name, author)})
                except _RowError as e:
                    raise _RowError(where, e.reason) from None
                if calls:
                    messages[-1]["tool_calls"] = calls
            if tools:
                messages = with_tools(messages, json.dumps(tools, ensure_ascii=False))
        except (_RowError, ToolError) as e:
            if config.strict:
                raise DataError(skipped_text(raw.where, raw.index, e.field, e.reason)) from None
            report.skip(raw.where, raw.index, e.field, e.reason)
            continue
        report.rows_valid += 1
        yield messages
    report.format = override if override != "auto" else ",".join(sorted(set(detected.values()))) or "?"
    if report.rows_read == 0:
        raise DataError(f"{spec.text}: the source has no rows")
    if report.rows_skipped > config.max_bad_rows * report.rows_read:
        first = "; ".join(skipped_text(**s) for s in report.skipped[:3])
        raise DataError(
            f"{spec.text}: {report.rows_skipped} of {report.rows_read} rows failed validation, more than "
            f"data.max_bad_rows={config.max_bad_rows:g} allows; first: {first}"
        )
    if not report.rows_valid:
        raise DataError(f"{spec.text}: no valid row out of {report.rows_read} (dropped: {report.dropped})")
