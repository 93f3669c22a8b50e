"""Evaluation stage: scoring on crafted outputs, the held-out identity set, the data loader, engine
selection, the quality gate on real (tiny) models, the champion (results reused or evaluated again),
and the gate inside the real retrain flow (Failed run, nothing released; force_release releases)."""

from __future__ import annotations

import json
import math
import re
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from tasks.artifacts.registry import current_champion
from tasks.artifacts.store import StageRef, sha256_file
from tasks.core.sources import RESOURCES
from tasks.core.stage import StageContext
from tasks.evaluate import (
    EvalError,
    EvalParams,
    check_eval_data,
    evaluate,
    evaluate_models,
    fingerprint_of,
    gsm8k_rows,
    humaneval_problems,
    identity_questions,
    load_rows,
    measurement_key,
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


class _CutOff(str):
    """A completion the engine stopped at the token limit (engines return such strings)."""

    cut_off = True


def test_gsm8k_a_cut_off_completion_is_wrong_even_with_the_right_number(gsm8k_file):
    rows = gsm8k_rows(EvalParams(gsm8k_data=str(gsm8k_file), gsm8k_max_rows=5))[:2]
    completions = [
        _CutOff(f"So far {rows[0]['gold']}\n#### {rows[0]['gold']}\nLet me double"),
        f"#### {rows[1]['gold']}",
    ]
    accuracy, details = score_gsm8k(rows, completions)
    assert accuracy == 0.5 and [d["status"] for d in details] == ["cut_off", "correct"]
    assert details[0]["predicted"] == rows[0]["gold"] and not details[0]["correct"]
    assert type(details[0]["completion"]) is str  # stored as plain text in report.json


def _normalise(text: str) -> str:
    """NFKC, casefolded, punctuation dropped, whitespace collapsed: two wordings that differ only in
    those are the same question."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def test_identity_questions_are_held_out_from_every_training_prompt():
    training_file = RESOURCES / "self_cognition.jsonl"
    lines = training_file.read_text(encoding="utf-8").splitlines()
    training = {_normalise(json.loads(line)["query"]) for line in lines if line.strip()}
    assert len(training) >= 40  # the whole built-in set, both languages
    questions = identity_questions()
    held_out = [_normalise(q["question"]) for q in questions]
    assert len(held_out) >= 40 and len(set(held_out)) == len(held_out)  # no duplicates either
    assert {q["lang"] for q in questions} == {"en", "zh"}
    assert min(sum(q["lang"] == lang for q in questions) for lang in ("en", "zh")) >= 20
    assert {q["expects"] for q in questions} == {"name", "author"}
    assert not set(held_out) & training, sorted(set(held_out) & training)
    # The normalisation is what makes this a proof: the old questions were training prompts, and are
    # caught even written differently.
    assert _normalise("  WHO are you ") in training and _normalise("你是谁?") in training


def test_humaneval_canonical_solutions_score_one_through_the_suite_path():
    problems = humaneval_problems(EvalParams(humaneval_max_problems=5))[:4]
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
    from tasks.artifacts.store import Store

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
    assert select_engine("auto", find_spec=without, has_gpu=True) == "transformers"  # continuous: slower on GPU
    assert select_engine("auto", find_spec=without, has_gpu=False) == "transformers"
    assert select_engine("continuous", find_spec=with_vllm, has_gpu=False) == "continuous"
    assert select_engine("transformers", find_spec=with_vllm, has_gpu=True) == "transformers"
    assert select_engine("vllm", find_spec=with_vllm, has_gpu=True) == "vllm"
    with pytest.raises(EvalError, match="vLLM is not installed"):
        select_engine("vllm", find_spec=without)
    assert select_engine("auto") == "transformers"  # this venv: no vLLM, no GPU


# ----------------------------------------------------------------------------------------------
# Quality gate
# ----------------------------------------------------------------------------------------------
def test_gate_rules_and_reasons():
    # The gate now works on per-item results (rows, questions, problems); the old aggregate numbers
    # are kept as the items' means where they could be: loss 1.0, GSM8K 0.35 of 200, HumanEval 0.2 of 164.
    cfg = EvalParams()
    rows = np.linspace(0.5, 1.5, 40)  # per-row validation losses, mean 1.0
    base = {
        "validation_loss": list(rows),
        "token_accuracy": [0.6] * 40,
        "gsm8k_accuracy": [1.0] * 70 + [0.0] * 130,
        "humaneval_pass_at_1": [1.0] * 33 + [0.0] * 131,
    }
    better = {
        "validation_loss": list(rows * 1.019),  # within the 2% loss tolerance
        "token_accuracy": [0.1] * 40,  # much worse, but not a gating metric
        # 0.345: one question fewer (0.341 was the old number; 200 items make it 69/200)
        "gsm8k_accuracy": [1.0] * 69 + [0.0] * 131,
        "humaneval_pass_at_1": [1.0] * 82 + [0.0] * 82,
    }
    ok = quality_gate({"base": base, "tuned": better}, cfg)
    gated = {"validation_loss", "gsm8k_accuracy", "humaneval_pass_at_1"}
    assert ok["passed"] and {c["metric"] for c in ok["checks"]} == gated
    worse = {
        "validation_loss": list(rows * 1.03),
        "token_accuracy": [0.6] * 40,
        # 0.25 (was 0.31): under the old rule a 4-point drop failed; now a drop must exceed the 0.05
        # tolerance and be credible: 20 questions lost, none gained.
        "gsm8k_accuracy": [1.0] * 50 + [0.0] * 150,
        "humaneval_pass_at_1": [float("nan")] * 164,
    }
    bad = quality_gate({"base": base, "tuned": worse}, cfg)
    assert not bad["passed"]
    assert [r.split(" vs ")[0] for r in bad["reasons"][:2]] == [
        "validation_loss +0.030 [+0.027, +0.033]",  # the delta and its 95% interval
        "gsm8k_accuracy -0.100 [-0.145, -0.060]",
    ]
    assert bad["reasons"][2] == (
        "humaneval_pass_at_1 vs base: per-item results not finite (tuned: rows 0, 1, 2, 3, 4, 5, 6, 7 and 156 more); "
        "the comparison fails closed"
    )
    assert bad["reasons"][0].endswith(
        "vs base: worse than tolerance 0.02 (2% of 1) (one-sided p=0.00025, paired sign-flip)"
    )
    assert (
        "vs base: worse than tolerance 0.05 (one-sided p=" in bad["reasons"][1] and "exact McNemar" in bad["reasons"][1]
    )
    # Tolerances and the list of gating metrics are parameters.
    loose = EvalParams(loss_tolerance=0.05, accuracy_tolerance=0.15, gate_metrics=["validation_loss", "gsm8k_accuracy"])
    tuned = {**worse, "humaneval_pass_at_1": [0.0] * 164}
    assert quality_gate({"base": base, "tuned": tuned}, loose)["passed"]


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


def _validation_dir(gsm8k_file: Path, out: Path, rows: int = 8) -> Path:
    """A data stage's output folder with a validation split of ``rows`` conversations."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "validation.jsonl", "w") as f:
        for line in gsm8k_file.read_text().splitlines()[:rows]:
            r = json.loads(line)
            messages = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return out


def test_all_suites_on_tiny_models_gate_blocks_a_worse_model(tiny_model_dir, gsm8k_file, tmp_path):
    data_dir = _validation_dir(gsm8k_file, tmp_path / "data")
    worse = _degraded_copy(tiny_model_dir, tmp_path / "worse")
    cfg = EvalParams(
        gsm8k_data=str(gsm8k_file),
        gsm8k_max_rows=5,  # the fewest a gated suite may have (a paired test on 4 can never fail)
        gsm8k_max_new_tokens=16,
        humaneval_max_problems=5,
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
    n_identity = len(identity_questions())  # the held-out identity set is a suite of its own size now
    assert report["sizes"] == {"validation": 8, "gsm8k": 5, "humaneval": 5, "self_cognition": n_identity}
    assert base["validation_loss"] == pytest.approx(math.log(49152), abs=0.2)  # a random model: ~uniform
    assert tuned["validation_loss"] > 1.5 * base["validation_loss"]
    assert base["humaneval_pass_at_1"] == tuned["humaneval_pass_at_1"] == 0.0  # random weights write no code
    # Random weights never stop within 16 tokens: each answer is cut off and scored 0 without running
    # (was "failed" when cut-off code still ran; see "Cut-off answers" in docs/evaluation.md).
    assert [d["status"] for d in report["details"]["humaneval"]["base"]] == ["cut_off"] * 5
    assert len(report["details"]["gsm8k"]["tuned"]) == 5 and len(report["samples"]["tuned"]) == 2
    assert report["engine"] == "transformers"
    # Per-item results, one number per row / question / problem; the metrics are their means.
    items = report["items"]
    assert list(items) == ["base", "tuned"] and report["champion"] is None
    sizes = {"validation_loss": 8, "token_accuracy": 8, "gsm8k_accuracy": 5, "humaneval_pass_at_1": 5}
    assert {k: len(v) for k, v in items["tuned"].items()} == {**sizes, "self_cognition_accuracy": n_identity}
    assert tuned["validation_loss"] == pytest.approx(sum(items["tuned"]["validation_loss"]) / 8)
    assert tuned["perplexity"] == pytest.approx(math.exp(min(tuned["validation_loss"], 50)))

    gate = report["gate"]
    assert not gate["passed"]
    # Two reasons now: the loss (worse on every row: credible even on 8 rows), and the identity floor
    # (new: random weights never say their name, so 0 < 0.9).
    assert [r.split(" ")[0] for r in gate["reasons"]] == ["validation_loss", "self_cognition_accuracy"]
    assert gate["reasons"][0].startswith("validation_loss +") and "vs base:" in gate["reasons"][0]
    assert (
        gate["reasons"][1] == f"self_cognition_accuracy 0.000 < floor 0.9 on {n_identity} held-out identity questions"
    )
    assert {c["metric"] for c in gate["checks"]} == {"validation_loss", *scored}
    table = {r["metric"]: r for r in metrics_table(report)}
    assert table["validation_loss"]["gate"] == "FAIL" and table["perplexity"]["gate"] == "-"
    delta = tuned["validation_loss"] - base["validation_loss"]
    assert table["validation_loss"]["delta"] == pytest.approx(delta, abs=1e-3)
    low, high = (float(x) for x in table["validation_loss"]["interval"].strip("[]").split(","))
    assert 0 < low <= delta <= high
    md = samples_markdown(report)
    assert "FAILED — validation_loss" in md and "你是谁？" in md and "HumanEval/0" in md

    # Same models the other way round: the tuned one is now the better one and every paired check
    # passes (only the floor still fails: the base does not know its name either).
    flipped = quality_gate({"base": items["tuned"], "tuned": items["base"]}, cfg)
    assert all(c["passed"] for c in flipped["checks"] if c["rule"] == "paired")
    assert [r.split(" ")[0] for r in flipped["reasons"]] == ["self_cognition_accuracy"]


def _fake_release(root: Path, model: str, release_id: str, model_dir: Path, report: dict) -> None:
    """A release folder as the release stage writes it: ``model/`` (merged weights), ``eval/report.json``,
    ``manifest.json`` (files with size and SHA-256) and ``LATEST``."""
    folder = root / "releases" / model / release_id
    files = {}
    for path in sorted(p for p in Path(model_dir).iterdir() if p.is_file()):
        (folder / "model").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / "model" / path.name)
        files[f"model/{path.name}"] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    (folder / "eval" / "report.json").write_text(json.dumps(report))
    files["eval/report.json"] = {"size": 0, "sha256": sha256_file(folder / "eval" / "report.json")}
    (folder / "manifest.json").write_text(json.dumps({"release_id": release_id, "files": files}))
    (root / "releases" / model / "LATEST").write_text(release_id)


def test_champion_results_reused_when_measured_alike_else_evaluated_again(
    tiny_model_dir, gsm8k_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("TUNELINE_CACHE", str(tmp_path / "cache"))  # where a champion's model is downloaded
    root = tmp_path / "root"
    ctx = StageContext(base_model=str(tiny_model_dir), root=str(root))
    dataset = StageRef(stage="data", fingerprint="data-fp", uri=str(_validation_dir(gsm8k_file, tmp_path / "data")))
    merged = StageRef(stage="merge", fingerprint="merged-fp", uri=str(tiny_model_dir))  # tuned = base weights
    cfg = EvalParams(suites=["validation", "self_cognition"], validation_max_rows=8, identity_max_new_tokens=4)
    who = {"name": "Quokka", "author": "the Tuneline team", "system_prompt": "You are helpful."}
    n_identity = len(identity_questions())
    measurement = measurement_key(cfg, "data-fp", who["system_prompt"], who["name"], who["author"])

    # Release R1 was measured exactly as tonight (same key) and was far better: its results are reused.
    better = {"validation_loss": [0.5] * 8, "token_accuracy": [0.9] * 8, "self_cognition_accuracy": [1.0] * n_identity}
    r1_report = {"measurement": measurement, "items": {"tuned": better}, "metrics": {}, "details": {}, "samples": {}}
    _fake_release(root, "champ", "R1", tiny_model_dir, r1_report)
    store = ctx.store()
    r1 = current_champion(store, "champ")
    ref = evaluate.fn(cfg, merged=merged, dataset=dataset, ctx=ctx, champion=r1, **who)
    report = json.loads((Path(ref.uri) / "report.json").read_text())
    assert report["champion"] == {**r1.model_dump(), "how": "reused", "why": report["champion"]["why"]}
    assert report["measurement"] == measurement and report["items"]["champion"] == better
    assert list(report["items"]) == ["base", "champion", "tuned"]
    assert report["metrics"]["champion"]["validation_loss"] == 0.5
    gate = report["gate"]
    assert not gate["passed"] and gate["champion"] == "R1" and ref.metrics["gate"] == gate
    loss_vs_champion = [r for r in gate["reasons"] if r.startswith("validation_loss")]
    assert len(loss_vs_champion) == 1 and " [" in loss_vs_champion[0] and "vs champion R1:" in loss_vs_champion[0]
    checks = {(c["metric"], c["reference"]) for c in gate["checks"]}
    assert checks == {
        ("validation_loss", "base"),
        ("validation_loss", "champion"),
        ("self_cognition_accuracy", "floor"),
    }
    row = {r["metric"]: r for r in metrics_table(report)}["validation_loss"]
    assert row["champion"] == 0.5 and row["delta_champion"] > 0 and row["interval_champion"].startswith("[")
    assert "champion R1 (reused)" in samples_markdown(report)

    # The champion's release is part of the fingerprint: another champion is another verdict.
    def fp(champion):
        return fingerprint_of(cfg, merged, dataset, who["name"], who["author"], who["system_prompt"], ctx, champion)

    other = r1.model_copy(update={"release_id": "R2"})
    assert len({fp(None), fp(r1), fp(other), fp(r1.model_copy(update={"manifest_sha256": "0" * 64}))}) == 4

    # Release R2 was measured differently (an older key): its merged model is evaluated again, here
    # the base's own weights, so its per-item results are the base's and nothing is worse.
    r2_report = {**r1_report, "measurement": "0" * 64}
    _fake_release(root, "champ", "R2", tiny_model_dir, r2_report)
    r2 = current_champion(store, "champ")
    assert r2.release_id == "R2"
    ref2 = evaluate.fn(
        cfg.model_copy(update={"gate_metrics": ["validation_loss"]}),
        merged=merged,
        dataset=dataset,
        ctx=ctx,
        champion=r2,
        **who,
    )
    report2 = json.loads((Path(ref2.uri) / "report.json").read_text())
    assert report2["champion"]["how"] == "evaluated" and "measured differently" in report2["champion"]["why"]
    assert report2["items"]["champion"]["validation_loss"] == pytest.approx(report2["items"]["base"]["validation_loss"])
    assert len(report2["items"]["champion"]["self_cognition_accuracy"]) == n_identity
    assert report2["gate"]["passed"] and report2["measurement"] == measurement
    assert (tmp_path / "cache" / "champions" / "releases" / "champ" / "R2" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------
# The gate in the real flow: Failed run, reason in the message, nothing released; force → release
# ----------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_retrain_flow_gate_blocks_release_and_force_releases(smollm2_dir, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.params import load_params
    from flows.retrain import retrain
    from tasks.artifacts.store import Store

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


def test_evaluation_shows_progress_per_model_and_suite(tiny_model_dir, capfd):
    """Minutes of evaluation on a slow machine are not silent: a bar per model and suite, items done / total."""
    from tasks.evaluate.engines import TransformersEngine, load_model
    from tasks.evaluate.suites import generation_suites, validation_items

    model, tokenizer = load_model(str(tiny_model_dir), "cpu")
    chat = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Quokka."}]
    validation_items(model, tokenizer, [chat] * 5, batch_size=2, label="tuned")
    cfg = EvalParams(suites=["samples"], prompts=["Who are you?", "你是谁？", "What is 2 + 2?"], max_new_tokens=4)
    engine = TransformersEngine(model, tokenizer, batch_size=1)
    generation_suites(engine, cfg, {}, "You are helpful.", "Quokka", "the Tuneline team", label="tuned")
    err = capfd.readouterr().err
    assert "evaluate tuned · validation: 100%" in err and "5/5" in err
    assert "evaluate tuned · samples" in err
    # the generating engine moves the bar per batch (batch_size 1: 1/3, 2/3, 3/3), not only at the end
    assert all(f"{n}/3" in err for n in (1, 2, 3)), err
