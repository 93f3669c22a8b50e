"""GPU proof of the SFT stage's plain function (issue 4): one profile, a small model, real data.

The model is SmolLM2-135M's architecture and tokenizer with random weights (the real weights are
too big to carry to the device machine), so losses show that training runs and falls, not what
the real model would learn. Data: the alpaca demo rows (en + zh) as chat messages.

    python bench/sft_gpu_proof.py --profile v100 --out $OUT/v100        # one GPU, fp16 path
    python bench/sft_gpu_proof.py --profile auto --out $OUT/bf16        # one H100: bf16 profile
    python bench/sft_gpu_proof.py --profile a100x2 --out $OUT/a100x2    # two GPUs: torchrun + DDP

Prepare the carried inputs here (git-ignored .carry/)::

    python bench/sft_gpu_proof.py --prepare
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CARRY = ROOT / ".carry"


def prepare() -> None:
    """Tokenizer + config of SmolLM2 (no weights) and the alpaca demo as train/validation jsonl."""
    from tasks.core.models import SMOLLM2_PACKAGE, resolve_model

    src = resolve_model(SMOLLM2_PACKAGE)
    (CARRY / "smollm2").mkdir(parents=True, exist_ok=True)
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        shutil.copy(src / name, CARRY / "smollm2" / name)
    rows = []
    for f in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        for r in json.loads((ROOT.parent / "shared" / "data" / "alpaca" / f).read_text()):
            prompt = (r["instruction"] + "\n" + r.get("input", "")).strip()
            rows.append(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]}
            )
    out = CARRY / "sftdata"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:-64]))
    (out / "validation.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[-64:]))
    print(f"prepared {len(rows)} rows in {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--profile", default="auto")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="/tmp/sft-proof")
    opts = ap.parse_args()
    if opts.prepare:
        return prepare()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.runtime.hardware import detect_machine, preflight, resolve_profile
    from tasks.runtime.launch import launch_training
    from tasks.sft.stage import SFTParams, make_job, train

    machine = detect_machine()
    profile = resolve_profile(opts.profile, machine)
    preflight(profile.requirement, machine)
    print(
        f"[proof] {machine.describe()}; profile {profile.name}: {profile.requirement.describe()} -> preflight passed",
        flush=True,
    )

    model_dir = Path("/tmp/proof-model")
    if not model_dir.exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CARRY / "smollm2"))
        model.save_pretrained(model_dir)
        for f in (CARRY / "smollm2").iterdir():
            if f.name.startswith(("tokenizer", "chat_template")):
                shutil.copy(f, model_dir / f.name)
    out = Path(opts.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = SFTParams(
        profile=opts.profile, max_steps=opts.steps, learning_rate=1e-3, eval_steps=4, save_steps=4, logging_steps=1
    )
    job = make_job(cfg, model_dir, CARRY / "sftdata", out / "scratch", profile)
    if profile.nproc > 1:
        launch_training("tasks.sft.stage", job, out / "job.json", profile.nproc)  # torchrun, as the task does
    else:
        train(job)
    final = Path(job["output_dir"])
    metrics = json.loads((final / "metrics.json").read_text())
    history = json.loads((final / "log_history.json").read_text())
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    for f in ("metrics.json", "curves.png", "log_history.json"):
        shutil.copy(final / f, out / f)
    print(
        f"[proof] {profile.name} on {torch.cuda.get_device_name(0)}: loss {losses[0][1]:.3f} (step {losses[0][0]}) -> "
        f"{losses[-1][1]:.3f} (step {losses[-1][0]}); metrics {json.dumps(metrics)}",
        flush=True,
    )


if __name__ == "__main__":
    main()
