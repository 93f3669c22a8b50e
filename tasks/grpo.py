"""GRPO stage (optional): continue training the SFT adapter with TRL's GRPOTrainer and rule-based rewards.

Off by default; ``grpo.enabled`` turns it on. Like SFT, training runs in a child process
(``python -m tasks.grpo JOB.json``), so a crash is a failed task Prefect can retry.

Data: the flow prepares the stage's own dataset (``grpo.datasets``: GSM8K question/answer rows with
``#### N``, NuminaMath problem/solution rows, a local jsonl of reasoning-gym problems, or the built-in
``tuneline/arithmetic``) through the dataset stage. In each ``{"messages": [...]}`` row the last
assistant turn is the reference answer (column ``answer``) and the turns before it are the prompt.

Rewards come from ``tasks/rewards.py`` by name (``accuracy``, ``format``, ``overlong``,
``repetition``) or as a ``module:function`` import path, with optional weights and settings
(``reward_settings: {format: {pattern: "^<answer>"}}``).

Rollouts: transformers ``generate`` by default. ``use_vllm`` asks for vLLM: colocated in the training
process on one GPU (``vllm_mode=colocate``), or, with two GPUs (``server``), a ``trl vllm-serve`` on the
second card that this stage starts, owns and always stops (success, failure, cancellation). vLLM has
its own venv (``vllm_python``, made by ``python -m tasks.vllm_cpu ensure-venv``); the training child
re-executes itself under it. On a CPU box the same runs on vllm-cpu with the patches in
``tasks/vllm_cpu.py`` (docs/vllm-cpu.md). Without vLLM the stage falls back to transformers and says so
in the log and in the metric ``rollout_engine``.

Outputs (stage folder): the adapter, ``metrics.json``, ``log_history.json``, ``samples.json`` (sample
completions with their rewards), ``rewards.png`` (reward curve and per-reward means); the Prefect
task also posts the picture and the samples table as artifacts.

Run the plain function without Prefect::

    python -m tasks.grpo job.json        # job: config, model_dir, adapter_dir, data_dir, output_dir, ...
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

try:
    from prefect import task
except ModuleNotFoundError:  # the training child may run in the vLLM venv, which has no Prefect

    def task(**_kwargs: Any):  # type: ignore[no-redef]
        return lambda fn: fn

from tasks.hardware import PROFILES, detect_machine, launch_training, preflight, resolve_profile
from tasks.models import resolve_model
from tasks.store import StageRef, code_version, fingerprint, open_ref, stage_cache_key, store_for

STAGE = "grpo"
LOG = "[tuneline.grpo]"


class GRPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Run GRPO after SFT. Off: the SFT adapter goes straight to merge.")
    datasets: list[str] = Field(default=["tuneline/arithmetic#256"], min_length=1, description="Prompt sources (SOURCE[#N], as for the dataset stage); the last assistant turn is the reference answer.")
    rewards: list[str] = Field(default=["accuracy", "format"], min_length=1, description="Reward functions: accuracy, format, overlong, repetition, or a module:function import path.")
    reward_weights: list[float] | None = Field(default=None, description="One weight per reward (same order); empty: all 1. The advantage uses the weighted sum.")
    reward_settings: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Settings per reward name, passed to its factory, e.g. {format: {pattern: '^<answer>'}, overlong: {max_length: 256, cache_length: 64}}.")
    num_generations: int = Field(default=8, ge=2, le=256, description="Completions sampled per prompt: the group GRPO normalises over. More: better advantage estimates, slower steps.")
    max_completion_length: int = Field(default=256, ge=4, le=32768, description="Longest completion in tokens. Longer lets the model reason, costs rollout time and memory.")
    temperature: float = Field(default=1.0, gt=0.0, le=2.0, description="Sampling temperature of the rollouts. Too low: the group agrees, reward variance and learning vanish.")
    beta: float = Field(default=0.0, ge=0.0, le=1.0, description="KL penalty against the reference model (0: no reference model, less memory).")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(default="dapo", description="GRPO loss normalisation (TRL's loss_type).")
    learning_rate: float = Field(default=1e-5, gt=0.0, le=1.0, description="Peak learning rate.")
    max_steps: int | None = Field(default=100, ge=1, le=1_000_000, description="Optimizer steps; empty: train num_train_epochs over the prompts.")
    num_train_epochs: float = Field(default=1.0, gt=0.0, le=1000.0, description="Epochs over the prompts, used when max_steps is empty.")
    per_device_batch_size: int = Field(default=8, ge=1, le=1024, description="Completions per micro-batch per process (a multiple of num_generations when accumulation is 1).")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    use_vllm: bool = Field(default=False, description="Generate rollouts with vLLM (colocated on one GPU, a server on the second of two). Without vLLM: transformers, said in the log and metrics.")
    vllm_mode: Literal["auto", "colocate", "server"] = Field(default="auto", description="auto: server when the machine has 2+ GPUs, else colocate. server: this stage starts, owns and stops `trl vllm-serve`.")
    vllm_python: str | None = Field(default=None, max_length=1000, description="Python of a venv with vLLM + TRL (e.g. .venv-vllm/bin/python); the training child runs under it. Empty: the current one.")
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto", description="vLLM weights dtype. bfloat16: ~2x faster rollouts on CPU; float32: rollouts match the fp32 policy exactly.")
    vllm_enforce_eager: bool = Field(default=False, description="Skip vLLM's torch.compile/CUDA graphs: seconds instead of minutes of start-up, slower decoding. Turn on for CPU and short runs.")
    vllm_max_model_length: int = Field(default=2048, ge=64, le=131072, description="vLLM context (prompt + completion) in tokens; less KV cache memory when smaller.")
    vllm_verify_sync: bool = Field(default=False, description="After training, sync the policy to vLLM once more and check vLLM's temperature-0 completion equals transformers' greedy one (exact only with vllm_dtype float32).")
    num_samples: int = Field(default=16, ge=0, le=1000, description="Sample completions (with their rewards) kept in the stage folder and the run's artifact.")
    logging_steps: int = Field(default=1, ge=1, le=10_000, description="Log every N steps.")
    seed: int = Field(default=42, ge=0, description="Seed.")

    @model_validator(mode="after")
    def _check(self) -> "GRPOParams":
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards {self.rewards}")
        unknown = sorted(set(self.reward_settings) - set(self.rewards))
        if unknown:
            raise ValueError(f"reward_settings for {unknown}, which is not in rewards {self.rewards}")
        if (self.per_device_batch_size * self.gradient_accumulation_steps) % self.num_generations:
            raise ValueError(f"per_device_batch_size × gradient_accumulation_steps ({self.per_device_batch_size} × {self.gradient_accumulation_steps}) must be a multiple of num_generations ({self.num_generations})")
        return self


# ----------------------------------------------------------------------------------------------
# Checks that run before anything expensive
# ----------------------------------------------------------------------------------------------


def resolve_rewards(cfg: GRPOParams) -> list[Any]:
    """The reward callables (``ValueError`` naming the reward when one is unknown or misconfigured)."""
    from tasks.rewards import resolve_reward

    return [resolve_reward(name, **cfg.reward_settings.get(name, {})) for name in cfg.rewards]


def to_prompt_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of the dataset stage as GRPO rows: ``prompt`` (messages) and ``answer`` (reference).
    A malformed row is an error naming the file, the row and the field."""
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, row {i}"
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{where}, field 'messages': not a JSON object with messages ({e})") from None
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError(f"{where}, field 'messages': needs a prompt and a reference answer (at least 2 turns)")
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant" or not isinstance(last.get("content"), str) or not last["content"].strip():
            raise ValueError(f"{where}, field 'messages[-1]': the last turn must be the assistant's reference answer")
        if not any(isinstance(m, dict) and m.get("role") == "user" for m in messages[:-1]):
            raise ValueError(f"{where}, field 'messages': the prompt has no user turn")
        rows.append({"prompt": messages[:-1], "answer": last["content"]})
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def rollout_plan(cfg: GRPOParams, gpus: int, vllm_installed: bool) -> dict[str, Any]:
    """Which engine generates the rollouts, and why (for the log and the metrics)."""
    if not cfg.use_vllm:
        return {"engine": "transformers", "mode": None, "reason": "use_vllm is off"}
    if not vllm_installed:
        return {"engine": "transformers", "mode": None, "reason": "use_vllm is on but vLLM is not installed in this Python: falling back to transformers generation"}
    mode = cfg.vllm_mode if cfg.vllm_mode != "auto" else ("server" if gpus >= 2 else "colocate")
    where = "CPU (vllm-cpu)" if gpus == 0 else (f"GPU {gpus - 1}, training on GPU 0" if mode == "server" else "the training GPU")
    return {"engine": "vllm", "mode": mode, "reason": f"vLLM {mode} on {where}"}


