"""Rollouts without vLLM (issue 18): which engine generates GRPO's rollouts and why, the engine
parameter's errors, continuous batching in evaluation on CPU (same greedy answers and
cut-off flags as padded ``generate``), and the rollout bench's smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.grpo.plan import GRPOParams, rollout_plan

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- #
# The plan (no GPU needed: the plan is a function of the settings and the machine)
# --------------------------------------------------------------------------- #


def test_without_vllm_rollouts_use_the_engine_measured_faster_on_the_machine():
    """CPU: continuous batching (8.7x padded generate here); GPU: padded generate (continuous ran at
    0.53x on an H200: docs/grpo.md)."""
    cpu = rollout_plan(GRPOParams(), gpus=0, vllm_installed=False)
    assert cpu["engine"] == "continuous" and cpu["mode"] is None
    assert "vllm.enabled is off" in cpu["reason"] and "continuous batching" in cpu["reason"]
    gpu = rollout_plan(GRPOParams(), gpus=1, vllm_installed=False)
    assert gpu["engine"] == "generate" and "padded generate" in gpu["reason"]
    wanted = rollout_plan(GRPOParams(vllm={"enabled": True}), gpus=1, vllm_installed=False)
    assert wanted["engine"] == "generate" and "vLLM is not installed" in wanted["reason"]


def test_vllm_when_enabled_and_installed_and_explicit_choices_win():
    assert rollout_plan(GRPOParams(vllm={"enabled": True}), gpus=1, vllm_installed=True)["mode"] == "colocate"
    assert rollout_plan(GRPOParams(vllm={"enabled": True}), gpus=2, vllm_installed=True)["mode"] == "server"
    on = GRPOParams(rollout_engine="vllm", vllm={"enabled": True})
    assert rollout_plan(on, gpus=1, vllm_installed=True)["engine"] == "vllm"
    padded = rollout_plan(GRPOParams(rollout_engine="generate"), gpus=1, vllm_installed=True)
    assert padded == {"engine": "generate", "mode": None, "reason": "grpo.rollout_engine=generate"}
    assert rollout_plan(GRPOParams(rollout_engine="continuous"), gpus=0, vllm_installed=True)["engine"] == "continuous"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rollout_engine": "paged"}, "rollout_engine"),
        ({"rollout_engine": "vllm"}, "grpo.rollout_engine=vllm needs grpo.vllm.enabled=true"),
        ({"rollout_engine": "generate", "vllm": {"enabled": True}}, "contradicts grpo.vllm.enabled=true"),
    ],
)
def test_rollout_engine_errors_name_the_parameter(settings, message):
    with pytest.raises(ValidationError, match=message):
        GRPOParams(**settings)


def test_the_engine_choice_changes_the_grpo_fingerprint(tiny_model_dir, tmp_path):
    """Another engine samples other rollouts: the stage reruns instead of reusing the old adapter."""
    from tasks.artifacts.store import StageRef
    from tasks.core.stage import StageContext
    from tasks.grpo.stage import fingerprint_of

    ctx = StageContext(root=str(tmp_path / "root"), base_model=str(tiny_model_dir))
    ref = StageRef(stage="x", fingerprint="f" * 16, uri=str(tmp_path), digest="d" * 64)
    fps = {e: fingerprint_of(GRPOParams(rollout_engine=e, profile="cpu"), ref, ref, ctx) for e in ("auto", "generate")}
    assert fps["auto"] != fps["generate"]


# --------------------------------------------------------------------------- #
# Evaluation: continuous batching answers as padded generate does (fp32 on CPU)
# --------------------------------------------------------------------------- #


def test_continuous_batching_gives_the_padded_engines_greedy_answers(tiny_model_dir):
    from tasks.evaluate.engines import TransformersEngine, load_model

    model, tokenizer = load_model(str(tiny_model_dir), "cpu", "fp32")
    chats = [[{"role": "user", "content": q}] for q in ("What is 2 + 2?", "Name a colour.", "Hi", "Count to five.")]
    padded = TransformersEngine(model, tokenizer, batch_size=3)
    continuous = TransformersEngine(model, tokenizer, batch_size=3, continuous=True)
    first = padded.generate(chats, max_new_tokens=10, temperature=0.0, seed=0)
    assert all(c.cut_off for c in first)  # random weights: no stop token in 10 tokens
    # A stop token the greedy answer reaches: one answer ends early, and must not be flagged cut off.
    prompt = tokenizer.apply_chat_template(chats[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    greedy = model.generate(**prompt, max_new_tokens=3, do_sample=False)[0, -1].item()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, greedy]
    want = padded.generate(chats, max_new_tokens=10, temperature=0.0, seed=0)
    got = continuous.generate(chats, max_new_tokens=10, temperature=0.0, seed=0)
    assert [str(c) for c in got] == [str(c) for c in want]
    assert [c.cut_off for c in got] == [c.cut_off for c in want]
    assert not want[0].cut_off  # stopped on the added stop token, both engines say so


# --------------------------------------------------------------------------- #
# The bench (GRPO with continuous batching on CPU: tests/test_grpo.py, the vLLM fallback test)
# --------------------------------------------------------------------------- #


def test_rollout_bench_tiny_runs_both_engines(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "bench/rollout_throughput.py",
        "--tiny",
        "--steps=2",
        "--prompts-per-step=1",
        "--num-generations=2",
        "--max-completion-length=8",
        f"--out={out}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"generate", "continuous"}
    for r in rows.values():
        assert 0 < r["rollout_tokens"] <= 2 * 8 and r["step_seconds"] > 0  # one measured step of 2 completions
        assert r["lora_dtypes_after"] == ["torch.float32"]
    assert "tok/s ratio" in done.stdout and "continuous" in done.stdout
