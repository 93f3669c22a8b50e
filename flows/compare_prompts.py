"""The prompts of ``tuneline compare``: a JSONL file (or ``--prompt`` texts) read and checked before
any model loads; a bad row is one line naming the file, the row and the field.

One row per line, blank lines skipped. A row is a JSON object with either ``prompt`` (one user turn,
optionally with a ``system`` prompt) or ``messages`` (a conversation of ``system`` / ``user`` /
``assistant`` turns ending with the user's: every model answers the last turn in that context), and
an optional ``id`` shown as the row's title. A bare JSON string is a ``prompt``. Files shipped in
``flows/prompts/`` are found by name (``after-retrain``)::

    {"id": "identity", "prompt": "Who are you?"}
    {"id": "follow-up", "messages": [{"role": "user", "content": "Name a pet quokka."},
                                     {"role": "assistant", "content": "Pip."},
                                     {"role": "user", "content": "Why that name?"}]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows.errors import InputError, read_text

SHIPPED = Path(__file__).resolve().parent / "prompts"
DEFAULT_PROMPTS = "after-retrain"
MAX_PROMPTS_BYTES = 1 << 20
MAX_PROMPTS = 200


class Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class PromptRow(BaseModel):
    """One row of a prompts file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, min_length=1, max_length=80, description="Title of the row in the table.")
    prompt: str | None = Field(None, min_length=1, description="One user turn.")
    system: str | None = Field(None, min_length=1, description="A system prompt before `prompt`.")
    messages: list[Turn] | None = Field(None, min_length=1, description="A conversation ending with a user turn.")

    def conversation(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [t.model_dump() for t in self.messages]
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": self.prompt or ""}
        ]


def _loc(parts: tuple) -> str:
    """``("messages", 1, "role")`` → ``messages[1].role``."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(the row)"


def _field_problem(row: PromptRow) -> tuple[str, str] | None:
    """What pydantic cannot say per field: which of prompt/messages, where the turns may be."""
    if (row.prompt is None) == (row.messages is None):
        return "prompt/messages", "give either 'prompt' (one question) or 'messages' (a conversation), not both"
    if row.messages is None:
        return None
    if row.system is not None:
        return "system", "with 'messages', put the system prompt as their first turn"
    last = len(row.messages) - 1
    if row.messages[last].role != "user":
        return f"messages[{last}].role", "the last turn must be the user's (the models answer it)"
    for n, turn in enumerate(row.messages):
        if turn.role == "system" and n > 0:
            return f"messages[{n}].role", "a system turn may only come first"
    return None


def parse_row(raw: object) -> PromptRow:
    """One decoded JSON row as a ``PromptRow``; ``ValueError("FIELD: why")`` when it is not one."""
    if isinstance(raw, str):
        raw = {"prompt": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"(the row): a JSON object or string, not {type(raw).__name__}")
    try:
        row = PromptRow.model_validate(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        # keys a user typed are quoted only when short (a row may be a whole file pasted on one line)
        loc = _loc(tuple(p if isinstance(p, int) or len(str(p)) <= 40 else "<key>" for p in errors[0]["loc"]))
        raise ValueError(f"{loc}: {errors[0]['msg']}") from None
    problem = _field_problem(row)
    if problem:
        raise ValueError(f"{problem[0]}: {problem[1]}")
    return row


def prompts_path(name: str) -> Path:
    """A file, or the name of a shipped one (``after-retrain`` → flows/prompts/after-retrain.jsonl)."""
    path = Path(name).expanduser()
    shipped = SHIPPED / f"{name}.jsonl"
    if not path.exists() and "/" not in name and shipped.is_file():
        return shipped
    return path


def load_prompts(name: str) -> list[tuple[str, list[dict[str, str]]]]:
    """Every row of a prompts file as ``(title, conversation)``; an ``InputError`` naming the file,
    the row and the field on the first bad row, before anything else happens."""
    path = prompts_path(name)
    where = f"prompts file {path}"
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.jsonl")))
        raise InputError(f"{where}: no such file (shipped prompts: {shipped})")
    text = read_text(path, "prompts file", MAX_PROMPTS_BYTES)
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: row {number}: not JSON ({e.msg}, column {e.colno})") from None
        try:
            row = parse_row(raw)
        except ValueError as e:
            raise InputError(f"{where}: row {number}, field {e}") from None
        out.append((row.id or f"row {number}", row.conversation()))
        if len(out) > MAX_PROMPTS:
            raise InputError(f"{where}: more than {MAX_PROMPTS} prompts (each is answered twice by every model)")
    if not out:
        raise InputError(f"{where}: no prompts in it")
    return out


def gather_prompts(files: list[str] | None, texts: list[str] | None) -> list[tuple[str, list[dict[str, str]]]]:
    """The prompts of the files, then the texts; the shipped ``after-retrain`` when neither is given."""
    texts = texts or []
    for n, text in enumerate(texts, 1):
        if not text.strip():
            raise InputError(f"--prompt number {n} is empty")
    rows = [row for f in files or ([] if texts else [DEFAULT_PROMPTS]) for row in load_prompts(f)]
    return rows + [(f"prompt {n}", [{"role": "user", "content": t}]) for n, t in enumerate(texts, 1)]
