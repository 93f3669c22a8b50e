"""How far do merged logits move from base + adapter when the merged weights are cast to 16 bits?

Calibrates ``tasks.merge.stage.TOLERANCE``: merges a LoRA adapter (rank 8, all linear layers, B weights
drawn so that the adapter changes the logits about as much as a fine-tune does) into SmolLM2-135M-
Instruct in fp32, fp16 and bf16, and prints max |Δlogit| beside max |logit| and the tolerance used.

    python bench/merge_tolerance.py            # CPU; ~1 min
    python bench/merge_tolerance.py --device cuda
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from tasks.core.models import SMOLLM2_PACKAGE, resolve_model
from tasks.merge.stage import TOLERANCE, MergeError, merge_and_save, verify_merged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--b-std", type=float, default=0.02, help="std of the LoRA B weights")
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = resolve_model(SMOLLM2_PACKAGE)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=8, lora_alpha=32, target_modules="all-linear")
        )
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=args.b_std)
        model.save_pretrained(adapter)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(adapter)
        dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
        print(f"machine: {dev}; model: SmolLM2-135M-Instruct; LoRA r=8 all-linear, B ~ N(0, {args.b_std}²)")
        print(f"{'dtype':6} {'max|Δlogit|':>12} {'max|logit|':>11} {'Δ/max':>9} {'tolerance':>10}  size")
        for dtype in ("fp32", "fp16", "bf16"):
            out = Path(tmp) / dtype
            ref = merge_and_save(str(base_dir), adapter, out, dtype, args.device)
            try:
                m = verify_merged(out, ref, dtype, args.device)
            except MergeError as e:
                print(dtype, "FAILED", e)
                continue
            print(
                f"{dtype:6} {m['max_logit_diff']:12.4g} {m['max_abs_logit']:11.4g} "
                f"{m['max_logit_diff'] / m['max_abs_logit']:9.2e} {m['tolerance']:10.4g}  {m['size_bytes'] / 1e6:.0f} "
                "MB"
            )
        print("rtol by dtype:", {k: v[1] for k, v in TOLERANCE.items()})


if __name__ == "__main__":
    main()
