"""Merge stage: fold the LoRA adapter into the base weights, then prove the merge is right.

Resource profile: CPU by default (``device="cpu"``; a 7B merge needs ~2× the model size in RAM),
or one GPU (``device="cuda"``).

What is evaluated is what ships, so the merge comes before evaluation. The merged model is saved in
the pinned dtype (default: the training profile's — fp16 on v100, bf16 on a100x2, fp32 on cpu;
merges silently saved in fp32 at twice the size are a known trap) as sharded safetensors with the
tokenizer, chat template and generation config. Verification: logits of the merged model and of
base + adapter on a fixed batch must agree within a tolerance for the dtype; a failed check stops
the flow.

Run the plain function without Prefect::

    python -c "from tasks.merge import MergeParams, merge; from pathlib import Path; \
        print(merge(MergeParams(), 'BASE_DIR', Path('ADAPTER_DIR'), Path('/tmp/merged'), 'fp32'))"
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.hardware import resolve_profile
from tasks.store import StageRef, code_version, fingerprint, open_ref, stage_cache_key, store_for

STAGE = "merge"
# Max |Δlogit| allowed between merged and base+adapter, by dtype. Rounding the merged weights to
# 16 bits moves logits by up to a few tenths on a 135M model; fp32 is exact up to accumulation order.
TOLERANCE = {"fp32": 1e-3, "bf16": 0.5, "fp16": 0.1}
VERIFY_PROMPTS = ["Who are you?", "What is 12 * 7?", "Write a haiku about autumn.", "用一句话介绍你自己。"]


class MergeError(RuntimeError):
    """The merged model does not reproduce base + adapter."""


class MergeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(default="auto", description="Dtype of the saved merged model; auto = the training profile's dtype.")
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="Where to merge: cpu (any machine) or cuda (faster for large models).")
    max_shard_size: str = Field(default="2GB", pattern=r"^\d+(MB|GB)$", description="Largest safetensors shard.")


def merge(config: MergeParams, base_dir: str, adapter_dir: Path, out_dir: Path, dtype: str) -> dict[str, Any]:
    """Merge, save and verify; return the metrics (dtype, size, max logit difference)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    # Reference: base + adapter, computed in fp32 so that the check measures the merge alone.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(config.device)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    peft_model.eval()
    batch = _verify_batch(tokenizer, config.device)
    with torch.no_grad():
        reference = peft_model(**batch).logits.float()
        merged = peft_model.merge_and_unload()
        merged = merged.to(torch_dtype)
        merged.save_pretrained(out_dir, max_shard_size=config.max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del merged, peft_model, base

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch_dtype).to(config.device)
    with torch.no_grad():
        got = reloaded(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    diff = (got - reference).abs()[mask].max().item()
    saved_dtype = str(next(reloaded.parameters()).dtype).replace("torch.", "")
    size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    metrics = {"dtype": dtype, "saved_dtype": saved_dtype, "max_logit_diff": diff, "tolerance": TOLERANCE[dtype], "size_bytes": size}
    (out_dir / "merge-verification.json").write_text(json.dumps(metrics, indent=2))
    if not diff <= TOLERANCE[dtype]:
        raise MergeError(f"merged model differs from base + adapter: max |Δlogit| {diff:.4g} > tolerance {TOLERANCE[dtype]} ({dtype})")
    return metrics


def _verify_batch(tokenizer, device: str):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in VERIFY_PROMPTS
    ]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True).to(device)


def merge_dtype(config: MergeParams, sft_profile: str) -> str:
    return resolve_profile(sft_profile).dtype if config.dtype == "auto" else config.dtype


def fingerprint_of(config: MergeParams, adapter: StageRef, base_model: str, base_revision: str, sft_profile: str, root: str, storage_block: str | None = None) -> str:
    cfg = {"config": config, "dtype": merge_dtype(config, sft_profile), "model": base_model, "revision": base_revision}
    return fingerprint(STAGE, code_version(merge), cfg, upstream=[adapter.fingerprint])


@task(name="merge_lora", cache_key_fn=stage_cache_key(STAGE, fingerprint_of), persist_result=True, tags=["cpu"])
def merge_lora(config: MergeParams, adapter: StageRef, base_model: str, base_revision: str, sft_profile: str, root: str, storage_block: str | None = None) -> StageRef:
    """Merge the adapter into the base model and verify the result. CPU (or one GPU)."""
    from tasks.models import resolve_model

    fp = fingerprint_of(config, adapter, base_model, base_revision, sft_profile, root)
    store = store_for(root, storage_block)
    if (ref := store.completed(STAGE, fp)) is not None:
        return ref
    with tempfile.TemporaryDirectory(prefix="tuneline-merge-") as tmp:
        metrics = merge(config, str(resolve_model(base_model, base_revision)), open_ref(adapter, storage_block), Path(tmp), merge_dtype(config, sft_profile))
        return store.publish(STAGE, fp, Path(tmp), metrics)
