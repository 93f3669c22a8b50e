"""Rollouts without vLLM (issues 18 and 31): which engine generates GRPO's rollouts and why, the engine
parameter's errors, continuous batching in evaluation on CPU (same greedy answers and
cut-off flags as padded ``generate``), the static-cache and merged-adapter engines (same greedy
tokens as padded ``generate``, weights bit-identical after a merged rollout, the stage trains with
them), and the rollout bench's smoke run with every engine."""

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
    """CPU: continuous batching (8.7x padded generate here); GPU: static+merged (4.80x padded generate on
    an H100, where continuous ran at 0.53x on an H200: docs/benchmarks.md)."""
    cpu = rollout_plan(GRPOParams(), gpus=0, vllm_installed=False)
    assert cpu["engine"] == "continuous" and cpu["mode"] is None
    assert "vllm.enabled is off" in cpu["reason"] and "continuous batching" in cpu["reason"]
    gpu = rollout_plan(GRPOParams(), gpus=1, vllm_installed=False)
    assert gpu["engine"] == "static+merged" and "static cache + CUDA graphs, adapter merged" in gpu["reason"]
    wanted = rollout_plan(GRPOParams(vllm={"enabled": True}), gpus=1, vllm_installed=False)
    assert wanted["engine"] == "static+merged" and "vLLM is not installed" in wanted["reason"]


