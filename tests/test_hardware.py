"""Hardware profiles, preflight messages, attention selection and the training child process."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys

import pytest

from tasks.runtime.hardware import PROFILES, GpuInfo, HardwareError, Machine, preflight, resolve_profile
from tasks.runtime.launch import launch_training

V100 = GpuInfo("Tesla V100-SXM2-32GB", 32.0, (7, 0))
A100 = GpuInfo("NVIDIA A100-SXM4-80GB", 80.0, (8, 0))
H100 = GpuInfo("NVIDIA H100 80GB HBM3", 79.6, (9, 0))
T4 = GpuInfo("Tesla T4", 15.0, (7, 5))


def test_preflight_names_both_sides():
    with pytest.raises(HardwareError) as err:
        preflight(PROFILES["a100x2"].requirement, Machine((V100,)))
    assert str(err.value) == "needs 2 GPUs ≥ 40 GiB, cc ≥ 8.0; found 1 × Tesla V100-SXM2-32GB 32 GiB, cc 7.0"

    with pytest.raises(HardwareError) as err:
        preflight(PROFILES["v100"].requirement, Machine())
    assert str(err.value) == "needs 1 GPU ≥ 30 GiB, cc ≥ 7.0; found no GPU"

    with pytest.raises(HardwareError, match=r"found 2 × Tesla T4 15 GiB, cc 7.5"):
        preflight(PROFILES["v100"].requirement, Machine((T4, T4)))


def test_preflight_passes_when_the_machine_is_enough():
    machine = Machine((A100, A100))
    assert preflight(PROFILES["a100x2"].requirement, machine) is machine
    assert preflight(PROFILES["v100"].requirement, Machine((H100,))).gpus == (H100,)
    assert preflight(PROFILES["cpu"].requirement, Machine()).gpus == ()


@pytest.mark.parametrize(
    ("gpus", "expected", "dtype", "nproc"),
    [
        ((V100,), "v100", "fp16", 1),
        ((A100, A100), "a100x2", "bf16", 2),
        ((H100,), "gpu-bf16", "bf16", 1),  # one Ampere-or-newer card: bf16 on one process
        ((T4,), "gpu-fp16", "fp16", 1),
    ],
)
def test_auto_profile_follows_the_machine(gpus, expected, dtype, nproc):
    profile = resolve_profile("auto", Machine(gpus))
    assert (profile.name, profile.dtype, profile.nproc) == (expected, dtype, nproc)
    preflight(profile.requirement, Machine(gpus))  # what auto picks always passes its own preflight


def test_named_profiles_are_what_the_design_says():
    v100, pair = PROFILES["v100"], PROFILES["a100x2"]
    assert (v100.dtype, v100.nproc, v100.gradient_checkpointing) == ("fp16", 1, True)
    assert (pair.dtype, pair.nproc, pair.gradient_checkpointing) == ("bf16", 2, False)  # ≥ 40 GiB: memory for speed
    assert resolve_profile("auto", Machine((H100,))).gradient_checkpointing is False
    assert resolve_profile("auto", Machine((GpuInfo("NVIDIA A10", 24.0, (8, 6)),))).gradient_checkpointing is True
    assert resolve_profile("v100", Machine()) is v100  # a named profile is taken as asked; preflight judges it


def test_auto_never_means_cpu():
    """A 7B must not quietly train on a CPU for days: auto without a GPU fails, naming what was found."""
    with pytest.raises(HardwareError, match=r"^profile auto chooses among GPU profiles and found no GPU; set the "):
        resolve_profile("auto", Machine())
    assert resolve_profile("cpu", Machine()).name == "cpu"  # CPU only when the parameters say so


def test_detection_is_torchs_view_read_in_a_subprocess(monkeypatch):
    """CUDA_VISIBLE_DEVICES may hold indices, GPU UUIDs or MIG ids: torch (in a short subprocess, so
    this process never initialises CUDA) reads them all; nvidia-smi is not needed. On this CPU machine
    every form finds no GPU, and the message says what was looked at."""
    import torch

    from tasks.runtime.hardware import detect_machine

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_machine() == Machine()
    assert detect_machine().describe() == "found no GPU (CUDA_VISIBLE_DEVICES='': no device is visible)"
    uuid = "GPU-5bd2e6a4-7a3c-2f0e-1e5b-0c2d3e4f5a6b"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuid)
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi to lean on
    found = detect_machine()
    assert found.gpus == () and f"CUDA_VISIBLE_DEVICES='{uuid}'" in found.describe()
    assert not torch.cuda.is_initialized()
    with pytest.raises(HardwareError, match=f"found no GPU .*{uuid}"):
        resolve_profile("auto")


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is None, reason="needs GPUs (run on the two-H200 machine: docs/gpu-runs.md)"
)
def test_on_a_gpu_machine_each_card_is_found_by_its_uuid_and_index(monkeypatch):
    """For real: CUDA_VISIBLE_DEVICES holding one card's UUID (how a pinned worker names it) finds
    exactly that card, the same one its index finds."""
    from tasks.runtime.hardware import detect_machine

    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"], capture_output=True, text=True
    )
    cards = [line.split(", ") for line in out.stdout.strip().splitlines()]
    assert cards, out.stderr
    for index, uuid, name in cards:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuid)
        by_uuid = detect_machine()
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", index)
        by_index = detect_machine()
        assert [g.name for g in by_uuid.gpus] == [name] and by_uuid.gpus[0].uuid == by_index.gpus[0].uuid
        assert by_uuid.gpus[0].uuid.replace("GPU-", "") == uuid.replace("GPU-", "")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(uuid for _, uuid, _ in cards))
    assert len(detect_machine().gpus) == len(cards)


def test_a_pool_profile_decides_auto(monkeypatch):
    monkeypatch.setenv("TUNELINE_POOL_PROFILE", "v100")
    assert resolve_profile("auto", Machine()) is PROFILES["v100"]  # preflight then judges the machine
    with pytest.raises(HardwareError, match=r"needs 1 GPU ≥ 30 GiB, cc ≥ 7.0; found no GPU"):
        preflight(resolve_profile("auto", Machine()).requirement, Machine())
    monkeypatch.setenv("TUNELINE_POOL_PROFILE", "cpu")  # a CPU pool does not turn auto into CPU
    with pytest.raises(HardwareError):
        resolve_profile("auto", Machine())


def test_the_resolved_profile_travels_to_the_training_child():
    from tasks.runtime.hardware import profile_from_job
    from tasks.sft.stage import SFTParams, make_job

    auto = resolve_profile("auto", Machine((H100,)))  # gpu-bf16 is not a named profile: it travels whole
    job = make_job(SFTParams(), "/m", "/d", __import__("pathlib").Path("/s"), auto)
    assert profile_from_job(job["profile"]) == auto
    assert profile_from_job("v100") is PROFILES["v100"]


def test_flash_attention_is_chosen_only_when_installed(tmp_path, monkeypatch):
    """The selection, not the kernel: no flash-attn wheel exists for these machines."""
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    pair = PROFILES["a100x2"]
    assert pair.attention() == ("sdpa", "flash-attn is not installed: SDPA")
    assert pair.attention(packing=True) == (
        "tuneline_packed_sdpa",
        "flash-attn is not installed: SDPA once per packed row (tasks/runtime/attention.py)",
    )
    assert PROFILES["v100"].attention() == ("sdpa", "profile v100: SDPA")
    assert PROFILES["v100"].attention(packing=True)[0] == "tuneline_packed_sdpa"

    (tmp_path / "flash_attn").mkdir()  # an installed package, as importlib finds it
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert pair.attention() == pair.attention(packing=True) == ("flash_attention_2", "flash-attn is installed")
    assert (
        PROFILES["v100"].attention(packing=True)[0] == "tuneline_packed_sdpa"
    )  # cc 7.0: no flash-attn 2, installed or not


def test_liger_kernels_only_on_bf16_profiles_where_installed(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "liger_kernel", raising=False)
    (tmp_path / "liger_kernel").mkdir()
    (tmp_path / "liger_kernel" / "__init__.py").write_text("")
    assert not PROFILES["a100x2"].use_liger() or importlib.util.find_spec("liger_kernel") is not None
    monkeypatch.syspath_prepend(str(tmp_path))
    assert PROFILES["a100x2"].use_liger()
    # one bf16 card compiles its layers when its plan has no checkpointing; with checkpointing, liger
    one_card = resolve_profile("auto", Machine((GpuInfo("NVIDIA H200", 139.8, (9, 0)),)))
    assert not one_card.use_liger()
    checkpointed = dataclasses.replace(one_card, gradient_checkpointing=True)
    assert checkpointed.use_liger() and not checkpointed.compiles()
    assert not PROFILES["v100"].use_liger() and not PROFILES["cpu"].use_liger()  # fp16 / CPU: not measured there


def test_compiled_layers_replace_liger_only_without_checkpointing_and_unsharded():
    """Measured on a 7B (docs/benchmarks.md, "SFT round two"): compiled layers without liger beat liger;
    liger's kernels break the compiled graph, so a profile never does both."""
    one_card = resolve_profile("auto", Machine((GpuInfo("NVIDIA H200", 139.8, (9, 0)),)))
    assert one_card.name == "gpu-bf16" and one_card.compiles() and not one_card.use_liger()
    assert not dataclasses.replace(one_card, gradient_checkpointing=True).compiles()  # not measured
    # measured on one process only: DDP (a100x2) and FSDP keep their uncompiled layers
    assert not PROFILES["a100x2"].compiles() and not PROFILES["fsdp"].compiles()
    assert not PROFILES["v100"].compiles() and not PROFILES["cpu"].compiles()


