"""LoRA SFT stage: TRL's SFTTrainer with a peft LoRA on the dataset stage's conversations.

Resource profile: the GPUs of the chosen hardware profile (``tasks/runtime/hardware.py``); ``cpu`` for the
demo and tests. Training always runs in a child process started by the task — ``python -m
tasks.sft.stage JOB.json`` for one process, ``torchrun --nproc_per_node N -m tasks.sft.stage JOB.json`` for
several — so a crash of training is a failed task that Prefect can retry, not a dead flow.

Features and their trade-offs:
- Loss on assistant tokens only (TRL ``assistant_only_loss``). It needs ``{% generation %}``
  markers in the chat template: TRL's own training template when it knows the model's template,
  else our ChatML training template (SmolLM2, many others), else a clear error. Rows are tokenized
  here (``tasks.core.models.tokenize_record``: the row's ``tools`` and call arguments parsed from their
  JSON text) into Arrow files on disk, a line at a time (``tasks/sft/rows.py``), and handed to TRL
  pre-tokenized with their assistant masks.
- Checkpoints every ``save_steps`` into ``<root>/scratch/sft/<fingerprint>/``, keeping
  ``save_total_limit``; a checkpoint counts only once ``_COMPLETE`` is written after it, so a retry
  resumes from the newest complete one (global step, optimizer, scheduler, RNG, data position) and
  never from a half-written one.
- A row with no trainable (assistant) token left after truncation is an error naming its line,
  found before the model is loaded: such a micro-batch would train on nothing (a silent zero loss).
- Non-finite guard: an optimizer step whose loss or gradients are not finite is skipped (no update)
  and counted; more than ``max_nonfinite_steps`` end the stage with a clear message.
- Packing (default on): rows are packed into sequences of ``max_length`` (best-fit decreasing) and
  trained padding-free; attention stays inside each row (flash-attn's varlen kernel where
  installed, else SDPA once per row: tasks/runtime/attention.py). ``batch_plan`` keeps the tokens per
  optimizer step of the unpacked job (rows per step x mean row length) and lets the profile size
  the micro-batch. GPU profiles also drop peft's fp32 copies of the adapter inputs and, on bf16
  cards with liger-kernel installed, use its RMSNorm/SwiGLU/RoPE kernels. Measured on an H200 and
  checked to learn the same per token: docs/benchmarks.md ("SFT").
- Optional DoRA, optional QLoRA (4-bit NF4 base through bitsandbytes, GPU only).
- Progress: the child appends one JSON line per logging step to ``progress.jsonl``; the task turns
  it into a Prefect progress artifact. The terminal shows the trainer's own progress bar. Loss,
  token accuracy and learning rate go to ``curves.png`` (a markdown artifact); tokens/s (steady after
  warm-up and whole run, MFU: ``tasks/sft/speed.py``), peak GPU memory and wall time to the metrics.

Run the plain function without Prefect (what the GPU machine does; Prefect need not be installed)::

    python -m tasks.sft.stage job.json                                    # one process; job.json: see make_job
    torchrun --standalone --nproc_per_node 2 -m tasks.sft.stage job.json  # the a100x2 profile
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tasks.artifacts.checkpoint_sync import CheckpointSync
from tasks.artifacts.store import StageRef
from tasks.artifacts.tracking import report_to
from tasks.core.common import (
    ProgressReporter,
    load_tokenizer,
    metrics_markdown,
    picture_markdown,
    publish_markdown,
    run_logger,
    task,
    torch_dtype,
)
from tasks.core.fingerprints import code_identity, content_of, fingerprint, stack_versions, with_lineage
from tasks.core.models import training_chat_template
from tasks.core.stage import StageContext, Workspace, run_stage, stage_cache_key
from tasks.runtime.cluster import check_cluster, train_on_cluster
from tasks.runtime.fsdp import (
    adapter_state_dict,
    build_sharded_lora,
    check_sharding,
    let_accelerate_shard_on_cpu,
)
from tasks.runtime.hardware import PROFILES, Profile, preflight, profile_from_job, profile_to_job, resolve_profile
from tasks.runtime.launch import launch_training
from tasks.runtime.requirements import sft_need
from tasks.sft.fp8 import cards_here, check_precision, convert_base_to_fp8, torchao_version
from tasks.sft.plan import (
    SFTParams,
    attention_kernel,
    check_quantization,
    compile_decoder_layers,
    lora_config,
    memory_plan,
    sft_config,
    skip_adapter_input_casts,
    speed_settings,
)
from tasks.sft.rows import arrow_rows, rows_dir
from tasks.sft.speed import lora_flops_at, speed_line, speed_metrics, step_clock

STAGE = "sft"
CODE = "tasks.sft.stage"  # the module of train(): the code identity starts here
COMPLETE = "_COMPLETE"
NONFINITE = "nonfinite.json"


# ----------------------------------------------------------------------------------------------
# The plain function: runs in the child process (one per GPU under torchrun)
# ----------------------------------------------------------------------------------------------
def _latest_checkpoint(scratch: Path) -> Path | None:
    """The newest checkpoint with ``_COMPLETE`` in it; a half-written one is never picked."""
    done = [p for p in scratch.glob("checkpoint-*") if (p / COMPLETE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _remove_incomplete_checkpoints(scratch: Path) -> None:
    for p in scratch.glob("checkpoint-*"):
        if not (p / COMPLETE).exists():
            shutil.rmtree(p, ignore_errors=True)


def train(job: dict[str, Any]) -> dict[str, Any]:
    """Train the adapter described by ``job`` (see ``make_job``); return the metrics."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTTrainer

    cfg = SFTParams.model_validate(job["config"])
    profile = profile_from_job(job["profile"])  # resolved once by the task (auto included)
    scratch, output, data_dir = Path(job["scratch_dir"]), Path(job["output_dir"]), Path(job["data_dir"])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_quantization(cfg, profile.dtype)
    check_sharding(cfg, profile)
    check_precision(cfg, profile, cards_here(this_process=True))  # the card this process trains on
    attn, attn_reason, skip_casts = speed_settings(profile, cfg.packing)
    if rank == 0:
        print(
            f"[tuneline.sft] profile={profile.name} dtype={profile.dtype} attention={attn} ({attn_reason}) "
            f"processes={world} packing={cfg.packing} quantization={cfg.quantization} "
            f"liger_kernels={profile.use_liger()}",
            flush=True,
        )
        _remove_incomplete_checkpoints(scratch)

    # -- setup: tokenizer (training template), data check, model -------------------------------
    tokenizer = load_tokenizer(job["model_dir"])
    inference_template = tokenizer.chat_template
    if (training_template := training_chat_template(tokenizer)) is not None:
        tokenizer.chat_template = training_template
    # One pass per split into Arrow files under scratch/rows/rank<RANK>/, the train rows checked (tasks/sft/rows.py)
    data, stats = {}, {}
    for s in ("train", "validation"):
        path = data_dir / f"{s}.jsonl"
        if s == "train" or (path.exists() and path.stat().st_size):  # an empty validation split: no evaluation
            data[s], stats[s] = arrow_rows(tokenizer, path, rows_dir(scratch, rank, s), cfg.max_length, s == "train")
    mean_row_tokens = stats["train"].mean_row_tokens

    dtype = torch_dtype(profile.dtype)
    load_kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    if cfg.quantization == "4bit":
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        load_kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    lora = lora_config(cfg)
    if profile.shard_model:  # FSDP2: built on meta, each process reads only its shards (tasks/runtime/fsdp.py)
        model = build_sharded_lora(Path(job["model_dir"]), lora, dtype, attn, profile.gradient_checkpointing, cfg.seed)
    else:
        model = AutoModelForCausalLM.from_pretrained(job["model_dir"], **load_kwargs)
    if cfg.precision == "fp8":  # before peft wraps the layers: its adapters stay bf16/fp32 (tasks/sft/fp8.py)
        converted = convert_base_to_fp8(model)
        if rank == 0:
            print(f"[tuneline.sft] precision=fp8: {converted} base linear layers compute in FP8 (torchao)", flush=True)
    if cfg.packing and torch.cuda.is_available():
        card = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        profile = memory_plan(profile, model.config, weight_bytes, cfg.max_length, card.total_memory / 2**30)
    compiled = profile.compiles() and torch.cuda.is_available()  # decided by the fitted plan (checkpointing)
    has_val = "validation" in data  # an empty validation split means no evaluation

    args = sft_config(
        cfg,
        profile,
        scratch,
        world=world,
        evaluate=has_val,
        mean_row_tokens=mean_row_tokens,
        disable_tqdm=rank != 0,
        report_to=report_to(output) or "none",  # the stage's nested MLflow run / TensorBoard (tracking.*)
        # accelerate sees several CPU processes as distributed only when told it runs on the CPU (tests)
        **({"use_cpu": True} if profile.shard_model and not torch.cuda.is_available() else {}),
    )
    # The rows come pre-tokenized with their assistant masks, which TRL turns into the labels (loss on
    # assistant tokens only); its assistant_only_loss switch is for rows it tokenizes itself.
    args.assistant_only_loss = False
    if rank == 0:
        print(
            f"[tuneline.sft] batch: {args.per_device_train_batch_size} "
            f"{'packed sequences' if cfg.packing else 'rows'} x "
            f"{args.gradient_accumulation_steps} accumulation x {world} processes (rows average {mean_row_tokens:.0f} "
            "tokens); "
            f"gradient_checkpointing={args.gradient_checkpointing or profile.gradient_checkpointing} "
            f"compiled_layers={compiled} liger_kernels={args.use_liger_kernel}"
            + (" fsdp2=sharded base" if profile.shard_model else ""),
            flush=True,
        )

    class Progress(TrainerCallback):
        """Append a JSON line per log; mark a checkpoint complete once every process wrote its part."""

        tokens_at_start = 0

        def on_train_begin(self, args, state, control, **kw):
            self.tokens_at_start = int(state.num_input_tokens_seen)  # > 0 on a resumed run

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                with open(scratch / "progress.jsonl", "a") as f:
                    f.write(
                        json.dumps(
                            {
                                "step": state.global_step,
                                "max_steps": state.max_steps,
                                "nonfinite_skipped": guard.skipped,
                                **logs,
                            }
                        )
                        + "\n"
                    )

        def on_save(self, args, state, control, **kw):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank's RNG state is on disk
            if state.is_world_process_zero:
                ckpt = scratch / f"checkpoint-{state.global_step}"
                (ckpt / NONFINITE).write_text(json.dumps({"skipped": guard.skipped}))
                (ckpt / COMPLETE).write_text(str(time.time()))
                print(f"[tuneline.sft] {ckpt.name} complete", flush=True)

    if profile.shard_model and not torch.cuda.is_available():
        let_accelerate_shard_on_cpu()
    guard = _nonfinite_guard(cfg.max_nonfinite_steps)
    progress, clock = Progress(), step_clock()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["validation"] if has_val else None,
        processing_class=tokenizer,
        peft_config=None if profile.shard_model else lora,  # the sharded model carries its adapter
        callbacks=[progress, guard, clock],  # the clock last: its pauses include the others' saving
    )
    if skip_casts:
        skip_adapter_input_casts(trainer.model)
    if compiled:
        compile_decoder_layers(trainer.model)
    resume = _latest_checkpoint(scratch)
    if resume is not None and (resume / NONFINITE).exists():
        guard.skipped = json.loads((resume / NONFINITE).read_text())["skipped"]
    if rank == 0:
        print(f"[tuneline.sft] {'resuming from ' + resume.name if resume else 'starting from step 0'}", flush=True)

    # -- train ------------------------------------------------------------------------------
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - start
    eval_metrics = trainer.evaluate() if has_val else {}

    # -- save (rank 0) ----------------------------------------------------------------------
    tokens = int(trainer.state.num_input_tokens_seen)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    speed = speed_metrics(*clock.summary(), lora_flops_at(trainer.model, stats["train"].lengths_moment()), card, world)
    metrics = {
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else 0,
        "nonfinite_steps_skipped": guard.skipped,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_mean_token_accuracy": eval_metrics.get("eval_mean_token_accuracy"),
        "train_tokens": tokens,  # non-padding tokens over all processes
        "tokens_per_second": (tokens - progress.tokens_at_start) / wall if wall else None,  # this attempt only
        **speed,  # steady-state tokens/s and MFU (tasks/sft/speed.py)
        "wall_seconds": wall,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else 0.0,  # rank 0's card
        "profile": profile.name,
        "dtype": profile.dtype,
        "attention": attn,
        "processes": world,
        "packing": cfg.packing,
        "micro_batch": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        # sharded: per-layer checkpointing set up with the model (tasks/runtime/fsdp.py), not by the Trainer
        "gradient_checkpointing": args.gradient_checkpointing or profile.gradient_checkpointing,
        "liger_kernels": bool(args.use_liger_kernel),
        "compiled_layers": compiled,
    }
    # Sharded: gather the adapter alone (every process takes part), never the base.
    adapter = adapter_state_dict(trainer.model) if profile.shard_model else None
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(output, state_dict=adapter)
        tokenizer.chat_template = inference_template
        tokenizer.save_pretrained(output)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (output / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
        _plot_curves(trainer.state.log_history, output / "curves.png")
        print(f"[tuneline.sft] {speed_line(metrics)}", flush=True)
        print(f"[tuneline.sft] metrics {json.dumps(metrics)}", flush=True)
    return metrics


def _nonfinite_guard(limit: int) -> Any:
    """A callback that skips optimizer steps with non-finite gradients and counts them.

    Written by hand: transformers only filters non-finite losses out of the *logs*
    (``logging_nan_inf_filter``) and fp16's loss scaler skips only its own overflows; nothing skips
    a NaN step in bf16/fp32 or stops a run that keeps producing them. Dropping every gradient
    before ``optimizer.step()`` makes the step a no-op (torch optimizers skip parameters without
    a gradient; the loss scaler still records the overflow it saw). The learning-rate schedule
    still advances, so a skipped step counts as a step."""
    import torch
    from transformers import TrainerCallback

    class Guard(TrainerCallback):
        def __init__(self) -> None:
            self.limit, self.skipped = limit, 0

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)).item():
                return
            for p in model.parameters():
                p.grad = None
            self.skipped += 1
            if state.is_world_process_zero:
                print(
                    f"[tuneline.sft] step {state.global_step + 1}: non-finite loss or gradient, step skipped "
                    f"({self.skipped} so far, at most {self.limit})",
                    flush=True,
                )
            if self.skipped > self.limit:
                raise FloatingPointError(
                    f"{self.skipped} optimizer steps had a non-finite loss or gradient (limit max_nonfinite_steps="
                    f"{self.limit}); stopping. Lower the learning rate, check the data, or use bf16 instead of fp16."
                )

    return Guard()


