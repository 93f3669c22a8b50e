"""A check for tests/test_fsdp.py, run under torchrun (gloo): ``torchrun ... -m tests.fsdp_worker MODEL_DIR OUT``.

Builds the sharded LoRA model exactly as the ``fsdp`` profile does (``tasks.runtime.fsdp.build_sharded_lora``)
and writes, per process, what it holds (its local share of the base's elements), whether every weight
gathered back equals the checkpoint's, and the logits of a fixed batch (a fresh adapter adds zero, so
they must be the plain model's).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tasks.runtime.fsdp import build_sharded_lora, hf_name
from tasks.sft.plan import SFTParams, lora_config


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    model = build_sharded_lora(model_dir, lora_config(SFTParams()), torch.float32, "sdpa", True, seed=0)
    rank = dist.get_rank()
    saved = {}
    for f in model_dir.glob("*.safetensors"):
        saved.update(load_file(str(f)))
    local = total = 0
    worst = 0.0
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        local += value.to_local().numel()
        total += value.numel()
        full = value.full_tensor()  # a collective: every rank, same order
        name = hf_name(key)
        if name in saved:
            worst = max(worst, (full - saved[name].float()).abs().max().item())
    batch = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    (out / f"rank{rank}.json").write_text(
        json.dumps({"local": local, "total": total, "max_weight_diff": worst, "logits": logits.tolist()})
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
