"""GRPO stage (optional): continue training the SFT adapter with TRL's GRPOTrainer and rule-based rewards.

Resource profile: the GPUs of the chosen profile (``cpu`` for tests). Off by default; ``enabled``
turns it on. Like SFT, training runs in a child process (``python -m tasks.grpo JOB.json``).

Data: the flow prepares the stage's own dataset (``datasets``, e.g. GSM8K question/answer rows or
``tuneline/arithmetic``) through the dataset stage; each row's last assistant turn is the reference
answer and the turns before it are the prompt. Rewards come from ``tasks/rewards.py`` by name
(``accuracy``, ``format``, ``overlong``, ``repetition``) or by ``module:function`` path.

Rollouts use transformers generation; ``use_vllm`` asks TRL for vLLM rollouts when vLLM is
installed — without it the stage falls back to transformers and says so in the log and metrics.

Run the plain function without Prefect::

    python -m tasks.grpo job.json
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.hardware import PROFILES, ProfileName, launch_training, preflight, resolve_profile
from tasks.models import resolve_model
from tasks.store import StageRef, code_version, fingerprint, open_ref, stage_cache_key, store_for

STAGE = "grpo"


class GRPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Run GRPO after SFT. Off: the SFT adapter goes straight to merge.")
    datasets: list[str] = Field(default=["tuneline/arithmetic#256"], min_length=1, description="Prompt sources (SOURCE[#N], as for the dataset stage); the last assistant turn is the reference answer.")
    rewards: list[str] = Field(default=["accuracy", "format"], min_length=1, description="Reward functions: accuracy, format, overlong, repetition, or module:function.")
    reward_weights: list[float] | None = Field(default=None, description="One weight per reward; empty: all 1.")
    num_generations: int = Field(default=8, ge=2, le=256, description="Completions sampled per prompt (the group GRPO normalises over).")
    max_completion_length: int = Field(default=256, ge=4, le=32768, description="Longest completion in tokens.")
    temperature: float = Field(default=1.0, gt=0.0, le=2.0, description="Sampling temperature of the rollouts.")
    beta: float = Field(default=0.0, ge=0.0, le=1.0, description="KL penalty against the reference (0: no reference model, less memory).")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(default="dapo", description="GRPO loss normalisation (TRL's loss_type).")
    learning_rate: float = Field(default=1e-5, gt=0.0, le=1.0, description="Peak learning rate.")
    max_steps: int = Field(default=100, ge=1, le=1_000_000, description="Optimizer steps.")
    per_device_batch_size: int = Field(default=8, ge=1, le=1024, description="Completions per micro-batch per process (a multiple of num_generations when accumulation is 1).")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    use_vllm: bool = Field(default=False, description="Generate rollouts with vLLM when installed (colocate on one GPU, server on two).")
    logging_steps: int = Field(default=1, ge=1, le=10_000, description="Log every N steps.")
    seed: int = Field(default=42, ge=0, description="Seed.")


def to_prompt_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of the dataset stage as GRPO rows: ``prompt`` (messages) and ``answer`` (reference)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:-1], "answer": messages[-1]["content"]})
    return rows


def train(job: dict[str, Any]) -> dict[str, Any]:
    """Run GRPO on the adapter in ``job``; save the new adapter; return the metrics."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tasks.rewards import resolve_reward

    cfg = GRPOParams.model_validate(job["config"])
    profile = PROFILES.get(job["profile"]) or resolve_profile("auto")
    output, scratch = Path(job["output_dir"]), Path(job["scratch_dir"])
    vllm = cfg.use_vllm and importlib.util.find_spec("vllm") is not None
    if cfg.use_vllm and not vllm:
        print("[tuneline.grpo] use_vllm is on but vLLM is not installed: rollouts use transformers generation", flush=True)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[profile.dtype]
    tokenizer = AutoTokenizer.from_pretrained(job["adapter_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype)
    model = PeftModel.from_pretrained(base, job["adapter_dir"], is_trainable=True)
    dataset = Dataset.from_list(to_prompt_rows(Path(job["data_dir"]) / "train.jsonl"))
    rewards = [resolve_reward(name) for name in cfg.rewards]
    args = GRPOConfig(
        output_dir=str(scratch),
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        reward_weights=cfg.reward_weights,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        bf16=profile.dtype == "bf16",
        fp16=profile.dtype == "fp16",
        use_vllm=vllm,
        vllm_mode="colocate",
        report_to="none",
        seed=cfg.seed,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=dataset, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    reward_curve = [h["reward"] for h in history if "reward" in h]
    metrics = {
        "steps": trainer.state.global_step,
        "wall_seconds": wall,
        "step_seconds": wall / max(1, trainer.state.global_step),
        "reward_first": reward_curve[0] if reward_curve else None,
        "reward_last": reward_curve[-1] if reward_curve else None,
        "rollout_engine": "vllm" if vllm else "transformers",
        "profile": profile.name,
    }
    output.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (output / "log_history.json").write_text(json.dumps(history, indent=2))
    return metrics


def fingerprint_of(config: GRPOParams, adapter: StageRef, dataset: StageRef, base_model: str, base_revision: str, root: str, storage_block: str | None = None) -> str:
    cfg = {"config": config, "model": base_model, "revision": base_revision, "profile": resolve_profile("auto").name}
    return fingerprint(STAGE, code_version(train), cfg, upstream=[adapter.fingerprint, dataset.fingerprint])


@task(name="grpo", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["gpu"], retries=1)
def grpo(config: GRPOParams, adapter: StageRef, dataset: StageRef, base_model: str, base_revision: str, root: str, storage_block: str | None = None) -> StageRef:
    """GRPO on top of the SFT adapter; returns the new adapter. GPU (or CPU for tests)."""
    profile = resolve_profile("auto")
    preflight(profile.requirement)
    fp = fingerprint_of(config, adapter, dataset, base_model, base_revision, root)
    store = store_for(root, storage_block)
    if (ref := store.completed(STAGE, fp)) is not None:
        return ref
    scratch = store.scratch_dir(STAGE, fp)
    job = {
        "config": config.model_dump(mode="json"),
        "model_dir": str(resolve_model(base_model, base_revision)),
        "adapter_dir": str(open_ref(adapter, storage_block)),
        "data_dir": str(open_ref(dataset, storage_block)),
        "scratch_dir": str(scratch),
        "output_dir": str(scratch / "final"),
        "profile": profile.name,
    }
    launch_training("tasks.grpo", job, scratch / "job.json", 1)
    output = Path(job["output_dir"])
    ref = store.publish(STAGE, fp, output, json.loads((output / "metrics.json").read_text()))
    shutil.rmtree(scratch, ignore_errors=True)
    return ref


if __name__ == "__main__":
    train(json.loads(Path(sys.argv[1]).read_text()))
