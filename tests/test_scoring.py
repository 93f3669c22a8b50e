"""Tests for tasks.core.scoring: completion text, answer extraction, gold answers and matching."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.core import scoring as S
from tasks.core.scoring import answers_match, completion_text, extract_answer, gold_answer, is_correct


def conv(content):
    return [{"role": "assistant", "content": content}]


HUGE = "lorem ipsum 7 " * 80_000  # ~1.1 MB
MALFORMED = [
    None,
    "",
    "   ",
    conv(None),
    conv(""),
    [],
    [{"role": "assistant"}],
    [{"content": [{"type": "text", "text": "\\boxed{3}"}]}],
    {"content": 5},
    42,
    "\\boxed{" * 50_000,
    "}" * 10_000 + "{" * 10_000,
    "\\boxed{\\frac{1}{2}",
    "<answer>",
    "</answer><answer>",
    "<think><think></think></think><answer></answer>",
    "答案是 ٣ ， 🙂 \u2212\u2212 \x00 \ud800",
    HUGE,
    "9" * 20_000,
    "\\boxed{9^{9^{9^{9^{9}}}}}",
    "#### ",
    "####",
]


# ------------------------------------------------------------------------------ completion_text


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("plain", "plain"),
        (conv("hi"), "hi"),
        (
            [
                {"role": "assistant", "content": "call"},
                {"role": "tool", "content": "42"},
                {"role": "assistant", "content": "final"},
            ],
            "final",
        ),
        ([{"role": "user", "content": "only user"}], "only user"),
        (conv([{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]), "ab"),
        (conv(None), ""),
        (None, ""),
        (3.5, ""),
    ],
)
def test_completion_text(completion, expected):
    assert completion_text(completion) == expected


# ------------------------------------------------------------------------------ extract_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # \boxed
        (r"The answer is \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"first \boxed{1}, then \boxed{2}", "2"),
        (r"ok \boxed{5} then broken \boxed{6", "5"),
        (r"\boxed{\boxed{7}}", r"\boxed{7}"),
        (r"\fbox{3}", "3"),
        (r"\boxed {8}", "8"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"$\boxed{1,234}$", "1234"),
        (r"\boxed{\text{(B)}}", r"\text{(B)}"),
        # GSM8K ####
        ("She earns 24 + 48 = 72.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("####72", "72"),
        ("#### $72.00.", "72"),
        ("#### 72\nsome trailing text 5", "72"),
        ("#### -3", "-3"),
        ("#### 72 dollars", "72 dollars"),
        # <answer> tags
        ("<think>2+2</think><answer>4</answer>", "4"),
        ("<ANSWER> 4 </ANSWER>", "4"),
        (r"<answer>\boxed{5}</answer>", "5"),
        (r"<think>maybe \boxed{3}</think><answer>5</answer>", "5"),
        ("<answer>first</answer> <answer>x = 5</answer>", "x = 5"),
        ("<answer>#### 9</answer>", "9"),
        ("<answer>  </answer> so 6", "6"),
        ("<answer>6", "6"),
        # last number
        ("a 3 b 4.5 c", "4.5"),
        ("1,234,567 apples", "1234567"),
        ("It is -3 degrees", "-3"),
        ("about 3/4 cup", "3/4"),
        ("It costs $5.", "5"),
        ("grew by 50%", "50"),
        ("答案是 42。", "42"),
        ("x2 and CO2", None),
        ("0.50", "0.5"),
        ("007", "7"),
        ("\u22127", "-7"),
        # priority: <answer> > \boxed > #### > last number
        (r"#### 3 and \boxed{4}", "4"),
        (r"\boxed{4} <answer>2</answer>", "2"),
        ("12 then #### 13 and 14", "13 and 14"),
        # nothing
        ("no digits here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_conversational():
    assert extract_answer(conv(r"\boxed{12}")) == "12"
    assert extract_answer(conv(None)) is None


# ------------------------------------------------------------------------------ gold_answer


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\nTogether 48+24 = <<48+24=72>>72.\n#### 72", "72"),
        ("... #### 1,000", "1000"),
        (r"So $x = \boxed{\dfrac{1}{3}}$.", r"\dfrac{1}{3}"),
        (r"two boxes \boxed{1} and finally \boxed{2}", "2"),
        ("72", "72"),
        (72, "72"),
        (2.50, "2.5"),
        (r"\frac{1}{3}", r"\frac{1}{3}"),
        ("(A)", "(A)"),
        ("a long explanation\nwithout markers but ends with 17", "17"),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_gold_answer(raw, expected):
    assert gold_answer(raw) == expected


# ------------------------------------------------------------------------------ answers_match


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("72", "72"),
        ("72.0", "72"),
        ("1,234", "1234"),
        ("$1,234.", "1234"),
        ("0.5", r"\frac{1}{2}"),
        ("1/2", "0.5"),
        (r"\dfrac{3}{4}", "0.75"),
        ("-3", "-3.00"),
        (r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2"),
        (r"2\pi", r"\pi \cdot 2"),
        ("x = 5", "5"),
        ("72 dollars", "72"),
        (" Paris ", "paris"),
        ("1" * 5000, "1" * 5000),
    ],
)
def test_answers_match_true(pred, gold):
    assert answers_match(pred, gold) is True


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("71", "72"),
        ("0.33", r"\frac{1}{3}"),
        ("3 or 5", "5"),
        (None, "72"),
        ("", "72"),
        ("72", ""),
        ("72", None),
        (r"\frac{1}{", "1"),
        ("{{{", "}}}"),
        ("日本", "72"),
        ("\ud800", "72"),
        ("1/0", "0"),
        ("1" * 5000, "1" * 4999 + "2"),
        (HUGE, "7"),
        ("9" * 20_000, "9"),
    ],
)
def test_answers_match_false(pred, gold):
    assert answers_match(pred, gold) is False


def test_answers_match_outside_main_thread():
    """math-verify's signal timeouts only work in the main thread; scoring must still work elsewhere."""
    results, errors = [], []

    def work():
        try:
            results.append(answers_match(r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2"))
            results.append(answers_match(r"\frac{\sqrt{3}}{2}", r"\sqrt{2}/2"))
            results.append(answers_match("0.5", "1/2"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=60)
    assert not errors
    assert results == [True, False, True]


@pytest.mark.parametrize(
    "huge", [r"9^{9^{9^{9}}}", r"2^{2^{30}}", r"(10^{100})!", r"\binom{10^{9}}{10^{8}}", "1000000000000^{10000000}"]
)
def test_answers_match_refuses_huge_values_quickly(huge):
    """verify() would try to evaluate these (no timeout outside the main thread): they are refused first."""
    results = []
    t = threading.Thread(target=lambda: results.append(answers_match(huge, "3")))
    start = time.monotonic()
    t.start()
    t.join(timeout=30)
    assert results == [False]
    assert time.monotonic() - start < 5
    assert answers_match("2^{10}", "1024") and answers_match("5!", "120")


def test_answers_match_without_math_verify(monkeypatch):
    monkeypatch.setattr(S, "_math_verify", False)
    assert answers_match("0.5", r"\frac{1}{2}") is True
    assert answers_match(r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2") is False


def test_answers_match_survives_math_verify_errors(monkeypatch):
    class Boom:
        @staticmethod
        def parse(*a, **k):
            raise RuntimeError("boom")

        verify = parse

    monkeypatch.setattr(S, "_math_verify", Boom)
    assert answers_match(r"\sqrt{2}", r"\sqrt{2}") is True  # same text, no math-verify needed
    assert answers_match(r"\sqrt{2}", r"\sqrt{3}") is False


def test_is_correct():
    assert is_correct(conv("so 8 left\n#### 8"), "4 + 4 = 8\n#### 8")
    assert not is_correct(conv("#### 9"), "4 + 4 = 8\n#### 8")
    assert not is_correct(None, "#### 8")


@pytest.mark.parametrize("text", MALFORMED)
def test_scoring_never_raises(text):
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)
    gold = gold_answer(text)
    assert gold is None or isinstance(gold, str)
    assert isinstance(answers_match(answer, "3"), bool)
    assert isinstance(answers_match("3", gold), bool)
    assert isinstance(is_correct(text, text), bool)
