"""SFT's parameters (``SFTParams``, the Run form's ``sft`` section) and how the stage trains on a
hardware profile: the LoRA and TRL configs, the batch plan (tokens
per optimizer step), the memory plan (checkpointing and packed sequences fitted to the card) and
the speed settings (attention, adapter-input casts).

Pure planning functions with doctests, apart from the training loop in ``tasks/sft/stage.py`` so that
the benchmarks (``bench/sft_throughput.py``, ``bench/sft_agreement.py``) time exactly what the stage
runs. Measurements behind the constants: docs/benchmarks.md, "SFT".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.runtime.attention import ATTENTION
from tasks.runtime.attention import register as register_packed_attention
from tasks.runtime.cluster import ClusterParams
from tasks.runtime.hardware import Profile, SFTProfileName


class SFTParams(BaseModel):
    """LoRA SFT settings. Defaults reproduce the ms-swift reference job (Qwen2-7B-Instruct, r8/α32)."""

    model_config = ConfigDict(extra="forbid")

    profile: SFTProfileName = Field(
        default="auto",
        description="Hardware profile: auto (read the machine), cpu, v100 (fp16, 1 GPU), a100x2 (bf16, 2 GPUs, DDP) "
        "or fsdp (bf16, every GPU, the base model sharded: for a model that does not fit one card).",
    )
    lora_rank: int = Field(
        default=8, ge=1, le=1024, description="LoRA rank r: capacity of the adapter; memory and time grow with it."
    )
    lora_alpha: int = Field(default=32, ge=1, le=4096, description="LoRA alpha: the adapter's scale is alpha / r.")
    lora_dropout: float = Field(default=0.05, ge=0.0, le=0.5, description="Dropout on the LoRA input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        default="all-linear",
        description="Modules that get adapters: all-linear, or a list of module names (q_proj, v_proj, ...).",
    )
    use_dora: bool = Field(
        default=False, description="DoRA (weight-decomposed LoRA): often a little better, about 1.5-2x slower steps."
    )
    quantization: Literal["none", "4bit"] = Field(
        default="none",
        description="QLoRA: 4bit loads the frozen base as NF4 through bitsandbytes (GPU only): about a quarter of the "
        "base's memory, slower steps, slightly lower quality. none keeps the profile's precision.",
    )
    precision: Literal["auto", "fp8"] = Field(
        default="auto",
        description="auto: the profile's precision (bf16 on Ampere and newer). fp8: the frozen base's linear layers "
        "compute in FP8 (torchao) on cards with FP8 tensor cores (H100/H200, L4, L40S; compute capability >= 8.9); "
        "the adapters stay bf16/fp32. Faster steps, same memory; refused on other cards (docs/benchmarks.md).",
    )
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    num_train_epochs: float = Field(
        default=1.0, gt=0.0, le=100.0, description="Passes over the training split (ignored when max_steps > 0)."
    )
    max_steps: int = Field(
        default=-1, ge=-1, le=1_000_000, description="Optimizer steps; -1 trains for num_train_epochs."
    )
    per_device_batch_size: int = Field(
        default=1,
        ge=1,
        le=512,
        description="Rows per micro-batch. With packing on, rows per step = this x gradient_accumulation_steps, and "
        "the stage sizes the packed micro-batches itself (see packing).",
    )
    gradient_accumulation_steps: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Micro-batches per optimizer step; rows per step = per_device_batch_size x this, over all "
        "processes (with more processes it is divided so that the global batch stays the same).",
    )
    max_length: int = Field(
        default=2048,
        ge=16,
        le=131072,
        description="Longest sequence in tokens (a packed sequence when packing); longer rows are truncated.",
    )
    warmup_ratio: float = Field(
        default=0.05, ge=0.0, le=0.5, description="Share of the steps spent warming up the learning rate."
    )
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    eval_steps: int = Field(
        default=50,
        ge=1,
        le=1_000_000,
        description="Evaluate on the validation split (loss, mean token accuracy) every N steps.",
    )
    save_steps: int = Field(
        default=50,
        ge=1,
        le=1_000_000,
        description="Checkpoint every N steps (what a retry resumes from). Smaller loses less work on a crash, costs "
        "a save each time.",
    )
    save_total_limit: int = Field(
        default=2,
        ge=2,
        le=100,
        description="Checkpoints kept. At least 2, so that a complete one survives while the next is being written.",
    )
    logging_steps: int = Field(
        default=5, ge=1, le=10_000, description="Log loss, accuracy and learning rate every N steps."
    )
    packing: bool = Field(
        default=True,
        description="Pack rows into sequences of max_length (best-fit decreasing) and train padding-free, attention "
        "kept inside each row. Faster: fuller, fewer launches (see docs/benchmarks.md). An optimizer step "
        "still holds about the tokens of per_device_batch_size x gradient_accumulation_steps rows, so the "
        "steps per epoch and what is learned per token stay those of the unpacked job; the profile "
        "decides how many packed sequences go in one micro-batch. Off: one row per sequence.",
    )
    max_nonfinite_steps: int = Field(
        default=10,
        ge=0,
        le=100_000,
        description="Optimizer steps with a non-finite loss or gradient are skipped (no update) and counted; more "
        "than this many end the stage with an error. fp16's loss scaler skips a few steps while it finds "
        "its scale.",
    )
    seed: int = Field(default=42, ge=0, description="Seed of the adapter initialisation and the data order.")
    cluster: ClusterParams = Field(
        default_factory=ClusterParams,
        description="Train here (mode none) or on several GPU nodes through Kubeflow Trainer (docs/operating.md, "
        '"Multi-node SFT").',
    )


def check_quantization(cfg: SFTParams, dtype: str) -> None:
    """QLoRA needs a GPU and bitsandbytes: say so before anything is loaded."""
    if cfg.quantization == "none":
        return
    if dtype == "fp32":
        raise ValueError(
            "quantization=4bit (QLoRA) needs a GPU profile (bitsandbytes 4-bit kernels); the cpu profile has none"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError("quantization=4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def lora_config(cfg: SFTParams) -> Any:
    """The peft adapter. Its weights stay fp32 under fp16/bf16 autocast (peft's
    ``autocast_adapter_dtype``) while the frozen base keeps the profile's dtype."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        task_type="CAUSAL_LM",
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

    >>> from tasks.runtime.hardware import PROFILES
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
    sequences = max(
        1, round(rows_per_step * mean_row_tokens / cfg.max_length / world)
    )  # packed sequences per process per step
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
    >>> from tasks.runtime.hardware import PROFILES
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


