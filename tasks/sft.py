"""LoRA SFT stage: TRL's SFTTrainer with a peft LoRA on the dataset stage's conversations.

Resource profile: the GPUs of the chosen hardware profile (``tasks/hardware.py``); ``cpu`` for the
demo and tests. Training always runs in a child process started by the task — ``python -m
tasks.sft JOB.json`` for one process, ``torchrun --nproc_per_node N -m tasks.sft JOB.json`` for
several — so a crash of training is a failed task that Prefect can retry, not a dead flow.

Features and their trade-offs:
- Loss on assistant tokens only (TRL ``assistant_only_loss``). It needs ``{% generation %}``
  markers in the chat template: TRL's own training template when it knows the model's template,
  else our ChatML training template (SmolLM2, many others), else a clear error.
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
  installed, else SDPA once per row: tasks/attention.py). ``batch_plan`` keeps the tokens per
  optimizer step of the unpacked job (rows per step x mean row length) and lets the profile size
  the micro-batch. GPU profiles also drop peft's fp32 copies of the adapter inputs and, on bf16
  cards with liger-kernel installed, use its RMSNorm/SwiGLU/RoPE kernels. Measured on an H200 and
  checked to learn the same per token: docs/benchmarks.md ("SFT").
- Optional DoRA, optional QLoRA (4-bit NF4 base through bitsandbytes, GPU only).
- Progress: the child appends one JSON line per logging step to ``progress.jsonl``; the task turns
  it into a Prefect progress artifact. The terminal shows the trainer's own progress bar. Loss,
  token accuracy and learning rate go to ``curves.png`` (a markdown artifact); tokens/s, peak GPU
  memory and wall time to the stage's metrics.

Run the plain function without Prefect (what the GPU machine does; Prefect need not be installed)::

    python -m tasks.sft job.json                                    # one process; job.json: see make_job
    torchrun --standalone --nproc_per_node 2 -m tasks.sft job.json  # the a100x2 profile
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.attention import ATTENTION
from tasks.attention import register as register_packed_attention
from tasks.hardware import PROFILES, Profile, ProfileName, launch_training, preflight, resolve_profile
from tasks.models import resolve_model, training_chat_template
from tasks.store import StageRef, code_version, fingerprint, open_ref, stage_cache_key, store_for

try:
    from prefect import task
except ModuleNotFoundError:  # a GPU worker runs only `train` and may lack Prefect: the task stays a plain function
    def task(*_args: Any, **_kwargs: Any) -> Any:
        return lambda fn: fn

STAGE = "sft"
COMPLETE = "_COMPLETE"
NONFINITE = "nonfinite.json"

class SFTParams(BaseModel):
    """LoRA SFT settings. Defaults reproduce the ms-swift reference job (Qwen2-7B-Instruct, r8/α32)."""

    model_config = ConfigDict(extra="forbid")

    profile: ProfileName = Field(default="auto", description="Hardware profile: auto (read the machine), cpu, v100 (fp16, 1 GPU) or a100x2 (bf16, 2 GPUs, DDP).")
    lora_rank: int = Field(default=8, ge=1, le=1024, description="LoRA rank r: capacity of the adapter; memory and time grow with it.")
    lora_alpha: int = Field(default=32, ge=1, le=4096, description="LoRA alpha: the adapter's scale is alpha / r.")
    lora_dropout: float = Field(default=0.05, ge=0.0, le=0.5, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(default="all-linear", description="Modules that get adapters: all-linear, or a list of module names (q_proj, v_proj, ...).")
    use_dora: bool = Field(default=False, description="DoRA (weight-decomposed LoRA): often a little better, about 1.5-2x slower steps.")
    quantization: Literal["none", "4bit"] = Field(default="none", description="QLoRA: 4bit loads the frozen base as NF4 through bitsandbytes (GPU only): about a quarter of the base's memory, slower steps, slightly lower quality. none keeps the profile's precision.")
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    num_train_epochs: float = Field(default=1.0, gt=0.0, le=100.0, description="Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = Field(default=-1, ge=-1, le=1_000_000, description="Optimizer steps; -1 trains for num_train_epochs.")
    per_device_batch_size: int = Field(default=1, ge=1, le=512, description="Rows per micro-batch. With packing on, rows per step = this x gradient_accumulation_steps, and the stage sizes the packed micro-batches itself (see packing).")
    gradient_accumulation_steps: int = Field(default=16, ge=1, le=1024, description="Micro-batches per optimizer step; rows per step = per_device_batch_size x this, over all processes (with more processes it is divided so that the global batch stays the same).")
    max_length: int = Field(default=2048, ge=16, le=131072, description="Longest sequence in tokens (a packed sequence when packing); longer rows are truncated.")
    warmup_ratio: float = Field(default=0.05, ge=0.0, le=0.5, description="Share of the steps spent warming up the learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(default="cosine", description="Learning-rate schedule after warmup.")
    eval_steps: int = Field(default=50, ge=1, le=1_000_000, description="Evaluate on the validation split (loss, mean token accuracy) every N steps.")
    save_steps: int = Field(default=50, ge=1, le=1_000_000, description="Checkpoint every N steps (what a retry resumes from). Smaller loses less work on a crash, costs a save each time.")
    save_total_limit: int = Field(default=2, ge=2, le=100, description="Checkpoints kept. At least 2, so that a complete one survives while the next is being written.")
    logging_steps: int = Field(default=5, ge=1, le=10_000, description="Log loss, accuracy and learning rate every N steps.")
    packing: bool = Field(default=True, description="Pack rows into sequences of max_length (best-fit decreasing) and train padding-free, attention kept inside each row. Faster: fuller, fewer launches (see docs/benchmarks.md). An optimizer step still holds about the tokens of per_device_batch_size x gradient_accumulation_steps rows, so the steps per epoch and what is learned per token stay those of the unpacked job; the profile decides how many packed sequences go in one micro-batch. Off: one row per sequence.")
    max_nonfinite_steps: int = Field(default=10, ge=0, le=100_000, description="Optimizer steps with a non-finite loss or gradient are skipped (no update) and counted; more than this many end the stage with an error. fp16's loss scaler skips a few steps while it finds its scale.")
    seed: int = Field(default=42, ge=0, description="Seed of the adapter initialisation and the data order.")


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


def check_quantization(cfg: SFTParams, dtype: str) -> None:
    """QLoRA needs a GPU and bitsandbytes: say so before anything is loaded."""
    if cfg.quantization == "none":
        return
    if dtype == "fp32":
        raise ValueError("quantization=4bit (QLoRA) needs a GPU profile (bitsandbytes 4-bit kernels); the cpu profile has none")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError("quantization=4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def check_trainable_tokens(tokenizer: Any, data_file: Path, max_length: int) -> tuple[int, float]:
    """Every row must keep at least one assistant token after truncation to ``max_length``, else a
    micro-batch of it trains on nothing and its loss is a silent 0 (or NaN). Uses TRL's own
    tokenization call (the chat template's generation markers), before any model is loaded.
    Returns the number of trainable tokens and the mean row length in tokens (after truncation)."""
    total, lengths = 0, []
    with open(data_file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            out = tokenizer.apply_chat_template(
                json.loads(line)["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            n = sum(out["assistant_masks"][:max_length])
            if n == 0:
                raise ValueError(
                    f"{data_file} line {line_no}, field messages: no assistant token within max_length={max_length} "
                    f"(row is {len(out['input_ids'])} tokens); it would train on nothing. Shorten the prompt, raise "
                    "max_length or drop the row."
                )
            total += n
            lengths.append(min(len(out["input_ids"]), max_length))
    return total, sum(lengths) / max(1, len(lengths))


def lora_config(cfg: SFTParams) -> Any:
    """The peft adapter. Its weights stay fp32 under fp16/bf16 autocast (peft's
    ``autocast_adapter_dtype``) while the frozen base keeps the profile's dtype."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules, use_dora=cfg.use_dora, task_type="CAUSAL_LM",
    )


