"""Tests for tasks.rewards: answer extraction, matching, TRL-style rewards and the registry."""
from __future__ import annotations

import pickle
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # plain `pytest` from anywhere: import tasks.*

from tasks import rewards as R  # noqa: E402
from tasks.rewards import (  # noqa: E402
    REWARDS,
    accuracy_reward,
    answers_match,
    completion_text,
    extract_answer,
    format_reward,
    gold_answer,
    is_correct,
    make_format_reward,
    make_overlong_reward,
    make_repetition_penalty_reward,
    repetition_penalty_reward,
    resolve_reward,
    soft_overlong_reward,
)


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
        ([{"role": "assistant", "content": "call"}, {"role": "tool", "content": "42"},
          {"role": "assistant", "content": "final"}], "final"),
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
    monkeypatch.setattr(R, "_math_verify", False)
    assert answers_match("0.5", r"\frac{1}{2}") is True
    assert answers_match(r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2") is False


def test_answers_match_survives_math_verify_errors(monkeypatch):
    class Boom:
        @staticmethod
        def parse(*a, **k):
            raise RuntimeError("boom")

        verify = parse

    monkeypatch.setattr(R, "_math_verify", Boom)
    assert answers_match(r"\sqrt{2}", r"\sqrt{2}") is True  # same text, no math-verify needed
    assert answers_match(r"\sqrt{2}", r"\sqrt{3}") is False


def test_is_correct():
    assert is_correct(conv("so 8 left\n#### 8"), "4 + 4 = 8\n#### 8")
    assert not is_correct(conv("#### 9"), "4 + 4 = 8\n#### 8")
    assert not is_correct(None, "#### 8")


# ------------------------------------------------------------------------------ accuracy_reward


def test_accuracy_reward_standard_and_conversational():
    gold = ["Work... #### 72"] * 4
    std = [r"so \boxed{72}", "<answer>71</answer>", "no answer at all", "#### 72"]
    assert accuracy_reward(completions=std, answer=gold) == [1.0, 0.0, 0.0, 1.0]
    assert accuracy_reward(completions=[conv(c) for c in std], answer=gold) == [1.0, 0.0, 0.0, 1.0]


def test_accuracy_reward_trl_call_convention():
    logged = {}
    out = accuracy_reward(
        prompts=["q1", "q2", "q3"],
        completions=[conv(r"\boxed{\frac{1}{3}}"), conv(r"\boxed{\frac{1}{2}}"), conv(None)],
        completion_ids=[[1, 2], [3], []],
        solution=[r"The answer is $\boxed{\frac13}$", r"$\boxed{\frac{1}{3}}$", r"\boxed{1}"],
        problem=["p1", "p2", "p3"],
        trainer_state=object(),
        log_extra=lambda name, values: logged.__setitem__(name, values),
        log_metric=lambda name, value: None,
    )
    assert out == [1.0, 0.0, 0.0]
    assert logged["gold_answer"][1] == r"\frac{1}{3}"
    assert logged["pred_answer"][2] == "[none]"


def test_accuracy_reward_prefers_answer_and_skips_unreadable_gold():
    assert accuracy_reward(completions=["#### 1", "#### 2"], answer=["#### 1", None], solution=["x", "y"]) == [
        1.0,
        None,
    ]


def test_accuracy_reward_broken_log_extra_is_ignored():
    def broken(*a):
        raise RuntimeError("x")

    assert accuracy_reward(completions=["#### 1"], answer=["#### 1"], log_extra=broken) == [1.0]


def test_accuracy_reward_config_errors():
    with pytest.raises(ValueError, match="'answer' or 'solution'"):
        accuracy_reward(completions=["1"], question=["q"])
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        accuracy_reward(completions=["1", "2"], answer=["1"])


# ------------------------------------------------------------------------------ format_reward


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>reasoning</think><answer>4</answer>", 1.0),
        ("  <think>\nmulti\nline\n</think>\n\n<answer>\n4\n</answer>\n", 1.0),
        ("<answer>4</answer>", 0.0),
        ("<think>r</think>", 0.0),
        ("<think>r</think><answer>4</answer> trailing", 0.0),
        ("prefix <think>r</think><answer>4</answer>", 0.0),
        ("<think>r</think><answer>   </answer>", 0.0),
        ("<think>a<think>b</think><answer>4</answer>", 0.0),
        ("<think>r</think><answer>1</answer><answer>2</answer>", 0.0),
        ("<think>r</think><answer>4", 0.0),
        ("<think>日本語の推論 🙂</think><answer>四</answer>", 1.0),
    ],
)
def test_format_reward(text, expected):
    assert format_reward([text]) == [expected]
    assert format_reward(completions=[conv(text)]) == [expected]


