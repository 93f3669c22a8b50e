"""Hardware: what a stage needs, what the machine has, and the training profiles.

One declaration per task (``GpuRequirement``) drives three things: the preflight check that fails
fast, with both sides named, before a model is loaded; the Prefect tags used for GPU concurrency
limits (the ``gpu`` tag that the work pools limit); and which work pool a deployment targets.

Profiles are data, not ``if`` chains (docs/design.md, "Hardware"):

========  ==================  =========  ==========================  ===============================
profile   machine             precision  attention (packed rows)     layout
========  ==================  =========  ==========================  ===============================
cpu       no GPU              fp32       SDPA once per row           1 process (tests, demo)
v100      1 GPU ≥ 30 GiB, 7.0 fp16 base  SDPA once per row (no       1 process, 1 packed sequence
                              + fp32     flash-attn on 7.0)          per micro-batch, gradient
                              LoRA, loss                             checkpointing (7B: 15.5 GiB)
                              scaler
a100x2    2 GPUs ≥ 40 GiB,    bf16       flash_attention_2 when      2 processes (DDP), same tokens
          8.0                            installed, else SDPA once   per step; micro-batch and
                                         per row; liger kernels      checkpointing fitted to memory
auto      read from the machine: one bf16 card (as a100x2, 1 process) or one fp16 card (as v100)
========  ==================  =========  ==========================  ===============================

"Fitted to memory" (``fit_memory``): the SFT stage picks gradient checkpointing and up to
``packed_sequences`` packed sequences per micro-batch so that the estimated peak stays within 75%
of the card (``tasks.sft.memory_plan``; a 7B on an 80 GiB card: 3 sequences, no checkpointing,
51.5 GiB and 8.8x a plain TRL script's tokens/s, measured on an H200). Unpacked rows use plain SDPA.
Measurements: docs/benchmarks.md, "SFT".
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from dataclasses import dataclass
from typing import Literal

ProfileName = Literal["auto", "cpu", "v100", "a100x2"]


class HardwareError(RuntimeError):
    """The machine does not meet a stage's declared requirement."""


@dataclass(frozen=True)
class GpuRequirement:
    gpus: int = 0
    min_memory_gib: float = 0.0
    min_compute_capability: tuple[int, int] = (0, 0)

    def describe(self) -> str:
        if self.gpus == 0:
            return "needs no GPU"
        parts = [f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}"]
        if self.min_memory_gib:
            parts[0] += f" ≥ {self.min_memory_gib:g} GiB"
        if self.min_compute_capability > (0, 0):
            parts.append("cc ≥ %d.%d" % self.min_compute_capability)
        return "needs " + ", ".join(parts)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_gib: float
    compute_capability: tuple[int, int]

    def describe(self) -> str:
        return f"{self.name} {self.memory_gib:.0f} GiB, cc %d.%d" % self.compute_capability


@dataclass(frozen=True)
class Machine:
    gpus: tuple[GpuInfo, ...] = ()

    def describe(self) -> str:
        if not self.gpus:
            return "found no GPU"
        names = sorted({g.describe() for g in self.gpus})
        return "found " + "; ".join(f"{sum(g.describe() == n for g in self.gpus)} × {n}" for n in names)


@dataclass(frozen=True)
class Profile:
    """Training settings that follow from the hardware. ``global_batch`` is kept across profiles."""

    name: str
    requirement: GpuRequirement
    dtype: Literal["fp32", "fp16", "bf16"]
    nproc: int = 1
    gradient_checkpointing: bool = False
    prefer_flash_attention: bool = False
    packed_sequences: int = 1  # most packed sequences of max_length in one micro-batch
    # SFT with packing: choose checkpointing and packed sequences (up to the above) from the card's
    # memory and the model's size (tasks.sft.memory_plan) instead of the fixed values
    fit_memory: bool = False
    liger_kernels: bool = False  # liger-kernel's Triton RMSNorm/SwiGLU/RoPE when installed (bf16 cards)
    notes: str = ""

    def attention(self, packing: bool = False) -> tuple[str, str]:
        """The attention implementation and why it was chosen (for the log and the metrics)."""
        from tasks.attention import ATTENTION

        if self.prefer_flash_attention and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2", "flash-attn is installed"
        missing = "flash-attn is not installed: " if self.prefer_flash_attention else f"profile {self.name}: "
        if packing:
            return ATTENTION, missing + "SDPA once per packed row (tasks/attention.py)"
        return "sdpa", missing + "SDPA"

    def use_liger(self) -> bool:
        return self.liger_kernels and importlib.util.find_spec("liger_kernel") is not None


