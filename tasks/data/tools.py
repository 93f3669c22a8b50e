"""Tool calling in the data stage: a row's ``tools`` (JSON schemas), its calls and results, read from
glaive / ms-swift sharegpt (``function_call`` / ``observation`` turns, ``tools`` as a JSON string),
OpenAI messages (``tool_calls``) and ms-swift's ``tool_call`` / ``tool_response`` roles.

A converted row carries calls the OpenAI / TRL way: an assistant message with ``tool_calls``
(``{"type": "function", "function": {"name", "arguments"}}``), results as ``tool`` messages. The
schemas and every call's ``arguments`` stay JSON *text* until rendering (``tasks.core.models.chat_inputs``):
Arrow would merge the schemas of different rows into one struct and fill the missing keys with nulls.
Inside the stage a row is its list of messages; its tools ride on the first message under ``TOOLS``
(``tools_of`` / ``with_tools``) and move to the row's top level when written (``record``).
"""

from __future__ import annotations

import json
from typing import Any

TOOLS = "tools"


class ToolError(Exception):
    """A bad tool field; ``field`` names it in the row."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def parse_tools(value: Any, field: str = "tools") -> list[dict[str, Any]] | None:
    """A row's ``tools`` (a list, or its JSON text) as OpenAI function schemas
    (``{"type": "function", "function": {...}}``; bare ``{"name", ...}`` schemas are wrapped, as
    ms-swift's ``wrap_tool`` does). None for a row without tools.

    >>> parse_tools('[{"name": "weather", "parameters": {"type": "object"}}]')
    [{'type': 'function', 'function': {'name': 'weather', 'parameters': {'type': 'object'}}}]
    """
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ToolError(field, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ToolError(field, f"must be a list of JSON schemas, got {type(value).__name__}")
    tools = []
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolError(f"{field}[{i}]", "a tool schema needs a name")
        tools.append({"type": "function", "function": fn})
    return tools


def parse_call(value: Any, field: str) -> dict[str, Any]:
    """One call: a ``function_call`` / ``tool_call`` turn's content (JSON text or an object
    ``{"name", "arguments"}``) or an OpenAI ``tool_calls`` item, as
    ``{"type": "function", "function": {"name", "arguments": <JSON text>}}``.

    >>> parse_call('{"name": "weather", "arguments": {"city": "Oslo"}}', "value")
    {'type': 'function', 'function': {'name': 'weather', 'arguments': '{"city": "Oslo"}'}}
    >>> parse_call("weather(Oslo)", "conversations[1].value")
    Traceback (most recent call last):
    ...
    tasks.data.tools.ToolError: a tool call must be JSON {"name": ..., "arguments": {...}} (Expecting value at column 1)
    """
    call = value
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except json.JSONDecodeError as e:
            raise ToolError(
                field, f'a tool call must be JSON {{"name": ..., "arguments": {{...}}}} ({e.msg} at column {e.colno})'
            ) from None
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ToolError(field, 'a tool call must be an object {"name": ..., "arguments": {...}}')
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolError(field, f"the call's arguments are not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(arguments, dict):
        raise ToolError(field, f"the call's arguments must be a JSON object, got {type(arguments).__name__}")
    arguments = json.dumps(arguments, ensure_ascii=False)
    return {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}


def merge_calls(turns: list[tuple], tools: list[dict[str, Any]] | None, tools_field: str) -> list[tuple]:
    """Fold ``tool_call`` turns into the assistant message they belong to: consecutive calls are one
    message (parallel calls), following the assistant's text when it directly precedes them. Turns
    are (role, content, content field, role field); the result's assistant turns carry a fifth item,
    their calls. Every call must name a tool of ``tools``."""
    names = {t["function"]["name"] for t in tools or []}
    out: list[tuple] = []
    for role, content, where, role_field in turns:
        if role != "tool_call":
            out.append((role, content, where, role_field, None))
            continue
        call = parse_call(content, where)
        name = call["function"]["name"]
        if name not in names:
            known = ", ".join(sorted(names)) if names else f"none: the row has no {tools_field}"
            raise ToolError(where, f"call to tool {name!r}, which is not in {tools_field} (tools: {known})")
        prev = out[-1] if out else None
        if prev and prev[0] == "assistant":
            out[-1] = (*prev[:4], [*(prev[4] or []), call])
        else:
            out.append(("assistant", "", where, role_field, [call]))
    return out


def tools_of(messages: list[dict[str, Any]]) -> str | None:
    """The row's tools as JSON text, or None."""
    return messages[0].get(TOOLS) if messages else None


def with_tools(messages: list[dict[str, Any]], tools: str | None) -> list[dict[str, Any]]:
    """``messages`` with the row's tools on its first message (and on no other)."""
    out = [{k: v for k, v in m.items() if k != TOOLS} for m in messages]
    if tools and out:
        out[0] = {**out[0], TOOLS: tools}
    return out


def record(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The row as written to ``train.jsonl`` / ``validation.jsonl``: ``{"messages"}``, plus ``"tools"``
    (JSON text) for a row with tools."""
    tools = tools_of(messages)
    row: dict[str, Any] = {"messages": with_tools(messages, None) if tools else messages}
    if tools:
        row[TOOLS] = tools
    return row