def test_make_format_reward():
    boxed = make_format_reward(r"\\boxed\{.+\}\s*$", name="boxed_format")
    assert boxed(completions=[r"so \boxed{3}", "so 3", conv(None)]) == [1.0, 0.0, 0.0]
    assert boxed.__name__ == "boxed_format"
    assert pickle.loads(pickle.dumps(boxed))([r"\boxed{1}"]) == [1.0]
    with pytest.raises(ValueError, match="invalid format reward pattern"):
        make_format_reward("<answer>(")


# ------------------------------------------------------------------------------ overlong


def test_overlong_with_completion_ids():
    f = make_overlong_reward(max_length=100, cache_length=20)
    ids = [[0] * n for n in (0, 80, 81, 90, 100, 101, 10_000)]
    out = f(completions=["x"] * len(ids), completion_ids=ids)
    assert out == [0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0]


def test_overlong_whitespace_fallback_and_hard_cutoff():
    f = make_overlong_reward(max_length=4, cache_length=2)
    assert f(completions=["a b", "a b c", "a b c d", "a b c d e", conv(None)]) == [0.0, -0.5, -1.0, -1.0, 0.0]
    hard = make_overlong_reward(max_length=3, cache_length=0)
    assert hard(completions=["a b c", "a b c d"]) == [0.0, -1.0]
    # ids of the wrong length are ignored in favour of the text
    assert f(completions=["a b c"], completion_ids=[[1], [2]]) == [-0.5]
    assert soft_overlong_reward(completions=["a"], completion_ids=[[1] * 2000]) == [-1.0]


@pytest.mark.parametrize(("max_length", "cache_length"), [(0, 0), (-5, 1), (10, 11), (10, -1), (10.5, 2)])
def test_overlong_bad_config(max_length, cache_length):
    with pytest.raises(ValueError, match="overlong reward"):
        make_overlong_reward(max_length, cache_length)


def test_overlong_picklable():
    f = pickle.loads(pickle.dumps(make_overlong_reward(10, 5)))
    assert f(completions=["a " * 8]) == [-0.6]


# ------------------------------------------------------------------------------ repetition


def test_repetition_penalty():
    out = repetition_penalty_reward(["the cat sat on the mat", "go go go go go go", "", "one two", conv(None)])
    assert out == [0.0, -0.75, 0.0, 0.0, 0.0]
    out = repetition_penalty_reward([("spam " * 10_000)])
    assert -1.0 <= out[0] < -0.99


def test_repetition_penalty_with_ids():
    f = make_repetition_penalty_reward(ngram_size=2, max_penalty=-0.5, use_completion_ids=True)
    assert f(completions=["a", "b", "c"], completion_ids=[[1, 2, 3, 4], [5, 5, 5, 5, 5], None]) == [
        0.0,
        -0.375,
        0.0,
    ]
    assert f.__name__ == "repetition_penalty_reward"


@pytest.mark.parametrize(("ngram_size", "max_penalty"), [(0, -1.0), (2, 0.5), (2, -1.5)])
def test_repetition_bad_config(ngram_size, max_penalty):
    with pytest.raises(ValueError, match="repetition reward"):
        make_repetition_penalty_reward(ngram_size, max_penalty)