# ----------------------------------------------------------------------------------------------
# The plain function (runs in the training child)
# ----------------------------------------------------------------------------------------------


def train(job: dict[str, Any]) -> dict[str, Any]:
    """Run GRPO on the adapter in ``job``; save the new adapter and the report; return the metrics."""
    import importlib.util

    cfg = GRPOParams.model_validate(job["config"])
    output, scratch = Path(job["output_dir"]), Path(job["scratch_dir"])
    rows = to_prompt_rows(Path(job["data_dir"]) / "train.jsonl")
    rewards = resolve_rewards(cfg)
    gpus = len(detect_machine().gpus)
    plan = rollout_plan(cfg, gpus, importlib.util.find_spec("vllm") is not None)
    print(f"{LOG} rollouts: {plan['engine']} ({plan['reason']})", flush=True)
    if plan["mode"] == "server" and gpus >= 2:
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"  # before torch: the trainer gets card 0, the server the last one
    if plan["engine"] == "vllm" and gpus == 0:
        from tasks.vllm_cpu import cpu_env_defaults

        cpu_env_defaults()
    from tasks.vllm_cpu import raise_on_sigterm

    raise_on_sigterm()  # cancellation runs the finally blocks below (the vLLM server's stop)

    if plan["mode"] == "server":
        from tasks.vllm_cpu import VLLMServer

        server = VLLMServer(job["model_dir"], scratch / "vllm-server.log", max_model_len=cfg.vllm_max_model_length,
                            dtype=cfg.vllm_dtype, enforce_eager=cfg.vllm_enforce_eager,
                            gpus=str(gpus - 1) if gpus >= 2 else None)
        with server:
            metrics = _train(job, cfg, rows, rewards, plan, server)
        metrics["vllm_server"] = {"startup_seconds": server.startup_seconds, "stopped": server.stopped_how, "left_behind": server.left_behind}
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
    return _train(job, cfg, rows, rewards, plan, None)


