"""Merge stage: the merged model reproduces base + adapter, a broken merge is caught, dtype is pinned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.artifacts.store import StageRef, Store
from tasks.merge.stage import MergeError, MergeParams, merge_and_save, merge_dtype, verify_merged


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter whose B weights are not zero (as after training), saved like the SFT stage does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def merged(tiny_model_dir, adapter_dir, tmp_path_factory) -> dict[str, tuple[Path, dict, dict]]:
    """The adapter merged once per dtype: (folder, metrics, reference for ``verify_merged``)."""
    out = {}
    for dtype in ("fp32", "bf16", "fp16"):
        folder = tmp_path_factory.mktemp(f"merged-{dtype}")
        reference = merge_and_save(str(tiny_model_dir), adapter_dir, folder, dtype, max_shard_size="2MB")
        out[dtype] = (folder, verify_merged(folder, reference, dtype), reference)
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def test_merged_weights_are_base_plus_lora_delta_and_folder_is_complete(tiny_model_dir, adapter_dir, merged):
    from peft import PeftConfig
    from transformers import AutoTokenizer

    tmp_path, metrics, _ = merged["fp32"]

    assert metrics["verified"] and metrics["max_logit_diff"] <= metrics["tolerance"]
    # The adapter really changes the model, by far more than the tolerance: the check means something.
    assert metrics["adapter_effect"] > 20 * metrics["tolerance"]
    # Independent of the check: W_merged = W_base + scaling · B·A for a LoRA-targeted layer.
    base, merged, lora = _tensors(tiny_model_dir), _tensors(tmp_path), _tensors(adapter_dir)
    key = "model.layers.1.self_attn.q_proj"
    a = next(v for k, v in lora.items() if key in k and "lora_A" in k)
    b = next(v for k, v in lora.items() if key in k and "lora_B" in k)
    cfg = PeftConfig.from_pretrained(adapter_dir)
    expected = base[f"{key}.weight"] + (cfg.lora_alpha / cfg.r) * b @ a
    torch.testing.assert_close(merged[f"{key}.weight"], expected, rtol=1e-5, atol=1e-6)
    assert not any("lora" in k for k in merged)
    # Sharded safetensors with an index, tokenizer with its chat template, generation config.
    assert metrics["shards"] > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert (tmp_path / "generation_config.json").exists()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (
        tok.chat_template == AutoTokenizer.from_pretrained(adapter_dir).chat_template
        and "<|im_start|>" in tok.chat_template
    )
    assert json.loads((tmp_path / "merge-verification.json").read_text())["verified"] is True


def _unmerge(folder: Path, base_dir: Path) -> None:
    """Replace the merged weights with the base's: a merge that forgot the adapter."""
    from safetensors.torch import load_file, save_file

    base = _tensors(base_dir)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({k: base[k].to(v.dtype) for k, v in tensors.items()}, shard, metadata={"format": "pt"})


def _corrupt_one(folder: Path, base_dir: Path) -> None:
    """Scale one merged matrix by 1.05: a subtly corrupted weight."""
    from safetensors.torch import load_file, save_file

    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        name = "model.layers.0.mlp.down_proj.weight"
        if name in tensors:
            tensors[name] = tensors[name] * 1.05
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise AssertionError("weight not found")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("breakage", [_unmerge, _corrupt_one], ids=["adapter-not-merged", "one-weight-corrupted"])
def test_a_broken_merge_fails_the_check(tiny_model_dir, merged, tmp_path, dtype, breakage):
    import shutil

    good, metrics, reference = merged[dtype]
    assert metrics["verified"]  # the intact merge passes
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    breakage(broken, tiny_model_dir)
    with pytest.raises(MergeError, match="does not reproduce base \\+ adapter"):
        verify_merged(broken, reference, dtype)
    assert json.loads((broken / "merge-verification.json").read_text())["verified"] is False


def test_dtype_is_pinned_and_16_bit_merges_are_half_the_size(merged):
    sizes = {}
    for dtype, (folder, m, _) in merged.items():
        assert m["saved_dtypes"] == [dtype], m
        assert (
            json.loads((folder / "config.json").read_text())["dtype"]
            == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        )
        # A 16-bit merge is verified against a bound that the adapter's effect clearly exceeds.
        assert m["verified"] and m["adapter_effect"] > 3 * m["tolerance"], m
        sizes[dtype] = m["size_bytes"]
    for dtype in ("bf16", "fp16"):
        assert sizes[dtype] / sizes["fp32"] == pytest.approx(0.5, abs=0.02)


def test_auto_dtype_is_the_training_dtype():
    trained_fp16 = StageRef(stage="sft", fingerprint="x", uri="/x", metrics={"dtype": "fp16"})
    unknown = StageRef(stage="sft", fingerprint="x", uri="/x")
    assert merge_dtype(MergeParams(), trained_fp16, "auto") == "fp16"
    assert merge_dtype(MergeParams(), unknown, "a100x2") == "bf16"
    assert merge_dtype(MergeParams(), unknown, "v100") == "fp16"
    assert merge_dtype(MergeParams(dtype="fp32"), trained_fp16, "auto") == "fp32"


def test_failed_verification_fails_the_flow_and_publishes_nothing(tiny_model_dir, adapter_dir, tmp_path):
    from prefect import flow

    from tasks.core.stage import StageContext
    from tasks.merge.stage import fingerprint_of, merge_lora

    adapter = StageRef(stage="sft", fingerprint="adapter0", uri=str(adapter_dir), metrics={"dtype": "bf16"})
    root = str(tmp_path / "artifacts")
    ctx = StageContext(base_model=str(tiny_model_dir), root=root)

    @flow
    def just_merge(config: MergeParams):
        return merge_lora(config, adapter, sft_profile="cpu", ctx=ctx)

    # A bound tighter than bf16 rounding: the real check fails, the task fails, the flow stops.
    strict = MergeParams(tolerance=1e-9)
    state = just_merge(strict, return_state=True)
    assert state.is_failed()
    with pytest.raises(MergeError):
        state.result()
    assert Store(root).completed("merge", fingerprint_of(strict, adapter, "cpu", ctx)) is None

    ref = just_merge(MergeParams())
    assert ref.metrics["dtype"] == "bf16" and ref.metrics["verified"]
    assert Path(ref.uri, "merge-verification.json").exists() and Path(ref.uri, "_SUCCESS").exists()
