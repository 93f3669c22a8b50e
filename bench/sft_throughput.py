"""SFT training speed: plain TRL baseline vs our stage's configuration, back to back on one card.

Issue 9. Prints one table (variant, non-pad tokens/s, MFU, peak GiB, final loss, ratio to baseline)
and writes the numbers as JSON. Both variants train the same model on the same rows:

- model: the Qwen2-7B architecture (config written here, random weights, no download), bf16;
- rows: alpaca-like lengths, 300-2048 tokens (300 + exponential, mean ~620), random token ids,
  loss on the last 60% of each row (the "assistant" part) through TRL's ``completion_mask``.
  Token ids are random, so losses say nothing about learning quality, only that training runs;
- LoRA r8 / alpha 32 / all-linear / dropout 0.05 in every variant.

Variants (``--variants``, comma-separated):
- ``baseline``: ``SFTConfig(bf16=True, per_device_train_batch_size=1, gradient_accumulation_steps=16,
  gradient_checkpointing=True, max_length=2048, packing=False)`` (plain TRL);
- ``stage``: ``tasks.sft.stage.sft_config`` as the stage runs it on this card: padding-free best-fit-
  decreasing packing to 2048 tokens, the batch plan (tokens per step of 16 rows), checkpointing and
  packed sequences per micro-batch fitted to the card (``memory_plan``), SDPA once per packed row,
  liger kernels, no fp32 copies of adapter inputs; ``stage:80`` plans as if the card had 80 GiB
  (an H100); ``v100``: the v100 profile (fp16, checkpointing, one packed sequence per micro-batch);
  ``a100x2[:GIB]``: that profile on as many processes as ``torchrun`` starts;
- levers, one at a time: ``pack-b<B>x<A>-<gc|nogc>[-liger][-varlen][-nocast][-fp16]`` (``parse_variant``);
- ``trl-pf-b<B>-<gc|nogc>[-liger]``: what a user who reads TRL's docs runs (issue 18): TRL's
  padding-free batches of B rows (``padding_free=True``, no packing, SDPA), B x (16 / B) rows per
  step, liger kernels with ``-liger``;
- suffixes on any variant: ``@loop`` attends packed rows with the per-row SDPA loop instead of
  torch's one-launch varlen kernel (``tasks/runtime/attention.py``; the lever of issue 18), ``+compile``
  compiles every decoder layer (with its LoRA adapters) with ``torch.compile`` (the stage's own
  variants compile where the stage does: ``Profile.compiles``), ``+noliger`` turns liger's kernels
  off (its Triton functions break the compiled graph; liger patches transformers' classes for the
  whole process, so a ``+noliger`` variant must come before any liger one), ``+fp8`` computes the frozen
  base's linear layers in FP8 (``sft.precision=fp8``, torchao: tasks/sft/fp8.py; MFU stays counted
  against the bf16 peak, so an fp8 variant can pass 100% of "MFU" only in name).

Tokens/s counts non-pad input tokens (``num_input_tokens_seen``) between the end of the warm-up
steps and the last step, with the GPU synchronised at each step end. MFU = model FLOPs / (time x
the bf16 matmul rate measured in this run on an 8192^3 product). Model FLOPs per token for LoRA
with a frozen base: forward 2N + input-gradient backward 2N over the linear layers (N includes
lm_head, excludes the embedding; recomputation by gradient checkpointing is not counted) plus causal
attention 6 * layers * hidden * E[len^2]/E[len] per token (per row, as packing keeps rows apart).

Run (device machine; needs trl, datasets, pydantic, liger-kernel wheels)::

    CUDA_VISIBLE_DEVICES=0 python bench/sft_throughput.py --out bench.json
    torchrun --standalone --nproc_per_node 2 bench/sft_throughput.py --variants a100x2   # two cards
    CUDA_VISIBLE_DEVICES=0 python bench/sft_throughput.py --measure-tokens 40000 \
        --variants baseline,trl-pf-b8-nogc-liger,stage:80@loop,stage:80,stage:80+compile   # issue 18
    python bench/sft_throughput.py --tiny --steps 2 --warmup 1     # CPU smoke test of the script
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

from bench.sft_bench_setup import (  # noqa: E402  (after the path insert above); re-exported for the other benches
    QWEN2_7B,
    TINY,
    datasheet_tflops,
    make_rows,
    matmul_tflops,
    parse_trl_variant,
    parse_variant,
    trace_summary,
)

__all__ = ["QWEN2_7B", "TINY", "make_rows", "parse_variant", "parse_trl_variant"]


def run_variant(
    name,
    args_fn,  # a variant's SFTConfig, built when it runs
    model_cfg,
    tokenizer,
    rows,
    steps,
    warmup,
    cuda,
    trace=False,
    attn="sdpa",
    nocast=False,
    measure_tokens=0,
    mean_len=620.0,
    compile_layers=False,
    fp8=False,
):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Qwen2Config, TrainerCallback
    from trl import SFTTrainer

    from tasks.runtime.attention import ATTENTION, register
    from tasks.runtime.attention import backend as packed_backend
    from tasks.sft.stage import SFTParams, lora_config, skip_adapter_input_casts

    register()  # also reads TUNELINE_PACKED_ATTENTION, set per variant by main()

    args = args_fn()
    if "+noliger" in name:
        args.use_liger_kernel = False
    if measure_tokens:  # enough timed steps for ~measure_tokens tokens, at least 3
        per_step = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * (2000 if args.packing else mean_len)
        )
        per_step *= int(os.environ.get("WORLD_SIZE", "1"))
        steps = warmup + max(3, -(-measure_tokens // int(per_step)))
        args.max_steps = steps
    if trace:
        args.max_steps = steps + 1
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        dtype = (torch.float16 if args.fp16 else torch.bfloat16) if cuda else torch.float32
        model = AutoModelForCausalLM.from_config(Qwen2Config(**model_cfg), dtype=dtype, attn_implementation=attn)
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if fp8:  # the stage's sft.precision=fp8: the frozen base's linear layers in FP8 (tasks/sft/fp8.py)
        from tasks.sft.fp8 import convert_base_to_fp8

        convert_base_to_fp8(model)
    marks: list[tuple[float, int]] = []
    traced: dict = {}

    class Clock(TrainerCallback):
        """Times each optimizer step; with ``trace``, profiles one extra step after the timed ones."""

        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if trace and state.global_step == steps:
                if cuda:
                    torch.cuda.synchronize()
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            if self.prof is not None:
                wall = time.perf_counter() - self.t
                self.prof.__exit__(None, None, None)
                traced.update(trace_summary(self.prof, wall, args.gradient_accumulation_steps))
                self.prof = None
                return
            marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(SFTParams(lora_rank=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")),
        callbacks=[Clock()],
    )
    if nocast:
        skip_adapter_input_casts(trainer.model)
    if compile_layers:
        from tasks.sft.plan import compile_decoder_layers

        compile_decoder_layers(trainer.model)
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
        "micro_batch": args.per_device_train_batch_size,
        "accumulation": args.gradient_accumulation_steps,
        "liger": bool(args.use_liger_kernel),
        "dtype": "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
        "attention": attn if attn != ATTENTION else f"{ATTENTION} ({packed_backend()})",
        "adapter_input_casts": not nocast,
        "compiled_layers": compile_layers,
        "fp8_base": fp8,
    }
    if traced:
        out["trace"] = traced
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
    ap.add_argument(
        "--measure-tokens",
        type=int,
        default=0,
        help="time each variant over about this many tokens (at least 3 steps) instead of --steps",
    )
    ap.add_argument(
        "--tokenizer",
        default=".carry/smollm2",
        help="any tokenizer folder: only its pad id is used (data is pre-tokenized)",
    )
    ap.add_argument(
        "--variants",
        default="baseline,stage,stage:80,v100",
        help="comma-separated: baseline, stage (the stage's defaults on this card), stage:GIB (its plan for a "
        "card of GIB GiB), v100 (the v100 profile's settings: fp16, its batch and checkpointing), "
        "a100x2[:GIB] (that profile's settings, as many processes as torchrun starts), or a lever "
        "pack-b<B>x<A>-<gc|nogc>[-liger][-varlen][-nocast][-fp16], or trl-pf-b<B>-<gc|nogc>[-liger] (TRL's "
        "padding-free batches); suffix @loop (packed rows by the per-row loop), +compile (compiled layers) or "
        "+fp8 (the frozen base's linear layers in FP8, sft.precision=fp8)",
    )
    ap.add_argument(
        "--trace", default="", help="comma-separated variants to profile (torch.profiler) over one extra step"
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    opts = ap.parse_args()

    import torch
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from tasks.runtime.attention import ATTENTION
    from tasks.runtime.hardware import PROFILES, detect_machine, resolve_profile
    from tasks.sft.stage import SFTParams, memory_plan, sft_config, speed_settings

    cuda = torch.cuda.is_available() and not opts.tiny
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if cuda and world > 1:  # under torchrun: one card per process (the Trainer runs DDP)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    say = print if rank == 0 else (lambda *a, **k: None)
    model_cfg = TINY if opts.tiny else QWEN2_7B
    tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer)
    rows, lengths = make_rows(3000 if not opts.tiny else 400, model_cfg["vocab_size"], seed=0)
    card = (f"{world} x " if world > 1 else "") + (torch.cuda.get_device_name() if cuda else "cpu")
    peak = matmul_tflops() if cuda else float("nan")
    sheet = datasheet_tflops(torch.cuda.get_device_name()) if cuda else float("nan")
    profile = resolve_profile("auto", detect_machine()) if cuda else resolve_profile("cpu")
    say(
        f"card: {card}; bf16 matmul {peak:.0f} TFLOP/s; stage profile {profile.name}; rows: mean {lengths.mean():.0f} "
        f"tokens, min {lengths.min()}, max {lengths.max()}",
        flush=True,
    )
    tmp = Path("/tmp/sft-bench")
    common = dict(
        max_steps=opts.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
    )
    if opts.tiny:
        common.update(use_cpu=True)
    stage_cfg = SFTParams(max_steps=opts.steps, logging_steps=1)
    card_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30 if cuda else 0.0

    def fitted(prof, gib: float | None = None):
        """The profile as the stage fits it to this card (or to a card of ``gib`` GiB) for this model."""
        from transformers import AutoModelForCausalLM, Qwen2Config

        config = Qwen2Config(**model_cfg)
        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        return memory_plan(prof, config, params * 2, 2048, gib or card_gib) if cuda else prof

    variants = {
        "baseline": lambda: SFTConfig(
            output_dir=str(tmp / "b"),
            bf16=cuda,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=16,
            gradient_checkpointing=True,
            max_length=2048,
            packing=False,
            **common,
        ),
        "stage": lambda: sft_config(
            stage_cfg,
            fitted(profile),
            tmp / "s",
            evaluate=False,
            assistant_only_loss=False,
            bf16=cuda,
            mean_row_tokens=float(lengths.mean()),
            **common,
        ),
        "a100x2": lambda: sft_config(
            stage_cfg,
            fitted(PROFILES["a100x2"]),
            tmp / "a",
            world=world,
            evaluate=False,
            assistant_only_loss=False,
            bf16=cuda,
            mean_row_tokens=float(lengths.mean()),
            **common,
        ),
        "v100": lambda: sft_config(
            stage_cfg,
            PROFILES["v100"],
            tmp / "v",
            evaluate=False,
            assistant_only_loss=False,
            fp16=cuda,
            bf16=False,
            mean_row_tokens=float(lengths.mean()),
            **common,
        ),
    }
    # how each variant runs: (attention implementation, peft's adapter-input casts skipped)
    how = {
        "baseline": ("sdpa", False),
        **{
            name: speed_settings(prof, packing=True)[::2]
            for name, prof in (("stage", profile), ("v100", PROFILES["v100"]), ("a100x2", PROFILES["a100x2"]))
        },
    }

    def plain(name: str) -> str:  # the variant without its @loop / +compile suffixes
        return name.replace("@loop", "").replace("+compile", "").replace("+noliger", "").replace("+fp8", "")

    for name in map(plain, opts.variants.split(",")):
        if name in variants:
            continue
        if (trl := parse_trl_variant(name)) is not None:
            how[name] = ("sdpa", False)
            if not cuda:
                trl.update(use_liger_kernel=False)
            variants[name] = lambda trl=trl, name=name: SFTConfig(
                # rows are at most 2048 tokens already; TRL refuses max_length with padding-free unpacked batches
                output_dir=str(tmp / name),
                bf16=cuda,
                max_length=None,
                **{**common, **trl},
            )
        elif name.startswith(("stage:", "a100x2:")):  # the stage's plan for a card of that many GiB (stage:80: H100)
            base, gib = name.split(":")
            prof = profile if base == "stage" else PROFILES["a100x2"]
            how[name] = how[base]
            variants[name] = lambda prof=prof, gib=float(gib), name=name: sft_config(
                stage_cfg,
                fitted(prof, gib),
                tmp / name.replace(":", "-"),
                world=world,
                evaluate=False,
                assistant_only_loss=False,
                bf16=cuda,
                mean_row_tokens=float(lengths.mean()),
                **common,
            )
        else:
            lever = parse_variant(name)
            how[name] = (ATTENTION if lever.pop("varlen") else "sdpa", lever.pop("nocast"))
            if not cuda:
                lever.update(fp16=False, use_liger_kernel=False)  # CPU smoke test: fp32, no Triton
            variants[name] = lambda lever=lever, name=name: sft_config(
                stage_cfg,
                profile,
                tmp / name,
                evaluate=False,
                assistant_only_loss=False,
                **{"bf16": cuda and not lever["fp16"], **common, **lever},
            )
    # the stage's own choice for its variants: compiled decoder layers where its fitted plan says so
    stage_compiles = {"stage": fitted(profile).compiles(), "a100x2": fitted(PROFILES["a100x2"]).compiles()}
    for name in map(plain, opts.variants.split(",")):
        if name.startswith(("stage:", "a100x2:")):
            base, gib = name.split(":")
            stage_compiles[name] = fitted(profile if base == "stage" else PROFILES["a100x2"], float(gib)).compiles()
    trace = set(filter(None, opts.trace.split(",")))
    e_len2 = float((lengths.astype(float) ** 2).mean() / lengths.mean())
    results = []
    for name in opts.variants.split(","):
        os.environ["TUNELINE_PACKED_ATTENTION"] = "loop" if "@loop" in name else "auto"
        try:
            attn, nocast = how[plain(name)]
            r = run_variant(
                name,
                variants[plain(name)],
                model_cfg,
                tokenizer,
                rows,
                opts.steps,
                opts.warmup,
                cuda,
                trace=name in trace,
                attn=attn,
                nocast=nocast,
                measure_tokens=opts.measure_tokens,
                mean_len=float(lengths.mean()),
                compile_layers="+compile" in name or (stage_compiles.get(plain(name), False) and cuda),
                fp8="+fp8" in name,
            )
        except torch.OutOfMemoryError as e:
            r = {"variant": name, "error": f"out of memory: {e}"[:200]}
        if "error" not in r:
            flops_tok = 4 * r["n_linear"] + 6 * model_cfg["num_hidden_layers"] * model_cfg["hidden_size"] * e_len2
            r["mfu"] = r["tokens_per_s"] * flops_tok / (peak * 1e12 * world) if cuda else float("nan")
            r["mfu_datasheet"] = r["tokens_per_s"] * flops_tok / (sheet * 1e12 * world) if cuda else float("nan")
            r["processes"] = world
        results.append(r)
        if "trace" in r:
            say(r["trace"].pop("table"), flush=True)
        say(json.dumps(r), flush=True)
        if opts.out and rank == 0:  # partial results survive a run cut short
            Path(opts.out).write_text(json.dumps({"card": card, "results": results}, indent=2))

    base = next((r for r in results if r["variant"] == "baseline" and "error" not in r), None)
    say(f"\n{card}, bf16 matmul {peak:.0f} TFLOP/s measured, {sheet:.0f} datasheet; MFU vs measured | datasheet")
    say("Qwen2-7B architecture (random weights), LoRA r8/a32 all-linear")
    say(
        f"{'variant':<26} {'tokens/s':>9} {'MFU':>6} {'sheet':>6} {'peak GiB':>9} {'s/step':>7} {'tok/step':>9} "
        f"{'final loss':>10} "
        f"{'x base':>7} {'GPU busy':>8}"
    )
    for r in results:
        if "error" in r:
            say(f"{r['variant']:<26} {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        busy = r.get("trace", {}).get("device_busy_fraction")
        say(
            f"{r['variant']:<26} {r['tokens_per_s']:9.0f} {r['mfu']:6.1%} {r['mfu_datasheet']:6.1%} "
            f"{r['peak_gib']:9.1f} "
            f"{r['seconds_per_step']:7.2f} "
            f"{r['tokens_per_step']:9.0f} {r['final_loss']:10.3f} {ratio:7.2f} {'' if busy is None else f'{busy:8.0%}'}"
        )
    if opts.out and rank == 0:
        Path(opts.out).write_text(
            json.dumps(
                {
                    "card": card,
                    "matmul_tflops": peak,
                    "datasheet_tflops": sheet,
                    "profile": profile.name,
                    "results": results,
                    "rows_mean_len": float(lengths.mean()),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
