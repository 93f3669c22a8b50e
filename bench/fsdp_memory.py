"""Sharded LoRA training (the ``fsdp`` profile) on two cards: per-card peak memory and tokens/s against
DDP, then a model that does not fit one card.

Issue 19. One ``torchrun`` run, every part in the same processes, one after the other:

- ``ddp``: the Qwen2-7B architecture (random weights, bf16) under the ``a100x2`` profile's settings
  (DDP: every process holds the whole model; checkpointing and packed sequences fitted to the card);
- ``fsdp``: the same model, rows and tokens per step under the ``fsdp`` profile: built on the meta
  device, sharded with FSDP2, each process initialising only its shards (``tasks.runtime.fsdp``), activation
  checkpointing per layer;
- ``big``: the Qwen2.5-72B architecture (145 GB in bf16: more than one 141 GB H200) under ``fsdp``,
  LoRA r8, rows of ``--big-seq`` tokens, a few optimizer steps. Before each try the per-card peak is
  estimated (``estimate_peak``); a size whose estimate exceeds the card, or that runs out of memory,
  is reported with its numbers and the next smaller Qwen2.5 (32B, 14B) is tried.

Rows, LoRA (r8/alpha32/all-linear) and timing are bench/sft_throughput.py's: tokens/s counts non-pad
input tokens over all processes between the end of the warm-up steps and the last step. Peak memory
is ``torch.cuda.max_memory_allocated`` of each process (the table shows the largest).

Run (device machine, 2 GPUs; carry .carry/wheels and .carry/smollm2 for the tokenizer's pad id)::

    torchrun --standalone --nproc_per_node 2 bench/fsdp_memory.py --out /tmp/fsdp.json
    torchrun --standalone --nproc_per_node 2 bench/fsdp_memory.py --tiny --tokenizer DIR   # CPU, gloo
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sft_throughput import QWEN2_7B, TINY, make_rows  # noqa: E402

_QWEN25 = dict(vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
QWEN25 = {
    "72B": dict(
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        **_QWEN25,
    ),
    "32B": dict(
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        **_QWEN25,
    ),
    "14B": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        **_QWEN25,
    ),
}
TINY_BIG = {"tiny-a": dict(TINY, num_hidden_layers=4), "tiny-b": TINY}


def parameter_counts(cfg: dict, r: int = 8) -> dict[str, int]:
    """Base parameters (all, per decoder layer, outside the layers) and LoRA parameters (all-linear)."""
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    attn = 2 * h * h + 2 * h * kv + h + 2 * kv  # q, o, k, v and the q/k/v biases
    layer = attn + 3 * h * i + 2 * h
    outside = 2 * v * h + h  # embedding, lm_head, final norm
    lora = n * r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    return {"base": n * layer + outside, "layer": layer, "outside": outside, "lora": lora}


def estimate_peak(cfg: dict, world: int, seq: int, checkpointing: bool = True) -> dict[str, float]:
    """Per-card peak (GiB) under fsdp: the bf16 shard, two gathered layers (the one computing and the
    prefetched one), the gathered embedding + LM head (the root unit stays gathered through the
    step), LoRA weights/gradients/Adam in fp32 (sharded), activations (checkpointed layer inputs, one
    layer's full activations, fp32 logits and their gradient) and 2 GiB of workspace."""
    p = parameter_counts(cfg)
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    layer_act = 2 * (10 * h + 3 * i)  # bytes per token of one layer's saved activations (memory_plan's)
    acts = seq * (2 * h * n + layer_act if checkpointing else layer_act * n) + 3 * seq * v * 4
    parts = {
        "shard": p["base"] * 2 / world,
        "gathered_layers": 2 * p["layer"] * 2,
        "gathered_root": p["outside"] * 2,
        "lora_and_adam": p["lora"] * 16 / world,
        "activations": acts,
        "workspace": 2 * 2**30,
    }
    out = {k: v / 2**30 for k, v in parts.items()}
    out["total"] = sum(out.values())
    out["model_gib_bf16"] = p["base"] * 2 / 2**30
    return out


def run(name, model, args, rows, tokenizer, peft_config, warmup, cuda) -> dict:
    """Train; time the steps after ``warmup``; the largest per-process peak."""
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Clock()],
    )
    if args.bf16:
        from tasks.sft.plan import skip_adapter_input_casts

        skip_adapter_input_casts(trainer.model)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0  # the model as built: whole or a shard
    trainer.train()
    (t0, k0), (t1, k1) = marks[warmup - 1], marks[-1]
    # NCCL gathers into the card's memory: every buffer on this rank's device (CPU ones crash it)
    here = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=here)
    peaks = [torch.zeros(1, device=here) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "variant": name,
        "tokens_per_s": (k1 - k0) / (t1 - t0),
        "seconds_per_step": (t1 - t0) / (len(marks) - warmup),
        "tokens_per_step": (k1 - k0) / (len(marks) - warmup),
        "peak_gib_per_card": [round(float(x), 2) for x in peaks],
        "peak_gib": max(float(x) for x in peaks),
        "resident_gib_before_training": round(resident, 2),
        "final_loss": float(losses[-1]) if losses else float("nan"),
        "micro_batch": args.per_device_train_batch_size,
        "accumulation": args.gradient_accumulation_steps,
        "processes": dist.get_world_size(),
    }
    del trainer
    return out


