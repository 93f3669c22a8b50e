"""Merge stage: fold the LoRA adapter into the base weights, save, and prove the result is right.

Resource profile: CPU by default (fp32 reference pass + the merged model: about 3× the model's fp16
size in RAM, e.g. ~45 GB for a 7B model); ``device: cuda`` does the same on one GPU, much faster.

It runs *before* evaluation, so that what is evaluated is exactly what ships (docs/design.md).

1. base (fp32) + adapter → reference logits on a fixed batch of chat prompts;
2. peft's ``merge_and_unload``, cast to the pinned dtype — by default the dtype the adapter was
   trained in (fp16 on v100, bf16 on a100x2), never silently fp32 (ms-swift users reported merged
   models saved in fp32 at twice the size) — and saved as sharded safetensors with the tokenizer,
   its chat template and the generation config;
3. the *saved* folder is loaded back and its logits compared with the reference: the largest
   difference must stay within the dtype's tolerance (``atol + rtol · max|reference logit|``: rounding
   weights to 16 bits moves logits in proportion to their size). A failure raises ``MergeError``, the
   task fails and the flow stops; nothing is published.

Run it without Prefect::

    python -c "from pathlib import Path; from tasks.merge.stage import *; \
        print(merge(MergeParams(dtype='bf16'), 'BASE_DIR', Path('ADAPTER_DIR'), Path('OUT_DIR'), 'bf16'))"
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts.store import StageRef
from tasks.core.common import Dtype, load_tokenizer, run_logger, task, torch_dtype
from tasks.core.fingerprints import code_identity, content_of, fingerprint, stack_versions, with_lineage
from tasks.core.stage import StageContext, Workspace, run_stage, stage_cache_key
from tasks.runtime.hardware import card_dtype, detect_machine, preflight, resolve_profile
from tasks.runtime.requirements import ONE_GPU

STAGE = "merge"
CODE = "tasks.merge.stage"  # the module of merge(): the code identity starts here
# (atol, rtol) of max|Δlogit| by dtype, relative to the largest reference logit. Measured by
# bench/merge_tolerance.py on SmolLM2-135M: casting the merged weights moves logits by 0.67 % of
# max|logit| in bf16 and 0.18 % in fp16 (2e-6 in fp32); the bounds leave ~3× room.
TOLERANCE: dict[str, tuple[float, float]] = {"fp32": (1e-4, 1e-4), "fp16": (1e-3, 5e-3), "bf16": (1e-3, 2e-2)}
VERIFY_PROMPTS = ["Who are you?", "What is 12 * 7?", "Write a haiku about autumn.", "用一句话介绍你自己。"]
# Files of the base model that describe generation and are not written by save_pretrained when the
# loaded model lacks them (kept as they are: the merge changes weights, not how to generate).
_COPIED_FROM_BASE = ("generation_config.json",)


class MergeError(RuntimeError):
    """The merged model does not reproduce base + adapter."""


class MergeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto",
        description="Dtype of the saved merged model. auto = the dtype the adapter was trained in (fp16 on v100, "
        "bf16 on a100x2, fp32 on cpu). fp32 doubles the size for no gain at inference; fp16 on a bf16-trained model "
        "may overflow.",
    )
    device: Literal["cpu", "cuda"] = Field(
        default="cpu",
        description="Where to merge: cpu (any machine, slow for 7B) or cuda (one GPU, fast; needs ~3× the fp16 model "
        "size in GPU memory).",
    )
    method: Literal["peft", "stream"] = Field(
        default="peft",
        description="peft: load the whole base model, merge with peft and check logits (needs ~3x the model in "
        "memory). stream: merge one safetensors shard at a time on the CPU, checking each merged weight "
        "(holds about one shard: for a model that fits neither one card nor the host's memory; "
        "tasks/merge/stream.py). stream keeps the base's shard files and ignores device and max_shard_size.",
    )
    max_shard_size: str = Field(
        default="2GB",
        pattern=r"^\d+(MB|GB)$",
        description="Largest safetensors shard: smaller shards upload and resume in finer pieces, more files.",
    )
    tolerance: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="Largest allowed |Δlogit| between the merged model and base + adapter. Empty = the dtype's "
        "default (atol + rtol · max|logit|, see TOLERANCE). Raise it only with a reason: a loose bound lets a broken "
        "merge ship.",
    )


# ----------------------------------------------------------------------------------------------
# Plain functions
# ----------------------------------------------------------------------------------------------
def merge(config: MergeParams, base_dir: str, adapter_dir: Path, out_dir: Path, dtype: Dtype) -> dict[str, Any]:
    """Merge, save and verify; return the metrics (dtype, size, max logit difference, tolerance)."""
    if config.method == "stream":  # shard by shard on the CPU, checked per weight (tasks/merge/stream.py)
        from tasks.merge.stream import stream_merge

        return stream_merge(Path(base_dir), adapter_dir, out_dir, dtype)
    reference = merge_and_save(base_dir, adapter_dir, out_dir, dtype, config.device, config.max_shard_size)
    return verify_merged(out_dir, reference, dtype, config.device, config.tolerance)


def merge_and_save(
    base_dir: str, adapter_dir: Path, out_dir: Path, dtype: Dtype, device: str = "cpu", max_shard_size: str = "2GB"
) -> dict[str, Any]:
    """Save the merged model in ``out_dir``; return the reference (batch and base + adapter logits)
    that ``verify_merged`` checks the saved folder against."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(adapter_dir)  # the SFT stage saved it with the inference chat template
    # Reference in fp32, so that the check measures the merge and the cast, not the reference's rounding.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    batch = _verify_batch(tokenizer, device)
    with torch.no_grad():
        reference = model(**batch).logits.float().cpu()
        with (
            model.disable_adapter()
        ):  # how much the adapter changes the logits: a check weaker than this proves nothing
            base_logits = model(**batch).logits.float().cpu()
        merged = model.merge_and_unload().to(torch_dtype(dtype))
    merged.config.dtype = torch_dtype(dtype)  # config.json states what the shards hold
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    for name in _COPIED_FROM_BASE:
        if (Path(base_dir) / name).exists() and not (out_dir / name).exists():
            shutil.copyfile(Path(base_dir) / name, out_dir / name)
    del merged, model, base
    mask = batch["attention_mask"].bool().cpu()
    effect = (reference - base_logits).abs()[mask].max().item()
    return {"batch": {k: v.cpu() for k, v in batch.items()}, "logits": reference, "adapter_effect": effect}


