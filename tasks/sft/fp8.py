"""FP8 for the frozen base (``sft.precision=fp8``): the base model's linear layers compute in FP8 on
cards that have it, the LoRA adapters and their gradients stay in bf16/fp32.

Why: the frozen base's matmuls are ~99.7% of a LoRA step's FLOPs, and Hopper/Ada cards (compute
capability ≥ 8.9) run FP8 matmuls at twice their bf16 rate. Library: torchao's float8 training
(``torchao.float8.convert_to_float8_training``) — chosen over Transformer Engine because it swaps
``nn.Linear`` modules in place (peft then wraps them like any linear: LoRA's own A/B layers are
created after the swap and stay ordinary bf16/fp32 ``nn.Linear``), it is a pip wheel with no CUDA
build step (Transformer Engine needs its own compiled extension matching the CUDA toolkit, and its
own ``te.Linear`` modules that peft does not know), and it is made for ``torch.compile``, which the
stage already applies per decoder layer (the casts fuse into the compiled graph, and AOTAutograd
drops the weight-gradient matmul of a frozen weight). Scaling: tensorwise dynamic (torchao's default
recipe), recomputed each step — the weights stay bf16 in memory, so memory does not fall.

Not converted: ``lm_head`` (the logits feed the loss and are the most precision-sensitive product;
what torchtune and torchao's own examples leave out) and any layer whose dimensions are not multiples
of 16 (``torch._scaled_mm``'s requirement). The check (:func:`check_precision`) runs in the flow's
preflight and again in the training child: one line on a card without FP8, on a profile that is not
bf16, with QLoRA, with FSDP sharding, or without torchao.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

#: FP8 tensor cores: Ada (8.9) and Hopper (9.0) and newer.
FP8_MIN_CAPABILITY = (8, 9)


def check_precision(cfg: Any, profile: Any, capabilities: list[tuple[int, int]] | None) -> None:
    """Raise ``ValueError`` (one line naming ``sft.precision``) when fp8 cannot run here.
    ``capabilities``: the compute capability of each card the stage trains on (``None``: not known here,
    e.g. a cluster's nodes; the training child checks again).

    >>> from types import SimpleNamespace as NS
    >>> bf16 = NS(name="gpu-bf16", dtype="bf16", shard_model=False)
    >>> check_precision(NS(precision="auto", quantization="none"), bf16, [])   # nothing asked, nothing checked
    >>> check_precision(NS(precision="fp8", quantization="none"), bf16, [(8, 0)])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: sft.precision=fp8 needs FP8 tensor cores (...); found cc 8.0; use sft.precision=auto
    """
    if getattr(cfg, "precision", "auto") != "fp8":
        return
    if profile.dtype != "bf16":
        raise ValueError(
            f"sft.precision=fp8 computes the frozen base in FP8 around a bf16 model; profile {profile.name} trains in "
            f"{profile.dtype}; use a bf16 profile (auto on an H100) or sft.precision=auto"
        )
    if cfg.quantization != "none":
        raise ValueError("sft.precision=fp8 and sft.quantization=4bit both change the frozen base; choose one")
    if profile.shard_model:
        raise ValueError("sft.precision=fp8 is not supported with the fsdp profile (measured on one process only)")
    if capabilities is not None:
        low = sorted({c for c in capabilities if c < FP8_MIN_CAPABILITY})
        if low or not capabilities:
            found = ", ".join("cc %d.%d" % c for c in low) if low else "no GPU"
            raise ValueError(
                "sft.precision=fp8 needs FP8 tensor cores (compute capability ≥ 8.9: H100, H200, L4, L40S, RTX 4090); "
                f"found {found}; use sft.precision=auto"
            )
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("sft.precision=fp8 needs torchao on the training machine: pip install torchao")


def cards_here(this_process: bool = False) -> list[tuple[int, int]]:
    """Compute capabilities of the cards here: the one this process uses (the training child), or
    every card of the machine, read without initialising CUDA in this process (the task)."""
    if this_process:
        import torch

        return [torch.cuda.get_device_capability()] if torch.cuda.is_available() else []
    from tasks.runtime.hardware import detect_machine

    return [g.compute_capability for g in detect_machine().gpus]


def fp8_targets(model: Any) -> list[str]:
    """Names of the linear layers that compute in FP8: every ``nn.Linear`` of the base except
    ``lm_head`` and layers whose in/out features are not multiples of 16. Called before peft adds its
    adapters, so no LoRA layer is among them.

    >>> import torch
    >>> m = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(64, 32), "odd": torch.nn.Linear(64, 30),
    ...                          "lm_head": torch.nn.Linear(64, 128)})
    >>> fp8_targets(m)
    ['q_proj']
    """
    import torch

    return [
        name
        for name, m in model.named_modules()
        if type(m) is torch.nn.Linear  # exact type: not peft's or an already converted layer
        and name.split(".")[-1] != "lm_head"
        and m.in_features % 16 == 0
        and m.out_features % 16 == 0
    ]


#: ``TUNELINE_FP8_SCALING``: ``tensorwise`` (default: one scale per tensor, the fastest) or ``rowwise``
#: (one scale per row of each operand: more accurate, slower; torchao's ``rowwise_with_gw_hp`` recipe).
#: Part of the SFT fingerprint when fp8 is on (another scaling computes other numbers).
SCALING_ENV = "TUNELINE_FP8_SCALING"


def fp8_scaling() -> str:
    scaling = os.environ.get(SCALING_ENV, "tensorwise")
    if scaling not in ("tensorwise", "rowwise"):
        raise ValueError(f"{SCALING_ENV}={scaling!r}: use tensorwise or rowwise")
    return scaling


def convert_base_to_fp8(model: Any) -> int:
    """Swap the base's linear layers (:func:`fp8_targets`) for torchao's ``Float8Linear`` in place;
    returns how many. Run on the loaded model before the trainer adds the adapters."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.config import CastConfig, Float8LinearConfig, ScalingType

    targets = set(fp8_targets(model))
    if fp8_scaling() == "rowwise":  # grad_weight in high precision too (see below)
        config = Float8LinearConfig.from_recipe_name("rowwise_with_gw_hp")
        convert_to_float8_training(model, config=config, module_filter_fn=lambda _module, fqn: fqn in targets)
        return len(targets)

    # Tensorwise scaling (torchao's default recipe) for the two products a frozen base computes (output,
    # grad_input); the grad_weight product stays in bf16: nothing needs it (the weight is frozen, and the
    # compiled graph drops it), and in FP8 its inner dimension would be the packed token count, which
    # torch._scaled_mm needs to be a multiple of 16 (measured: the compile failed on a packed batch).
    config = Float8LinearConfig(  # two objects: torchao fills in each one's dtype in place
        cast_config_input_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED),
        cast_config_grad_output_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED),
    )
    convert_to_float8_training(model, config=config, module_filter_fn=lambda _module, fqn: fqn in targets)
    return len(targets)


def torchao_version() -> str:
    """torchao's installed version and the scaling (``absent`` without torchao), for an fp8 run's fingerprint."""
    from importlib import metadata

    try:
        return f"{metadata.version('torchao')} {fp8_scaling()}"
    except metadata.PackageNotFoundError:
        return "absent"