# ------------------------------------------------------------------------------ robustness


@pytest.mark.parametrize("as_conversation", [False, True])
def test_rewards_never_raise_on_malformed(as_conversation):
    completions = [conv(c) if as_conversation else c for c in MALFORMED]
    n = len(completions)
    kwargs = dict(
        prompts=["p"] * n,
        completions=completions,
        completion_ids=[[1, 2, 3]] * (n - 1) + [None],
        answer=["#### 3"] * (n - 2) + [None, r"\boxed{\frac{1}{2}"],
        trainer_state=None,
        log_extra=None,
        log_metric=None,
    )
    start = time.monotonic()
    for name, func in REWARDS.items():
        out = func(**kwargs)
        assert len(out) == n, name
        for value in out:
            assert value is None or (isinstance(value, float) and -1.0 <= value <= 1.0), (name, value)
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("text", MALFORMED)
def test_scoring_never_raises(text):
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)
    gold = gold_answer(text)
    assert gold is None or isinstance(gold, str)
    assert isinstance(answers_match(answer, "3"), bool)
    assert isinstance(answers_match("3", gold), bool)
    assert isinstance(is_correct(text, text), bool)


def test_huge_inputs_are_fast():
    start = time.monotonic()
    assert extract_answer("\\boxed{" * 200_000) is None
    assert extract_answer("<answer>" * 200_000) is None
    assert format_reward(["<think>" + "a" * 500_000 + "</think><answer>1</answer>"]) == [1.0]
    assert extract_answer(HUGE + "\\boxed{9}") == "9"
    assert time.monotonic() - start < 20


# ------------------------------------------------------------------------------ registry


def test_registry_names():
    assert set(REWARDS) == {"accuracy", "format", "overlong", "repetition"}
    for func in REWARDS.values():
        assert callable(func) and func.__name__.endswith("reward")


def test_resolve_builtin_and_paths():
    assert resolve_reward("accuracy") is accuracy_reward
    assert resolve_reward(" format ") is format_reward
    assert resolve_reward("tasks.rewards:repetition_penalty_reward") is repetition_penalty_reward
    assert resolve_reward(format_reward) is format_reward
    overlong = resolve_reward("overlong", max_length=8, cache_length=4)
    assert overlong(completions=["a " * 6]) == [-0.5]
    fmt = resolve_reward("tasks.rewards:make_format_reward", pattern="^ok$")
    assert fmt(["ok", "no"]) == [1.0, 0.0]
    assert resolve_reward("tasks.rewards:REWARDS.get") == REWARDS.get  # dotted attribute path


def test_resolve_unknown_name_lists_builtins():
    with pytest.raises(ValueError, match="unknown reward 'speed'.*accuracy, format, overlong, repetition"):
        resolve_reward("speed")
    with pytest.raises(ValueError, match="did you mean 'mypkg.mod:fn'"):
        resolve_reward("mypkg.mod.fn")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:reward", "cannot import module 'no_such_module_xyz'"),
        ("tasks.rewards:no_such_function", "module 'tasks.rewards' has no attribute 'no_such_function'"),
        ("tasks.rewards:DEFAULT_FORMAT_PATTERN", "is not callable"),
        (":reward", "expected 'module:function'"),
        ("tasks.rewards:", "expected 'module:function'"),
        ("", "built-in name or 'module:function'"),
    ],
)
def test_resolve_bad_paths(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward(spec)


def test_resolve_bad_settings():
    with pytest.raises(ValueError, match="takes no settings"):
        resolve_reward("accuracy", foo=1)
    with pytest.raises(ValueError, match="bad settings for reward 'overlong'"):
        resolve_reward("overlong", max_len=10)
    with pytest.raises(ValueError, match="overlong reward"):
        resolve_reward("overlong", max_length=10, cache_length=20)
    with pytest.raises(ValueError, match="already-built"):
        resolve_reward(format_reward, pattern="x")
    with pytest.raises(ValueError, match="built-in name"):
        resolve_reward(None)