def _plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, title) in zip(
        axes, [("loss", "loss"), ("mean_token_accuracy", "token accuracy"), ("learning_rate", "learning rate")]
    ):
        train = [(h["step"], h[key]) for h in history if key in h]
        evals = [(h["step"], h["eval_" + key]) for h in history if "eval_" + key in h]
        if train:
            ax.plot(*zip(*train), label="train")
        if evals:
            ax.plot(*zip(*evals), "o-", label="validation")
        ax.set_title(title)
        ax.set_xlabel("step")
        if train or evals:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Prefect task (orchestration side)
# ----------------------------------------------------------------------------------------------
def fingerprint_of(config: SFTParams, dataset: StageRef, ctx: StageContext) -> str:
    """The code ``train`` runs, the training stack, the parameters, the base model's content and the
    dataset's (docs/caching.md)."""
    # sft.cluster and sft.precision count only when used: unused, the fingerprints stay those before they existed
    unused = {"cluster"} if config.cluster.mode == "none" else set()
    unused |= {"precision"} if config.precision == "auto" else set()
    dumped = config.model_dump(mode="json", exclude=unused or None)
    profile = resolve_profile(config.profile)
    cfg = {"config": dumped, "model": ctx.model_identity(), "profile": profile.name}
    cfg["attention"] = attention_kernel(profile, config.packing)  # the kernel computes the numbers too
    if config.precision == "fp8":  # torchao's casts compute the numbers too
        cfg["fp8"] = {"torchao": torchao_version()}
    stack = stack_versions("training")
    return fingerprint(STAGE, code_identity(CODE), cfg, upstream=[content_of(dataset)], stack=stack)


