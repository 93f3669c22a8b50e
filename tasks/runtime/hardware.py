"""Hardware: the training profiles, what the machine has (torch's view, read in a subprocess), the
preflight check that names both sides, and the precision a card runs in.

Which task needs what is declared once in ``tasks/runtime/requirements.py``; its tags, the flow's preflight
and the device evaluation and merge use follow from that declaration and this module.

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
fsdp      ≥ 2 GPUs, 8.0       bf16       as a100x2 (no liger         every visible GPU, FSDP2: base
                                         kernels)                    sharded, built on meta, read
                                                                     shard by shard; activation
                                                                     checkpointing (tasks/runtime/fsdp.py)
auto      the work pool's profile (TUNELINE_POOL_PROFILE), else read from the machine: one bf16 card
          (as a100x2, 1 process) or one fp16 card (as v100); never CPU: no GPU fails preflight
========  ==================  =========  ==========================  ===============================

"Fitted to memory" (``fit_memory``): the SFT stage picks gradient checkpointing and up to
``packed_sequences`` packed sequences per micro-batch so that the estimated peak stays within 75%
of the card (``tasks.sft.stage.memory_plan``; a 7B on an 80 GiB card: 3 sequences, no checkpointing,
51.5 GiB and 8.8x a plain TRL script's tokens/s, measured on an H200). Unpacked rows use plain SDPA.
Measurements: docs/benchmarks.md, "SFT".
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ProfileName = Literal["auto", "cpu", "v100", "a100x2"]
# SFT can also shard the model (tasks/runtime/fsdp.py); GRPO cannot, so its parameter keeps ProfileName.
SFTProfileName = Literal["auto", "cpu", "v100", "a100x2", "fsdp"]

# The packed-row attention's registered name (tasks/runtime/attention.py registers it). Named here, not
# imported from there: evaluation reads this module (precision by card) and must not count the kernel.
PACKED_ATTENTION = "tuneline_packed_sdpa"


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
    uuid: str = field(default="", compare=False)  # as torch reports it (names the card in logs)

    def describe(self) -> str:
        return f"{self.name} {self.memory_gib:.0f} GiB, cc %d.%d" % self.compute_capability


@dataclass(frozen=True)
class Machine:
    gpus: tuple[GpuInfo, ...] = ()
    # How the GPUs were looked for, named in "found no GPU" messages (CUDA_VISIBLE_DEVICES, probe errors).
    how: str = field(default="", compare=False)

    def describe(self) -> str:
        if not self.gpus:
            return f"found no GPU ({self.how})" if self.how else "found no GPU"
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
    # memory and the model's size (tasks.sft.stage.memory_plan) instead of the fixed values
    fit_memory: bool = False
    liger_kernels: bool = False  # liger-kernel's Triton RMSNorm/SwiGLU/RoPE when installed (bf16 cards)
    # torch.compile each decoder layer with its adapters when the plan has no checkpointing: 15,775 vs
    # 14,090 tokens/s with liger instead on a 7B, one process (docs/benchmarks.md, issue 18). Liger's
    # Triton functions break the compiled graph, so compiling replaces them.
    compile_layers: bool = False
    # FSDP2: the base model sharded over the processes, never whole in one (tasks/runtime/fsdp.py)
    shard_model: bool = False
    notes: str = ""

    def attention(self, packing: bool = False) -> tuple[str, str]:
        """The attention implementation and why it was chosen (for the log and the metrics)."""
        if self.prefer_flash_attention and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2", "flash-attn is installed"
        missing = "flash-attn is not installed: " if self.prefer_flash_attention else f"profile {self.name}: "
        if packing:
            return PACKED_ATTENTION, missing + "SDPA once per packed row (tasks/runtime/attention.py)"
        return "sdpa", missing + "SDPA"

    def compiles(self) -> bool:
        """Whether the decoder layers are compiled (measured without checkpointing and unsharded only)."""
        return self.compile_layers and not self.gradient_checkpointing and not self.shard_model

    def use_liger(self) -> bool:
        return self.liger_kernels and not self.compiles() and importlib.util.find_spec("liger_kernel") is not None


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
        # compile_layers stays off: measured on one process only; DDP with compiled layers did not run
        notes="bf16, DDP over two processes, no gradient checkpointing",
    ),
    # nproc: every visible GPU, set by resolve_profile; 2 here is the least it runs on.
    "fsdp": Profile(
        "fsdp",
        GpuRequirement(2, 0, (8, 0)),
        "bf16",
        nproc=2,
        gradient_checkpointing=True,  # activation checkpointing per decoder layer: a 72B's activations
        prefer_flash_attention=True,
        packed_sequences=4,
        shard_model=True,
        notes="bf16, FSDP2 over every GPU: the frozen base sharded, never whole in one process",
    ),
}


#: Set by a work pool for its runs (infra/work-pools.yaml ``profile``): ``auto`` resolves to it there.
POOL_PROFILE_ENV = "TUNELINE_POOL_PROFILE"

# torch's own view of the devices: it understands what CUDA_VISIBLE_DEVICES may hold (indices, GPU
# UUIDs, MIG ids), which nvidia-smi does not, and needs no nvidia-smi on the worker.
_PROBE = """
import json, torch
props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
print(json.dumps([[p.name, p.total_memory, p.major, p.minor, str(getattr(p, "uuid", ""))] for p in props]))
"""


def detect_machine() -> Machine:
    """The GPUs this process may use, as torch sees them, read in a short subprocess so that the
    orchestrating process never initialises CUDA (CUDA in a parent breaks forked children). Read
    once per process and ``CUDA_VISIBLE_DEVICES`` value."""
    return _probe(os.environ.get("CUDA_VISIBLE_DEVICES"))


@functools.lru_cache(maxsize=8)
def _probe(visible: str | None) -> Machine:
    where = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
    if visible is not None and visible.strip() in ("", "-1"):
        return Machine(how=f"{where}: no device is visible")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=180, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired:
        return Machine(how=f"{where}; torch's device probe timed out after 180 s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Machine(how=f"{where}; torch's device probe failed: {last}")
    gpus = tuple(
        GpuInfo(name, mem / 2**30, (major, minor), uuid)
        for name, mem, major, minor, uuid in json.loads(done.stdout.strip().splitlines()[-1])
    )
    return Machine(gpus, how=f"torch sees 0 CUDA devices, {where}")


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


def resolve_profile(name: SFTProfileName, machine: Machine | None = None) -> Profile:
    """A named profile; for ``auto``, the work pool's profile (``TUNELINE_POOL_PROFILE``) when the
    run is on a GPU pool, else the largest GPU profile this machine satisfies. ``auto`` never means
    CPU: with no GPU it raises ``HardwareError`` (a 7B must not quietly train on a CPU for days)."""
    if name == "fsdp":  # one process per visible GPU (at least 2: fewer fails preflight)
        machine = machine or detect_machine()
        return dataclasses.replace(PROFILES["fsdp"], nproc=max(2, len(machine.gpus)))
    if name != "auto":
        return PROFILES[name]
    pool = os.environ.get(POOL_PROFILE_ENV, "")
    if pool in PROFILES and pool not in ("cpu", "fsdp"):  # fsdp is asked for by name, never chosen
        return PROFILES[pool]
    machine = machine or detect_machine()
    if not machine.gpus:
        raise HardwareError(
            f"profile auto chooses among GPU profiles and {machine.describe()}; set the profile to cpu to run on CPU"
        )
    if satisfies(machine, PROFILES["a100x2"].requirement):
        return PROFILES["a100x2"]
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
            compile_layers=True,
        )
    if satisfies(machine, PROFILES["v100"].requirement):
        return PROFILES["v100"]
    return Profile("gpu-fp16", GpuRequirement(1), "fp16", gradient_checkpointing=True)


def profile_to_job(profile: Profile) -> dict[str, Any]:
    """The resolved profile as the training child receives it (``auto`` is resolved once, by the task:
    the child, its torchrun workers and a GRPO child that narrows its devices all train the same way)."""
    return asdict(profile)


def profile_from_job(spec: dict[str, Any] | str) -> Profile:
    """Inverse of ``profile_to_job``; a plain name (older jobs) is looked up.

    >>> profile_from_job(profile_to_job(PROFILES["v100"])) == PROFILES["v100"]
    True
    """
    if isinstance(spec, str):
        return PROFILES[spec]
    req = spec["requirement"]
    requirement = GpuRequirement(req["gpus"], req["min_memory_gib"], tuple(req["min_compute_capability"]))
    return Profile(**{**spec, "requirement": requirement})


def card_dtype(capability: tuple[int, int] | None) -> Literal["fp32", "fp16", "bf16"]:
    """The precision a model runs in on a card: bf16 from compute capability 8.0, fp16 below (a V100
    reports bf16 as supported, by emulation, so asking torch would evaluate a model that never ships),
    fp32 without a GPU.

    >>> card_dtype((7, 0)), card_dtype((9, 0)), card_dtype(None)
    ('fp16', 'bf16', 'fp32')
    """
    if capability is None:
        return "fp32"
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"
