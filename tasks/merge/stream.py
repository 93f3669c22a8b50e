"""Streaming LoRA merge: fold an adapter into a base model that fits neither one card nor the host's
memory whole (a 72B in bf16 is 145 GB), one safetensors shard file at a time, on the CPU.

For each shard file of the base: read it, add ``scale · B @ A`` (in fp32) to every weight the adapter
adapts, cast to the pinned dtype, write the shard under the same name, drop it, go on. What is held at
once: one shard's tensors (in and out) and the adapter (a few hundred MB at most), so the peak is about
the largest shard file plus the adapter, whatever the model's size. The index, config (its dtype),
tokenizer and generation config are written beside them, so the folder loads like peft's merge.

Written by hand: peft's ``merge_and_unload`` needs the whole base model loaded, which is what this
avoids; the arithmetic is peft's (``LoraLayer.get_delta_weight`` for a Linear: ``B @ A · alpha / r``,
``alpha / √r`` with rsLoRA). DoRA (weight-norm rescaling) and adapters on embeddings are refused.

The check (``verify``) is per weight, not per logit (which would need the whole model): after each shard
is written, every merged weight is read back and compared with the fp32 sum; the difference must stay
within the dtype's rounding (``WEIGHT_RTOL`` x the largest value), and ``adapter_effect`` (largest
|ΔW|) shows the adapter changes something.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Largest |saved - fp32 sum| relative to the tensor's largest |value|: half an ulp of the dtype, x2.
WEIGHT_RTOL = {"fp32": 1e-6, "fp16": 2**-10, "bf16": 2**-7}
_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_ADAPTER_PREFIX = "base_model.model."


class StreamMergeError(RuntimeError):
    """The adapter cannot be merged this way, or a merged weight does not match its fp32 sum."""


def lora_deltas(adapter_dir: Path) -> tuple[dict[str, tuple[Any, Any]], float]:
    """``{base weight name: (A, B)}`` and the scale, from peft's saved adapter."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise StreamMergeError("adapter uses DoRA: merge it with merge.method=peft (DoRA rescales by the weight norm)")
    if cfg.get("fan_in_fan_out"):
        raise StreamMergeError("adapter has fan_in_fan_out=true (Conv1D layers): merge it with merge.method=peft")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise StreamMergeError("adapter has per-module ranks (rank_pattern/alpha_pattern): use merge.method=peft")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        module, _, kind = key.removeprefix(_ADAPTER_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise StreamMergeError(f"adapter tensor {key} is not a Linear LoRA weight: use merge.method=peft")
        pairs.setdefault(module + ".weight", {})[kind[0]] = value
    return {name: (ab["A"], ab["B"]) for name, ab in pairs.items()}, scale


def stream_merge(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str,
    on_shard: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Merge shard file by shard file into ``out_dir``; return the metrics (``verified`` true, or raise
    ``StreamMergeError``). ``on_shard`` is called after each shard is written (progress)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = getattr(torch, _DTYPE_NAMES[dtype])
    deltas, scale = lora_deltas(adapter_dir)
    shards = sorted(base_dir.glob("*.safetensors"))
    if not shards:
        raise StreamMergeError(f"base model {base_dir} has no safetensors files")
    out_dir.mkdir(parents=True, exist_ok=True)
    merged_names: set[str] = set()
    worst, effect, total = 0.0, 0.0, 0
    rtol = WEIGHT_RTOL[dtype]
    for shard in shards:
        out: dict[str, Any] = {}
        sums: dict[str, Any] = {}  # fp32 sums of this shard's adapted weights, for the check
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata() or {}
            for name in f.keys():
                w = f.get_tensor(name)
                if name in deltas:
                    a, b = deltas[name]
                    delta = (b.float() @ a.float()) * scale
                    if delta.shape != w.shape:
                        raise StreamMergeError(f"{name}: adapter delta {tuple(delta.shape)} vs weight {tuple(w.shape)}")
                    sums[name] = w.float() + delta
                    effect = max(effect, delta.abs().max().item())
                    out[name] = sums[name].to(target)
                    merged_names.add(name)
                else:
                    out[name] = w.to(target) if w.is_floating_point() else w
        save_file(out, str(out_dir / shard.name), metadata={**metadata, "format": "pt"})
        total += sum(t.numel() * t.element_size() for t in out.values())
        del out
        # -- check: the written weights read back, against their fp32 sums --
        with safe_open(str(out_dir / shard.name), framework="pt") as f:
            for name, exact in sums.items():
                diff = (f.get_tensor(name).float() - exact).abs().max().item()
                worst = max(worst, diff / max(exact.abs().max().item(), 1e-12))
        del sums
        if on_shard is not None:
            on_shard(out_dir / shard.name)
    missing = sorted(set(deltas) - merged_names)
    if missing:
        raise StreamMergeError(f"adapter weights with no base weight in {base_dir}: {missing[:5]}")
    _write_beside(base_dir, adapter_dir, out_dir, dtype, total)
    metrics = {
        "method": "stream",
        "dtype": dtype,
        "max_weight_rel_diff": worst,
        "tolerance": rtol,
        "adapter_effect": effect,  # largest |ΔW|
        "weights_merged": len(merged_names),
        "verified": worst <= rtol,
        "size_bytes": sum(p.stat().st_size for p in out_dir.glob("*.safetensors")),
        "shards": len(shards),
        "largest_base_shard_bytes": max(p.stat().st_size for p in shards),
    }
    (out_dir / "merge-verification.json").write_text(json.dumps(metrics, indent=2))
    if not worst <= rtol:  # also catches NaN
        raise StreamMergeError(
            f"merged weights in {out_dir} differ from base + adapter by {worst:.3g} of their largest value "
            f"> {rtol:.3g} ({dtype}); nothing was published"
        )
    return metrics


def _write_beside(base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str, total: int) -> None:
    """Index (new total size), config (the saved dtype), tokenizer (the adapter's: it carries the
    inference chat template) and generation config."""
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        (out_dir / index.name).write_text(json.dumps(data, indent=2))
    config = json.loads((base_dir / "config.json").read_text())
    config["dtype"] = _DTYPE_NAMES[dtype]
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if (base_dir / "generation_config.json").exists():
        shutil.copyfile(base_dir / "generation_config.json", out_dir / "generation_config.json")
    from tasks.core.common import load_tokenizer

    load_tokenizer(adapter_dir).save_pretrained(out_dir)
