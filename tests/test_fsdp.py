"""The fsdp profile: preflight and settings, sharded building (each process holds its half, reads the
right slices), a real 2-process gloo run of the SFT child resumed on 4 processes, the streaming merge.

FSDP2 runs on CPU with gloo in torch 2.13; accelerate enables its FSDP plugin only on GPUs, which
``tasks.runtime.fsdp.let_accelerate_shard_on_cpu`` lifts for these runs (nothing else differs from a GPU run).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.runtime.hardware import PROFILES, GpuInfo, GpuRequirement, HardwareError, Machine, preflight, resolve_profile
from tasks.runtime.launch import launch_training
from tasks.runtime.requirements import sft_need
from tasks.sft.stage import SFTParams, make_job

H200 = GpuInfo("NVIDIA H200", 139.8, (9, 0))
V100 = GpuInfo("Tesla V100-SXM2-32GB", 31.7, (7, 0))
# The fsdp profile as it runs on CPU: no GPU to ask for, fp32 (bf16 on CPU is slow and coarse).
CPU_FSDP = dataclasses.replace(PROFILES["fsdp"], requirement=GpuRequirement(0), dtype="fp32")


# ----------------------------------------------------------------------------------------------
# Profile
# ----------------------------------------------------------------------------------------------
def test_fsdp_profile_takes_every_gpu_and_preflight_names_both_sides():
    four = Machine((H200,) * 4)
    profile = sft_need("fsdp", four).profile
    assert (profile.name, profile.nproc, profile.dtype, profile.shard_model) == ("fsdp", 4, "bf16", True)
    assert profile.gradient_checkpointing
    preflight(profile.requirement, four)
    one = Machine((H200,))
    with pytest.raises(HardwareError, match=r"needs 2 GPUs, cc ≥ 8.0; found 1 × NVIDIA H200"):
        preflight(resolve_profile("fsdp", one).requirement, one)
    v100s = Machine((V100, V100))
    with pytest.raises(HardwareError, match=r"cc ≥ 8.0; found 2 × Tesla V100"):
        preflight(resolve_profile("fsdp", v100s).requirement, v100s)
    assert SFTParams(profile="fsdp").profile == "fsdp"  # selectable as sft.profile=fsdp


def test_auto_never_means_fsdp_and_grpo_has_none(monkeypatch):
    from pydantic import ValidationError

    from tasks.grpo.plan import GRPOParams
    from tasks.runtime.hardware import POOL_PROFILE_ENV

    monkeypatch.setenv(POOL_PROFILE_ENV, "fsdp")
    assert resolve_profile("auto", Machine((H200,) * 4)).name == "a100x2"
    with pytest.raises(ValidationError, match="profile"):
        GRPOParams(profile="fsdp")


def test_fsdp_settings_go_to_accelerates_fsdp2_plugin(tmp_path, monkeypatch):
    from tasks.sft.plan import sft_config

    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments sets it: restored after
    args = sft_config(SFTParams(), PROFILES["fsdp"], tmp_path, world=2, mean_row_tokens=620, use_cpu=True)
    assert args.fsdp_config["version"] == 2
    assert args.fsdp_config["state_dict_type"] == "SHARDED_STATE_DICT"  # DCP: reshards on load
    assert not args.fsdp_config["cpu_ram_efficient_loading"]  # the whole model on rank 0: never
    assert not args.gradient_checkpointing  # per layer, set up before sharding (tasks/runtime/fsdp.py)
    assert args.bf16


@pytest.mark.parametrize(
    "change, message",
    [({"quantization": "4bit"}, "quantization=4bit"), ({"use_dora": True}, "use_dora=true")],
)
def test_fsdp_refuses_what_it_cannot_shard_before_loading(change, message):
    from tasks.runtime.fsdp import check_sharding

    with pytest.raises(ValueError, match=message):
        check_sharding(SFTParams(profile="fsdp", **change), PROFILES["fsdp"])


# ----------------------------------------------------------------------------------------------
# Sharded building: each process holds its share, read from the right slices
# ----------------------------------------------------------------------------------------------
def _torchrun(nproc: int, *args: str, timeout: int = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def test_each_process_holds_half_the_base_and_the_model_computes_like_the_plain_one(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    _torchrun(2, "-m", "tests.fsdp_worker", str(tiny_model_dir), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["local"] <= r["total"] / 2 + 64  # FSDP2 pads uneven dim-0 splits by at most a row
        assert r["max_weight_diff"] == 0.0  # each slice read from the safetensors is the right one
    assert ranks[0]["local"] + ranks[1]["local"] == ranks[0]["total"]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        expected = plain(input_ids=torch.arange(1, 17).reshape(2, 8)).logits
    for r in ranks:  # a fresh adapter adds nothing: the plain model's logits, RoPE buffers rebuilt
        assert torch.allclose(torch.tensor(r["logits"]), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The SFT child with fsdp: 2 gloo processes, checkpoint, resume on 4 processes
# ----------------------------------------------------------------------------------------------
def _data(folder: Path, shared_data: Path) -> Path:
    rows = json.loads((shared_data / "alpaca" / "alpaca_en_demo.json").read_text())
    rows = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for r in rows
        if len(r["instruction"]) + len(r["output"]) < 600
    ]
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[24:28]))
    return folder


# Unpacked, 4 rows per step over any number of processes (4 = 2 x 2 = 4 x 1), no dropout: the same
# optimizer steps on 2 and on 4 processes.
_CFG = SFTParams(
    profile="cpu",
    max_steps=4,
    per_device_batch_size=1,
    gradient_accumulation_steps=4,
    packing=False,
    max_length=256,
    learning_rate=1e-3,
    lora_dropout=0.0,
    eval_steps=2,
    save_steps=2,
    logging_steps=1,
)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_model_dir, shared_data) -> dict[str, Path]:
    """One uninterrupted 2-process run; a second that resumes the first's step-2 checkpoint on 4 processes."""
    import shutil

    root = tmp_path_factory.mktemp("fsdp")
    data = _data(root / "data", shared_data)
    runs = {}
    for name, nproc in (("whole", 2), ("resumed", 4)):
        scratch = root / name
        scratch.mkdir()
        if name == "resumed":
            shutil.copytree(runs["whole"] / "checkpoint-2", scratch / "checkpoint-2")
        job = make_job(_CFG, tiny_model_dir, data, scratch, dataclasses.replace(CPU_FSDP, nproc=nproc))
        launch_training("tasks.sft.stage", job, scratch / "job.json", nproc)
        runs[name] = scratch
    return runs


