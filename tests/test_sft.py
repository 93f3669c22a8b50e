"""LoRA SFT stage on the tiny random model (CPU): report, data checks, non-finite guard, crash resume."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tasks.sft.stage import COMPLETE, SFTParams, _latest_checkpoint, make_job, train


def _messages(row: dict) -> dict:
    prompt = (row["instruction"] + "\n" + row.get("input", "")).strip()
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]}


def _write(folder: Path, train_rows: list[dict], val_rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("validation", val_rows)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def alpaca(shared_data) -> list[dict]:
    rows = json.loads((shared_data / "alpaca" / "alpaca_en_demo.json").read_text())
    return [_messages(r) for r in rows if len(r["instruction"]) + len(r["output"]) < 600][:40]


def _cfg(**kw) -> SFTParams:
    base = dict(
        profile="cpu",
        max_steps=4,
        per_device_batch_size=1,
        gradient_accumulation_steps=2,
        max_length=256,
        learning_rate=1e-3,
        eval_steps=2,
        save_steps=2,
        logging_steps=1,
    )
    return SFTParams(**{**base, **kw})


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_train_reports_curves_metrics_and_skips_a_half_written_checkpoint(tmp_path, tiny_model_dir, alpaca, capfd):
    data = _write(tmp_path / "data", alpaca[:24], alpaca[24:28])
    scratch = tmp_path / "scratch"
    half = scratch / "checkpoint-3"  # a crash while saving: files, but no _COMPLETE
    half.mkdir(parents=True)
    (half / "trainer_state.json").write_text("{trunc")
    assert _latest_checkpoint(scratch) is None

    metrics = train(make_job(_cfg(), tiny_model_dir, data, scratch, "cpu"))

    out = capfd.readouterr().out
    assert "profile=cpu dtype=fp32 attention=tuneline_packed_sdpa (profile cpu: SDPA once per packed row" in out
    assert (
        "batch: 1 packed sequences x 1 accumulation x 1 processes" in out
    )  # 2 rows of ~120 tokens < one 256-token sequence
    assert "starting from step 0" in out  # the half-written checkpoint was not picked
    assert metrics["global_step"] == 4 and metrics["resumed_from_step"] == 0
    assert 0.0 <= metrics["eval_mean_token_accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    assert metrics["tokens_per_second"] > 0 and metrics["wall_seconds"] > 0 and metrics["train_tokens"] > 0
    # steady state counts steps 3-4 (after the two warm-up steps), less the checkpoint pauses
    assert metrics["steady_after_step"] == 2 and metrics["steady_tokens_per_second"] > 0
    assert metrics["mfu"] is None and metrics["device"] == "cpu" and metrics["model_flops_per_token"] > 0
    assert "speed: steady " in out and "whole run " in out
    assert metrics["nonfinite_steps_skipped"] == 0
    final = scratch / "final"
    assert (final / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _adapter(final)
    assert "{% generation %}" not in (final / "chat_template.jinja").read_text()  # inference template restored
    history = json.loads((final / "log_history.json").read_text())
    assert {"loss", "learning_rate", "mean_token_accuracy"} <= {k for h in history for k in h}
    assert sorted(p.name for p in scratch.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all((p / COMPLETE).exists() for p in scratch.glob("checkpoint-*"))
    assert _latest_checkpoint(scratch).name == "checkpoint-4"
    progress = [json.loads(x) for x in (scratch / "progress.jsonl").read_text().splitlines()]
    assert progress[-1]["step"] == 4
    # the rows reached the trainer from Arrow files on disk, per process and split (tasks/sft/rows.py)
    assert all(list((scratch / "rows" / "rank0" / s).rglob("*.arrow")) for s in ("train", "validation"))


def test_a_row_without_trainable_tokens_is_an_error_naming_its_line(tmp_path, tiny_model_dir, alpaca):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}
    data = _write(tmp_path / "data", [alpaca[0], alpaca[1], long_prompt, alpaca[2]], [])
    with pytest.raises(
        ValueError, match=r"train\.jsonl line 3, field messages: no assistant token within max_length=64"
    ):
        train(make_job(_cfg(max_length=64), tiny_model_dir, data, tmp_path / "scratch", "cpu"))


def test_qlora_on_cpu_is_refused_before_loading(tmp_path, tiny_model_dir, alpaca):
    data = _write(tmp_path / "data", alpaca[:4], [])
    with pytest.raises(ValueError, match="quantization=4bit .QLoRA. needs a GPU profile"):
        train(make_job(_cfg(quantization="4bit"), tiny_model_dir, data, tmp_path / "scratch", "cpu"))


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_model_dir, alpaca):
    """An untied copy of the tiny model whose embedding rows for a marker's tokens are inf: every
    row that contains the marker gives a NaN loss and NaN gradients, the others train normally."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    marker = " 🦓🦓 zebra-crossing 🦓"
    seen = {i for r in alpaca for m in r["messages"] for i in tok(m["content"])["input_ids"]}
    bad = sorted(set(tok(marker)["input_ids"]) - seen - set(tok.all_special_ids))
    assert bad, "the marker must have tokens of its own"
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight[bad] = float("inf")
    out = tmp_path_factory.mktemp("poisoned")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    rows = [dict(r) for r in alpaca[:8]]
    for i in (1, 4, 6):  # three poisoned rows
        msgs = [dict(m) for m in rows[i]["messages"]]
        msgs[0]["content"] += marker
        rows[i] = {"messages": msgs}
    return out, rows


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, poisoned):
    import torch

    model_dir, rows = poisoned
    data = _write(tmp_path / "data", rows, [])
    cfg = _cfg(max_steps=8, gradient_accumulation_steps=1, packing=False, save_steps=100, max_nonfinite_steps=5)
    metrics = train(make_job(cfg, model_dir, data, tmp_path / "scratch", "cpu"))
    assert metrics["global_step"] == 8
    assert metrics["nonfinite_steps_skipped"] == 3  # one per poisoned row, one row per step
    weights = _adapter(tmp_path / "scratch" / "final")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # the other 5 steps did update