def make_job(
    config: SFTParams, model_dir: Path, data_dir: Path, scratch: Path, profile: Profile | str
) -> dict[str, Any]:
    """The child's job file; the profile travels resolved, so every torchrun worker trains the same way."""
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    return {
        "config": config.model_dump(mode="json"),
        "model_dir": str(model_dir),
        "data_dir": str(data_dir),
        "scratch_dir": str(scratch),
        "output_dir": str(scratch / "final"),
        "profile": profile_to_job(profile),
    }


@task(
    name="lora_sft", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["gpu"], retries=1
)
def lora_sft(config: SFTParams, dataset: StageRef, ctx: StageContext) -> StageRef:
    """Train a LoRA adapter. Needs the profile's GPUs (none for ``cpu``); a retry resumes from the
    newest complete checkpoint."""
    check_cluster(config.cluster, config.profile, ctx.root)
    need = sft_need(config.profile, cluster=config.cluster.mode)  # tasks/runtime/requirements.py: what SFT needs here
    preflight(need.requirement)  # before anything is loaded
    # On a cluster the task needs nothing; the nodes train with the named profile (tasks/runtime/cluster.py).
    profile = need.profile if config.cluster.mode == "none" else resolve_profile(config.profile)
    check_quantization(config, profile.dtype)
    check_sharding(config, profile)
    # a cluster's nodes are not this machine: the training child checks there
    check_precision(config, profile, None if config.cluster.mode != "none" else cards_here())

    def build(work: Workspace) -> dict[str, Any]:
        assert work.scratch is not None
        job = make_job(config, ctx.model_dir(), ctx.open(dataset), work.scratch, profile)
        assert Path(job["output_dir"]) == work.out
        if config.cluster.mode != "none":  # a TrainJob's pods train; this task submits and follows it
            metrics = train_on_cluster(
                config, dataset.uri, ctx.store(), job["model_dir"], ctx.model_identity(), work.scratch.name,
                job["profile"], work.out,
            )  # fmt: skip
        else:
            report = ProgressReporter(work.scratch / "progress.jsonl", "sft-progress", "LoRA SFT steps done")
            # -- checkpoints in an s3:// store: a retry on another machine resumes (artifacts/checkpoint_sync.py) --
            with CheckpointSync(ctx.store(), STAGE, work.scratch.name, work.scratch, log=run_logger()) as sync:
                launch_training(
                    "tasks.sft.stage", job, work.scratch / "job.json", profile.nproc, on_progress=report.update
                )
            sync.clear()  # trained: the stage's own folder replaces them
            # -- end of checkpoint sync --
            report.finish()
            metrics = json.loads((work.out / "metrics.json").read_text())
        run_logger().info(speed_line(metrics))
        publish_markdown(
            "sft-curves",
            picture_markdown(work.out / "curves.png", "loss, accuracy and learning rate") + metrics_markdown(metrics),
            "LoRA SFT curves and metrics",
        )
        return metrics

    lineage = {"stage": STAGE, "code": code_identity(CODE), "stack": stack_versions("training")}
    built = with_lineage(build, **lineage, inputs=[dataset], model=ctx.model_identity())
    return run_stage(STAGE, fingerprint_of(config, dataset, ctx), ctx, built, resumable=True)


if __name__ == "__main__":
    train(json.loads(Path(sys.argv[1]).read_text()))
