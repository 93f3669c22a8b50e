"""The train/validation split, held out by construction: normalised text, per-source dedupe, and a split
by a stable hash of each conversation's prompt (its first user turn, with its disguises removed), so no
prompt is ever on both sides and a row keeps its side from night to night.

A prompt is in validation iff ``sha256(prompt_text(first user turn))``, read as a number in [0, 1), is
below ``validation_ratio``. Nothing that changes between nights goes into the hash (not ``data.seed``, not
the other sources, not ``#N``), and each row is decided alone, so the split also works on streamed rows.
``prompt_text`` folds what real mixes disguise a prompt with (width, case, quotes, punctuation, spaces,
zero-width characters); docs/data.md says what still counts as a different prompt. The data report
checks the result with an independent, stricter key (``tasks/data/overlap.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

Messages = list[dict[str, str]]

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The text as compared for duplicates and prompts: NFKC, case-folded, whitespace collapsed, stripped.

    >>> normalise("  Ｗhat is\\n 2 +  2？ ")
    'what is 2 + 2?'
    """
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


#: Typographic quotes and primes folded to ASCII. Punctuation is removed after this anyway; folding first
#: keeps the rule readable when the removal below is ever narrowed.
_QUOTES = str.maketrans("‘’‚‛′´`“”„‟″", "'''''''\"\"\"\"\"")
#: Unicode categories that never make two prompts different: punctuation (P*: ``?``, ``。``, ``、``,
#: quotes, dashes), separators (Z*: spaces of every width) and other (C*: controls such as newlines and
#: tabs, format characters such as the zero-width space and joiner, private use, unassigned).
_DROPPED = frozenset("PZC")


def prompt_text(text: str) -> str:
    """A user turn as the split compares it: NFKC (full-width forms, ligatures), case folded (NFKC again
    after, as Unicode's NFKC_Casefold does), quotes folded, then every punctuation, separator, whitespace
    and format character removed. Letters, digits and symbols (``+``, ``$``, ``=``, emoji) stay.

    >>> prompt_text("  Ｗhat is\\n 2 +  2？ ") == prompt_text("what is 2+2??") == prompt_text("What\\u200b is 2 + 2.")
    True
    >>> prompt_text("他说：“你好，世界。”") == prompt_text("他说你好、世界")
    True
    >>> prompt_text("2 + 2") == prompt_text("2 - 2")
    False
    """
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold()).translate(_QUOTES)
    return "".join(c for c in folded if unicodedata.category(c)[0] not in _DROPPED and not c.isspace())


def prompt_key(messages: Messages) -> str:
    """What decides a row's side: ``prompt_text`` of its first user turn. Rows with the same first user
    turn share a key whatever follows (other answers, system prompts, later turns: a conversation's
    prefix is a prompt too), so they land on the same side; the key is the same for every source.

    >>> prompt_key([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  THERE!"},
    ...             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And you?"}])
    'hithere'
    """
    return next((prompt_text(m["content"]) for m in messages if m["role"] == "user"), "")


def conversation_key(messages: Messages) -> str:
    """The whole normalised conversation (every role and turn): what makes two rows duplicates."""
    turns = [[m["role"], normalise(m["content"]), m.get("tool_calls")] for m in messages]
    return json.dumps([messages[0].get("tools") if messages else None, turns], ensure_ascii=False)


def position(key: str) -> float:
    """A key's place in [0, 1): the first 64 bits of its SHA-256. Not Python's ``hash()``, which is salted
    per process: the same prompt must get the same place on every machine, every night.

    >>> round(position("what is 2 + 2?"), 4)
    0.4108
    """
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) / 2**64


def prompt_position(messages: Messages) -> float:
    return position(prompt_key(messages))


def dedupe(rows: list[Messages]) -> tuple[list[Messages], int]:
    """Rows without repeats of a whole normalised conversation (the first one is kept), and how many went.

    >>> rows = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": " hi "}]]
    >>> dedupe(rows)
    ([[{'role': 'user', 'content': 'Hi'}]], 1)
    """
    seen: set[str] = set()
    unique = []
    for messages in rows:
        key = conversation_key(messages)
        if key not in seen:
            seen.add(key)
            unique.append(messages)
    return unique, len(rows) - len(unique)


