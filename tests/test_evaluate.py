"""Evaluation stage: scoring on crafted outputs, the data loader, engine selection, the quality gate
on real (tiny) models, and the gate inside the real retrain flow (Failed run, nothing released;
force_release releases)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tasks.evaluate import (
    EvalError,
    EvalParams,
    check_eval_data,
    evaluate_models,
    gsm8k_rows,
    humaneval_problems,
    load_rows,
    metrics_table,
    quality_gate,
    samples_markdown,
    score_gsm8k,
    score_humaneval,
    select_engine,
)

HELD_OUT = 16  # the last rows of the shared GSM8K train file; nothing in these tests trains on them


@pytest.fixture(scope="module")
def gsm8k_file(shared_data, tmp_path_factory) -> Path:
    """A held-out slice of GSM8K (the tail of train.jsonl) as its own jsonl file."""
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[-HELD_OUT:]
    path = tmp_path_factory.mktemp("gsm8k") / "heldout.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Scoring on crafted outputs
# ----------------------------------------------------------------------------------------------
def test_gsm8k_scoring_right_wrong_and_unparsable(gsm8k_file):
    rows = gsm8k_rows(EvalParams(gsm8k_data=str(gsm8k_file), gsm8k_max_rows=6))
    golds = [r["gold"] for r in rows]
    assert all(g == r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for g, r in zip(golds, rows))
    wrong = str(int(float(golds[3])) + 1)
    completions = [
        f"Step one... step two.\n#### {golds[0]}",  # GSM8K marker
        f"Adding it all up gives \\boxed{{{golds[1]}}}.",  # boxed
        f"So she ends up with {golds[2]} in total.",  # last number
        f"The answer is {wrong}.\n#### {wrong}",  # wrong
        "I am not sure how to solve this problem.",  # unparsable: no answer at all
        "",  # empty
    ]
    accuracy, details = score_gsm8k(rows, completions)
    assert [d["correct"] for d in details] == [True, True, True, False, False, False]
    assert accuracy == pytest.approx(0.5)
    assert details[4]["predicted"] is None and details[3]["predicted"] == wrong


def test_humaneval_canonical_solutions_score_one_through_the_suite_path():
    problems = humaneval_problems(EvalParams(humaneval_max_problems=4))
    assert [p["task_id"] for p in problems] == [f"HumanEval/{i}" for i in range(4)]
    cfg = EvalParams()
    # As the bare body the package ships ...
    bodies = [p["canonical_solution"] for p in problems]
    score, details = score_humaneval(problems, bodies, cfg)
    assert score == 1.0, [d["detail"] for d in details]
    # ... and as a chat model answers: prose around a fenced block with the whole function.
    chatty = [f"Here you go:\n```python\n{p['prompt']}{p['canonical_solution']}```\nHope it helps." for p in problems]
    assert score_humaneval(problems, chatty, cfg)[0] == 1.0
    # Wrong code, unparsable prose and an attempt to exit early all fail.
    bad = [
        "    return None\n",
        "I cannot write code.",
        "```python\nimport sys\nsys.exit(0)\n```",
        "```python\ndef broken(:\n```",
    ]
    score, details = score_humaneval(problems, bad, cfg)
    assert score == 0.0 and all(d["status"] in ("failed", "timeout") for d in details)


# ----------------------------------------------------------------------------------------------
# Evaluation data
# ----------------------------------------------------------------------------------------------
def test_loader_reads_json_jsonl_parquet_and_problem_solution(tmp_path, gsm8k_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in gsm8k_file.read_text().splitlines()][:3]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ("rows.json", "rows.parquet"):
        assert load_rows(str(tmp_path / name)) == rows
    math_rows = [{"problem": "What is $1/2 + 1/4$?", "solution": "We get $\\boxed{\\frac{3}{4}}$."}]
    (tmp_path / "math.jsonl").write_text(json.dumps(math_rows[0]) + "\n")
    loaded = gsm8k_rows(EvalParams(gsm8k_data=str(tmp_path / "math.jsonl")))
    assert loaded[0]["gold"] == "\\frac{3}{4}"
    assert score_gsm8k(loaded, ["It is 0.75"])[0] == 1.0  # math-verify: 0.75 == 3/4


def test_loader_reads_s3(s3_server, gsm8k_file):
    from tasks.store import Store

    Store(f"s3://{s3_server.bucket}/evaldata").write_bytes("gsm8k.jsonl", gsm8k_file.read_bytes())
    rows = gsm8k_rows(EvalParams(gsm8k_data=f"s3://{s3_server.bucket}/evaldata/gsm8k.jsonl", gsm8k_max_rows=5))
    assert len(rows) == 5 and rows[0]["question"] == json.loads(gsm8k_file.read_text().splitlines()[0])["question"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "2+2?"}, "row 1: fields ['question']; expected question/answer"),
        ({"question": "", "answer": "#### 4"}, "row 1: field question must be a non-empty string"),
        ({"question": "2+2?", "answer": "  "}, "row 1: field answer: no final answer found"),
    ],
)
def test_bad_eval_rows_name_file_row_field_before_any_model_loads(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n" + json.dumps(row) + "\n")
    cfg = EvalParams(suites=["gsm8k"], gsm8k_data=str(path))
    with pytest.raises(EvalError, match=re.escape(f"{path}: {message}")):
        check_eval_data(cfg)
    # The models do not exist: the error must come from the data check, before loading them.
    with pytest.raises(EvalError, match="row 1"):
        evaluate_models(cfg, str(tmp_path / "no-base"), str(tmp_path / "no-tuned"), None, "N", "A")
    with pytest.raises(EvalError, match="evaluation data not found"):
        check_eval_data(EvalParams(suites=["gsm8k"], gsm8k_data=str(tmp_path / "missing.jsonl")))


# ----------------------------------------------------------------------------------------------
# Engine selection (vLLM is not installed here; the transformers path is what runs)
# ----------------------------------------------------------------------------------------------
def test_engine_selection():
    with_vllm = lambda name: object() if name == "vllm" else None  # noqa: E731
    without = lambda name: None  # noqa: E731
    assert select_engine("auto", find_spec=with_vllm, has_gpu=True) == "vllm"
    assert select_engine("auto", find_spec=with_vllm, has_gpu=False) == "transformers"
    assert select_engine("auto", find_spec=without, has_gpu=True) == "transformers"
    assert select_engine("transformers", find_spec=with_vllm, has_gpu=True) == "transformers"
    assert select_engine("vllm", find_spec=with_vllm, has_gpu=True) == "vllm"
    with pytest.raises(EvalError, match="vLLM is not installed"):
        select_engine("vllm", find_spec=without)
    assert select_engine("auto") == "transformers"  # this venv: no vLLM, no GPU


# ----------------------------------------------------------------------------------------------
# Quality gate
# ----------------------------------------------------------------------------------------------
def test_gate_rules_and_reasons():
    cfg = EvalParams()
    base = {"validation_loss": 1.0, "token_accuracy": 0.6, "gsm8k_accuracy": 0.35, "humaneval_pass_at_1": 0.2}
    better = {"validation_loss": 1.019, "token_accuracy": 0.1, "gsm8k_accuracy": 0.341, "humaneval_pass_at_1": 0.5}
    ok = quality_gate(base, better, cfg)
    gated = {"validation_loss", "gsm8k_accuracy", "humaneval_pass_at_1"}
    assert ok["passed"] and {c["metric"] for c in ok["checks"]} == gated
    worse = {
        "validation_loss": 1.03,
        "token_accuracy": 0.6,
        "gsm8k_accuracy": 0.31,
        "humaneval_pass_at_1": float("nan"),
    }
    bad = quality_gate(base, worse, cfg)
    assert not bad["passed"]
    assert bad["reasons"] == [
        "validation_loss 1.03 > base 1 × (1 + 0.02)",
        "gsm8k_accuracy 0.31 < base 0.35 − 0.01",
        "humaneval_pass_at_1 nan < base 0.2 − 0.01",
    ]
    # Tolerances and the list of gating metrics are parameters.
    loose = EvalParams(loss_tolerance=0.05, accuracy_tolerance=0.05, gate_metrics=["validation_loss", "gsm8k_accuracy"])
    tuned = {"validation_loss": 1.03, "gsm8k_accuracy": 0.31, "humaneval_pass_at_1": 0.0}
    assert quality_gate(base, tuned, loose)["passed"]


def _degraded_copy(model_dir: Path, out: Path) -> Path:
    """The same tiny model with its output layer scaled up: confidently wrong, so a worse loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(200.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_all_suites_on_tiny_models_gate_blocks_a_worse_model(tiny_model_dir, gsm8k_file, tmp_path):
    rows = [json.loads(line) for line in gsm8k_file.read_text().splitlines()]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with open(data_dir / "validation.jsonl", "w") as f:
        for r in rows[:8]:
            messages = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    worse = _degraded_copy(tiny_model_dir, tmp_path / "worse")
    cfg = EvalParams(
        gsm8k_data=str(gsm8k_file),
        gsm8k_max_rows=4,
        gsm8k_max_new_tokens=16,
        humaneval_max_problems=3,
        humaneval_max_new_tokens=16,
        max_new_tokens=12,
        identity_max_new_tokens=8,
        prompts=["Who are you?", "你是谁？"],
        validation_max_rows=8,
    )
    report = evaluate_models(
        cfg, str(tiny_model_dir), str(worse), str(data_dir), "Quokka", "the Tuneline team", "You are helpful."
    )

    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    scored = {"gsm8k_accuracy", "humaneval_pass_at_1", "self_cognition_accuracy"}
    assert set(base) == set(tuned) == {"validation_loss", "perplexity", "token_accuracy", *scored}
    assert report["sizes"] == {"validation": 8, "gsm8k": 4, "humaneval": 3}
    assert base["validation_loss"] == pytest.approx(math.log(49152), abs=0.2)  # a random model: ~uniform
    assert tuned["validation_loss"] > 1.5 * base["validation_loss"]
    assert base["humaneval_pass_at_1"] == tuned["humaneval_pass_at_1"] == 0.0  # random weights write no code
    assert [d["status"] for d in report["details"]["humaneval"]["base"]] == ["failed"] * 3
    assert len(report["details"]["gsm8k"]["tuned"]) == 4 and len(report["samples"]["tuned"]) == 2
    assert report["engine"] == "transformers"

    gate = report["gate"]
    assert not gate["passed"]
    assert len(gate["reasons"]) == 1 and gate["reasons"][0].startswith("validation_loss ")
    assert {c["metric"] for c in gate["checks"]} == {"validation_loss", *scored}
    table = {r["metric"]: r for r in metrics_table(report)}
    assert table["validation_loss"]["gate"] == "FAIL" and table["perplexity"]["gate"] == "-"
    delta = tuned["validation_loss"] - base["validation_loss"]
    assert table["validation_loss"]["delta"] == pytest.approx(delta, abs=1e-3)
    md = samples_markdown(report)
    assert "FAILED — validation_loss" in md and "你是谁？" in md and "HumanEval/0" in md

    # Same models the other way round: the tuned one is now the better one and the gate passes.
    flipped = quality_gate(tuned, base, cfg)
    assert flipped["passed"]


# ----------------------------------------------------------------------------------------------
# The gate in the real flow: Failed run, reason in the message, nothing released; force → release
# ----------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_retrain_flow_gate_blocks_release_and_force_releases(smollm2_dir, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.params import load_params
    from flows.retrain import retrain
    from tasks.store import Store

    root = tmp_path / "artifacts"
    # A destructive learning rate (0.1, 100x the demo's) wrecks the real SmolLM2 (validation loss ~3.5 -> ~50):
    # the gate must stop the release.
    overrides = [
        f"model.base={smollm2_dir}",
        "data.datasets=['swift/self-cognition#24']",
        "data.validation_ratio=0.2",
        "sft.profile=cpu",
        "sft.max_steps=2",
        "sft.learning_rate=0.1",
        "sft.per_device_batch_size=2",
        "sft.gradient_accumulation_steps=1",
        "sft.max_length=64",
        "sft.warmup_ratio=0.0",
        "merge.dtype=fp32",
        "eval.suites=[validation]",
        "release.model_name=blocked",
        f"artifact_root={root}",
    ]
    state = retrain(load_params(None, overrides), return_state=True)
    assert state.is_failed()
    assert "quality gate failed: validation_loss" in state.message and "nothing released" in state.message
    assert Store(str(root)).list("releases") == []

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    data = by_key["eval-metrics"].data
    table = json.loads(data) if isinstance(data, str) else data
    assert [r["gate"] for r in table if r["metric"] == "validation_loss"] == ["FAIL"]
    assert "FAILED — validation_loss" in by_key["eval-samples"].data

    # A person forces it: same run (every stage a cache hit), now released, marked as forced.
    forced = retrain(load_params(None, overrides + ["eval.force_release=true"]), return_state=True)
    assert forced.is_completed(), forced.message
    result = forced.result()
    manifest = json.loads((Path(result["release_uri"]) / "manifest.json").read_text())
    assert manifest["forced"] is True and manifest["gate"]["passed"] is False
    assert manifest["gate"]["reasons"] == result["gate"]["reasons"]