def test_gpu_profiles_fit_sft_to_the_card_and_the_model():
    from types import SimpleNamespace

    from tasks.sft.plan import memory_plan

    smollm2 = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    qwen2_7b = SimpleNamespace(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28)
    auto = resolve_profile("auto", Machine((GpuInfo("NVIDIA H100 80GB HBM3", 79.6, (9, 0)),)))
    assert auto.fit_memory and auto.packed_sequences == 4

    def plan(profile, config, weight_gib, card_gib):
        p = memory_plan(profile, config, int(weight_gib * 2**30), 2048, card_gib)
        return p.gradient_checkpointing, p.packed_sequences

    assert plan(auto, smollm2, 0.25, 22.0) == (False, 4)  # a small model: the largest micro-batch, no recomputation
    assert plan(auto, qwen2_7b, 14.2, 79.6) == (False, 3)  # 7B on 80 GB: 51.5 GiB measured on an H200
    assert plan(auto, qwen2_7b, 14.2, 39.4) == (True, 4)  # 7B on 40 GB: checkpointing, 4 sequences (18.4 GiB measured)
    assert plan(auto, qwen2_7b, 14.2, 16.0) == (True, 1)  # nothing fits the estimate: the smallest footprint
    assert plan(PROFILES["v100"], qwen2_7b, 14.2, 32.0) == (True, 1)  # fixed profiles stay as they are
    assert plan(PROFILES["cpu"], smollm2, 0.5, 0.0) == (False, 1)


def test_training_child_failure_is_an_error_with_its_last_lines(tmp_path):
    job = tmp_path / "job.json"
    with pytest.raises(RuntimeError, match=r"exited with 1; last lines:\n(.|\n)*No module named tasks.nonexistent"):
        launch_training("tasks.nonexistent", {"x": 1}, job, 1)
    assert (tmp_path / "job.log").exists()
    assert not (tmp_path / "job.pid").exists()  # removed once the child is gone
