"""Sharded LoRA training (the ``fsdp`` profile): a base model built on the meta device, sharded with
FSDP2 across every process and materialised shard by shard, so that no process ever holds it whole.

How the model is built (``build_sharded_lora``), and why not accelerate's own loading:

1. the architecture is built on the ``meta`` device (no memory) and peft's LoRA is added to it;
2. every decoder layer (and then the root) is wrapped with ``fully_shard`` (FSDP2), each layer's
   activations checkpointed when the profile says so, with bf16 compute and fp32 gradient
   reduction (``MixedPrecisionPolicy``); the frozen base keeps the profile's dtype, the LoRA weights fp32;
3. ``to_empty`` allocates each process's own shards only, on its card;
4. ``torch.distributed.checkpoint`` reads the base weights with its ``HuggingFaceStorageReader``: each
   process reads just the slices of the safetensors files that its shards hold;
5. the LoRA weights get peft's initialisation (A: kaiming-uniform, B: zero) from a seeded generator,
   the same for any number of processes; RoPE's non-persistent buffers are recomputed.

accelerate's ``cpu_ram_efficient_loading`` loads the *whole* model on rank 0's CPU and broadcasts each
full tensor (145 GB of host memory for a 72B); without it every process loads the whole model. Both break
"never whole in one process", hence steps 1-5 here. The Trainer still runs the loop through accelerate's
FSDP2 plugin (``fsdp_training_args``): it sees an ``FSDPModule`` and leaves the sharding as it is, and
saves checkpoints with DCP (``SHARDED_STATE_DICT``), which a run on another number of processes reshards
when it loads them. The final adapter is gathered on its own (``adapter_state_dict``): it is small.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

# peft's prefix of the wrapped model and the base layer of an adapted Linear, absent from a HF checkpoint.
_PEFT_PREFIX = "base_model.model."
_BASE_LAYER = ".base_layer"


def check_sharding(cfg: Any, profile: Any) -> None:
    """What the sharded path does not do, said before anything is loaded."""
    if not profile.shard_model:
        return
    if cfg.quantization != "none":
        raise ValueError("quantization=4bit (QLoRA) is not supported with profile fsdp: the base is sharded instead")
    if cfg.use_dora:
        raise ValueError("use_dora=true is not supported with profile fsdp (DoRA needs the whole base weight's norm)")


def device_for_rank() -> Any:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed() -> None:
    """The process group before the model is built (the device mesh needs it); the Trainer reuses it."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for_rank())
        dist.init_process_group("cuda:nccl,cpu:gloo", device_id=device_for_rank())
    else:
        dist.init_process_group("gloo")


def let_accelerate_shard_on_cpu() -> None:
    """CPU runs (the tests: gloo processes): accelerate 1.15 turns on its FSDP plugin only for GPU-like
    distributed types (``AcceleratorState``: MULTI_GPU, MULTI_XPU...); on MULTI_CPU it wraps the model
    in DDP instead, which fails on FSDP2's DTensor parameters. FSDP2 itself runs on CPU with gloo, so
    the shared state is told "multi-device" before the Trainer builds its Accelerator (after
    ``TrainingArguments`` made the CPU process group). Never called with a GPU."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def decoder_layer_class(model: Any) -> type:
    """The class of the repeated block (``Qwen2DecoderLayer``...): the unit FSDP shards and checkpoints."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        for cls in type(module).__mro__:  # fully_shard subclasses it (FSDPQwen2DecoderLayer)
            if cls.__name__ in names:
                return cls
    raise ValueError(f"cannot find the decoder layer class of {type(model).__name__} (_no_split_modules={names})")


def fsdp_training_args() -> dict[str, Any]:
    """TrainingArguments for accelerate's FSDP2 plugin. The model arrives already sharded per decoder
    layer, with activation checkpointing on (``build_sharded_lora``), so the plugin wraps nothing
    (``NO_WRAP``; its own wrap would look the layer class up by a name that ``fully_shard`` changed);
    what it does is the loop and the sharded (DCP) checkpoints that reshard on load."""
    return {
        "fsdp": "full_shard",
        "fsdp_config": {
            "version": 2,  # FSDP2 (transformers reads "version"; 2 is its default from 5.16)
            "reshard_after_forward": True,
            "auto_wrap_policy": "NO_WRAP",
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_ram_efficient_loading": False,  # whole model on rank 0: see the module docstring
            "activation_checkpointing": False,  # applied before sharding, by build_sharded_lora
        },
    }


