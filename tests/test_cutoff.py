"""Cut-off answers: a generation that stopped at the token limit is flagged by both engines
(``Completion.cut_off``), and HumanEval scores it 0 without running it unless a code block closed
before the cut. (GSM8K's side of the rule is tested with its scoring, in tests/test_evaluate.py.)"""

from __future__ import annotations

import json
import pickle
import sys
import types
from types import SimpleNamespace as NS

import pytest

from tasks.evaluate import humaneval
from tasks.evaluate.engines import (
    Completion,
    TransformersEngine,
    VLLMEngine,
    hit_token_limit,
    load_model,
    stop_token_ids,
    vllm_completion,
)
from tasks.evaluate.humaneval import answered_code, load_humaneval, score_humaneval
from tasks.evaluate.params import EvalParams

# --------------------------------------------------------------------------- #
# Completion and the two engines' detection
# --------------------------------------------------------------------------- #


def test_completion_is_a_str_that_carries_the_flag():
    c = Completion("so the answer is 4", cut_off=True)
    assert isinstance(c, str) and c == "so the answer is 4" and c.cut_off
    assert Completion("done").cut_off is False
    assert json.loads(json.dumps({"a": c})) == {"a": "so the answer is 4"}
    assert pickle.loads(pickle.dumps(c)).cut_off is True
    assert "answer" in c and c.split()[-1] == "4"


@pytest.mark.parametrize(
    ("new_ids", "limit", "expected"),
    [
        ([11, 12, 13, 14], 4, True),  # full length, no stop token
        ([11, 12, 13, 2], 4, False),  # the stop token is the last allowed one
        ([11, 2, 0, 0], 4, False),  # stopped early, padded up to the batch's longest
        ([11, 12], 4, False),  # the whole batch stopped before the limit
        ([3, 12, 13, 14], 4, False),  # a second stop id (generation configs may list several)
        ([], 0, True),  # degenerate: nothing allowed, nothing finished
    ],
)
def test_hit_token_limit_on_crafted_ids(new_ids, limit, expected):
    assert hit_token_limit(new_ids, {2, 3}, limit) is expected


def test_stop_token_ids_reads_the_generation_config():
    assert stop_token_ids(NS(generation_config=NS(eos_token_id=2))) == {2}
    assert stop_token_ids(NS(generation_config=NS(eos_token_id=[2, 7]))) == {2, 7}
    assert stop_token_ids(NS(generation_config=NS(eos_token_id=None))) == set()
    assert stop_token_ids(NS()) == set()


@pytest.mark.parametrize(("reason", "cut"), [("length", True), ("stop", False), (None, False), ("abort", False)])
def test_vllm_finish_reason_maps_to_cut_off(reason, cut):
    c = vllm_completion(NS(outputs=[NS(text="  #### 4\n", finish_reason=reason)]))
    assert isinstance(c, Completion) and c == "#### 4" and c.cut_off is cut


def test_vllm_engine_returns_completions(monkeypatch):
    """The engine's own generate path, with vLLM replaced by a stand-in (it is not installed here)."""
    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    engine = object.__new__(VLLMEngine)
    seen = {}

    def chat(chats, params, use_tqdm):
        seen["params"] = params
        return [
            NS(outputs=[NS(text="The answer is", finish_reason="length")]),
            NS(outputs=[NS(text="#### 4", finish_reason="stop")]),
        ]

    engine.llm = NS(chat=chat)
    out = engine.generate([[{"role": "user", "content": "q"}]] * 2, max_new_tokens=3, temperature=0.0, seed=0)
    assert [c.cut_off for c in out] == [True, False] and out == ["The answer is", "#### 4"]
    assert seen["params"]["max_tokens"] == 3


def _first_token(model, tokenizer, chat) -> int:
    import torch

    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return int(out[0, -1])


def test_transformers_engine_flags_cut_off_and_a_normal_stop(tiny_model_dir):
    """A random model never stops on its own within a few tokens: every answer is cut off. Making the
    token it greedily emits first a stop token makes the same generation stop normally, even when
    that stop token is the last one allowed."""
    model, tokenizer = load_model(str(tiny_model_dir), "cpu")
    chats = [[{"role": "user", "content": "Who are you?"}], [{"role": "user", "content": "What is 12 times 7?"}]]
    engine = TransformersEngine(model, tokenizer, batch_size=2)

    for limit in (1, 3):
        out = engine.generate(chats, max_new_tokens=limit, temperature=0.0, seed=0)
        assert all(isinstance(c, Completion) for c in out)
        assert [c.cut_off for c in out] == [True, True]

    model.generation_config.eos_token_id = sorted({_first_token(model, tokenizer, c) for c in chats})
    for limit in (1, 3):
        out = engine.generate(chats, max_new_tokens=limit, temperature=0.0, seed=0)
        assert [c.cut_off for c in out] == [False, False]


# --------------------------------------------------------------------------- #
# HumanEval: no final answer -> 0, not run
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def problem():
    return load_humaneval(limit=1)[0]


def _fenced(problem, closed: bool, after: str = "") -> str:
    code = problem["prompt"] + problem["canonical_solution"]
    return f"Here it is:\n```python\n{code}" + ("```\n" + after if closed else "")


def test_answered_code_rule(problem):
    right = _fenced(problem, closed=False)  # would pass if it ran: the fence is just not closed
    assert answered_code(problem, Completion(right, cut_off=True)) is None
    assert answered_code(problem, Completion(right, cut_off=False)) is not None  # stopped on its own: taken
    assert answered_code(problem, Completion(problem["canonical_solution"], cut_off=True)) is None
    done = _fenced(problem, closed=True, after="This function checks every pair of num")
    assert answered_code(problem, Completion(done, cut_off=True)) == answered_code(problem, done)
    # a second block still open at the cut does not replace the closed one
    two = done + "\n```python\ndef has_close_elements(numbers, threshold):\n    return Tr"
    assert answered_code(problem, Completion(two, cut_off=True)) == answered_code(problem, done)


def test_cut_off_answer_scores_0_without_running(problem, monkeypatch):
    ran: list[str] = []
    real = humaneval.pass_at_1

    def spy(problems, completions, **kw):
        ran.extend(completions)
        return real(problems, completions, **kw)

    monkeypatch.setattr(humaneval, "pass_at_1", spy)
    responses = [
        Completion(_fenced(problem, closed=False), cut_off=True),  # right code, unfinished: 0, not run
        Completion(_fenced(problem, closed=True, after="Explanation: the fun"), cut_off=True),  # finished block
        Completion(_fenced(problem, closed=False), cut_off=False),  # stopped on its own: runs as before
    ]
    score, details = score_humaneval([problem] * 3, responses, EvalParams())
    assert [d["status"] for d in details] == ["cut_off", "passed", "passed"]
    assert score == pytest.approx(2 / 3)
    assert len(ran) == 2
    assert [d["cut_off"] for d in details] == [True, True, False]
    assert details[0]["passed"] is False and "token limit" in details[0]["detail"]
    assert details[0]["completion"]  # the unfinished code stays visible in the report
    assert {d["sandbox_mode"] for d in details} == {humaneval.sandbox.sandbox_mode()}


def test_all_cut_off_runs_nothing(problem, monkeypatch):
    def no_programs(problems, completions, **kw):
        assert problems == completions == []
        return 0.0, []

    monkeypatch.setattr(humaneval, "pass_at_1", no_programs)
    score, details = score_humaneval([problem], [Completion("```python\ndef has_close", cut_off=True)], EvalParams())
    assert score == 0.0 and details[0]["status"] == "cut_off"