def _train(job: dict[str, Any], cfg: GRPOParams, rows: list[dict[str, Any]], rewards: list[Any], plan: dict[str, Any], server: Any) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    profile = PROFILES.get(job["profile"]) or resolve_profile("auto")
    output, scratch = Path(job["output_dir"]), Path(job["scratch_dir"])
    on_cpu = not torch.cuda.is_available()
    if plan["engine"] == "vllm":
        _setup_vllm(cfg, plan, on_cpu, scratch)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[profile.dtype]
    tokenizer = AutoTokenizer.from_pretrained(job["adapter_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype)
    model = PeftModel.from_pretrained(base, job["adapter_dir"], is_trainable=True)
    vllm_args: dict[str, Any] = {}
    if plan["engine"] == "vllm":
        vllm_args = {"use_vllm": True, "vllm_mode": plan["mode"], "vllm_max_model_length": cfg.vllm_max_model_length,
                     "vllm_enable_sleep_mode": False}
        if server is not None:
            vllm_args.update(vllm_server_base_url=server.base_url, vllm_server_timeout=60)
    args = GRPOConfig(
        output_dir=str(scratch / "trainer"),
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps or -1,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        reward_weights=cfg.reward_weights,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        gradient_checkpointing=profile.gradient_checkpointing,  # the profile's choice (TRL's default is on)
        use_cpu=on_cpu,
        bf16=profile.dtype == "bf16" and not on_cpu,
        fp16=profile.dtype == "fp16" and not on_cpu,
        report_to="none",
        seed=cfg.seed,
        dataloader_num_workers=0,
        **vllm_args,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    timing = _instrument(trainer, cfg.num_samples)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    history = trainer.state.log_history
    steps = trainer.state.global_step
    reward_curve = [h["reward"] for h in history if "reward" in h]
    metrics: dict[str, Any] = {
        "steps": steps,
        "wall_seconds": wall,
        "step_seconds": wall / max(1, steps),
        "reward_first": reward_curve[0] if reward_curve else None,
        "reward_last": reward_curve[-1] if reward_curve else None,
        "reward_std_mean": _mean([h["reward_std"] for h in history if "reward_std" in h]),
        "reward_means": {k.split("/")[1]: v for k, v in next((h for h in reversed(history) if "reward" in h), {}).items() if k.startswith("rewards/") and k.endswith("/mean")},
        "rollout_engine": plan["engine"],
        "rollout_mode": plan["mode"],
        "rollout_reason": plan["reason"],
        "rollout_tokens": timing["tokens"],
        "rollout_seconds": timing["seconds"],
        "rollout_tokens_per_second": timing["tokens"] / timing["seconds"] if timing["seconds"] else None,
        "weight_syncs": timing["syncs"],
        "sync_seconds": timing["sync_seconds"],
        "profile": profile.name,
        "device": torch.cuda.get_device_name(0) if not on_cpu else "cpu",
        "python": sys.executable,
    }
    if plan["engine"] == "vllm" and cfg.vllm_verify_sync:
        metrics["vllm_sync_check"] = _verify_vllm_sync(trainer, tokenizer, rows)
    output.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    (output / "log_history.json").write_text(json.dumps(history, indent=2))
    (output / "samples.json").write_text(json.dumps(timing["samples"], indent=2, ensure_ascii=False))
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    try:
        plot_rewards(history, output / "rewards.png")
    except ImportError:  # no matplotlib in this venv: the Prefect task draws it
        pass
    print(f"{LOG} done: {steps} steps, reward {metrics['reward_first']} -> {metrics['reward_last']}, rollouts by {plan['engine']}", flush=True)
    return metrics


def _setup_vllm(cfg: GRPOParams, plan: dict[str, Any], on_cpu: bool, scratch: Path) -> None:
    """Knobs TRL's colocate ``LLM(...)`` lacks, and on CPU the weight-sync patches (tasks/vllm_cpu.py)."""
    from tasks import vllm_cpu

    if plan["mode"] == "colocate":
        vllm_cpu.patch_colocate_llm_kwargs(dtype=cfg.vllm_dtype, enforce_eager=cfg.vllm_enforce_eager)
        if on_cpu:
            vllm_cpu.patch_colocate_sync()
    elif on_cpu:
        vllm_cpu.patch_server_sync_via_lora(scratch / "lora-sync")


def _instrument(trainer: Any, num_samples: int) -> dict[str, Any]:
    """Rollout tokens and seconds (TRL logs neither), weight syncs, and sample completions with rewards."""
    from transformers import TrainerCallback

    from tasks.rewards import completion_text

    timing: dict[str, Any] = {"tokens": 0, "seconds": 0.0, "syncs": 0, "sync_seconds": 0.0, "samples": []}
    generate = trainer._generate

    def timed_generate(prompts):
        t = time.perf_counter()
        out = generate(prompts)
        timing["seconds"] += time.perf_counter() - t
        timing["tokens"] += sum(len(ids) for ids in out[1])
        return out

    trainer._generate = timed_generate
    vgen = getattr(trainer, "vllm_generation", None)
    if vgen is not None:
        sync = vgen.sync_weights

        def timed_sync():
            t = time.perf_counter()
            sync()
            timing["syncs"] += 1
            timing["sync_seconds"] += time.perf_counter() - t

        vgen.sync_weights = timed_sync

    class Samples(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs_ = trainer._logs
            names = list(logs_["rewards"])
            for i, (prompt, completion) in enumerate(zip(logs_["prompt"], logs_["completion"])):
                user = [m["content"] for m in prompt if m.get("role") == "user"] if isinstance(prompt, list) else [prompt]
                timing["samples"].append({
                    "step": state.global_step, "prompt": (user or [""])[-1], "completion": completion_text(completion),
                    **{n: logs_["rewards"][n][i] for n in names}, "advantage": logs_["advantages"][i],
                })
            del timing["samples"][: max(0, len(timing["samples"]) - num_samples)]

    trainer.add_callback(Samples())
    return timing


def _verify_vllm_sync(trainer: Any, tokenizer: Any, rows: list[dict[str, Any]], n_prompts: int = 2, max_tokens: int = 12) -> dict[str, Any]:
    """Sync the trained policy to vLLM, then compare vLLM's temperature-0 completion with transformers'
    greedy completion of the same policy (LoRA merged), and of the base model (adapter off)."""
    import torch
    from vllm import SamplingParams

    policy = trainer.model
    prompt_ids = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows[:n_prompts]]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompt_ids]
    vgen = trainer.vllm_generation
    vgen.sync_weights()
    outs = vgen.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids],
                             sampling_params=SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    vllm_ids = [list(o.outputs[0].token_ids) for o in outs]

    def greedy() -> list[list[int]]:
        res = []
        for ids in prompt_ids:
            g = policy.generate(torch.tensor([ids], device=policy.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=policy.device),
                                max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
            res.append(g[: len(g) - next((i for i, t in enumerate(reversed(g)) if t != tokenizer.pad_token_id), 0)] if g else g)
        return res

    policy.eval()
    with torch.no_grad():
        policy.merge_adapter()
        try:
            hf_policy = greedy()
        finally:
            policy.unmerge_adapter()
        with policy.disable_adapter():
            hf_base = greedy()
    strip = lambda seq: [t for t in seq if t != tokenizer.pad_token_id]  # noqa: E731
    result = {
        "prompts": len(prompt_ids),
        "identical": sum(strip(v) == strip(h) for v, h in zip(vllm_ids, hf_policy)),
        "policy_differs_from_base": sum(strip(h) != strip(b) for h, b in zip(hf_policy, hf_base)),
        "vllm": [tokenizer.decode(v) for v in vllm_ids],
        "transformers_policy": [tokenizer.decode(h) for h in hf_policy],
        "transformers_base": [tokenizer.decode(b) for b in hf_base],
    }
    print(f"{LOG} vLLM sync check: {result['identical']}/{result['prompts']} prompts identical to transformers greedy", flush=True)
    return result


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def plot_rewards(history: list[dict[str, Any]], path: Path) -> None:
    """Reward curve (mean ± std of the weighted sum) and each reward's mean, per logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    points = [(h["step"], h["reward"], h.get("reward_std", 0.0)) for h in history if "reward" in h]
    if points:
        steps, mean, std = zip(*points)
        axes[0].plot(steps, mean, "o-", label="reward")
        axes[0].fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
        axes[0].legend()
    axes[0].set_title("reward (weighted sum)")
    names = sorted({k for h in history for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    for key in names:
        axes[1].plot(*zip(*[(h["step"], h[key]) for h in history if key in h]), "o-", label=key.split("/")[1])
    if names:
        axes[1].legend()
    axes[1].set_title("per-reward mean")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Prefect task (orchestration side)
# ----------------------------------------------------------------------------------------------


def fingerprint_of(config: GRPOParams, adapter: StageRef, dataset: StageRef, base_model: str, base_revision: str, root: str, storage_block: str | None = None) -> str:
    cfg = {"config": config, "model": base_model, "revision": base_revision, "profile": resolve_profile("auto").name}
    return fingerprint(STAGE, code_version(train), cfg, upstream=[adapter.fingerprint, dataset.fingerprint])


def make_job(config: GRPOParams, model_dir: Path, adapter_dir: Path, data_dir: Path, scratch: Path, profile: str) -> dict[str, Any]:
    """The child's job file. ``python`` is the vLLM venv's interpreter when one is configured."""
    python = None
    if config.use_vllm and config.vllm_python:
        python = os.path.abspath(os.path.expanduser(config.vllm_python))
        if not os.access(python, os.X_OK):
            raise ValueError(f"grpo.vllm_python: {python} is not an executable Python (make one: python -m tasks.vllm_cpu ensure-venv .venv-vllm)")
    return {
        "config": config.model_dump(mode="json"),
        "model_dir": str(model_dir),
        "adapter_dir": str(adapter_dir),
        "data_dir": str(data_dir),
        "scratch_dir": str(scratch),
        "output_dir": str(scratch / "final"),
        "profile": profile,
        "python": python,
    }


@task(name="grpo", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["gpu"], retries=1)
def grpo(config: GRPOParams, adapter: StageRef, dataset: StageRef, base_model: str, base_revision: str, root: str, storage_block: str | None = None) -> StageRef:
    """GRPO on top of the SFT adapter; returns the new adapter.

    Resources: the GPUs of the machine's profile (1 GPU colocated, or 2 with a vLLM server on the
    second), CPU for tests; memory ≈ SFT's plus the rollouts (and vLLM's KV cache when on)."""
    profile = resolve_profile("auto")
    preflight(profile.requirement)
    resolve_rewards(config)  # a bad reward name or setting fails here, before any model is loaded
    fp = fingerprint_of(config, adapter, dataset, base_model, base_revision, root)
    store = store_for(root, storage_block)
    if (ref := store.completed(STAGE, fp)) is not None:
        return ref
    data_dir = open_ref(dataset, storage_block)
    to_prompt_rows(data_dir / "train.jsonl")  # malformed rows fail here, naming file, row and field
    scratch = store.scratch_dir(STAGE, fp)
    job = make_job(config, resolve_model(base_model, base_revision), open_ref(adapter, storage_block), data_dir, scratch, profile.name)
    launch_training("tasks.grpo", job, scratch / "job.json", 1)
    output = Path(job["output_dir"])
    metrics = json.loads((output / "metrics.json").read_text())
    if not (output / "rewards.png").exists():
        plot_rewards(json.loads((output / "log_history.json").read_text()), output / "rewards.png")
    _publish_report(output, metrics)
    ref = store.publish(STAGE, fp, output, metrics)
    shutil.rmtree(scratch, ignore_errors=True)
    return ref


def _publish_report(output: Path, metrics: dict[str, Any]) -> None:
    """Prefect artifacts: the reward picture with the headline metrics, and the samples table."""
    import base64

    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.logging import get_run_logger

    try:
        logger = get_run_logger()
        logger.info("GRPO rollouts: %s (%s)", metrics["rollout_engine"], metrics["rollout_reason"])
        png = base64.b64encode((output / "rewards.png").read_bytes()).decode()
        keys = ["steps", "reward_first", "reward_last", "rollout_engine", "rollout_reason", "rollout_tokens_per_second", "step_seconds"]
        rows = "\n".join(f"| {k} | {metrics.get(k)} |" for k in keys)
        create_markdown_artifact(key="grpo-rewards", markdown=f"![reward curve and per-reward means](data:image/png;base64,{png})\n\n| metric | value |\n|---|---|\n{rows}",
                                 description="GRPO reward curve and per-reward means")
        samples = json.loads((output / "samples.json").read_text())
        if samples:
            create_table_artifact(key="grpo-samples", table=samples, description="GRPO sample completions and their rewards")
    except Exception as e:  # noqa: BLE001 - outside a Prefect run (plain call) there is nowhere to report
        print(f"{LOG} no Prefect artifacts: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    job_file = Path(sys.argv[1])
    python = json.loads(job_file.read_text()).get("python")
    if python and python != sys.executable and not os.environ.get("TUNELINE_GRPO_REEXEC"):
        # the vLLM venv: same process (same pid and process group, so launch_training's stop still works)
        os.environ["TUNELINE_GRPO_REEXEC"] = "1"
        os.execv(python, [python, "-m", "tasks.grpo", str(job_file)])
    train(json.loads(job_file.read_text()))
