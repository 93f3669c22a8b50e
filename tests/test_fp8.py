"""``sft.precision=fp8`` (tasks/sft/fp8.py): refused in one line where it cannot run, before any
work; the layers it converts; what it does to the SFT fingerprint. FP8 itself runs on GPUs only
(docs/gpu-runs.md, "Speed, round three": speed and quality were measured there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tasks.runtime.hardware import PROFILES, Profile
from tasks.sft.fp8 import check_precision, fp8_targets
from tasks.sft.plan import SFTParams

REPO = Path(__file__).resolve().parents[1]
BF16 = Profile("gpu-bf16", PROFILES["a100x2"].requirement, "bf16")


def test_a_run_asking_for_fp8_on_this_cpu_machine_fails_in_one_line_before_anything_is_created(tmp_path):
    root = tmp_path / "artifacts"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "demo", "--set", f"artifact_root={root}",
           "--set", "sft.precision=fp8"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "sft.precision=fp8" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not root.exists()  # refused before the data stage or a server started


@pytest.mark.parametrize(
    ("cards", "expected"),
    [
        ([(8, 0)], "found cc 8.0"),  # A100: no FP8 tensor cores
        ([(7, 0)], "found cc 7.0"),
        ([(9, 0), (8, 6)], "found cc 8.6"),  # every card the stage trains on must have them
        ([], "found no GPU"),
    ],
)
def test_cards_without_fp8_are_refused_naming_the_card(cards, expected):
    with pytest.raises(ValueError, match=expected):
        check_precision(SFTParams(precision="fp8"), BF16, cards)


def test_fp8_needs_a_bf16_profile_and_no_qlora_or_sharding():
    with pytest.raises(ValueError, match="profile v100 trains in fp16"):
        check_precision(SFTParams(precision="fp8"), PROFILES["v100"], [(9, 0)])
    with pytest.raises(ValueError, match="4bit"):
        check_precision(SFTParams(precision="fp8", quantization="4bit"), BF16, [(9, 0)])
    with pytest.raises(ValueError, match="fsdp"):
        check_precision(SFTParams(precision="fp8"), PROFILES["fsdp"], [(9, 0)])


def test_an_fp8_card_passes_when_torchao_is_installed_and_names_it_when_not():
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        with pytest.raises(ValueError, match="needs torchao"):
            check_precision(SFTParams(precision="fp8"), BF16, [(9, 0), (8, 9)])
    else:
        check_precision(SFTParams(precision="fp8"), BF16, [(9, 0), (8, 9)])
    check_precision(SFTParams(), BF16, [(7, 0)])  # auto asks for nothing


def test_the_converted_layers_are_the_bases_projections_not_lm_head_nor_odd_sizes():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    names = fp8_targets(model)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each layer
    assert not any("lm_head" in n for n in names)
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(150, 64)  # 150 is not a multiple of 16
    assert "model.layers.0.mlp.down_proj" not in fp8_targets(model)


def test_precision_counts_in_the_sft_fingerprint_only_when_fp8_is_asked_for(monkeypatch):
    from tasks.sft import stage

    seen = []
    monkeypatch.setattr(stage, "resolve_profile", lambda _name: BF16)
    monkeypatch.setattr(stage, "fingerprint", lambda *a, **k: seen.append(a[2]) or "digest")
    monkeypatch.setattr(stage, "content_of", lambda _ref: "data")
    ctx = SimpleNamespace(model_identity=lambda: "model")
    stage.fingerprint_of(SFTParams(), None, ctx)
    stage.fingerprint_of(SFTParams(precision="fp8"), None, ctx)
    auto, fp8 = seen
    assert "precision" not in auto["config"] and "fp8" not in auto  # unchanged fingerprints for every auto night
    assert fp8["config"]["precision"] == "fp8" and "torchao" in fp8["fp8"]
