"""An independent check of the held-out split: how many validation rows a stricter key finds in train.

The split decides sides with ``split.prompt_key``; counting its overlap with the same key reads 0 by
construction, whatever the key misses. This module shares no code with ``split`` and compares more
coarsely — letters and digits only, after NFKD with accents stripped and case folded, so symbols,
accents and every mark are gone too — and on three measures, so the report can disagree with the split:

- ``all_user_turns``: validation rows whose user turns, all of them in order, are a training row's;
- ``first_user_turn``: validation rows whose first user turn opens a training row;
- ``any_user_turn``: validation rows with any non-trivial user turn (``MIN_CHARS`` letters or digits or
  more: "yes", "continue" are not a prompt) that appears anywhere among the training rows' user turns.
"""

from __future__ import annotations

import unicodedata
from typing import Any

#: A user turn shorter than this (in letters and digits) is too generic to call a shared prompt.
MIN_CHARS = 16


def coarse(text: str) -> str:
    """Letters and digits only, accents stripped, case folded: coarser than the split's key.

    >>> coarse("Café — 2 + 2 = ?") == coarse("cafe 2 2")
    True
    """
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if c.isalnum() and not unicodedata.combining(c)).casefold()


def _user_turns(messages: list[dict[str, Any]]) -> list[str]:
    return [coarse(str(m.get("content") or "")) for m in messages if m.get("role") == "user"]


def held_out_check(train: list[list[dict[str, Any]]], validation: list[list[dict[str, Any]]]) -> dict[str, int]:
    """Validation rows found in ``train`` by each measure (see the module docstring).

    >>> row = lambda *turns: [{"role": r, "content": c} for c in turns for r in ("user", "assistant")][::2]
    >>> train = [row("What is 2+2?", "And times 3, then add 10, please?")]
    >>> held_out_check(train, [row("what is 2 + 2"), row("Hi", "and times 3 then add 10 please")])
    {'validation_rows': 2, 'all_user_turns': 0, 'first_user_turn': 1, 'any_user_turn': 1}
    """
    whole = {tuple(turns) for m in train if (turns := _user_turns(m))}
    firsts = {turns[0] for turns in whole}
    anywhere = {t for turns in whole for t in turns if len(t) >= MIN_CHARS}
    counts = {"validation_rows": len(validation), "all_user_turns": 0, "first_user_turn": 0, "any_user_turn": 0}
    for m in validation:
        turns = _user_turns(m)
        counts["all_user_turns"] += bool(turns) and tuple(turns) in whole
        counts["first_user_turn"] += bool(turns) and turns[0] in firsts
        counts["any_user_turn"] += any(len(t) >= MIN_CHARS and t in anywhere for t in turns)
    return counts


def check_line(check: dict[str, int] | None) -> str:
    """The report's line for ``held_out_check``.

    >>> check_line({"validation_rows": 9, "all_user_turns": 0, "first_user_turn": 1, "any_user_turn": 2})[-105:]
    '9 validation rows, 0 have all their user turns in train, 1 its first user turn, 2 a non-trivial user turn'
    """
    if not check:
        return "held-out check: not computed"
    return (
        f"held-out check (independent key, letters and digits only): of {check['validation_rows']} validation rows, "
        f"{check['all_user_turns']} have all their user turns in train, {check['first_user_turn']} its first "
        f"user turn, {check['any_user_turn']} a non-trivial user turn"
    )


class HeldOutCheck:
    """``held_out_check`` for a training split too big to hold: the validation rows (capped, small) are
    held, the training rows are shown one at a time (``see``), and ``counts`` gives the same numbers.

    >>> row = lambda *turns: [{"role": r, "content": c} for c in turns for r in ("user", "assistant")][::2]
    >>> check = HeldOutCheck([row("what is 2 + 2"), row("Hi", "and times 3 then add 10 please")])
    >>> check.see(row("What is 2+2?", "And times 3, then add 10, please?"))
    >>> check.counts()
    {'validation_rows': 2, 'all_user_turns': 0, 'first_user_turn': 1, 'any_user_turn': 1}
    """

    def __init__(self, validation: list[list[dict[str, Any]]]):
        self._validation = [_user_turns(m) for m in validation]
        self._wanted_whole = {tuple(turns) for turns in self._validation if turns}
        self._wanted_first = {turns[0] for turns in self._validation if turns}
        self._wanted_any = {t for turns in self._validation for t in turns if len(t) >= MIN_CHARS}
        self._whole: set[tuple[str, ...]] = set()
        self._first: set[str] = set()
        self._any: set[str] = set()

    def see(self, messages: list[dict[str, Any]]) -> None:
        """One training row: remember only what a validation row asks about."""
        turns = _user_turns(messages)
        if not turns:
            return
        if (whole := tuple(turns)) in self._wanted_whole:
            self._whole.add(whole)
        if turns[0] in self._wanted_first:
            self._first.add(turns[0])
        self._any.update(t for t in turns if len(t) >= MIN_CHARS and t in self._wanted_any)

    def counts(self) -> dict[str, int]:
        counts = {"validation_rows": len(self._validation), "all_user_turns": 0, "first_user_turn": 0}
        counts["any_user_turn"] = 0
        for turns in self._validation:
            counts["all_user_turns"] += bool(turns) and tuple(turns) in self._whole
            counts["first_user_turn"] += bool(turns) and turns[0] in self._first
            counts["any_user_turn"] += any(len(t) >= MIN_CHARS and t in self._any for t in turns)
        return counts
