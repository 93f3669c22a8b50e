"""SFT training speed: plain TRL baseline vs our stage's configuration, back to back on one card.

Issue 9. Prints one table (variant, non-pad tokens/s, MFU, peak GiB, final loss, ratio to baseline)
and writes the numbers as JSON. Both variants train the same model on the same rows:

- model: the Qwen2-7B architecture (config written here, random weights, no download), bf16;
- rows: alpaca-like lengths, 300-2048 tokens (300 + exponential, mean ~620), random token ids,
  loss on the last 60% of each row (the "assistant" part) through TRL's ``completion_mask``.
  Token ids are random, so losses say nothing about learning quality, only that training runs;
- LoRA r8 / alpha 32 / all-linear / dropout 0.05 in every variant.

Variants:
- ``baseline``: ``SFTConfig(bf16=True, per_device_train_batch_size=1, gradient_accumulation_steps=16,
  gradient_checkpointing=True, max_length=2048, packing=False)`` (plain TRL);
- ``stage``: ``tasks.sft.sft_config`` on the profile the stage picks on this card (its defaults:
  padding-free best-fit-decreasing packing to 2048 tokens);
- ``stage-no-gc``: the same without gradient checkpointing (a lever for cards with memory to spare).

Tokens/s counts non-pad input tokens (``num_input_tokens_seen``) between the end of the warm-up
steps and the last step, with the GPU synchronised at each step end. MFU = model FLOPs / (time x
the bf16 matmul rate measured in this run on an 8192^3 product). Model FLOPs per token for LoRA
with a frozen base: forward 2N + input-gradient backward 2N over the linear layers (N includes
lm_head, excludes the embedding; recomputation by gradient checkpointing is not counted) plus causal
attention 6 * layers * hidden * E[len^2]/E[len] per token (per row, as packing keeps rows apart).

Run (device machine; needs trl, datasets, pydantic wheels)::

    CUDA_VISIBLE_DEVICES=0 python bench/sft_throughput.py --out bench.json
    python bench/sft_throughput.py --tiny --steps 2 --warmup 1     # CPU smoke test of the script
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN2_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)
TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)


def make_rows(n: int, vocab: int, seed: int, lo: int = 300, hi: int = 2048, mean: int = 620):
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(lo + rng.exponential(mean - lo, n), lo, hi).astype(int)
    rows = []
    for length in lengths:
        ids = rng.integers(100, vocab - 100, length).tolist()  # no special/pad ids
        prompt = int(length * 0.4)
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (length - prompt)})
    return rows, lengths


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def run_variant(name, args_fn, model_cfg, tokenizer, rows, steps, warmup, cuda):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Qwen2Config, TrainerCallback
    from trl import SFTTrainer

    from tasks.sft import SFTParams, lora_config

    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**model_cfg), dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa")
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    args = args_fn()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora_config(SFTParams(lora_rank=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")),
                         callbacks=[Clock()])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (t0, k0), (t1, k1) = marks[warmup - 1], marks[-1]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "variant": name,
        "tokens_per_s": (k1 - k0) / (t1 - t0),
        "seconds_per_step": (t1 - t0) / (len(marks) - warmup),
        "tokens_per_step": (k1 - k0) / (len(marks) - warmup),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "final_loss": float(losses[-1]) if losses else float("nan"),
        "n_linear": n_linear,
        "gradient_checkpointing": args.gradient_checkpointing,
        "packing": args.packing,
        "measured_steps": len(marks) - warmup,
    }
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test of the script)")
    ap.add_argument("--steps", type=int, default=7, help="optimizer steps per variant, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    ap.add_argument("--tokenizer", default=".carry/smollm2", help="any tokenizer folder: only its pad id is used (data is pre-tokenized)")
    ap.add_argument("--variants", default="baseline,stage,stage-no-gc")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    opts = ap.parse_args()

    import torch
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from tasks.hardware import detect_machine, resolve_profile
    from tasks.sft import SFTParams, sft_config

    cuda = torch.cuda.is_available() and not opts.tiny
    model_cfg = TINY if opts.tiny else QWEN2_7B
    tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer)
    rows, lengths = make_rows(3000 if not opts.tiny else 400, model_cfg["vocab_size"], seed=0)
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = matmul_tflops() if cuda else float("nan")
    profile = resolve_profile("auto", detect_machine()) if cuda else resolve_profile("cpu")
    print(f"card: {card}; bf16 matmul {peak:.0f} TFLOP/s; stage profile {profile.name}; rows: mean {lengths.mean():.0f} "
          f"tokens, min {lengths.min()}, max {lengths.max()}", flush=True)
    tmp = Path("/tmp/sft-bench")
    common = dict(max_steps=opts.steps, logging_steps=1, save_strategy="no", report_to="none",
                  completion_only_loss=True, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)
    if opts.tiny:
        common.update(use_cpu=True)
    stage_cfg = SFTParams(max_steps=opts.steps, logging_steps=1)
    variants = {
        "baseline": lambda: SFTConfig(output_dir=str(tmp / "b"), bf16=cuda, per_device_train_batch_size=1, gradient_accumulation_steps=16,
                                      gradient_checkpointing=True, max_length=2048, packing=False, **common),
        "stage": lambda: sft_config(stage_cfg, profile, tmp / "s", evaluate=False, assistant_only_loss=False, bf16=cuda, **common),
        "stage-no-gc": lambda: sft_config(stage_cfg, profile, tmp / "n", evaluate=False, assistant_only_loss=False, bf16=cuda,
                                          gradient_checkpointing=False, **common),
    }
    e_len2 = float((lengths.astype(float) ** 2).mean() / lengths.mean())
    results = []
    for name in opts.variants.split(","):
        try:
            r = run_variant(name, variants[name], model_cfg, tokenizer, rows, opts.steps, opts.warmup, cuda)
        except torch.OutOfMemoryError as e:
            r = {"variant": name, "error": f"out of memory: {e}"[:200]}
        if "error" not in r:
            flops_tok = 4 * r["n_linear"] + 6 * model_cfg["num_hidden_layers"] * model_cfg["hidden_size"] * e_len2
            r["mfu"] = r["tokens_per_s"] * flops_tok / (peak * 1e12) if cuda else float("nan")
        results.append(r)
        print(json.dumps(r), flush=True)

    base = next((r for r in results if r["variant"] == "baseline" and "error" not in r), None)
    print(f"\n{card}, bf16 matmul {peak:.0f} TFLOP/s, Qwen2-7B architecture (random weights), LoRA r8/a32 all-linear")
    print(f"{'variant':<13} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>9} {'s/step':>7} {'tok/step':>9} {'final loss':>10} {'x base':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<13} {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(f"{r['variant']:<13} {r['tokens_per_s']:9.0f} {r['mfu']:6.1%} {r['peak_gib']:9.1f} {r['seconds_per_step']:7.2f} "
              f"{r['tokens_per_step']:9.0f} {r['final_loss']:10.3f} {ratio:7.2f}")
    if opts.out:
        Path(opts.out).write_text(json.dumps({"card": card, "matmul_tflops": peak, "profile": profile.name, "results": results,
                                              "rows_mean_len": float(lengths.mean())}, indent=2))


if __name__ == "__main__":
    main()