def hf_name(key: str) -> str:
    """The safetensors name of a base weight in the peft model's state dict.

    >>> hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
    'model.layers.0.self_attn.q_proj.weight'
    """
    key = key.removeprefix(_PEFT_PREFIX)
    return key.replace(_BASE_LAYER + ".", ".")


def checkpoint_names(model_dir: Path) -> set[str]:
    """Tensor names in the model folder's safetensors files (their headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names.update(st.keys())
    return names


def build_sharded_lora(
    model_dir: Path | None,
    lora: Any,
    dtype: Any,
    attn: str,
    checkpointing: bool,
    seed: int,
    config: Any = None,
) -> Any:
    """The peft LoRA model, sharded with FSDP2 over the world, base weights read shard by shard from
    ``model_dir`` (``None``: random weights, each process initialising only its shards; for benchmarks)."""
    import torch
    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    init_distributed()
    device = device_for_rank()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    config = config if config is not None else AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model = get_peft_model(model, lora)
    layer_cls = decoder_layer_class(model)
    # Compute in the base's dtype; reduce gradients in fp32 (the LoRA weights and optimizer are fp32).
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if checkpointing:
        # transformers' own per-layer checkpointing (non-reentrant; the RNG state is kept, so dropout
        # recomputes alike), not torch's checkpoint_wrapper: that renames the modules
        # (``_checkpoint_wrapped_module``) and peft then finds no adapter in the state dict it saves.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})  # the method and its keyword were renamed in transformers 5.2x
    for module in model.modules():
        if isinstance(module, layer_cls):  # one FSDP unit per decoder layer: gathered, used, freed
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)  # this process's shards only
    _load_base(model, model_dir, seed, device)
    _init_lora(model, seed, device)
    _recompute_buffers(model, device)
    return model


def _load_base(model: Any, model_dir: Path | None, seed: int, device: Any) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()
    base = {k: v for k, v in state.items() if "lora_" not in k}
    if model_dir is None:  # benchmark: random weights, each shard drawn on its own process
        gen = torch.Generator(device=device).manual_seed(seed + torch.distributed.get_rank())
        with torch.no_grad():
            for v in base.values():
                local = v.to_local() if hasattr(v, "to_local") else v
                local.normal_(0.0, 0.02, generator=gen)
        return
    names = checkpoint_names(model_dir)
    wanted = {hf_name(k): v for k, v in base.items()}
    # A tied LM head is the embedding's own tensor: its name is not in the checkpoint.
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(wanted) - names - tied)
    if missing:
        raise ValueError(f"model_dir {model_dir}: weights missing from its safetensors files: {missing[:5]}")
    reader = dcp.HuggingFaceStorageReader(str(model_dir))  # reads each requested slice, not whole files
    dcp.load({k: v for k, v in wanted.items() if k in names}, storage_reader=reader)


def _init_lora(model: Any, seed: int, device: Any) -> None:
    """peft's default LoRA init, drawn whole (the adapters are small) from one seeded generator in
    name order, then each process keeps its slice: the same adapter for any number of processes."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if "lora_" not in name:
                continue
            full = torch.empty(p.shape, dtype=torch.float32)
            if "lora_A" in name:
                torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
            else:
                full.zero_()
            full = full.to(device=device, dtype=p.dtype)
            if isinstance(p, DTensor):
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p = p.to_local()
            p.copy_(full)


def _recompute_buffers(model: Any, device: Any) -> None:
    """Non-persistent buffers (RoPE's inverse frequencies) are not in any checkpoint and ``to_empty``
    left them uninitialised: rebuild each such module from its config on the device."""
    import torch

    for module in model.modules():
        buffers = getattr(module, "_non_persistent_buffers_set", set())
        if not buffers:
            continue
        if not hasattr(module, "config"):
            raise ValueError(f"cannot recompute the buffers {sorted(buffers)} of {type(module).__name__}")
        with torch.device(device):
            fresh = type(module)(config=module.config)
        for b in buffers:
            setattr(module, b, getattr(fresh, b).to(device))


def adapter_state_dict(model: Any) -> dict[str, Any]:
    """The LoRA weights gathered whole on every process (a collective: every rank calls it), on CPU."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
        for k, v in model.state_dict().items()
        if "lora_" in k
    }