def split_rows(rows: list[Messages], ratio: float) -> tuple[list[Messages], list[Messages]]:
    """(train, validation) of one source's rows, in their order. A prompt is in validation iff its
    position is below ``ratio``; when none is and the source has two prompts or more, the prompt with the
    smallest position is (at least one validation row per source, chosen by the hash alone, so it too is
    the same every night). A source with a single prompt keeps it for training. Below, the five repeated
    rows follow their prompts (q4 is held out twice).

    >>> rows = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(40)]
    >>> train, validation = split_rows(rows + rows[:5], 0.1)
    >>> len(train) + len(validation), sorted(prompt_key(m) for m in validation)
    (45, ['q15', 'q18', 'q19', 'q24', 'q38', 'q4', 'q4', 'q7'])
    >>> [len(part) for part in split_rows(rows, 0.0001)]
    [39, 1]
    """
    if ratio <= 0 or not rows:
        return list(rows), []
    keys = [prompt_key(m) for m in rows]
    places = {key: position(key) for key in set(keys)}
    held = {key for key, place in places.items() if place < ratio}
    if not held and len(places) > 1:
        held = {min(places, key=places.__getitem__)}
    train = [m for m, key in zip(rows, keys) if key not in held]
    validation = [m for m, key in zip(rows, keys) if key in held]
    return train, validation


def lowest(rows: list[Messages], n: int | None) -> list[Messages]:
    """The ``n`` rows with the smallest prompt positions (all when ``n`` is None or larger), in their
    order: ``#N`` on a validation dataset. Chosen by the hash, not ``data.seed``, so the same rows are
    held out every night; never repeated (a validation row counts once).

    >>> rows = [[{"role": "user", "content": c}] for c in "abcd"]
    >>> [m[0]["content"] for m in lowest(rows, 2)]
    ['c', 'd']
    """
    if n is None or n >= len(rows):
        return list(rows)
    picked = set(sorted(range(len(rows)), key=lambda i: prompt_position(rows[i]))[:n])
    return [m for i, m in enumerate(rows) if i in picked]


def remove_prompts(rows: list[Messages], prompts: set[str]) -> tuple[list[Messages], int]:
    """Rows whose prompt is not in ``prompts`` (the validation prompts), and how many were removed."""
    kept = [m for m in rows if prompt_key(m) not in prompts]
    return kept, len(rows) - len(kept)


def cap(parts: list[list[Messages]], max_rows: int) -> list[list[Messages]]:
    """At most ``max_rows`` validation rows over all sources: the ones with the smallest positions, each
    source's first row before any second one (so every source keeps a row while the cap allows).

    >>> a = [[{"role": "user", "content": c}] for c in "abcd"]
    >>> [[m[0]["content"] for m in part] for part in cap([a, a[:1]], 3)]
    [['c', 'd'], ['a']]
    """
    ranked = sorted((prompt_position(m), k, i) for k, part in enumerate(parts) for i, m in enumerate(part))
    chosen = capped(ranked, max_rows)
    return [[m for i, m in enumerate(part) if (k, i) in chosen] for k, part in enumerate(parts)]


def capped(ranked: list[tuple[float, int, int]], max_rows: int) -> set[tuple[int, int]]:
    """The ``(source, row)`` pairs :func:`cap` keeps from ``(position, source, row)`` entries in position
    order: each source's first row (lowest positions first), then the rest by position, ``max_rows`` in all."""
    firsts: dict[int, tuple[float, int, int]] = {}
    for entry in ranked:
        firsts.setdefault(entry[1], entry)
    chosen = {(k, i) for _, k, i in sorted(firsts.values())[:max_rows]}
    for _, k, i in ranked:
        if len(chosen) >= max_rows:
            break
        chosen.add((k, i))
    return chosen


def in_hash_order(parts: list[list[Messages]]) -> list[Messages]:
    """The validation rows of every source as one list, by prompt position: the same order every night,
    so a consumer that reads the first N rows (the evaluation stage) reads the same N."""
    ranked = sorted((prompt_position(m), k, i) for k, part in enumerate(parts) for i, m in enumerate(part))
    return [parts[k][i] for _, k, i in ranked]


def prompt_overlap(train: list[Messages], validation: list[Messages]) -> int:
    """How many distinct prompts are in both splits (computed on what is written; 0 by construction).

    >>> row = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    >>> prompt_overlap([row("Hi", "1"), row("Bye", "2")], [row("hi?", "3")])
    1
    """
    return len({prompt_key(m) for m in train} & {prompt_key(m) for m in validation})
