"""Tests for tasks.grpo.rewards: the TRL-style reward functions and the registry."""

from __future__ import annotations

import pickle
import time

import pytest

from tasks.core.scoring import extract_answer
from tasks.grpo.rewards import (
    REWARDS,
    accuracy_reward,
    format_reward,
    make_format_reward,
    make_overlong_reward,
    make_repetition_penalty_reward,
    repetition_penalty_reward,
    resolve_reward,
    soft_overlong_reward,
)
from tests.test_scoring import HUGE, MALFORMED, conv

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
    assert resolve_reward("tasks.grpo.rewards:repetition_penalty_reward") is repetition_penalty_reward
    assert resolve_reward(format_reward) is format_reward
    overlong = resolve_reward("overlong", max_length=8, cache_length=4)
    assert overlong(completions=["a " * 6]) == [-0.5]
    fmt = resolve_reward("tasks.grpo.rewards:make_format_reward", pattern="^ok$")
    assert fmt(["ok", "no"]) == [1.0, 0.0]
    assert resolve_reward("tasks.grpo.rewards:REWARDS.get") == REWARDS.get  # dotted attribute path


def test_resolve_unknown_name_lists_builtins():
    with pytest.raises(ValueError, match="unknown reward 'speed'.*accuracy, format, overlong, repetition"):
        resolve_reward("speed")
    with pytest.raises(ValueError, match="did you mean 'mypkg.mod:fn'"):
        resolve_reward("mypkg.mod.fn")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:reward", "cannot import module 'no_such_module_xyz'"),
        ("tasks.grpo.rewards:no_such_function", "module 'tasks.grpo.rewards' has no attribute 'no_such_function'"),
        ("tasks.grpo.rewards:DEFAULT_FORMAT_PATTERN", "is not callable"),
        (":reward", "expected 'module:function'"),
        ("tasks.grpo.rewards:", "expected 'module:function'"),
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
