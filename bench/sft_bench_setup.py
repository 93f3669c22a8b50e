"""The SFT benches' shared parts: the model shapes, the synthetic rows, the card's matmul rate and
datasheet peak, the variant names (levers and TRL baselines) and the profiler summary. Used by
bench/sft_throughput.py (which re-exports them), bench/fsdp_memory.py and bench/sft_agreement.py.
"""

from __future__ import annotations

import re

QWEN2_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
TINY = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


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


def datasheet_tflops(device_name: str) -> float:
    """The card's datasheet peak as the stage reports it (tasks/sft/speed.py); NaN for an unknown card."""
    from tasks.sft.speed import datasheet_tflops as stage_table

    peak = stage_table(device_name)
    return float("nan") if peak is None else peak


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


def parse_variant(name: str) -> dict:
    """A lever variant's settings from its name: ``pack-b4x4-gc-liger`` = packing, 4 packed sequences
    per micro-batch x 4 accumulation steps, gradient checkpointing on, liger kernels; ``-nogc`` turns
    checkpointing off; ``-fp16`` runs the v100 profile's precision (fp16 autocast + loss scaler);
    ``-varlen`` uses the stage's packed-row attention (tasks/runtime/attention.py) instead of SDPA over the
    whole packed row; ``-nocast`` stops peft's fp32 copies of the adapter inputs
    (``tasks.sft.stage.skip_adapter_input_casts``)."""
    m = re.fullmatch(r"pack-b(\d+)x(\d+)-(gc|nogc)((?:-liger|-fp16|-varlen|-nocast)*)", name)
    if not m:
        raise SystemExit(
            f"unknown variant {name!r}: use baseline, stage, v100 or "
            "pack-b<B>x<A>-<gc|nogc>[-liger][-varlen][-nocast][-fp16]"
        )
    return dict(
        per_device_train_batch_size=int(m[1]),
        gradient_accumulation_steps=int(m[2]),
        gradient_checkpointing=m[3] == "gc",
        use_liger_kernel="-liger" in m[4],
        fp16="-fp16" in m[4],
        varlen="-varlen" in m[4],
        nocast="-nocast" in m[4],
    )


def parse_trl_variant(name: str) -> dict | None:
    """TRL's padding-free settings from ``trl-pf-b<B>-<gc|nogc>[-liger]``, or None for other names."""
    m = re.fullmatch(r"trl-pf-b(\d+)-(gc|nogc)(-liger)?", name)
    if not m:
        return None
    batch = int(m[1])
    return dict(
        padding_free=True,
        packing=False,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=max(1, 16 // batch),
        gradient_checkpointing=m[2] == "gc",
        use_liger_kernel=bool(m[3]),
    )


def trace_summary(prof, wall: float, micro_batches: int) -> dict:
    """Where one optimizer step's time goes: host (CPU) time of the ops, device kernel time, launches."""
    events = prof.key_averages()
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]  # device-side rows only
    device = sum(e.self_device_time_total for e in kernels) / 1e6
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "wall_s": wall,
        "device_busy_s": device,
        "device_busy_fraction": device / wall if wall else None,
        "micro_batches": micro_batches,
        "kernels_per_micro_batch": sum(e.count for e in kernels) / max(1, micro_batches),
        "aten_ops_per_micro_batch": sum(e.count for e in events if e.key.startswith("aten::")) / max(1, micro_batches),
        "host_op_s_per_micro_batch": sum(e.self_cpu_time_total for e in events) / 1e6 / max(1, micro_batches),
        "top_self_cpu": [(e.key, round(e.self_cpu_time_total / 1e6, 3), e.count) for e in top],
        "table": events.table(sort_by="self_cpu_time_total", row_limit=25),
    }