def free(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU, gloo (smoke test of the script)")
    ap.add_argument("--parts", default="ddp,fsdp,big", help="comma-separated: ddp, fsdp, big")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per 7B variant, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    ap.add_argument("--big-sizes", default="72B,32B,14B", help="Qwen2.5 sizes to try, largest first")
    ap.add_argument("--big-seq", type=int, default=1024, help="tokens per row (one row per process per step)")
    ap.add_argument("--big-steps", type=int, default=4, help="optimizer steps of the big model, warm-up included")
    ap.add_argument("--card-gib", type=float, default=0.0, help="plan for a card of this size (0: the card's)")
    ap.add_argument("--tokenizer", default=".carry/smollm2", help="any tokenizer folder (only its pad id is used)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    opts = ap.parse_args()

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from tasks.runtime.fsdp import build_sharded_lora, init_distributed, let_accelerate_shard_on_cpu
    from tasks.runtime.hardware import PROFILES
    from tasks.sft.plan import SFTParams, lora_config, memory_plan, sft_config, speed_settings

    cuda = torch.cuda.is_available() and not opts.tiny
    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    say = print if rank == 0 else (lambda *a, **k: None)
    card_gib = opts.card_gib or (torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0)
    tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer)
    base_cfg = TINY if opts.tiny else QWEN2_7B
    # tiny: short rows, so that the CPU run takes seconds (the sizes matter on GPUs only)
    rows, lengths = make_rows(
        *((400, TINY["vocab_size"], 0, 60, 256, 120) if opts.tiny else (3000, QWEN2_7B["vocab_size"], 0))
    )
    card = torch.cuda.get_device_name() if cuda else "cpu"
    say(f"{world} x {card} ({card_gib:.1f} GiB); rows mean {lengths.mean():.0f} tokens")
    lora = lora_config(SFTParams(lora_rank=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
    common = dict(
        evaluate=False,
        world=world,
        assistant_only_loss=False,
        completion_only_loss=True,
        bf16=cuda,
        save_strategy="no",
        logging_steps=1,
        **({"use_cpu": True} if not cuda else {}),
    )
    cfg = SFTParams(max_steps=opts.steps, max_length=256 if opts.tiny else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    results: list[dict] = []

    for part in opts.parts.split(","):
        if part == "ddp":
            config = Qwen2Config(**base_cfg)
            with torch.device("meta"):
                n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            prof = (
                memory_plan(PROFILES["a100x2"], config, n * 2, cfg.max_length, card_gib) if cuda else PROFILES["a100x2"]
            )
            attn, _, _ = speed_settings(prof, packing=True)
            torch.manual_seed(0)
            with device:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
            args = sft_config(cfg, prof, Path("/tmp/fsdp-bench/ddp"), mean_row_tokens=float(lengths.mean()), **common)
            results.append(
                {
                    **run("ddp (a100x2)", model, args, rows, tokenizer, lora, opts.warmup, cuda),
                    "model": "tiny" if opts.tiny else "Qwen2-7B",
                }
            )
        elif part == "fsdp":
            prof = PROFILES["fsdp"]
            attn, _, _ = speed_settings(prof, packing=True)
            model = build_sharded_lora(None, lora, dtype, attn, True, 0, config=Qwen2Config(**base_cfg))
            args = sft_config(cfg, prof, Path("/tmp/fsdp-bench/fsdp"), mean_row_tokens=float(lengths.mean()), **common)
            if not cuda:
                let_accelerate_shard_on_cpu()
            results.append(
                {
                    **run("fsdp", model, args, rows, tokenizer, None, opts.warmup, cuda),
                    "model": "tiny" if opts.tiny else "Qwen2-7B",
                }
            )
        elif part == "big":
            results += run_big(opts, world, card_gib, cuda, dtype, tokenizer, lora, common, say)
        else:
            raise SystemExit(f"--parts: unknown part {part!r} (ddp, fsdp, big)")
        model = None
        free(cuda)
        say(json.dumps(results[-1]), flush=True)

    say("\n| model | variant | processes | tokens/step | tokens/s | s/step | peak GiB per card | final loss |")
    say("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "tokens_per_s" in r:
            say(
                f"| {r['model']} | {r['variant']} | {r['processes']} | {r['tokens_per_step']:,.0f} | "
                f"{r['tokens_per_s']:,.0f} | {r['seconds_per_step']:.2f} | {r['peak_gib_per_card']} | "
                f"{r['final_loss']:.3f} |"
            )
        else:
            say(f"| {r['model']} | {r['variant']} | {world} | — | — | — | {r['reason']} | — |")
    if rank == 0 and opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


def run_big(opts, world, card_gib, cuda, dtype, tokenizer, lora, common, say) -> list[dict]:
    """The largest Qwen2.5 size of ``--big-sizes`` that trains: each size estimated first, then tried."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import Qwen2Config

    from tasks.runtime.fsdp import build_sharded_lora, let_accelerate_shard_on_cpu
    from tasks.runtime.hardware import PROFILES
    from tasks.sft.plan import SFTParams, sft_config, speed_settings

    sizes = TINY_BIG if opts.tiny else {s: QWEN25[s] for s in opts.big_sizes.split(",")}
    prof = PROFILES["fsdp"]
    attn, _, _ = speed_settings(prof, packing=False)
    out: list[dict] = []
    for size, model_cfg in sizes.items():
        est = estimate_peak(model_cfg, world, opts.big_seq)
        say(
            f"[big] Qwen2.5-{size}: {est['model_gib_bf16']:.1f} GiB bf16; estimated per-card peak on {world} cards: "
            + ", ".join(f"{k} {v:.1f}" for k, v in est.items() if k != "model_gib_bf16")
            + " GiB",
            flush=True,
        )
        row = {"model": f"Qwen2.5-{size}", "variant": "fsdp", "estimate_gib": est, "card_gib": card_gib}
        if card_gib and est["total"] > 0.95 * card_gib:
            out.append({**row, "reason": f"estimate {est['total']:.1f} GiB > 95% of {card_gib:.1f} GiB: not tried"})
            continue
        rng = np.random.default_rng(0)
        rows = [
            {"input_ids": ids, "completion_mask": [0] * (opts.big_seq // 2) + [1] * (opts.big_seq - opts.big_seq // 2)}
            for ids in rng.integers(100, model_cfg["vocab_size"] - 100, (64, opts.big_seq)).tolist()
        ]
        cfg = SFTParams(
            max_steps=opts.big_steps, packing=False, per_device_batch_size=1, gradient_accumulation_steps=world
        )
        ok, result = 1, {}
        try:
            t = time.perf_counter()
            model = build_sharded_lora(None, lora, dtype, attn, True, 0, config=Qwen2Config(**model_cfg))
            built = time.perf_counter() - t
            args = sft_config(cfg, prof, Path(f"/tmp/fsdp-bench/{size}"), max_length=opts.big_seq, **common)
            if not cuda:
                let_accelerate_shard_on_cpu()
            result = run(f"fsdp, rows of {opts.big_seq}", model, args, rows, tokenizer, None, 1, cuda)
            result["build_seconds"] = built
        except torch.OutOfMemoryError as e:  # both cards hold the same shapes: both run out together
            ok, result = 0, {"reason": f"out of memory: {str(e).splitlines()[0][:160]}"}
        model = None
        free(cuda)
        flag = torch.tensor([ok], device="cuda" if cuda else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        out.append({**row, **result, "model": f"Qwen2.5-{size}"})
        if flag.item():
            break
    return out


if __name__ == "__main__":
    main()
