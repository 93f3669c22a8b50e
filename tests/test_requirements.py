"""Each task's GPU requirement, declared once (tasks/runtime/requirements.py), and what follows from it:
tags, the flow's preflight message, the devices evaluation and merge use, precision by card, and
GRPO's devices on a pinned worker."""

from __future__ import annotations

import pytest

from flows.params import load_params
from tasks.runtime.hardware import GpuInfo, HardwareError, Machine, card_dtype
from tasks.runtime.requirements import check_needs

V100 = GpuInfo("Tesla V100-SXM2-32GB", 32.0, (7, 0))
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", 80.0, (8, 0))


def _needs(machine: Machine, *sets: str):
    params = load_params("demo", list(sets))
    needs = params.task_needs(machine)
    check_needs(list(needs.values()), machine)
    return needs


def test_the_demo_needs_no_gpu_and_holds_no_gpu_slot():
    needs = _needs(Machine())
    assert {t: n.tags for t, n in needs.items()} == {"lora_sft": ["cpu"], "merge_lora": ["cpu"], "evaluate": ["cpu"]}
    assert needs["evaluate"].device == "cpu"


def test_auto_on_a_machine_without_gpu_fails_naming_task_and_what_was_found():
    with pytest.raises(HardwareError) as err:
        _needs(Machine(how="torch sees 0 CUDA devices, CUDA_VISIBLE_DEVICES unset"), "sft.profile=auto")
    assert str(err.value) == (
        "lora_sft (sft.profile=auto): profile auto chooses among GPU profiles and found no GPU (torch sees 0 CUDA "
        "devices, CUDA_VISIBLE_DEVICES unset); set the profile to cpu to run on CPU"
    )


def test_a_v100_run_tags_every_gpu_task_and_evaluates_on_the_card():
    needs = _needs(Machine((V100,)), "sft.profile=auto", "merge.device=cuda", "grpo.enabled=true")
    assert needs["lora_sft"].profile.name == "v100" and needs["grpo"].profile.name == "v100"
    assert all(n.tags == ["gpu"] for n in needs.values())
    assert needs["evaluate"].device == "cuda"
    assert needs["lora_sft"].describe() == "lora_sft (sft.profile=auto → v100): needs 1 GPU ≥ 30 GiB, cc ≥ 7.0"


def test_a_named_profile_the_machine_cannot_run_fails_before_anything_loads():
    with pytest.raises(
        HardwareError, match=r"^lora_sft \(sft.profile=a100x2\): needs 2 GPUs ≥ 40 GiB, cc ≥ 8.0; found 1 × Tesla V100"
    ):
        _needs(Machine((V100,)), "sft.profile=a100x2")
    with pytest.raises(HardwareError, match=r"^evaluate \(eval.device=cuda\): needs 1 GPU; found no GPU"):
        _needs(Machine(), "eval.device=cuda")


def test_precision_follows_the_card():
    """A V100 says bf16 is supported (emulated): evaluation and merge use fp16 there, bf16 from cc 8.0."""
    assert [card_dtype(g.compute_capability) for g in (V100, A100)] == ["fp16", "bf16"]
    from tasks.evaluate.engines import evaluation_dtype

    assert evaluation_dtype("cpu") == "fp32"


def test_grpo_venv_is_for_cpu_workers_only(tmp_path):
    """The vLLM venv holds vLLM's CPU build: a GPU worker's child runs the worker's own Python."""
    import os

    from tasks.grpo.stage import GRPOParams, make_job
    from tasks.runtime.hardware import PROFILES

    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n")
    os.chmod(python, 0o755)
    config = GRPOParams(vllm={"enabled": True, "python": str(python)})
    on_cpu = make_job(config, tmp_path, tmp_path, tmp_path, tmp_path, PROFILES["cpu"])
    on_gpu = make_job(config, tmp_path, tmp_path, tmp_path, tmp_path, PROFILES["v100"])
    assert on_cpu["python"] == str(python) and on_gpu["python"] is None