PROFILES: dict[str, Profile] = {
    "cpu": Profile("cpu", GpuRequirement(0), "fp32", notes="tests and the offline demo"),
    "v100": Profile(
        "v100",
        GpuRequirement(1, 30, (7, 0)),
        "fp16",
        gradient_checkpointing=True,
        notes="frozen base in fp16, LoRA weights fp32 under autocast with a loss scaler",
    ),
    "a100x2": Profile(
        "a100x2",
        GpuRequirement(2, 40, (8, 0)),
        "bf16",
        nproc=2,
        # Off: ~2x tokens/s on a 7B at 2048 packed tokens, peak 31 GiB < 40 (docs/benchmarks.md, "SFT").
        gradient_checkpointing=False,
        prefer_flash_attention=True,
        packed_sequences=4,
        fit_memory=True,
        liger_kernels=True,
        notes="bf16, DDP over two processes, no gradient checkpointing",
    ),
}


def detect_machine() -> Machine:
    """The GPUs of this machine, read through ``nvidia-smi`` so that no CUDA context is created
    in the orchestrating process (CUDA in a parent breaks forked children)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return Machine()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (FileNotFoundError, subprocess.SubprocessError):
        return Machine()
    gpus = []
    for line in out.strip().splitlines():
        name, mem, cc = (s.strip() for s in line.split(","))
        major, minor = (int(x) for x in cc.split("."))
        gpus.append(GpuInfo(name, float(mem) / 1024, (major, minor)))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        idx = [int(i) for i in visible.split(",") if i.strip().isdigit()]
        gpus = [gpus[i] for i in idx if i < len(gpus)]
    return Machine(tuple(gpus))


def satisfies(machine: Machine, req: GpuRequirement) -> bool:
    ok = [
        g
        for g in machine.gpus
        if g.memory_gib >= req.min_memory_gib * 0.97  # nvidia-smi reports a little under the nominal size
        and g.compute_capability >= req.min_compute_capability
    ]
    return len(ok) >= req.gpus


def preflight(req: GpuRequirement, machine: Machine | None = None) -> Machine:
    """Fail fast, before anything is loaded, naming both sides:
    ``needs 2 GPUs ≥ 40 GiB, cc ≥ 8.0; found 1 × Tesla V100 32 GiB, cc 7.0``."""
    machine = machine or detect_machine()
    if not satisfies(machine, req):
        raise HardwareError(f"{req.describe()}; {machine.describe()}")
    return machine


def resolve_profile(name: ProfileName, machine: Machine | None = None) -> Profile:
    """A named profile, or for ``auto`` the largest profile this machine satisfies."""
    if name != "auto":
        return PROFILES[name]
    machine = machine or detect_machine()
    if satisfies(machine, PROFILES["a100x2"].requirement):
        return PROFILES["a100x2"]
    if not machine.gpus:
        return PROFILES["cpu"]
    if max(g.compute_capability for g in machine.gpus) >= (8, 0):  # one Ampere-or-newer card: bf16
        big = min(g.memory_gib for g in machine.gpus) >= 39  # a 7B trains without checkpointing in ~27 GiB
        return Profile(
            "gpu-bf16",
            GpuRequirement(1, 0, (8, 0)),
            "bf16",
            gradient_checkpointing=not big,
            prefer_flash_attention=True,
            packed_sequences=4,
            fit_memory=True,
            liger_kernels=True,
        )
    if satisfies(machine, PROFILES["v100"].requirement):
        return PROFILES["v100"]
    return Profile("gpu-fp16", GpuRequirement(1), "fp16", gradient_checkpointing=True)
