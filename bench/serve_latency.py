"""Serving latency: first-token latency and tokens/s for 1 and 16 concurrent streams, served merged
vs base + adapter (LoRA in vLLM), through the same OpenAI-compatible server ``tuneline serve`` runs.

    python bench/serve_latency.py [--base DIR] [--vllm-python PY] [--max-tokens 64] [--out bench.json]

Without ``--merged``/``--adapter`` it builds both from ``--base`` (default: SmolLM2-135M-Instruct): a
LoRA adapter (r 8, all linear layers, random non-zero B, seed 0) and that adapter merged into the base,
so both servers compute the same function. Each engine: ``tasks.release.serving.Engine`` (enforce-eager,
float32 on CPU); the LoRA one adds ``--enable-lora --lora-modules adapter=DIR``. Streams request
``ignore_eos`` so every answer has exactly ``--max-tokens`` tokens. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Write a short story about a quokka who learns to cook. Use simple words."


def build_adapter_and_merged(base: Path, out: Path) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    adapter, merged = out / "adapter", out / "merged"
    model.save_pretrained(adapter)
    model.merge_and_unload().save_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(base)
    tok.save_pretrained(merged)
    for f in ("chat_template.jinja",):
        if (base / f).exists():
            (merged / f).write_text((base / f).read_text())
    return adapter, merged


async def one_stream(client, url: str, model: str, max_tokens: int) -> tuple[float, int, float]:
    """(seconds to the first content token, completion tokens, seconds to the end)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    return first or float("nan"), tokens, time.perf_counter() - t0


async def measure(url: str, model: str, streams: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as client:
        await one_stream(client, url, model, 8)  # warm-up
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one_stream(client, url, model, max_tokens) for _ in range(streams)))
        wall = time.perf_counter() - t0
    ttft = [r[0] for r in runs]
    tokens = sum(r[1] for r in runs)
    return {
        "streams": streams,
        "ttft_median_s": round(statistics.median(ttft), 3),
        "ttft_max_s": round(max(ttft), 3),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "per_stream_tokens_per_s": round(statistics.median(r[1] / (r[2] - r[0]) for r in runs), 1),
    }


def main() -> int:
    from tasks.release.serving import Engine, vllm_python

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", default=None, help="LoRA adapter folder (with --merged)")
    ap.add_argument("--merged", default=None, help="the adapter merged into --base")
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="serve_latency.json")
    args = ap.parse_args()
    if args.base is None:
        from tasks.core.models import SMOLLM2_PACKAGE, resolve_model

        args.base = str(resolve_model(SMOLLM2_PACKAGE))
    python = vllm_python(args.vllm_python)
    work = Path(tempfile.mkdtemp(prefix="serve-latency-"))
    if args.adapter and args.merged:
        adapter, merged = Path(args.adapter), Path(args.merged)
    else:
        print(f"building a LoRA adapter and its merged model from {args.base} in {work}", flush=True)
        adapter, merged = build_adapter_and_merged(Path(args.base), work)

    class LoraEngine(Engine):
        def command(self):
            cmd, env = super().command()
            cmd += ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "1", "--lora-modules", f"adapter={adapter}"]
            return cmd, env

    results = []
    for label, engine, model in (
        ("merged", Engine(merged, work / "merged.log", python=python, name="merged", dtype=args.dtype), "merged"),
        (
            "base+adapter",
            LoraEngine(args.base, work / "lora.log", python=python, name="base", dtype=args.dtype),
            "adapter",
        ),
    ):
        with engine:
            print(f"{label}: engine up after {engine.startup_seconds:.0f}s", flush=True)
            for n in (int(c) for c in args.concurrency.split(",")):
                row = {"served": label, **asyncio.run(measure(engine.base_url, model, n, args.max_tokens))}
                print(json.dumps(row), flush=True)
                results.append(row)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    Path(args.out).write_text(
        json.dumps({"machine": machine, "max_tokens": args.max_tokens, "rows": results}, indent=2)
    )
    print(f"\n{machine}, {args.max_tokens} tokens per stream\n")
    print("| served | streams | first token (median / max) | tokens/s (all streams) | tokens/s per stream |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['served']} | {r['streams']} | {r['ttft_median_s']} s / {r['ttft_max_s']} s | {r['tokens_per_s']} "
            f"| {r['per_stream_tokens_per_s']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