def verify_merged(
    merged_dir: Path, reference: dict[str, Any], dtype: Dtype, device: str = "cpu", tolerance: float | None = None
) -> dict[str, Any]:
    """Load the saved merged model and compare its logits with base + adapter's; raise ``MergeError``
    when the largest difference exceeds the tolerance. Writes ``merge-verification.json`` either way."""
    import torch
    from transformers import AutoModelForCausalLM

    # Computed in fp32 from the saved 16-bit weights: the check then measures the merge and the cast
    # of the weights, not the 16-bit arithmetic of inference (which moves logits several times more).
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).to(device).eval()
    batch = {k: v.to(device) for k, v in reference["batch"].items()}
    with torch.no_grad():
        got = reloaded(**batch).logits.float().cpu()
    mask = reference["batch"]["attention_mask"].bool()
    ref = reference["logits"]
    diff = (got - ref).abs()[mask].max().item()
    scale = ref.abs()[mask].max().item()
    atol, rtol = TOLERANCE[dtype]
    limit = tolerance if tolerance is not None else atol + rtol * scale
    saved_dtypes = _saved_dtypes(merged_dir)
    metrics = {
        "dtype": dtype,
        "saved_dtypes": saved_dtypes,
        "max_logit_diff": diff,
        "max_abs_logit": scale,
        "tolerance": limit,
        "adapter_effect": reference.get("adapter_effect"),
        "verified": diff <= limit,
        "size_bytes": sum(p.stat().st_size for p in merged_dir.glob("*.safetensors")),
        "shards": len(list(merged_dir.glob("*.safetensors"))),
    }
    (merged_dir / "merge-verification.json").write_text(json.dumps(metrics, indent=2))
    if not diff <= limit:  # also catches NaN
        raise MergeError(
            f"merged model in {merged_dir} does not reproduce base + adapter: max |Δlogit| {diff:.4g} > tolerance "
            f"{limit:.4g} ({dtype}); nothing was published"
        )
    return metrics


