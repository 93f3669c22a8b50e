"""The split sees through disguises (tasks/data/split.py) and the report checks it with an independent key
(tasks/data/overlap.py): property tests generate what real mixes do to a prompt, and GSM8K mixed with a
lightly cleaned copy of itself keeps every question on one side.

Offline: generated rows, and ../shared/data's GSM8K for the mixed-copy test.
"""

from __future__ import annotations

import json
import unicodedata

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.data import DataParams, prepare
from tasks.data.overlap import coarse, held_out_check
from tasks.data.split import prompt_key, split_rows

WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789éü你好世界数学题", min_size=1)
ZWSP = "\u200b"


def _fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else ("\u3000" if c == " " else c) for c in text)


def _drop_chinese_punctuation(text: str) -> str:
    return "".join(c for c in text if c not in "，。、？！：；“”‘’（）")


#: What the issue saw real mixes do to one prompt, each a function of the text and a position.
DISGUISES = {
    "trailing ?": lambda t, i: t + "?",
    "?? for ?": lambda t, i: t.replace("?", "??"),
    "。 for .": lambda t, i: t.replace(".", "。"),
    "、 for ，": lambda t, i: t.replace("，", "、"),
    "Chinese punctuation dropped": lambda t, i: _drop_chinese_punctuation(t),
    "’ for '": lambda t, i: t.replace("'", "’"),
    "zero-width space": lambda t, i: t[: i % (len(t) + 1)] + ZWSP + t[i % (len(t) + 1) :],
    "zero-width joiner": lambda t, i: t[: i % (len(t) + 1)] + "\u200d" + t[i % (len(t) + 1) :],
    "upper case": lambda t, i: t.upper(),
    "full-width": lambda t, i: _fullwidth(t),
    "spaces and newlines": lambda t, i: "  " + t.replace(" ", " \n\t ") + "\u00a0 ",
    "trailing period": lambda t, i: t.rstrip(".?!。？") + ".",
}


@st.composite
def prompts(draw) -> str:
    words = draw(st.lists(WORDS, min_size=1, max_size=8))
    seps = draw(st.lists(st.sampled_from([" ", ", ", "，", "、", " - ", "'", "。", ". "]), min_size=len(words)))
    end = draw(st.sampled_from(["", "?", "？", ".", "。", "!"]))
    return unicodedata.normalize("NFC", "".join(w + s for w, s in zip(words, seps)).strip() + end)


@st.composite
def disguised(draw) -> tuple[str, list[str]]:
    text = draw(prompts())
    copies = []
    for _ in range(draw(st.integers(1, 4))):
        names = draw(st.lists(st.sampled_from(sorted(DISGUISES)), min_size=1, max_size=4))
        at = draw(st.integers(0, 200))
        copy = text
        for name in names:
            copy = DISGUISES[name](copy, at)
        copies.append(copy)
    return text, copies


def _row(*turns: str) -> list[dict[str, str]]:
    out = []
    for k, turn in enumerate(turns):
        out += [{"role": "user", "content": turn}, {"role": "assistant", "content": f"answer {k}"}]
    return out


FILLER = [_row(f"filler question number {i} about something else") for i in range(60)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(disguised(), st.floats(0.05, 0.95))
def test_disguised_copies_of_a_prompt_land_on_one_side(family, ratio):
    text, copies = family
    rows = [_row(text), *(_row(c) for c in copies), _row(copies[0], "and a follow-up question, please")]
    assert len({prompt_key(m) for m in rows}) == 1, [prompt_key(m) for m in rows]
    train, validation = split_rows(FILLER + rows, ratio)
    ours = [m for m in validation if m in rows], [m for m in train if m in rows]
    assert sorted(map(len, ours)) == [0, len(rows)], f"{text!r} split from {copies!r}"


@settings(max_examples=200, deadline=None)
@given(prompts(), st.lists(prompts(), min_size=1, max_size=3), st.lists(prompts(), min_size=1, max_size=3))
def test_rows_sharing_their_first_user_turn_share_a_side(first, later_a, later_b):
    a, b = _row(first, *later_a), _row(first.upper() + " ", *later_b)
    train, validation = split_rows(FILLER + [a, b], 0.5)
    assert (a in validation) == (b in validation)


@settings(max_examples=200, deadline=None)
@given(prompts(), prompts())
def test_the_independent_check_is_at_least_as_coarse_as_the_split_key(one, two):
    # Whatever the split's key merges, the report's key merges too: so what the check counts is a real
    # disagreement with the split, not a difference of normalisation it would always find.
    if prompt_key(_row(one)) == prompt_key(_row(two)):
        assert coarse(one) == coarse(two)


def test_gsm8k_mixed_with_a_lightly_cleaned_copy_keeps_each_question_on_one_side(tmp_path, shared_data):
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:600]]
    original = tmp_path / "gsm8k.jsonl"
    original.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def clean(q: str) -> str:  # what a team's "light cleaning" does: quotes, spacing, final punctuation
        return q.replace("'", "’").replace("  ", " ").replace("?", " ?").rstrip(".") + "\u200b"

    cleaned = tmp_path / "gsm8k_clean.jsonl"
    cleaned.write_text("".join(json.dumps({**r, "question": clean(r["question"])}) + "\n" for r in rows))
    out = tmp_path / "out"
    params = DataParams(
        datasets=[str(original), str(cleaned)], validation_ratio=0.2, validation_max_rows=1000, system_prompt=""
    )
    metrics = prepare(params, out, model=None)
    train, validation = (
        [json.loads(x)["messages"] for x in (out / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "validation")
    )
    assert metrics["validation_rows"] > 100
    questions = {coarse(m[0]["content"]) for m in train if m[0]["role"] == "user"}
    leaked = [m for m in validation if coarse(next(t["content"] for t in m if t["role"] == "user")) in questions]
    assert not leaked, f"{len(leaked)} of {len(validation)} validation questions are in train"
    check = metrics["held_out_check"]
    assert check == {"validation_rows": len(validation), "all_user_turns": 0, "first_user_turn": 0, "any_user_turn": 0}
    assert "held-out check (independent key" in (out / "report.md").read_text()


def test_the_report_disagrees_when_the_split_key_misses_a_prompt():
    # Two prompts the split tells apart (a dash is punctuation, a plus is a symbol: "2-2" and "2+2" differ)
    # but the independent check folds together: the report counts it, so it can disagree with the split.
    train = [_row("Compute 12 + 30 for the grocery bill total")]
    validation = [_row("Compute 12 - 30 for the grocery bill total"), _row("Something unrelated and long enough")]
    assert prompt_key(train[0]) != prompt_key(validation[0])
    assert held_out_check(train, validation) == {
        "validation_rows": 2,
        "all_user_turns": 1,
        "first_user_turn": 1,
        "any_user_turn": 1,
    }
