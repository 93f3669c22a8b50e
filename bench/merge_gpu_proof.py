"""GPU proof of the merge stage's plain function (``device="cuda"``), for the device machine.

Builds a SmolLM2-architecture model with random weights from ``.carry/smollm2`` (config and
tokenizer; the real 538 MB weights do not fit the upload limit), a LoRA adapter whose B matrices
are non-zero (so the adapter really moves the logits), then merges in bf16 and fp16 on the GPU and
verifies the saved folder against base + adapter. No Prefect needed.

    python3 bench/merge_gpu_proof.py .carry/smollm2 $OUT/merge
    MERGE_DEVICE=cpu python bench/merge_gpu_proof.py .carry/smollm2 /tmp/merge   # the same on CPU
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tasks.merge.stage import MergeParams, merge


def main(model_src: str, out: str) -> None:
    work = Path(out)
    base_dir, adapter_dir = work / "base", work / "adapter"
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_src)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_src)
    tokenizer.save_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():  # a trained-looking adapter: B moved off zero, about as far as after a short SFT
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    rows = []
    for dtype in ("fp32", "bf16", "fp16"):
        start = time.perf_counter()
        metrics = merge(
            MergeParams(device=os.environ.get("MERGE_DEVICE", "cuda")),
            str(base_dir),
            adapter_dir,
            work / f"merged-{dtype}",
            dtype,
        )
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        rows.append({"dtype": dtype, **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}})
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