def _saved_dtypes(folder: Path) -> list[str]:
    """The dtypes stored in a folder's safetensors shards (read from their headers, not the model)."""
    from safetensors import safe_open

    names = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
    found: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            found.update(names.get(f.get_slice(k).get_dtype(), f.get_slice(k).get_dtype()) for k in f.keys())
    return sorted(found)


def _verify_batch(tokenizer, device: str):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in VERIFY_PROMPTS
    ]
    return tokenizer(texts, return_tensors="pt", padding=True).to(device)


def merge_dtype(config: MergeParams, adapter: StageRef, sft_profile: str) -> Dtype:
    """The pinned dtype: the parameter, else the dtype the adapter was trained in (recorded by the
    SFT stage), else the SFT profile's — and, merging on a card below compute capability 8.0, fp16
    instead of bf16 (precision follows the card: such a card only emulates bf16)."""
    if config.dtype != "auto":
        return config.dtype
    dtype = adapter.metrics.get("dtype") or resolve_profile(sft_profile).dtype  # type: ignore[arg-type]
    if dtype == "bf16" and config.device == "cuda":
        cards = detect_machine().gpus
        if cards and card_dtype(cards[0].compute_capability) == "fp16":
            return "fp16"
    return dtype


# ----------------------------------------------------------------------------------------------
# Prefect task
# ----------------------------------------------------------------------------------------------
def fingerprint_of(config: MergeParams, adapter: StageRef, sft_profile: str, ctx: StageContext) -> str:
    """The merge code, the merge stack, the parameters and dtype, the base model's content and the
    adapter's (docs/caching.md)."""
    cfg = {"config": config, "dtype": merge_dtype(config, adapter, sft_profile), "model": ctx.model_identity()}
    stack = stack_versions("merge")
    return fingerprint(STAGE, code_identity(CODE), cfg, upstream=[content_of(adapter)], stack=stack)


@task(name="merge_lora", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["cpu"])
def merge_lora(config: MergeParams, adapter: StageRef, sft_profile: str, ctx: StageContext) -> StageRef:
    """Merge the adapter into the base model and verify the result. CPU (or one GPU with device=cuda)."""
    from tasks.core.models import model_revision

    if config.device == "cuda" and config.method == "stream":
        raise ValueError("merge.method=stream runs on the CPU, one shard at a time: set merge.device=cpu")
    if config.device == "cuda":  # before anything is loaded (tasks/runtime/requirements.py)
        preflight(ONE_GPU.requirement)
    dtype = merge_dtype(config, adapter, sft_profile)

    def build(work: Workspace) -> dict[str, Any]:
        base_dir = ctx.model_dir()
        metrics = merge(config, str(base_dir), ctx.open(adapter), work.out, dtype)
        metrics["device"] = config.device
        # The exact weights merged into, for the release's lineage (a hub commit, not just "main").
        metrics["base_revision_resolved"] = model_revision(ctx.base_model, base_dir)
        logger = run_logger()
        logger.info(
            "merged in %s: max %s %.3g ≤ %.3g, %d shard(s), %.1f MB",
            dtype,
            "|Δweight| / max|weight|" if config.method == "stream" else "|Δlogit|",
            metrics.get("max_logit_diff", metrics.get("max_weight_rel_diff")),
            metrics["tolerance"],
            metrics["shards"],
            metrics["size_bytes"] / 1e6,
        )
        adapter_effect = metrics["adapter_effect"] if config.method == "peft" else None  # stream: |ΔW|, not logits
        if adapter_effect is not None and adapter_effect <= metrics["tolerance"]:
            logger.warning(
                "the adapter moves logits by at most %.3g, within the merge tolerance %.3g: the check cannot tell "
                "this merge from no merge (undertrained adapter?)",
                metrics["adapter_effect"],
                metrics["tolerance"],
            )
        return metrics

    lineage = {"stage": STAGE, "code": code_identity(CODE), "stack": stack_versions("merge")}
    built = with_lineage(build, **lineage, inputs=[adapter], model=ctx.model_identity())
    return run_stage(STAGE, fingerprint_of(config, adapter, sft_profile, ctx), ctx, built)