def test_fsdp_training_saves_sharded_checkpoints_and_a_plain_adapter(fsdp_runs):
    from safetensors.torch import load_file

    whole = fsdp_runs["whole"]
    metrics = json.loads((whole / "final" / "metrics.json").read_text())
    assert (metrics["profile"], metrics["processes"], metrics["global_step"]) == ("fsdp", 2, 4)
    assert metrics["gradient_checkpointing"]
    ckpt = whole / "checkpoint-2"
    # DCP: one file per process, for the adapter and for the optimizer; not a whole-model file
    assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "optimizer_0" / ".metadata").exists()
    adapter = load_file(str(whole / "final" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)  # the adapter alone, loadable by peft
    assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 0  # trained


def test_a_checkpoint_from_2_processes_resumes_on_4_with_the_same_result(fsdp_runs):
    from safetensors.torch import load_file

    resumed = json.loads((fsdp_runs["resumed"] / "final" / "metrics.json").read_text())
    assert (resumed["resumed_from_step"], resumed["processes"], resumed["global_step"]) == (2, 4, 4)
    a = load_file(str(fsdp_runs["whole"] / "final" / "adapter_model.safetensors"))
    b = load_file(str(fsdp_runs["resumed"] / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    whole = json.loads((fsdp_runs["whole"] / "final" / "metrics.json").read_text())
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Streaming merge
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_base_and_adapter(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """The tiny model saved in many small shard files, and a LoRA adapter with non-zero B (alpha/r = 4)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tasks.core.common import load_tokenizer

    root = tmp_path_factory.mktemp("stream")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.save_pretrained(root / "base", max_shard_size="16KB")
    load_tokenizer(tiny_model_dir).save_pretrained(root / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    )
    peft_model.save_pretrained(root / "adapter")
    load_tokenizer(tiny_model_dir).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _live_tensors() -> list:
    import torch

    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]


def test_streaming_merge_matches_peft_and_holds_one_shard_at_a_time(tmp_path, sharded_base_and_adapter):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tasks.merge.stream import stream_merge

    base_dir, adapter_dir = sharded_base_and_adapter
    shards = sorted(base_dir.glob("*.safetensors"))
    assert len(shards) >= 4
    held: list[int] = []
    before = {id(t) for t in _live_tensors()}

    def count(_shard: Path) -> None:  # tensors alive after each shard beyond the adapter's
        held.append(sum(1 for t in _live_tensors() if id(t) not in before))

    metrics = stream_merge(base_dir, adapter_dir, tmp_path / "merged", "fp32", on_shard=count)
    adapter_tensors = len(load_file(str(adapter_dir / "adapter_model.safetensors")))
    # Nothing accumulates from shard to shard: what stays alive is the adapter (its tensors and the
    # buffers they view) and the loop's last few names, not the merged weights (20 base tensors).
    assert len(held) == len(shards), held
    assert max(held) - min(held) <= 4 and max(held) <= 2 * adapter_tensors + 6, (held, adapter_tensors)
    assert metrics["verified"] and metrics["weights_merged"] == 14  # 7 projections x 2 layers

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    expected = reference.merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    got = merged.state_dict()
    assert got.keys() == expected.keys()
    assert max((got[k] - expected[k]).abs().max().item() for k in got) < 1e-5
    assert metrics["adapter_effect"] > 1e-3  # the adapter changes the weights: the check sees a merge


def test_streaming_merge_through_the_merge_stage_params_in_bf16(tmp_path, sharded_base_and_adapter):
    from tasks.merge.stage import MergeParams, _saved_dtypes, merge

    base_dir, adapter_dir = sharded_base_and_adapter
    metrics = merge(MergeParams(method="stream"), str(base_dir), adapter_dir, tmp_path / "m", "bf16")
    assert metrics["verified"] and metrics["method"] == "stream"
    assert _saved_dtypes(tmp_path / "m") == ["bf16"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "m" / "tokenizer_config.json").exists()
