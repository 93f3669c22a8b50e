"""How fast the SFT stage trained, counted as ``bench/sft_throughput.py`` counts it (issue 31).

The whole attempt's tokens/s includes the first steps' compilation and autotuning (26 s of a short
7B run on an H100), evaluation and checkpoints, so it reads as half the card's speed. The stage
reports three figures, all in ``metrics.json``, the run log and the SFT artifact:

- ``tokens_per_second``: non-pad tokens of this attempt / its training wall time (as before);
- ``steady_tokens_per_second``: tokens of the steps after the first ``WARMUP_STEPS``, over their time
  less the evaluation and checkpoint pauses between them (the GPU synchronised at each step end, as
  the bench does), so the two agree on the same rows;
- ``mfu``: the steady figure x model FLOPs per token / (the card's datasheet peak x processes).
  Model FLOPs per token for LoRA on a frozen base: forward 2N + input-gradient backward 2N over the
  linear layers (N counts lm_head, not the embedding or the adapters; recomputation by gradient
  checkpointing is not counted), plus causal attention 6 x layers x hidden x E[len^2]/E[len].
"""

from __future__ import annotations

import time
from typing import Any

# The bench's first two steps are warm-up too (bench/speed_runs.sh: --warmup 2).
WARMUP_STEPS = 2

# Dense bf16 (fp16 for the V100) tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by device name.
DATASHEET_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "V100": 125.0}


def datasheet_tflops(device_name: str) -> float | None:
    """The card's dense bf16 (V100: fp16) peak, or None for a card the table does not know."""
    return next((v for k, v in DATASHEET_TFLOPS.items() if k in device_name), None)


def lora_flops_per_token(model: Any, lengths: list[int]) -> float:
    """Model FLOPs per trained token of a LoRA step on a frozen base (module docstring), rows of ``lengths``."""
    total = sum(lengths)
    return lora_flops_at(model, sum(n * n for n in lengths) / total if total else 0.0)


def lora_flops_at(model: Any, length_moment: float) -> float:
    """``lora_flops_per_token`` from the rows' E[len^2] / E[len] (``tasks.sft.rows.RowStats``), no list of lengths."""
    import torch

    linear = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name  # the adapters' FLOPs are ~0.1%
    )
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    return 4.0 * linear + 6.0 * layers * hidden * length_moment


def steady_rate(
    steps: list[tuple[int, float, int]], paused: dict[int, float], warmup: int = WARMUP_STEPS
) -> tuple[float | None, int | None]:
    """Tokens/s over the steps after ``warmup`` and the step it starts after.

    ``steps``: (global step, time at its end, tokens seen by then), in order; ``paused``: seconds spent
    after a step's end in evaluation or saving, by step. Fewer than four steps: one step of warm-up;
    fewer than two: no steady figure."""
    if len(steps) < 2:
        return None, None
    skip = min(warmup, 1 if len(steps) < 4 else warmup)
    first, last = steps[skip - 1], steps[-1]
    seconds = last[1] - first[1] - sum(s for step, s in paused.items() if first[0] <= step < last[0])
    if seconds <= 0:
        return None, None
    return (last[2] - first[2]) / seconds, first[0]


def step_clock() -> Any:
    """A callback that times each optimizer step's end (GPU synchronised) and the evaluation and
    checkpoint pauses after it; ``summary()`` gives the steady figure."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[tuple[int, float, int]] = []
            self.paused: dict[int, float] = {}

        def _now(self) -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # a step's kernels are done when its time is taken
            return time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append((state.global_step, self._now(), int(state.num_input_tokens_seen)))

        def _pause(self, state) -> None:
            if self.steps and self.steps[-1][0] == state.global_step:
                self.paused[state.global_step] = self._now() - self.steps[-1][1]  # evaluation, then saving

        def on_evaluate(self, args, state, control, **kw):
            self._pause(state)

        def on_save(self, args, state, control, **kw):
            self._pause(state)

        def summary(self) -> tuple[float | None, int | None]:
            return steady_rate(self.steps, self.paused)

    return StepClock()


def speed_metrics(
    steady: float | None, after_step: int | None, flops_per_token: float, device_name: str | None, world: int
) -> dict[str, Any]:
    """The metrics.json entries beside ``tokens_per_second``."""
    peak = datasheet_tflops(device_name) if device_name else None
    mfu = steady * flops_per_token / (peak * 1e12 * world) if steady and peak else None
    return {
        "steady_tokens_per_second": steady,
        "steady_after_step": after_step,
        "model_flops_per_token": flops_per_token,
        "device": device_name or "cpu",
        "datasheet_tflops": peak,
        "mfu": mfu,  # against the datasheet's dense peak; None on a CPU or an unknown card
    }


def speed_line(metrics: dict[str, Any]) -> str:
    """One line for the run log: the steady figure first, then the whole run's."""
    steady, whole = metrics.get("steady_tokens_per_second"), metrics.get("tokens_per_second")
    parts = [f"steady {steady:,.0f} tokens/s after step {metrics['steady_after_step']}" if steady else "steady: n/a"]
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {metrics['mfu']:.1%} of {metrics['device']}'s {metrics['datasheet_tflops']:.0f} TFLOP/s")
    if whole:
        parts.append(f"whole run {whole:,.0f} tokens/s (compilation, evaluation and checkpoints included)")
    return "speed: " + "; ".join(parts)