def test_too_many_nonfinite_steps_end_the_stage(tmp_path, poisoned):
    model_dir, rows = poisoned
    data = _write(tmp_path / "data", rows, [])
    cfg = _cfg(max_steps=8, gradient_accumulation_steps=1, packing=False, save_steps=100, max_nonfinite_steps=1)
    with pytest.raises(
        FloatingPointError, match=r"2 optimizer steps had a non-finite loss or gradient \(limit max_nonfinite_steps=1\)"
    ):
        train(make_job(cfg, model_dir, data, tmp_path / "scratch", "cpu"))


def test_retry_after_sigkill_resumes_from_the_newest_complete_checkpoint(tmp_path, tiny_model_dir, alpaca):
    """The real Prefect task (retries=1) with its training child killed by SIGKILL mid-run: the retry
    resumes at the checkpoint's step and ends where an uninterrupted run ends, to 1e-4."""
    import torch

    from tasks.artifacts.store import StageRef
    from tasks.core.stage import StageContext
    from tasks.sft.stage import lora_sft

    data = _write(tmp_path / "data", alpaca[:24], alpaca[24:26])
    cfg = _cfg(max_steps=8, save_steps=2, eval_steps=100, gradient_accumulation_steps=2)
    root = tmp_path / "root"
    dataset = StageRef(stage="data", fingerprint="test-data", uri=str(data))
    killed: dict = {}

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            for pid_file in root.glob("scratch/sft/*/job.pid"):
                if _latest_checkpoint(pid_file.parent) is not None:
                    os.killpg(int(pid_file.read_text()), signal.SIGKILL)
                    time.sleep(0.5)
                    killed["step"] = int(_latest_checkpoint(pid_file.parent).name.split("-")[1])
                    return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    ref = lora_sft(cfg, dataset, ctx=StageContext(base_model=str(tiny_model_dir), base_revision="test", root=str(root)))
    watcher.join(timeout=5)

    assert 0 < killed["step"] < 8, "the child was killed mid-run, after a checkpoint"
    assert ref.metrics["resumed_from_step"] == killed["step"]
    assert ref.metrics["global_step"] == 8
    assert not (root / "scratch" / "sft" / ref.fingerprint).exists()  # published, scratch cleaned

    reference = train(make_job(cfg, tiny_model_dir, data, tmp_path / "uninterrupted", "cpu"))
    assert reference["global_step"] == ref.metrics["global_step"]
    resumed, straight = _adapter(Path(ref.uri)), _adapter(tmp_path / "uninterrupted" / "final")
    assert resumed.keys() == straight.keys()
    diff = max((resumed[k] - straight[k]).abs().max().item() for k in straight)
    assert diff <= 1e-4, f"resumed adapter differs from the uninterrupted one by {diff}"
    assert any(torch.count_nonzero(w) for k, w in straight.items() if "lora_B" in k)