def test_vllm_when_enabled_and_installed_and_explicit_choices_win():
    assert rollout_plan(GRPOParams(vllm={"enabled": True}), gpus=1, vllm_installed=True)["mode"] == "colocate"
    assert rollout_plan(GRPOParams(vllm={"enabled": True}), gpus=2, vllm_installed=True)["mode"] == "server"
    on = GRPOParams(rollout_engine="vllm", vllm={"enabled": True})
    assert rollout_plan(on, gpus=1, vllm_installed=True)["engine"] == "vllm"
    padded = rollout_plan(GRPOParams(rollout_engine="generate"), gpus=1, vllm_installed=True)
    assert padded == {"engine": "generate", "mode": None, "reason": "grpo.rollout_engine=generate"}
    assert rollout_plan(GRPOParams(rollout_engine="continuous"), gpus=0, vllm_installed=True)["engine"] == "continuous"
    for engine in ("static", "merged", "static+merged"):
        chosen = rollout_plan(GRPOParams(rollout_engine=engine), gpus=1, vllm_installed=True)
        assert chosen == {"engine": engine, "mode": None, "reason": f"grpo.rollout_engine={engine}"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rollout_engine": "paged"}, "rollout_engine"),
        ({"rollout_engine": "vllm"}, "grpo.rollout_engine=vllm needs grpo.vllm.enabled=true"),
        ({"rollout_engine": "generate", "vllm": {"enabled": True}}, "contradicts grpo.vllm.enabled=true"),
        ({"rollout_engine": "static+merged", "vllm": {"enabled": True}}, "rollout_engine=static\\+merged contradicts"),
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
# Static cache / merged adapter (issue 31): TRL's own rollout call, a tiny random model in fp32
# --------------------------------------------------------------------------- #


QUESTIONS = ("What is 2 + 2?", "Name a colour, any colour.")


def chats(questions) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": q}]} for q in questions]


def prompt_ids(tokenizer, rows) -> list[list[int]]:
    """The prompts as TRL hands them to its rollout call: token ids of the chat template."""
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    return [tokenizer(t)["input_ids"] for t in texts]


def rollout_trainer(model_dir, engine: str, tmp_path, rows, compile_on_cpu: bool = False):
    """(a real GRPOTrainer set up for ``engine`` as the stage does, its model, tokenizer, what was set up);
    greedy rollouts of 12 tokens, a tiny random model in fp32. The LoRA B matrices are random (peft's
    init_lora_weights=False), so the adapter changes the greedy tokens and a merge that did nothing would show."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tasks.grpo.rollouts import grpo_config_kwargs, setup_rollouts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    args = GRPOConfig(
        output_dir=str(tmp_path / engine),
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=12,
        use_cpu=True,
        report_to="none",
        generation_kwargs={"do_sample": False},  # greedy
        **grpo_config_kwargs(engine),
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    return trainer, model, tokenizer, setup_rollouts(trainer, engine, tokenizer, rows, compile_on_cpu=compile_on_cpu)


def greedy_rollout(model_dir, engine: str, tmp_path, compile_on_cpu: bool = False, adapter_off: bool = False):
    """(completion ids of TRL's ``_generate_single_turn`` for two prompts, what the engine set up, the
    parameters before and after)."""
    rows = chats(QUESTIONS)
    trainer, model, tokenizer, setup = rollout_trainer(model_dir, engine, tmp_path, rows, compile_on_cpu)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = prompt_ids(tokenizer, rows)
    if adapter_off:
        with model.disable_adapter():
            completions, _ = trainer._generate_single_turn(ids, None, {}, 1)
    else:
        completions, _ = trainer._generate_single_turn(ids, None, {}, 1)
    after = dict(model.named_parameters())
    return completions, setup, before, after


def test_merged_rollouts_generate_the_unmerged_tokens_and_leave_the_weights_bit_identical(tiny_model_dir, tmp_path):
    want, _, _, _ = greedy_rollout(tiny_model_dir, "generate", tmp_path)
    base_only, _, _, _ = greedy_rollout(tiny_model_dir, "generate", tmp_path, adapter_off=True)
    assert base_only != want  # the adapter matters for these tokens
    got, setup, before, after = greedy_rollout(tiny_model_dir, "merged", tmp_path)
    assert got == want and all(len(c) == 12 for c in got)
    assert setup["merged"] and setup["merge_seconds"] > 0
    changed = [n for n, p in after.items() if not torch_equal(p, before[n])]
    assert changed == []  # base weights restored exactly after unmerge (fp32 unmerge alone rounds), adapter untouched
    assert any("lora_B" in n for n in after) and any("base_layer" in n for n in after)


def test_static_cache_with_compiled_decode_generates_the_padded_tokens(tiny_model_dir, tmp_path):
    """The decode step compiled on CPU (inductor's C++ backend; on a GPU the same with CUDA graphs)."""
    import shutil

    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile on CPU needs a C compiler")
    want, _, _, _ = greedy_rollout(tiny_model_dir, "generate", tmp_path)
    got, setup, _, _ = greedy_rollout(tiny_model_dir, "static+merged", tmp_path, compile_on_cpu=True)
    assert got == want
    assert setup["static_cache"] and setup["compiled"] and setup["merged"]
    assert setup["max_cache_len"] is None or setup["max_cache_len"] > 12  # longest prompt + the 12-token limit
    eager, setup, _, _ = greedy_rollout(tiny_model_dir, "static", tmp_path)  # the stage's CPU default: eager
    assert eager == want and setup["static_cache"] and not setup["compiled"]


def test_the_decode_step_compiles_once_for_the_whole_run(tiny_model_dir, tmp_path):
    """The static cache is sized for the run's longest prompt (``max_cache_len``): a later rollout with
    a longer prompt reuses the compiled decode step instead of compiling it again (on a GPU that would
    be another minute of compilation and new CUDA graphs in the middle of training)."""
    import torch
    from torch._dynamo.utils import counters

    short = chats(QUESTIONS)
    long = chats([f"Add these numbers one by one and show each partial sum: {list(range(40 + i))}." for i in (0, 9)])
    torch._dynamo.reset()
    trainer, _, tokenizer, setup = rollout_trainer(tiny_model_dir, "static", tmp_path, short + long, True)
    assert setup["compiled"] and setup["max_cache_len"] == len(prompt_ids(tokenizer, long)[1]) + 12
    trainer._generate_single_turn(prompt_ids(tokenizer, short), None, {}, 1)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the decode step was compiled
    trainer._generate_single_turn(prompt_ids(tokenizer, long), None, {}, 1)
    assert counters["stats"]["unique_graphs"] == graphs


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a.detach(), b)


def test_the_stage_trains_with_the_static_merged_engine_and_says_so(tiny_model_dir, tmp_path, capfd):
    from tasks.grpo.stage import train
    from tests.test_grpo import data_dir, job_for, make_adapter

    config = GRPOParams(
        enabled=True,
        rewards=["format"],
        num_generations=2,
        per_device_batch_size=2,
        max_completion_length=4,
        max_steps=1,
        rollout_engine="static+merged",
    )
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    metrics = train(job_for(config, tiny_model_dir, adapter, data_dir(tmp_path, rows=4), tmp_path))
    assert metrics["steps"] == 1 and metrics["rollout_engine"] == "static+merged"
    assert 0 < metrics["rollout_tokens"] <= 2 * 4
    setup = metrics["rollout_setup"]
    assert setup["static_cache"] and setup["merged"] and not setup["compiled"]  # CPU: eager static cache
    assert "rollouts: static+merged (grpo.rollout_engine=static+merged)" in capfd.readouterr().out
    assert (tmp_path / "scratch" / "final" / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------- #
# The bench (GRPO with continuous batching on CPU: tests/test_grpo.py, the vLLM fallback test)
# --------------------------------------------------------------------------- #


def test_rollout_bench_tiny_runs_every_engine(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "bench/rollout_throughput.py",
        "--tiny",
        "--steps=2",
        "--prompts-per-step=1",
        "--num-generations=2",
        "--max-completion-length=8",
        "--variants=generate,continuous,static,merged,static+merged",
        "--compile-on-cpu",  # the static variants as on a GPU: compiled decode
        f"--out={out}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"generate", "continuous", "static", "merged", "static+merged"}
    for r in rows.values():
        assert 0 < r["rollout_tokens"] <= 2 * 8 and r["step_seconds"] > 0  # one measured step of 2 completions
        assert r["lora_dtypes_after"] == ["torch.float32"]
    assert "tok/s ratio" in done.stdout and "static+merged" in done.stdout
    assert rows["static+merged"]["rollout_setup"] == {
        "static_cache": True,
        "compiled": True,
        "merged": True,
        "max_cache_len": rows["static"]["rollout_setup"]["max_cache_len"],
        "merge_seconds": rows["static+merged"]["rollout_setup"]["merge_seconds"],
    }
    assert not rows["generate"]["rollout_setup"]["merged"] and not rows["generate"]["rollout_setup"]["static_cache"]