def attention_kernel(profile: Profile, packing: bool) -> str:
    """The attention kernel SFT trains with on ``profile``, for its fingerprint: flash-attn's when it is
    installed and the profile prefers it, else ours for packed rows with the way it attends
    (``varlen`` or ``loop``: ``TUNELINE_PACKED_ATTENTION``, the torch build), else SDPA. Another kernel
    computes other numbers, so a different choice is a different adapter. Registers nothing.

    >>> from tasks.runtime.hardware import PROFILES
    >>> attention_kernel(PROFILES["cpu"], packing=True), attention_kernel(PROFILES["cpu"], packing=False)
    ('tuneline_packed_sdpa/loop', 'sdpa')
    """
    from tasks.runtime.attention import backend

    attn, _ = profile.attention(packing=packing)
    if attn == ATTENTION:
        return f"{attn}/{backend('cuda' if profile.requirement.gpus else 'cpu')}"
    return attn


def compile_decoder_layers(model: Any) -> int:
    """``torch.compile`` each decoder layer in place, its LoRA adapters included, as torchtune's
    recipes do: the layers share one compiled graph (torch inlines the module, so its weights are
    inputs, not constants). Fuses what is not a matmul (RMSNorm, SwiGLU, RoPE, the adapters'
    dropout and scaling, residual adds); shapes vary with each packed micro-batch, which torch
    handles with one dynamic-shape recompilation. Returns the number of layers."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()
    return len(layers)


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


def sft_config(
    cfg: SFTParams,
    profile: Profile,
    output_dir: Path,
    world: int = 1,
    evaluate: bool = True,
    mean_row_tokens: float | None = None,
    **overrides: Any,
) -> Any:
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
        # CPU profiles: several processes (a multi-node run of the cpu profile, tests/test_multinode.py)
        # train as one DDP group over gloo; without it accelerate sees no GPU and each trains alone.
        use_cpu=profile.requirement.gpus == 0,
    )
    if profile.shard_model:
        # FSDP2 (tasks/runtime/fsdp.py): the model arrives sharded, activation checkpointing already applied
        from tasks.runtime.fsdp import fsdp_training_args

        kwargs.update(fsdp_training_args())
        kwargs.update(gradient_checkpointing=False)
    kwargs.update(overrides)
    return SFTConfig(**kwargs)