def batch_plan(cfg: SFTParams, profile: Profile, mean_row_tokens: float | None, world: int = 1) -> tuple[int, int]:
    """Micro-batch and accumulation steps per process: ``(per_device_train_batch_size,
    gradient_accumulation_steps)``.

    Unpacked, it is the configured rows per micro-batch, and the accumulation is divided among the
    processes so that the global batch stays the same. Packed, a micro-batch holds packed sequences
    of ``max_length`` tokens, and the plan keeps the *tokens* per optimizer step near what the
    configured rows would hold (rows per step x mean row length), so that packing changes the speed
    but not the number of optimizer steps per epoch, nor what is learned per token (docs/benchmarks.md,
    "what is learned"). The profile's ``packed_sequences`` caps the micro-batch (memory), and the
    rest is accumulation.

    >>> from tasks.hardware import PROFILES
    >>> batch_plan(SFTParams(), PROFILES["v100"], mean_row_tokens=620)          # 16 rows x 620 = 9,920 tokens
    (1, 5)
    >>> batch_plan(SFTParams(packing=False), PROFILES["v100"], mean_row_tokens=620)
    (1, 16)
    >>> batch_plan(SFTParams(), PROFILES["cpu"], mean_row_tokens=120)           # under one packed sequence
    (1, 1)
    >>> batch_plan(SFTParams(), PROFILES["a100x2"], mean_row_tokens=620, world=2)  # 9,920 tokens over 2 processes
    (2, 1)
    """
    rows_per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    if not cfg.packing or not mean_row_tokens:
        return cfg.per_device_batch_size, max(1, cfg.gradient_accumulation_steps // world)
    sequences = max(1, round(rows_per_step * mean_row_tokens / cfg.max_length / world))  # packed sequences per process per step
    batch = min(profile.packed_sequences, sequences)
    return batch, max(1, round(sequences / batch))


def memory_plan(profile: Profile, model_config: Any, weight_bytes: int, max_length: int, card_gib: float) -> Profile:
    """The profile with gradient checkpointing and packed sequences per micro-batch chosen to fit
    the card (profiles with ``fit_memory``; others are returned as they are).

    Peak estimate = weights + 1.2 x activations + 2 GiB, activations per token and layer (bf16)
    ~ 2 x (10 x hidden + 3 x intermediate) bytes without checkpointing, ~ 2 x hidden with it (plus
    one layer's worth): from 0.1 GiB under to 1.5 GiB over every peak measured for a 7B on an H200
    (27.0-63.8 GiB without, 18.3-22.3 GiB with checkpointing; docs/benchmarks.md). The budget is
    75% of the card.
    Small micro-batches are bound by the host, not the GPU, so more packed tokens per micro-batch
    come first, counting checkpointing's recomputation as a third more work; at equal value no
    checkpointing wins.

    >>> from types import SimpleNamespace
    >>> from tasks.hardware import PROFILES
    >>> qwen2_7b = SimpleNamespace(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28)
    >>> def plan(gib):
    ...     p = memory_plan(PROFILES["a100x2"], qwen2_7b, 15_231_233_024, 2048, gib)
    ...     return p.gradient_checkpointing, p.packed_sequences
    >>> plan(79.6), plan(39.4), plan(139.8)    # H100 80 GB, A100 40 GB, H200
    ((False, 3), (True, 4), (False, 4))
    """
    import dataclasses

    if not profile.fit_memory:
        return profile
    h, i, layers = model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers
    per_token = {False: 2 * layers * (10 * h + 3 * i), True: 2 * layers * h + 2 * (10 * h + 3 * i)}
    budget, weights = 0.75 * card_gib, weight_bytes / 2**30
    best: tuple[float, bool, int] | None = None
    for checkpointing in (False, True):
        for seqs in range(1, profile.packed_sequences + 1):
            peak = weights + 1.2 * seqs * max_length * per_token[checkpointing] / 2**30 + 2
            value = seqs * (1.0 if checkpointing else 4 / 3)
            if peak <= budget and (best is None or value > best[0]):
                best = (value, checkpointing, seqs)
    _, checkpointing, seqs = best or (0.0, True, 1)  # nothing fits the estimate: the smallest footprint
    return dataclasses.replace(profile, gradient_checkpointing=checkpointing, packed_sequences=seqs)


def speed_settings(profile: Profile, packing: bool) -> tuple[str, str, bool]:
    """What the stage trains with on a profile: the attention implementation (registered with
    transformers when it is ours), why it was chosen, and whether peft's adapter-input copies are
    skipped (under fp16/bf16 autocast). The benchmarks take it from here, so they time what runs."""
    attn, reason = profile.attention(packing=packing)
    if attn == ATTENTION:
        register_packed_attention()
    return attn, reason, profile.dtype != "fp32"


def skip_adapter_input_casts(model: Any) -> int:
    """Stop peft from copying every adapted layer's input to the adapter's fp32 dtype.

    peft keeps LoRA weights in fp32 and casts each input to fp32 before the LoRA product; under
    fp16/bf16 autocast that product runs in half precision anyway, so the cast is a full copy of
    the input of all 7 projections of every layer, forward and backward, for nothing (with the
    autocast copies it was ~11% of the GPU time of a 7B step: docs/benchmarks.md, "SFT"). The
    weights and the optimizer stay fp32. peft's ``helpers.disable_input_dtype_casting`` sets the
    same switch as a context manager; the stage keeps it off for the whole run. Returns the number
    of layers switched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)


def sft_config(cfg: SFTParams, profile: Profile, output_dir: Path, world: int = 1, evaluate: bool = True,
               mean_row_tokens: float | None = None, **overrides: Any) -> Any:
    """TRL's ``SFTConfig`` for our settings on a profile (also what bench/sft_throughput.py times).
    ``mean_row_tokens`` (the training rows' mean length) sizes packed batches: see ``batch_plan``."""
    from trl import SFTConfig

    batch, accumulation = batch_plan(cfg, profile, mean_row_tokens, world)
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=max(1, cfg.per_device_batch_size),
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        max_length=cfg.max_length,
        packing=cfg.packing,
        packing_strategy="bfd",  # best-fit decreasing; TRL trains it padding-free (position ids, no pad tokens)
        assistant_only_loss=True,
        gradient_checkpointing=profile.gradient_checkpointing,
        bf16=profile.dtype == "bf16",
        fp16=profile.dtype == "fp16",  # fp16 autocast + accelerate's loss scaler
        use_liger_kernel=profile.use_liger(),  # RMSNorm, SwiGLU, RoPE; TRL fuses the LM head and loss itself
        max_grad_norm=1.0,  # clipping also unscales fp16 gradients before the non-finite guard looks
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def train(job: dict[str, Any]) -> dict[str, Any]:
    """Train the adapter described by ``job`` (see ``make_job``); return the metrics."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    cfg = SFTParams.model_validate(job["config"])
    profile = PROFILES.get(job["profile"]) or resolve_profile("auto")  # auto-detected profiles are not in PROFILES
    scratch, output, data_dir = Path(job["scratch_dir"]), Path(job["output_dir"]), Path(job["data_dir"])
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_quantization(cfg, profile.dtype)
    attn, attn_reason, skip_casts = speed_settings(profile, cfg.packing)
    if rank == 0:
        print(f"[tuneline.sft] profile={profile.name} dtype={profile.dtype} attention={attn} ({attn_reason}) "
              f"processes={world} packing={cfg.packing} quantization={cfg.quantization} liger_kernels={profile.use_liger()}", flush=True)
        _remove_incomplete_checkpoints(scratch)

    # -- setup: tokenizer (training template), data check, model -------------------------------
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    inference_template = tokenizer.chat_template
    if (training_template := training_chat_template(tokenizer)) is not None:
        tokenizer.chat_template = training_template
    _, mean_row_tokens = check_trainable_tokens(tokenizer, data_dir / "train.jsonl", cfg.max_length)

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[profile.dtype]
    load_kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    if cfg.quantization == "4bit":
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        )
        load_kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], **load_kwargs)
    if cfg.packing and torch.cuda.is_available():
        card = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        profile = memory_plan(profile, model.config, weight_bytes, cfg.max_length, card.total_memory / 2**30)
    splits = [s for s in ("train", "validation") if (data_dir / f"{s}.jsonl").exists() and (data_dir / f"{s}.jsonl").stat().st_size]
    data = load_dataset("json", data_files={s: str(data_dir / f"{s}.jsonl") for s in splits})
    has_val = "validation" in data  # an empty validation split means no evaluation

    lora = lora_config(cfg)
    args = sft_config(cfg, profile, scratch, world=world, evaluate=has_val, mean_row_tokens=mean_row_tokens, disable_tqdm=rank != 0)
    if rank == 0:
        print(f"[tuneline.sft] batch: {args.per_device_train_batch_size} {'packed sequences' if cfg.packing else 'rows'} x "
              f"{args.gradient_accumulation_steps} accumulation x {world} processes (rows average {mean_row_tokens:.0f} tokens); "
              f"gradient_checkpointing={args.gradient_checkpointing}", flush=True)

    class Progress(TrainerCallback):
        """Append a JSON line per log; mark a checkpoint complete once every process wrote its part."""

        tokens_at_start = 0

        def on_train_begin(self, args, state, control, **kw):
            self.tokens_at_start = int(state.num_input_tokens_seen)  # > 0 on a resumed run

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                with open(scratch / "progress.jsonl", "a") as f:
                    f.write(json.dumps({"step": state.global_step, "max_steps": state.max_steps, "nonfinite_skipped": guard.skipped, **logs}) + "\n")

        def on_save(self, args, state, control, **kw):
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank's RNG state is on disk
            if state.is_world_process_zero:
                ckpt = scratch / f"checkpoint-{state.global_step}"
                (ckpt / NONFINITE).write_text(json.dumps({"skipped": guard.skipped}))
                (ckpt / COMPLETE).write_text(str(time.time()))
                print(f"[tuneline.sft] {ckpt.name} complete", flush=True)

    guard = _nonfinite_guard(cfg.max_nonfinite_steps)
    progress = Progress()
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data["train"],
        eval_dataset=data["validation"] if has_val else None,
        processing_class=tokenizer, peft_config=lora, callbacks=[progress, guard],
    )
    if skip_casts:
        skip_adapter_input_casts(trainer.model)
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
    metrics = {
        "train_loss": result.training_loss,
        "global_step": trainer.state.global_step,
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else 0,
        "nonfinite_steps_skipped": guard.skipped,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_mean_token_accuracy": eval_metrics.get("eval_mean_token_accuracy"),
        "train_tokens": tokens,  # non-padding tokens over all processes
        "tokens_per_second": (tokens - progress.tokens_at_start) / wall if wall else None,  # this attempt only
        "wall_seconds": wall,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,  # rank 0's card
        "profile": profile.name,
        "dtype": profile.dtype,
        "attention": attn,
        "processes": world,
        "packing": cfg.packing,
        "micro_batch": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_checkpointing": args.gradient_checkpointing,
        "liger_kernels": bool(args.use_liger_kernel),
    }
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(output)
        tokenizer.chat_template = inference_template
        tokenizer.save_pretrained(output)
        (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (output / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
        _plot_curves(trainer.state.log_history, output / "curves.png")
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
                print(f"[tuneline.sft] step {state.global_step + 1}: non-finite loss or gradient, step skipped "
                      f"({self.skipped} so far, at most {self.limit})", flush=True)
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
    for ax, (key, title) in zip(axes, [("loss", "loss"), ("mean_token_accuracy", "token accuracy"), ("learning_rate", "learning rate")]):
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
def fingerprint_of(config: SFTParams, dataset: StageRef, base_model: str, base_revision: str, root: str, storage_block: str | None = None) -> str:
    profile = resolve_profile(config.profile).name
    return fingerprint(STAGE, code_version(train), {"config": config, "model": base_model, "revision": base_revision, "profile": profile}, upstream=[dataset.fingerprint])


def make_job(config: SFTParams, model_dir: Path, data_dir: Path, scratch: Path, profile: str) -> dict[str, Any]:
    return {
        "config": config.model_dump(mode="json"),
        "model_dir": str(model_dir),
        "data_dir": str(data_dir),
        "scratch_dir": str(scratch),
        "output_dir": str(scratch / "final"),
        "profile": profile,
    }


@task(name="lora_sft", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["gpu"], retries=1)
def lora_sft(config: SFTParams, dataset: StageRef, base_model: str, base_revision: str, root: str, storage_block: str | None = None) -> StageRef:
    """Train a LoRA adapter. Needs the profile's GPUs (none for ``cpu``); a retry resumes from the
    newest complete checkpoint."""
    profile = resolve_profile(config.profile)
    preflight(profile.requirement)  # before anything is loaded
    check_quantization(config, profile.dtype)
    fp = fingerprint_of(config, dataset, base_model, base_revision, root)
    store = store_for(root, storage_block)
    if (ref := store.completed(STAGE, fp)) is not None:
        return ref
    scratch = store.scratch_dir(STAGE, fp)
    job = make_job(config, resolve_model(base_model, base_revision), open_ref(dataset, storage_block), scratch, profile.name)
    report = _ProgressReporter(scratch / "progress.jsonl")
    launch_training("tasks.sft", job, scratch / "job.json", profile.nproc, on_progress=report.update)
    report.finish()
    output = Path(job["output_dir"])
    metrics = json.loads((output / "metrics.json").read_text())
    _publish_curves(output / "curves.png", metrics)
    ref = store.publish(STAGE, fp, output, metrics)
    shutil.rmtree(scratch, ignore_errors=True)  # the checkpoints are no longer needed
    return ref


class _ProgressReporter:
    """Mirror ``progress.jsonl`` into a Prefect progress artifact (at most every few seconds)."""

    def __init__(self, path: Path):
        self.path, self.artifact_id, self.last = path, None, 0.0

    def update(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < 3:
            return
        self.last = time.monotonic()
        if not self.path.exists():
            return
        lines = self.path.read_text().strip().splitlines()
        if not lines:
            return
        last = json.loads(lines[-1])
        percent = 100.0 * last["step"] / max(1, last.get("max_steps") or 1)
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(progress=percent, key="sft-progress", description="LoRA SFT steps done")
            else:
                update_progress_artifact(self.artifact_id, progress=percent)
        except Exception:  # outside a Prefect run (plain call) there is nowhere to report
            pass

    def finish(self) -> None:
        self.update(force=True)


def _publish_curves(png: Path, metrics: dict[str, Any]) -> None:
    import base64

    from prefect.artifacts import create_markdown_artifact

    if not png.exists():
        return
    data = base64.b64encode(png.read_bytes()).decode()
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    try:
        create_markdown_artifact(
            key="sft-curves",
            markdown=f"![loss, accuracy and learning rate](data:image/png;base64,{data})\n\n| metric | value |\n|---|---|\n{rows}",
            description="LoRA SFT curves and metrics",
        )
    except Exception:
        pass


if __name__ == "__main__":
    train(json.loads(Path(sys.argv[1]).read_text()))
